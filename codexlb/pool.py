"""Runtime state of the upstream accounts: in-flight leases, cooldowns, usage, affinity.

The pool is the single owner of mutable account state; both transports go through it. It
turns that state into ``balancer.Candidate`` values and lets the pure balancer choose. Times
are wall-clock epoch seconds because the upstream speaks in epoch reset times.
"""

from __future__ import annotations

import email.utils
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from codexlb import balancer
from codexlb.config import AccountConfig, Config
from codexlb.credentials import Credentials, CredentialsError, load_credentials
from codexlb.errors import CodexLBError, PoolBusy, UpstreamUnavailable, UsageLimitReached

log = logging.getLogger(__name__)

AFFINITY_CAPACITY = 100_000


@dataclass(slots=True)
class UsageWindow:
    used_percent: float = 0.0
    resets_at: float = 0.0


@dataclass(slots=True)
class Account:
    """One upstream account and what the pool has learned about it."""

    config: AccountConfig
    base_url: str
    credentials: Credentials
    usable: bool = True
    inflight: int = 0
    cooldown_until: float = 0.0
    error_streak: int = 0
    last_error: str | None = None
    primary: UsageWindow = field(default_factory=UsageWindow)
    secondary: UsageWindow = field(default_factory=UsageWindow)

    @property
    def name(self) -> str:
        return self.config.name

    def candidate(self) -> balancer.Candidate:
        full = [w for w in (self.primary, self.secondary) if w.used_percent >= 100.0]
        return balancer.Candidate(
            name=self.config.name,
            enabled=self.config.enabled,
            usable=self.usable,
            cooldown_until=self.cooldown_until,
            inflight=self.inflight,
            max_inflight=self.config.max_inflight,
            used_percent=max(self.primary.used_percent, self.secondary.used_percent),
            usage_resets_at=max((w.resets_at for w in full), default=0.0),
            weight=self.config.weight,
        )


class Pool:
    def __init__(self, config: Config, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._routing = config.routing
        self._accounts: dict[str, Account] = {}
        self._affinity: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._turns = itertools.count()
        for account_config in config.accounts:
            self._accounts[account_config.name] = _new_account(config, account_config)

    @property
    def accounts(self) -> list[Account]:
        return list(self._accounts.values())

    def get(self, name: str) -> Account | None:
        return self._accounts.get(name)

    def choose(
        self, *, prefer: str | None, affinity_key: str | None, exclude: Collection[str]
    ) -> Account | None:
        now = self._clock()
        affinity = self._affinity_account(affinity_key, now)
        name = balancer.choose(
            [a.candidate() for a in self._accounts.values()],
            now,
            prefer=prefer,
            affinity=affinity,
            exclude=exclude,
            strategy=self._routing.strategy,
            turn=next(self._turns),
        )
        return self._accounts[name] if name is not None else None

    def eligible(self, account: Account) -> bool:
        return account.candidate().eligible(self._clock())

    @contextmanager
    def lease(self, account: Account) -> Iterator[None]:
        account.inflight += 1
        try:
            yield
        finally:
            account.inflight -= 1

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
        account.error_streak = 0

    def rate_limited(
        self, account: Account, *, headers: Mapping[str, str], error: Mapping[str, Any] | None
    ) -> None:
        now = self._clock()
        self.observe_headers(account, headers)
        until = rate_limit_reset(headers, error, now)
        if until is None:
            until = now + self._routing.default_rate_limit_cooldown_seconds
        account.cooldown_until = max(account.cooldown_until, until)
        account.last_error = "rate limited"
        log.warning("account %s is rate limited until %s", account.name, _fmt_time(until))

    def failed(self, account: Account, reason: str) -> None:
        """A 5xx, a connect error or a broken stream: exponential cooldown."""
        delay = min(
            self._routing.error_cooldown_seconds * 2 ** min(account.error_streak, 32),
            self._routing.max_error_cooldown_seconds,
        )
        account.error_streak += 1
        account.cooldown_until = max(account.cooldown_until, self._clock() + delay)
        account.last_error = reason
        log.warning("account %s failed (%s); cooling down %.1fs", account.name, reason, delay)

    def unauthorized(self, account: Account) -> None:
        account.usable = False
        account.last_error = "unauthorized"
        log.error(
            "account %s: upstream refused its credentials (401); it takes no new work "
            "until its credentials change",
            account.name,
        )

    def observe_headers(self, account: Account, headers: Mapping[str, str]) -> None:
        """Learn usage from the ``x-codex-{primary,secondary}-*`` headers, when present."""
        for window, prefix in ((account.primary, "primary"), (account.secondary, "secondary")):
            used = _float(headers.get(f"x-codex-{prefix}-used-percent"))
            if used is not None:
                window.used_percent = used
                window.resets_at = _float(headers.get(f"x-codex-{prefix}-reset-at")) or 0.0

    def observe_rate_limits(self, account: Account, event: Mapping[str, Any]) -> None:
        """Learn usage from a WebSocket ``codex.rate_limits`` event."""
        limits = event.get("rate_limits")
        if not isinstance(limits, Mapping):
            return
        for window, prefix in ((account.primary, "primary"), (account.secondary, "secondary")):
            values = limits.get(prefix)
            if isinstance(values, Mapping):
                used = _float(values.get("used_percent"))
                if used is not None:
                    window.used_percent = used
                    window.resets_at = _float(values.get("reset_at")) or 0.0

    # -- affinity -------------------------------------------------------------------------

    def remember_affinity(self, key: str | None, account: Account) -> None:
        if key is None or self._routing.affinity_ttl_seconds <= 0:
            return
        self._affinity[key] = (account.name, self._clock() + self._routing.affinity_ttl_seconds)
        self._affinity.move_to_end(key)
        while len(self._affinity) > AFFINITY_CAPACITY:
            self._affinity.popitem(last=False)

    def _affinity_account(self, key: str | None, now: float) -> str | None:
        if key is None:
            return None
        entry = self._affinity.get(key)
        if entry is None:
            return None
        if entry[1] <= now:
            del self._affinity[key]
            return None
        return entry[0]

    def _any_error_cooldown(self, now: float) -> bool:
        return any(a.error_streak and a.cooldown_until > now for a in self.accounts)


def _new_account(config: Config, account_config: AccountConfig) -> Account:
    base_url = config.account_base_url(account_config)
    try:
        credentials = load_credentials(account_config)
    except CredentialsError as exc:
        log.error("account %s: %s", account_config.name, exc)
        return Account(account_config, base_url, Credentials(), usable=False, last_error=str(exc))
    return Account(account_config, base_url, credentials, usable=credentials.usable)


def _only_busy(candidate: balancer.Candidate, now: float) -> bool:
    """Ineligible only because of its ``max_inflight``."""
    idle = replace(candidate, inflight=0)
    return idle.eligible(now)


def rate_limit_reset(
    headers: Mapping[str, str], error: Mapping[str, Any] | None, now: float
) -> float | None:
    """When a rate-limited account may be tried again, from whatever the upstream said."""
    if error is not None:
        resets_at = _float(error.get("resets_at"))
        if resets_at is not None and resets_at > now:
            return resets_at
        resets_in = _float(error.get("resets_in_seconds"))
        if resets_in is not None and resets_in > 0:
            return now + resets_in
    retry_after = headers.get("retry-after")
    if retry_after:
        seconds = _float(retry_after)
        if seconds is not None:
            return now + max(seconds, 0.0)
        try:
            return email.utils.parsedate_to_datetime(retry_after).timestamp()
        except (TypeError, ValueError):
            pass
    resets = [
        _float(headers.get(f"x-codex-{prefix}-reset-at"))
        for prefix in ("primary", "secondary")
        if (_float(headers.get(f"x-codex-{prefix}-used-percent")) or 0.0) >= 100.0
    ]
    known = [t for t in resets if t is not None and t > now]
    return max(known) if known else None


def _float(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _fmt_time(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
