"""Runtime state of the upstream accounts: in-flight leases, cooldowns, usage, affinity.

The pool is the single owner of mutable account state; both transports go through it. It
lets the pure balancer choose by reading that state (``balancer.Contender``). Times
are wall-clock epoch seconds because the upstream speaks in epoch reset times.

Credentials are not the pool's: each ``Account`` holds a reference to the credential manager's
record (``refresh.LiveCredentials``) and reads them there, so a refresh or a newer
``auth.json`` is seen at once. What the pool derives from them is computed from the record when
asked: an account is usable while its credentials are, unless the upstream refused those very
credentials (``Pool.unauthorized``); what was learned (cooldowns, usage) belongs to the upstream
identity the credentials name (an API key, a ChatGPT account id) and is forgotten when they
name another.

Error cooldowns count *requests*, not attempts (see ``Pool.failed``): an upstream that cannot
process one request fails it on every account, and a client repeating it must not cool down the
pool. Credentials refused even fresh (a second 401) take an account out, but not for good: one
request tries them again after ``unauthorized_retry_seconds``, doubling (``Pool.unauthorized``).

``reconfigure`` applies a reloaded configuration (S6) without losing what was learned: an
account is identified by its name, and an unchanged name keeps its ``Account`` object (so its
cooldowns, usage, error streak and in-flight count survive). A removed account leaves the
choice at once; while leases still hold it, it is kept aside as *draining* so those requests
finish and release it normally, and so the status view can show it.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from codexlb import balancer, pool_view, reported
from codexlb.config import AccountConfig, Config, RoutingConfig
from codexlb.credentials import Credentials
from codexlb.errors import CodexLBError, PoolBusy, UpstreamUnavailable, UsageLimitReached
from codexlb.knowledge import Knowledge, credentials_fingerprint, identity_fingerprint
from codexlb.refresh import CredentialManager, LiveCredentials

log = logging.getLogger(__name__)

AFFINITY_CAPACITY = 20_000
"""Affinity entries kept; the least recently used goes first."""
AFFINITY_KEY_LENGTH = 128
"""A longer affinity key (a client's ``session-id``, ``prompt_cache_key``...) is kept as its
SHA-256: a client cannot make the pool hold kilobytes per entry."""
FAILED_REQUESTS_REMEMBERED = 16
"""Requests an account remembers failing since its last success (``Learned.failed_requests``)."""
TURN_STATE_SECONDS = 6 * 3600.0
"""How long the issuer of a turn state is remembered: longer than any turn."""
VIEW_SECONDS = 1.0
"""How long the client's view of the pool is reused while nothing it is made of changes."""
VIEWS_CACHED = 64
"""Views kept at once (one per set of accounts client keys may use)."""
SUSPECTS_CAPACITY = 4096
SUSPECT_SECONDS = 600.0
"""How long a request that failed on two accounts stays suspect (``Pool.give_up``)."""

RequestId = bytes
"""What makes two requests "the same request" (``exchange.request_id``): a digest of the
client key's scope and the body it sent."""

AccountState = Literal[
    "draining", "disabled", "unusable", "rate_limited", "cooling_down", "busy", "ok"
]
"""One word for an account, in the order it is decided: ``draining`` (removed from the
configuration, still finishing the requests it carries), ``disabled`` (by the operator),
``unusable`` (credentials refused or unreadable), ``rate_limited`` (a 429 cooldown, or a usage
window at 100% until its reset), ``cooling_down`` (backing off after errors), ``busy`` (at its
``max_inflight``), else ``ok``."""


@dataclass(slots=True)
class UsageWindow:
    used_percent: float = 0.0
    resets_at: float = 0.0
    window_minutes: int | None = None
    reported: bool = False
    """Whether the upstream ever reported this window for the account."""

    def full_until(self) -> float:
        """When a window that is used up resets (0 when it is not used up, or unknown)."""
        return self.resets_at if self.used_percent >= 100.0 else 0.0


Identity = tuple[str | None, str | None]
"""Which upstream account credentials speak for: (API key, ChatGPT account id)."""


@dataclass(slots=True)
class Learned:
    """What the pool learned about one upstream identity."""

    identity: Identity
    cooldown_until: float = 0.0
    rate_limited_until: float = 0.0
    """The part of ``cooldown_until`` owed to a rate limit (the rest is error back-off)."""
    error_streak: int = 0
    failed_requests: list[RequestId] = field(default_factory=list)
    """The requests that met a server failure on it since its last success, the latest
    ``FAILED_REQUESTS_REMEMBERED``: a request failing again adds nothing to the streak."""
    primary: UsageWindow = field(default_factory=UsageWindow)
    secondary: UsageWindow = field(default_factory=UsageWindow)
    credits: pool_view.Credits | None = None
    reported_headers: tuple[str | None, ...] = ()
    """The usage headers last learned from, as received: the same again teach nothing."""
    reported_event: Any = None
    """The ``codex.rate_limits`` event last learned from (parsed): the same again teaches
    nothing either (its reset times are absolute)."""
    usage_at: float = 0.0
    """When the usage windows were last reported (other replicas' reports included)."""


@dataclass(slots=True)
class Account:
    """One upstream account and what the pool has learned about it."""

    config: AccountConfig
    base_url: str
    live: LiveCredentials
    """The credential manager's record of this account: read, never copied."""
    leased: int = 0
    """Requests in flight on it in this process."""
    elsewhere: int = 0
    """Requests in flight on it in the other live replicas (S12; 0 with one process)."""
    refused: Credentials | None = None
    """The credentials the upstream refused even fresh: unusable while the record holds them,
    but for one request now and then (``retry_at``)."""
    retry_at: float = 0.0
    """When one request may try the refused credentials again (0: never)."""
    retry_delay: float = 0.0
    """The wait before that try; doubles each time they are refused again."""
    refused_at: float = 0.0
    """When the credentials were last refused or accepted again (ordering replicas' news)."""
    failure: str | None = None
    """The last failure seen on the account (a rate limit, an error)."""
    removed: bool = False
    """Taken out of the configuration; the pool keeps it only while requests hold it."""
    name: str = field(init=False)
    """``config.name``, kept as a plain attribute: the balancer reads it for every account on
    every choice, and an account keeps its name for life (the pool is keyed by it)."""
    _learned: Learned = field(init=False)
    _followed: Credentials = field(init=False)
    """The record's credentials ``_learned`` was last checked against."""

    def __post_init__(self) -> None:
        self.name = self.config.name
        self._followed = self.live.credentials
        self._learned = Learned(_identity(self._followed))

    @property
    def credentials(self) -> Credentials:
        """What to send upstream now (the record's, as the credential manager keeps it)."""
        return self.live.credentials

    @property
    def learned(self) -> Learned:
        """What was learned about the upstream identity the credentials name now: a fresh
        start when they name another one than before."""
        credentials = self.live.credentials
        if credentials is not self._followed:  # renewed: the same identity, most likely
            self._followed = credentials
            identity = _identity(credentials)
            if self._learned.identity != identity:
                self._learned = Learned(identity)
        return self._learned

    @property
    def inflight(self) -> int:
        """Requests in flight on it across the replicas."""
        return self.leased + self.elsewhere

    @property
    def cooldown_until(self) -> float:
        return self.learned.cooldown_until

    @property
    def rate_limited_until(self) -> float:
        return self.learned.rate_limited_until

    @property
    def error_streak(self) -> int:
        return self.learned.error_streak

    @property
    def primary(self) -> UsageWindow:
        return self.learned.primary

    @property
    def secondary(self) -> UsageWindow:
        return self.learned.secondary

    @property
    def usable(self) -> bool:
        """It has credentials to send, and not the ones the upstream refused."""
        credentials = self.live.credentials
        return credentials.usable and credentials is not self.refused

    @property
    def last_error(self) -> str | None:
        """Why the account is unusable, else its last failure."""
        credentials = self.credentials
        if not credentials.usable:
            return self.live.error or "no usable credentials"
        if credentials is self.refused:
            return "unauthorized"
        return self.failure

    # -- read by the balancer (``balancer.Contender``) ----------------------------------------

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    @property
    def max_inflight(self) -> int:
        return self.config.max_inflight

    @property
    def weight(self) -> float:
        return self.config.weight

    @property
    def used_percent(self) -> float:
        learned = self.learned
        primary, secondary = learned.primary.used_percent, learned.secondary.used_percent
        return primary if primary >= secondary else secondary  # ``max``, without its call

    @property
    def usage_resets_at(self) -> float:
        learned = self.learned
        return max(learned.primary.full_until(), learned.secondary.full_until())

    # ----------------------------------------------------------------------------------------

    @property
    def kind(self) -> Literal["chatgpt", "platform"]:
        """``platform`` for an API key (inline, or the ``OPENAI_API_KEY`` of an auth.json)."""
        platform = self.config.is_platform or self.credentials.api_key is not None
        return "platform" if platform else "chatgpt"

    def state(self, now: float) -> AccountState:
        """See ``AccountState``: the one rule ``/status`` and ``/metrics`` both show."""
        if self.removed:
            return "draining"
        if not self.config.enabled:
            return "disabled"
        if not self.usable:
            return "unusable"
        if self.rate_limited_until > now:
            return "rate_limited"
        if self.used_percent >= 100.0 and self.usage_resets_at > now:
            return "rate_limited"
        if self.cooldown_until > now:
            return "cooling_down"
        if self.config.max_inflight and self.inflight >= self.config.max_inflight:
            return "busy"
        return "ok"

    def usage(self, now: float) -> pool_view.AccountUsage:
        """The account as the client's view of the pool sees it (``pool_view``): available
        unless disabled, unusable or rate limited (a busy account or one backing off after
        errors is back in moments)."""
        state = self.state(now)
        learned = self.learned
        recovers_at = 0.0
        if state == "rate_limited":
            recovers_at = max(learned.rate_limited_until, self.usage_resets_at)
        return pool_view.AccountUsage(
            available=state in ("ok", "busy", "cooling_down"),
            primary=_window(learned.primary),
            secondary=_window(learned.secondary),
            credits=learned.credits,
            recovers_at=recovers_at,
        )

    def knowledge(self) -> Knowledge:
        """What is known of the account, as other replicas adopt it (``Pool.adopt``)."""
        learned = self.learned
        refused = self.refused is not None and self.refused is self.credentials
        return Knowledge(
            identity=identity_fingerprint(*learned.identity),
            cooldown_until=learned.cooldown_until,
            rate_limited_until=learned.rate_limited_until,
            reason=self.failure,
            usage_at=learned.usage_at,
            primary_used=learned.primary.used_percent,
            primary_resets_at=learned.primary.resets_at,
            secondary_used=learned.secondary.used_percent,
            secondary_resets_at=learned.secondary.resets_at,
            refused=credentials_fingerprint(self.credentials) if refused else None,
            retry_at=self.retry_at if refused else 0.0,
            refused_at=self.refused_at,
        )

    def candidate(self) -> balancer.Candidate:
        """The account as the balancer sees it now, as plain values."""
        return balancer.Candidate(
            self.name,
            self.enabled,
            self.usable,
            self.cooldown_until,
            self.inflight,
            self.max_inflight,
            self.used_percent,
            self.usage_resets_at,
            self.weight,
            self.rate_limited_until,
        )


@dataclass(frozen=True, slots=True)
class Reconfiguration:
    """What ``Pool.reconfigure`` changed, by account name, for the reload's log line."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    """Settings changed in place: ``enabled``, ``weight``, ``max_inflight``, base URL."""
    credentials: tuple[str, ...] = ()
    """Credentials reloaded: changed in the file, or re-read from a changed ``auth_file``."""
    routing: bool = False

    def describe(self) -> str:
        parts = [
            f"{label} {', '.join(names)}"
            for label, names in (
                ("added", self.added),
                ("removed", self.removed),
                ("changed", self.changed),
                ("credentials reloaded for", self.credentials),
            )
            if names
        ]
        if self.routing:
            parts.append("routing settings changed")
        return "; ".join(parts) or "no change to the pool"


class Observer(Protocol):
    """Told, on the event loop and without awaiting, what the pool learns (S12)."""

    def learned(self, account: Account) -> None:
        """``account.knowledge()`` changed: a cooldown, usage, refused credentials."""

    def pinned(self, slot: str, account: str, until: float) -> None:
        """An affinity slot is served by ``account`` until ``until``."""

    def leased(self) -> None:
        """A lease was taken or released (``Pool.leases`` changed)."""


class Pool:
    """The accounts and what is known of them; mutated only here, on the event loop.

    ``accounts`` follow the configuration; an ``Account`` handed out by ``choose`` stays valid
    for the request that holds it, across reloads (see ``reconfigure`` and ``lease``).
    """

    def __init__(
        self,
        config: Config,
        credentials: CredentialManager | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``credentials``: the manager whose records the accounts read; without one, a manager
        of ``config`` that keeps no database (for tools and tests that refresh nothing)."""
        if credentials is None:
            credentials = CredentialManager(config, store=None)
        self.credentials = credentials
        self._clock = clock
        self._routing = config.routing
        self._accounts: dict[str, Account] = {}
        self._draining: dict[str, Account] = {}
        self._affinity: OrderedDict[str, tuple[str, float, float]] = OrderedDict()
        """slot → (account, until, until as the other replicas were last told)."""
        self._turn_states: OrderedDict[str, tuple[str, float, float]] = OrderedDict()
        """Turn state → the account that issued it, and until when it is remembered."""
        self._generation = 0
        """Counts the changes of what the client's view of the pool is made of (``view``)."""
        self._views: dict[tuple[str, ...] | None, tuple[int, float, pool_view.PoolView]] = {}
        self._turns = itertools.count()
        self._suspects: OrderedDict[RequestId, float] = OrderedDict()
        self._next_retry = math.inf
        """The earliest ``retry_at`` of an account with refused credentials."""
        self.observer: Observer | None = None
        """Told what the pool learns, to share it with other replicas (S12)."""
        for account_config in config.accounts:
            self._accounts[account_config.name] = self._new_account(config, account_config)

    @property
    def accounts(self) -> list[Account]:
        """The configured accounts, in the file's order."""
        return list(self._accounts.values())

    @property
    def draining(self) -> list[Account]:
        """Accounts removed from the configuration that still carry requests."""
        return list(self._draining.values())

    @property
    def routing(self) -> RoutingConfig:
        """The live ``[routing]`` settings (replaced by ``reconfigure``)."""
        return self._routing

    def now(self) -> float:
        return self._clock()

    def get(self, name: str) -> Account | None:
        return self._accounts.get(name)

    def choose(
        self,
        *,
        prefer: str | None,
        affinity_key: str | None,
        exclude: Collection[str],
        retry_refused: bool = True,
    ) -> Account | None:
        """The account for an attempt (``balancer.choose``). With ``retry_refused``, an account
        whose refused credentials are due to be tried again (``unauthorized``) comes first,
        for this one attempt."""
        now = self._clock()
        if retry_refused and now >= self._next_retry:
            retried = self._retry_refused(now, exclude)
            if retried is not None:
                return retried
        affinity = self._affinity_account(affinity_key, now)
        name = balancer.choose(
            list(self._accounts.values()),
            now,
            prefer=prefer,
            affinity=affinity,
            exclude=exclude,
            strategy=self._routing.strategy,
            turn=next(self._turns),
        )
        return self._accounts[name] if name is not None else None

    def eligible(self, account: Account) -> bool:
        """Whether ``account`` may take new work; never once it is removed from the pool."""
        return self._accounts.get(account.name) is account and balancer.eligible(
            account, self._clock()
        )

    def lease(self, account: Account) -> Lease:
        """Count a request in flight on ``account`` for a ``with`` block.

        Works on the ``Account`` object itself, so a lease taken before a reload releases
        cleanly after it even if the account was removed meanwhile; the last lease of a
        removed account lets it go.
        """
        return Lease(self, account)

    def _retry_refused(self, now: float, exclude: Collection[str]) -> Account | None:
        """The account whose refused credentials are due to be tried again, if any; its next
        try is pushed out at once, so that one request at a time tries them."""
        due = None
        for account in self._accounts.values():
            if not account.retry_at:
                continue
            if account.refused is not account.credentials:  # new ones: usable anyway
                account.retry_at = 0.0
            elif account.retry_at <= now and account.name not in exclude and due is None:
                account.retry_at = now + account.retry_delay
                if account.config.enabled and account.credentials.usable:
                    due = account
        self._next_retry = min(
            (a.retry_at for a in self._accounts.values() if a.retry_at), default=math.inf
        )
        if due is not None:
            log.warning(
                "account %s: one request tries the credentials the upstream refused again",
                due.name,
            )
        return due

    def _new_account(self, config: Config, account_config: AccountConfig) -> Account:
        base_url = config.account_base_url(account_config)
        return Account(account_config, base_url, self.credentials.record(account_config.name))

    def _released(self, account: Account) -> None:
        account.leased -= 1
        if self.observer is not None:
            self.observer.leased()
        if account.leased == 0 and self._draining.get(account.name) is account:
            del self._draining[account.name]
            log.info("account %s: removed from the configuration, now drained", account.name)

    def reconfigure(self, config: Config) -> Reconfiguration:
        """Apply a reloaded configuration to the accounts and the routing settings, after
        ``CredentialManager.reconfigure`` followed it (each account takes the record the
        manager now keeps for its name).

        - A new name is added and can be chosen at once.
        - A missing name is removed from the choice at once; requests it carries finish
          (see ``lease``). Named again before it drained, it comes back with its state.
        - A kept name keeps its ``Account`` and all its runtime state; ``enabled``, ``weight``,
          ``max_inflight`` and the base URL take their new values in place.
        - A kept name whose record the manager replaced (changed credentials in the file, a
          changed ``auth_file``: ``codex login`` again) reads the new one, and is usable again
          if its credentials are (after a 401, say). When they name another upstream identity
          (another API key or ChatGPT account id) what was learned about the old one is
          forgotten.

        Never raises for a valid ``Config`` the manager followed: an account whose credentials
        cannot be read is kept as unusable, with the reason in ``last_error``.
        """
        known = {**self._draining, **self._accounts}
        accounts: dict[str, Account] = {}
        added: list[str] = []
        changed: list[str] = []
        reloaded: list[str] = []
        for account_config in config.accounts:
            name = account_config.name
            account = known.pop(name, None)
            if account is None:
                accounts[name] = self._new_account(config, account_config)
                added.append(name)
                continue
            if name not in self._accounts:
                added.append(name)  # named again while it was draining
                account.removed = False
            elif self.credentials.record(name) is not account.live:
                reloaded.append(name)
                account.refused = None  # refused credentials are no longer the record's
                account.retry_at = account.retry_delay = 0.0
            account.live = self.credentials.record(name)
            if _update(account, config, account_config):
                changed.append(name)
            accounts[name] = account
        removed = [name for name in self._accounts if name not in accounts]
        for account in known.values():
            account.removed = True
        self._draining = {name: a for name, a in known.items() if a.leased > 0}
        self._accounts = accounts
        routing = config.routing != self._routing
        self._routing = config.routing
        self._changed()
        return Reconfiguration(
            tuple(added), tuple(removed), tuple(changed), tuple(reloaded), routing
        )

    def exhausted(self, *, rate_limited: bool) -> CodexLBError:
        """The error for a request no account could serve (SPEC S1.4)."""
        now = self._clock()
        candidates = [a.candidate() for a in self.accounts]
        recovery = balancer.earliest_recovery(candidates, now)
        if rate_limited:
            return UsageLimitReached(recovery)
        if any(not c.eligible(now) and _only_busy(c, now) for c in candidates):
            return PoolBusy()
        if recovery is not None and not self._any_error_cooldown(now):
            return UsageLimitReached(recovery)
        if not any(a.config.enabled and a.usable for a in self.accounts):
            return UpstreamUnavailable("No usable upstream account is configured.")
        return UpstreamUnavailable("Every upstream account failed or is cooling down after errors.")

    # -- outcomes -------------------------------------------------------------------------

    def succeeded(self, account: Account) -> None:
        """The account served a request: its error streak and back-off end (a rate limit's
        cooldown stays); credentials it was refused are accepted again."""
        learned = account.learned
        learned.error_streak = 0
        if learned.failed_requests:
            learned.failed_requests.clear()
        learned.cooldown_until = min(learned.cooldown_until, learned.rate_limited_until)
        if account.refused is not None:
            self._accepted(account)

    def rate_limited(
        self, account: Account, *, headers: Mapping[str, str], error: Mapping[str, Any] | None
    ) -> None:
        now = self._clock()
        self.observe_headers(account, headers)
        until = reported.rate_limit_reset(headers, error, now)
        if until is None:
            until = now + self._routing.default_rate_limit_cooldown_seconds
        learned = account.learned
        learned.cooldown_until = max(learned.cooldown_until, until)
        learned.rate_limited_until = max(learned.rate_limited_until, until)
        account.failure = "rate limited"
        self._changed()
        log.warning("account %s is rate limited until %s", account.name, _fmt_time(until))
        self._learned(account)

    def failed(self, account: Account, reason: str, *, request: RequestId | None = None) -> None:
        """A 5xx, a connect error or a broken stream: exponential cooldown.

        ``request``: the request that met a server failure, one it may have caused itself
        (``failover.Failure.implicates_request``). Its streak then counts distinct requests:
        the same request failing on the account again since its last success adds nothing, as
        outlier detection in production proxies counts consecutive errors, not retries of one
        call. "The same request" is the same body from the same client key (``RequestId``):
        Codex and a client that repeats a request resend it byte for byte. A client crafting a
        new body each time counts each, but each is tried on two accounts at most
        (``failover.Action.GIVE_UP``) and only the first is held responsible.
        """
        learned = account.learned
        if request is not None:
            failed = learned.failed_requests
            if request in failed:
                account.failure = reason
                log.info(
                    "account %s failed (%s) on a request that failed on it before; "
                    "not held against the account",
                    account.name,
                    reason,
                )
                return
            failed.append(request)
            if len(failed) > FAILED_REQUESTS_REMEMBERED:
                del failed[0]
        delay = min(
            self._routing.error_cooldown_seconds * 2 ** min(learned.error_streak, 32),
            self._routing.max_error_cooldown_seconds,
        )
        learned.error_streak += 1
        learned.cooldown_until = max(learned.cooldown_until, self._clock() + delay)
        account.failure = reason
        self._changed()
        log.warning("account %s failed (%s); cooling down %.1fs", account.name, reason, delay)
        self._learned(account)

    def unauthorized(self, account: Account) -> None:
        """The upstream refused the account's credentials even fresh: unusable until the
        credential manager holds others (a reload, a newer ``auth.json``), but for one request
        after ``unauthorized_retry_seconds`` (doubling, up to the maximum, each time they are
        refused again), so that an account whose upstream recovered comes back by itself."""
        first = account.refused is None
        account.refused = account.credentials
        self._changed()
        account.refused_at = self._clock()
        account.failure = None  # what failed before does not outlive these credentials
        routing = self._routing
        if not routing.unauthorized_retry_seconds:
            account.retry_at = 0.0
            log.error(
                "account %s: upstream refused its credentials (401); it takes no new work "
                "until its credentials change",
                account.name,
            )
            self._learned(account)
            return
        delay = routing.unauthorized_retry_seconds
        if not first and account.retry_delay:
            delay = min(account.retry_delay * 2, routing.max_unauthorized_retry_seconds)
        account.retry_delay = delay
        account.retry_at = self._clock() + delay
        self._next_retry = min(self._next_retry, account.retry_at)
        log.error(
            "account %s: upstream refused its credentials (401); it takes no new work "
            "until its credentials change, but for one request in %.0fs",
            account.name,
            delay,
        )
        self._learned(account)

    def _accepted(self, account: Account) -> None:
        """The upstream served an account with the credentials it refused before."""
        account.refused = None
        account.retry_at = account.retry_delay = 0.0
        self._changed()
        account.refused_at = self._clock()
        log.warning("account %s: the upstream accepts its credentials again", account.name)
        self._learned(account)

    # -- requests that fail everywhere ----------------------------------------------------

    def suspect(self, request: RequestId) -> bool:
        """Whether ``request`` failed on two accounts recently (``give_up``)."""
        until = self._suspects.get(request)
        if until is None:
            return False
        if until <= self._clock():
            del self._suspects[request]
            return False
        return True

    def give_up(self, request: RequestId) -> None:
        """``request`` met a server failure on two accounts: for ``SUSPECT_SECONDS`` the same
        request is tried on one account only and held against none (``failover.GIVE_UP``)."""
        self._suspects[request] = self._clock() + SUSPECT_SECONDS
        self._suspects.move_to_end(request)
        while len(self._suspects) > SUSPECTS_CAPACITY:
            self._suspects.popitem(last=False)

    def served(self, request: RequestId) -> None:
        """``request`` was served after all: no longer suspect."""
        self._suspects.pop(request, None)

    def observe_headers(self, account: Account, headers: Mapping[str, str]) -> None:
        """Learn usage from the ``x-codex-{primary,secondary}-*`` and ``x-codex-credits-*``
        headers, when present. Most answers repeat the last ones: those are not read again."""
        raw = tuple([headers.get(name) for name in reported.USAGE_HEADERS])
        learned = account.learned
        if raw == learned.reported_headers:
            return
        learned.reported_headers = raw
        learned.reported_event = None  # the next event is news again
        self._learn_usage(
            account,
            reported.header_windows(headers, self._clock()),
            reported.header_window_minutes(headers),
            reported.header_credits(headers),
        )

    def observe_rate_limits(self, account: Account, event: Mapping[str, Any]) -> None:
        """Learn usage from a WebSocket ``codex.rate_limits`` event. Most events repeat the
        account's last one: those are not read again."""
        learned = account.learned
        if event == learned.reported_event:
            return
        learned.reported_event = event
        learned.reported_headers = ()  # the next headers are news again
        self._learn_usage(
            account,
            reported.event_windows(event, self._clock()),
            reported.event_window_minutes(event),
            reported.event_credits(event),
        )

    def view(self, accounts: Collection[Account] | None = None) -> pool_view.PoolView:
        """The client's view of ``accounts`` (the ones a client key may use; by default all),
        now (S13). Every answer carries it, so it is computed again only when what it is made
        of changed (a usage figure, a rate limit, a refusal, the configuration), or after
        ``VIEW_SECONDS`` (a cooldown that ended, a window that reset)."""
        now = self._clock()
        key = None if accounts is None else tuple(account.name for account in accounts)
        cached = self._views.get(key)
        if cached is not None and cached[0] == self._generation and now < cached[1]:
            return cached[2]
        chosen = self._accounts.values() if accounts is None else accounts
        shown = pool_view.view([account.usage(now) for account in chosen], now)
        if len(self._views) >= VIEWS_CACHED:
            self._views.clear()
        self._views[key] = (self._generation, now + VIEW_SECONDS, shown)
        return shown

    def _changed(self) -> None:
        """Something the client's view of the pool is made of changed (``view``)."""
        self._generation += 1

    def _learn_usage(
        self,
        account: Account,
        windows: Mapping[str, tuple[float, float]],
        minutes: Mapping[str, int],
        credits: pool_view.Credits | None,
    ) -> None:
        for name, (used_percent, resets_at) in windows.items():
            window = account.primary if name == "primary" else account.secondary
            window_minutes = minutes.get(name, window.window_minutes)
            if (
                window.used_percent != used_percent
                or window.resets_at != resets_at
                or window.window_minutes != window_minutes
                or not window.reported
            ):
                window.used_percent = used_percent
                window.resets_at = resets_at
                window.reported = True
                window.window_minutes = window_minutes
                self._changed()
        if credits is not None and credits != account.learned.credits:
            account.learned.credits = credits
            self._changed()
        if windows:
            account.learned.usage_at = self._clock()
            self._learned(account)

    # -- affinity -------------------------------------------------------------------------

    def remember_affinity(self, key: str | None, account: Account) -> None:
        if key is None or self._routing.affinity_ttl_seconds <= 0:
            return
        self._remember(self._affinity, key, account, self._routing.affinity_ttl_seconds, share=True)

    def remember_turn_state(self, value: str, account: Account) -> None:
        """``account`` issued the turn state ``value`` (``turn_state``)."""
        self._remember(self._turn_states, value, account, TURN_STATE_SECONDS)

    def turn_state_owner(self, value: str) -> str | None:
        """The account that issued the turn state ``value``, if known."""
        return self._remembered(self._turn_states, value, self._clock())

    def _remember(
        self,
        entries: OrderedDict[str, tuple[str, float, float]],
        key: str,
        account: Account,
        seconds: float,
        *,
        share: bool = False,
    ) -> None:
        """``share``: tell the other replicas (S12) of a new or moved slot, or when what they
        were told is half way to expiring; a slot served again and again costs nothing else."""
        key = _affinity_slot(key)
        now = self._clock()
        until = shared_until = now + seconds
        if share and self.observer is not None:
            entry = entries.get(key)
            if entry is None or entry[0] != account.name or entry[2] - now < seconds / 2:
                self.observer.pinned(key, account.name, until)
            else:
                shared_until = entry[2]
        entries[key] = (account.name, until, shared_until)
        entries.move_to_end(key)
        while len(entries) > AFFINITY_CAPACITY:
            entries.popitem(last=False)

    def _remembered(
        self, entries: OrderedDict[str, tuple[str, float, float]], key: str, now: float
    ) -> str | None:
        key = _affinity_slot(key)
        entry = entries.get(key)
        if entry is None:
            return None
        if entry[1] <= now:
            del entries[key]
            return None
        return entry[0]

    def _affinity_account(self, key: str | None, now: float) -> str | None:
        return None if key is None else self._remembered(self._affinity, key, now)

    # -- shared with other replicas (S12; ``shared``) -------------------------------------

    def _learned(self, account: Account) -> None:
        if self.observer is not None:
            self.observer.learned(account)

    def adopt(self, name: str, news: Knowledge) -> None:
        """What another replica learned about account ``name`` (``knowledge.merged``'s rules).
        Ignored when the account's credentials here name another upstream identity, and never
        told back to the observer."""
        account = self._accounts.get(name) or self._draining.get(name)
        if account is None:
            return
        learned = account.learned
        if news.identity != identity_fingerprint(*learned.identity):
            return
        if news.cooldown_until > learned.cooldown_until:
            learned.cooldown_until = news.cooldown_until
            account.failure = news.reason
        learned.rate_limited_until = max(learned.rate_limited_until, news.rate_limited_until)
        if news.usage_at > learned.usage_at:
            learned.usage_at = news.usage_at
            for window, used, resets_at in (
                (learned.primary, news.primary_used, news.primary_resets_at),
                (learned.secondary, news.secondary_used, news.secondary_resets_at),
            ):
                window.used_percent, window.resets_at, window.reported = used, resets_at, True
            learned.reported_headers = ()  # the next headers are news again
        if news.refused_at > account.refused_at:
            account.refused_at = news.refused_at
            if news.refused is None:
                if account.refused is not None:
                    account.refused = None
                    account.retry_at = account.retry_delay = 0.0
            elif news.refused == credentials_fingerprint(account.credentials):
                account.refused = account.credentials
                account.retry_at = news.retry_at
                if news.retry_at:
                    self._next_retry = min(self._next_retry, news.retry_at)
        self._changed()  # the client's view of the pool may show what was adopted

    def adopt_affinity(self, slot: str, account: str, until: float) -> None:
        """Another replica served ``slot`` (a slot of ``remember_affinity``) by ``account``."""
        if until <= self._clock():
            return
        self._affinity[slot] = (account, until, until)
        self._affinity.move_to_end(slot)
        while len(self._affinity) > AFFINITY_CAPACITY:
            self._affinity.popitem(last=False)

    def set_elsewhere(self, inflight: Mapping[str, int]) -> None:
        """The requests the other live replicas carry, by account name."""
        for account in (*self._accounts.values(), *self._draining.values()):
            account.elsewhere = inflight.get(account.name, 0)

    def leases(self) -> dict[str, int]:
        """The requests this process carries, by account name (those carrying any)."""
        return {
            a.name: a.leased
            for a in (*self._accounts.values(), *self._draining.values())
            if a.leased
        }

    def _any_error_cooldown(self, now: float) -> bool:
        return any(balancer.backing_off(a, now) for a in self.accounts)


def _affinity_slot(key: str) -> str:
    if len(key) <= AFFINITY_KEY_LENGTH:
        return key
    return "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def _update(account: Account, config: Config, account_config: AccountConfig) -> bool:
    """Give a kept account its new settings; whether they changed."""
    old = account.config
    base_url = config.account_base_url(account_config)
    changed = (
        _setting_fields(account_config) != _setting_fields(old) or base_url != account.base_url
    )
    account.config = account_config
    account.base_url = base_url
    return changed


def _setting_fields(account: AccountConfig) -> tuple[Any, ...]:
    return (account.enabled, account.weight, account.max_inflight)


class Lease:
    """``Pool.lease``: a class rather than a generator, since every attempt takes one."""

    __slots__ = ("_account", "_pool")

    def __init__(self, pool: Pool, account: Account) -> None:
        self._pool = pool
        self._account = account

    def __enter__(self) -> None:
        self._account.leased += 1
        if self._pool.observer is not None:
            self._pool.observer.leased()

    def __exit__(self, *exc_info: object) -> None:
        self._pool._released(self._account)


def _identity(credentials: Credentials) -> Identity:
    """Which upstream account the credentials speak for (tokens rotate; this does not)."""
    return credentials.api_key, credentials.account_id


def _window(window: UsageWindow) -> pool_view.Window | None:
    if not window.reported:
        return None
    return pool_view.Window(window.used_percent, window.window_minutes, window.resets_at)


def _only_busy(candidate: balancer.Candidate, now: float) -> bool:
    """Ineligible only because of its ``max_inflight``."""
    idle = candidate._replace(inflight=0)
    return idle.eligible(now)


def _fmt_time(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
