"""One response's life, shared by every transport (SPEC S2-S4).

An ``Exchange`` runs the attempts of one request (``run``): it picks the account for each
(a retry on the same account, the conversation's account, the transport's open socket, soft
affinity, then the strategy), gives the input to send (the client's as-is, the conversation
replayed from snapshots, and only reasoning the account can read), applies the verdict on every
upstream failure (``judge``: cooldowns, refresh, replay, failover; see ``failover``), and
commits the snapshot before the terminal event goes out (``commit``). ``relay`` watches the
events of one attempt. Before the first attempt, the client key's limits are checked
(``limits.KeyLimits.admit``: every transport and route gets the same refusals), and the
request, with the tokens its responses reported, goes into the key's usage (``usage``).

The transports (``http_proxy``, ``ws_proxy``) read the client's request, connect, relay and
frame bytes; they touch neither the pool nor the store.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from codexlb import signals
from codexlb import turn_state as turn_states
from codexlb.credentials import Credentials
from codexlb.errors import SnapshotNotStored, UpstreamUnavailable
from codexlb.failover import Action, Failure, verdict
from codexlb.limits import OPEN
from codexlb.payload import CreateRequest
from codexlb.pool import Account, RequestId
from codexlb.provenance import keys_of, latest_owner, readable_by
from codexlb.relay import ResponseRecorder
from codexlb.replay import rebuild_input, strip_reasoning
from codexlb.store import Snapshot
from codexlb.token_endpoint import RefreshUnavailable

if TYPE_CHECKING:
    from codexlb.app import Services
    from codexlb.logs import RequestRecord

log = logging.getLogger("codexlb.requests")

R = TypeVar("R")

BROKEN_STREAM_STATUS = 502
"""The status a response is logged with when its upstream broke after visible output."""

Attempt = Callable[[Account], Awaitable[R | None]]
"""One try on an account: what the client was answered with, or ``None`` after ``judge``
chose to try again."""


class Exchange:
    """The life of one response across its attempts: account choice, upstream input, the
    verdict on each failure, and the snapshot commit.

    A transport calls ``run`` with its ``Attempt``; inside it, it takes the input from
    ``upstream_input``, relays what comes back, hands every upstream failure to ``judge``,
    and calls ``commit`` before the terminal event goes out. It touches neither the pool nor
    the store.
    """

    def __init__(
        self,
        services: Services,
        *,
        scope: str,
        request: CreateRequest,
        affinity_key: str | None,
        record: RequestRecord,
        stateless: bool = False,
        turn_state: str | None = None,
    ) -> None:
        self.services = services
        self.stateless = stateless
        """A translated request (S11): the client sends the whole history each time, so the
        store is neither read for it nor written."""
        self.scope = scope
        self.request = request
        self.affinity_key = affinity_key
        self.record = record
        self.chain: list[Snapshot] = []
        self.owners: Mapping[int, str] = {}
        """Which account produced the items the client sent, as far as the store knows
        (``provenance``): key → account."""
        self.live = False
        """This attempt forwards ``previous_response_id`` to the socket that made it (S3.1)."""
        self.sent = Credentials()
        """The credentials of the account as this attempt began: named again after a 401."""
        self._history_loaded = stateless
        self._looked_up: set[int] = set()
        self._tried: set[str] = set()
        self._rate_limited: set[str] = set()
        self._rate_limited_only = True
        self._strip_reasoning = False
        self._reconnected = False
        self._refreshed: set[str] = set()
        """Accounts whose 401 this exchange already answered with a refresh (once each)."""
        self._retry_on: Account | None = None
        self._server_failed_on: str | None = None
        """The first account this request met a server failure on (``failover.GIVE_UP``)."""
        self._given_up = False
        self._request_id: RequestId | None = None
        self.admission = OPEN
        """The client key's admission (``limits``): its accounts, its place in flight."""
        self._counted = False
        """The request is in the key's usage already (with the tokens of its response)."""
        self._body_turn_state = turn_states.in_body(request.body)
        self.turn_state = turn_state or self._body_turn_state
        """The turn state the client sent (a header, or ``client_metadata``): it goes only
        to the account that issued it (``turn_state``)."""

    async def run(
        self,
        attempt: Attempt[R],
        *,
        live_on: Account | None = None,
        prefer: str | None = None,
    ) -> R:
        """Attempts until one answers the client; raises S1.4's errors when no account is left.

        ``live_on`` is the account of a transport's socket that made the request's parent:
        the first attempt forwards the anchor there while it is eligible. Later attempts go
        to the account ``next_account`` picks (``prefer``: the transport's open socket).
        """
        services = self.services
        if not services.keys.unlimited(self.scope):
            self.admission = await services.limits.admit(self.scope, self.request.model)
        # One coroutine for the whole loop: every event the relay awaits resumes each frame
        # of the chain that awaits it.
        try:
            pool = services.pool
            if live_on is not None and not (
                pool.eligible(live_on) and self.admission.may_use(live_on.name)
            ):
                live_on = None
            account = live_on
            if account is not None and await self._moved_away_from(account):
                account = None
            self.live = account is not None
            while True:
                if account is None:
                    self.live = False
                    if not self._history_loaded:
                        await self.load_history()
                    account = self.next_account(prefer=prefer)
                else:
                    self._attempt_on(account)
                with pool.lease(account):
                    # Refresh a token that expires soon (S5); the account reads the new one.
                    credentials = services.credentials
                    if credentials.due(account.name):
                        await credentials.ensure_fresh(account.name)
                    self.sent = account.credentials
                    result = await attempt(account)
                if result is not None:
                    return result
                account = None
        finally:
            self.admission.release()
            if not self._counted:  # no response reported its usage: a request, no tokens
                services.ledger.add(self.scope, self.record.account, self.request.model, None)

    async def load_history(self) -> None:
        """Read what the store knows of this request's conversation, once: the ancestry of
        ``previous_response_id`` (raises S1.4's not-found error), and which accounts
        produced the items the client sent (``provenance``)."""
        if self._history_loaded:
            return
        sent = self.request.input_items
        previous = self.request.previous_response_id
        if previous is not None:
            self.chain = await self.services.store.chain(self.scope, previous)
            sent = [item for snapshot in self.chain for item in snapshot.input_items] + sent
        if keys := keys_of(sent):
            await self._look_up_owners(keys)
        self._history_loaded = True

    @property
    def origin_account(self) -> str | None:
        """The account the conversation was on: the one that produced its latest item codexlb
        relayed, the newest first (the client's input, then the chain's responses); else the
        parent's."""
        owners = self.owners
        if owners and (owner := latest_owner(self.request.input_items, owners)) is not None:
            return owner
        for snapshot in reversed(self.chain):
            if snapshot.output_items:
                return snapshot.account
            if owners and (owner := latest_owner(snapshot.input_items, owners)) is not None:
                return owner
        return self.chain[-1].account if self.chain else None

    def next_account(self, *, prefer: str | None = None) -> Account:
        """The account for the next attempt; raises when none is left (S1.4).

        A retry on the same account comes first (see ``judge``), then the conversation's
        account, then ``prefer``, then affinity and the strategy. Attempts on accounts that
        answered with a rate limit do not count against ``max_attempts``: a 429 never reaches
        a client while an eligible account is left untried (S4).
        """
        if self._given_up:
            raise UpstreamUnavailable(
                "The upstream could not process this request: it failed on more than one account."
            )
        retry, self._retry_on = self._retry_on, None
        if retry is not None:
            self._attempt_on(retry)
            return retry
        pool = self.services.pool
        max_attempts = pool.routing.max_attempts  # live: the pool follows config reloads
        account = None
        tried = self._tried
        if len(tried - self._rate_limited if self._rate_limited else tried) < max_attempts:
            exclude: Collection[str] = self._tried
            if barred := self.admission.barred(a.name for a in pool.accounts):
                exclude = self._tried | barred
            account = pool.choose(
                prefer=self.turn_state_owner or self.origin_account or prefer,
                affinity_key=self.affinity_key,
                exclude=exclude,
            )
        if account is None:
            raise pool.exhausted(rate_limited=bool(self._tried) and self._rate_limited_only)
        self._attempt_on(account)
        return account

    @property
    def turn_state_owner(self) -> str | None:
        """The account that issued the client's turn state: the rest of the turn prefers it."""
        if self.turn_state is None:
            return None
        return self.services.pool.turn_state_owner(self.turn_state)

    def upstream_headers(self, account: Account, headers: Mapping[str, str]) -> Mapping[str, str]:
        """The client's forwarded ``headers`` for ``account``: without a turn state another
        account issued."""
        if self.turn_state is None:  # none sent, none to drop
            return headers
        return turn_state_headers(self.services, account, headers)

    def drops_turn_state(self, account: Account) -> bool:
        """Whether the body's ``client_metadata`` turn state must not go to ``account``."""
        return self._body_turn_state is not None and (
            self.services.pool.turn_state_owner(self._body_turn_state) != account.name
        )

    def learn_turn_state(self, account: Account, value: str | None) -> None:
        """``account`` issued the turn state ``value`` (an answer's header, a
        ``response.metadata`` event)."""
        if value is not None:
            self.services.pool.remember_turn_state(value, account)

    def upstream_input(self, account: Account) -> list[Any] | None:
        """The input to send to ``account``, or ``None`` when the client's is sent as-is.

        Reasoning goes only where it can be read: a replay leaves out the output reasoning of
        other accounts (S3.2), and any input loses the reasoning the store knows another
        account minted (a client resends whatever it was given); after a refusal
        (``Action.WITHOUT_REASONING``) no reasoning goes at all.
        """
        if self.live:  # the client's delta after the anchor, without others' reasoning
            if not self.owners:
                return None
            return readable_by(self.request.input_items, self.owners, account.name)
        if self.chain:
            items = rebuild_input(self.chain, self.request.input_items, account.name)
            self.services.metrics.replay(
                len(items), same_account=self.chain[-1].account == account.name
            )
        else:
            items = self.request.input_items
        if self._strip_reasoning:
            return strip_reasoning(items)
        readable = readable_by(items, self.owners, account.name) if self.owners else None
        if readable is not None:
            return readable
        return items if self.chain else None

    async def judge(
        self, account: Account, failure: Failure, *, sent: Credentials | None = None
    ) -> Action:
        """Apply ``failover.verdict`` to a failure of the attempt on ``account`` and return
        the action: ``PASS_ON`` and ``BREAK`` are the transport's to carry out (the client
        gets the failure, or the response ends as ``stream_incomplete``); after any other
        the attempt returns ``None`` and ``run`` tries again as decided here. ``sent``: the
        credentials the failed connection was opened with, when not this attempt's."""
        pool = self.services.pool
        implicated = failure.implicates_request
        failure = replace(
            failure,
            live_anchor=self.live,
            reasoning_stripped=self._strip_reasoning,
            refreshed=account.name in self._refreshed,
            reconnected=self._reconnected,
            suspect=implicated
            and (
                self._server_failed_on not in (None, account.name) or pool.suspect(self.request_id)
            ),
        )
        action = verdict(failure)
        if failure.usage is not None:  # a failed or incomplete response: its tokens were spent
            self.services.ledger.add(
                self.scope, account.name, self.request.model, failure.usage, requests=0
            )
        metrics = self.services.metrics
        if implicated and self._server_failed_on is None:
            self._server_failed_on = account.name
        if action is Action.PASS_ON:
            metrics.attempt(account.name, "client_error")
            self.record.failed_with = failure.reported_status
        elif action is Action.BREAK:
            self._failed(account, failure, implicated=implicated)
            self.record.failed_with = BROKEN_STREAM_STATUS
        elif action is Action.COOL_DOWN:
            self._failed(account, failure, implicated=implicated)
        elif action is Action.GIVE_UP:
            self._given_up = True
            self._rate_limited_only = False
            pool.give_up(self.request_id)
            metrics.attempt(account.name, "error")
            # A request already known to fail everywhere is logged more quietly.
            log.log(
                logging.INFO if self._server_failed_on == account.name else logging.WARNING,
                "request %s: %s on account %s; it failed so on another account too: the "
                "upstream cannot process it; no more failover, no account held responsible",
                self.record.request_id,
                failure.describe(),
                account.name,
            )
        elif action is Action.RATE_LIMITED:
            self._rate_limited.add(account.name)
            pool.rate_limited(account, headers=failure.headers, error=failure.error)
            metrics.attempt(account.name, "rate_limited")
        elif action is Action.REFRESH or action is Action.UNUSABLE:
            self._rate_limited_only = False
            metrics.attempt(account.name, "unauthorized")
            if action is Action.UNUSABLE:
                pool.unauthorized(account)
            else:
                self._refreshed.add(account.name)
                if await reauthorize(self.services, account, sent or self.sent):
                    self._again(account)
        elif action is Action.WITHOUT_REASONING:
            log.info("account %s refused reasoning it cannot read: retrying without", account.name)
            metrics.attempt(account.name, "unreadable_reasoning")
            self._strip_reasoning = True
            self._again(account)
        elif action is Action.RECONNECT:
            self._reconnected = True
            self._again(account)
        elif action is Action.REPLAY:
            self._again(account)
        return action

    async def commit(self, account: Account, recorder: ResponseRecorder) -> dict[str, Any]:
        """Store the snapshot of a completed response; returns the response object.

        Runs before the terminal event is forwarded, so a follow-up sent the instant the
        client sees ``response.completed`` finds its parent.
        """
        response = recorder.response or {}
        response_id = response.get("id")
        output = recorder.ordered_output()
        usage = response.get("usage")
        self.record.usage = usage if isinstance(usage, dict) else None
        # Before the terminal event goes out: the key's next request sees these tokens.
        self.services.ledger.add(self.scope, account.name, self.request.model, self.record.usage)
        self._counted = True
        if isinstance(response_id, str) and not self.stateless:
            model = response.get("model")
            queued = time.perf_counter()
            try:
                await self.services.store.save(
                    Snapshot(
                        response_id=response_id,
                        previous_response_id=self.request.previous_response_id,
                        scope=self.scope,
                        account=account.name,
                        model=model if isinstance(model, str) else self.request.model,
                        input_items=self.request.input_items,
                        output_items=output,
                        usage=self.record.usage,
                        created_at=datetime.now(UTC),
                    )
                )
            except Exception as exc:
                log.error("response %s was not stored: %s", response_id, exc)
                self.record.failed_with = SnapshotNotStored.status
                raise SnapshotNotStored from exc
            self.services.metrics.snapshot_write.observe(time.perf_counter() - queued)
        elif not isinstance(response_id, str):
            log.warning("account %s completed a response without an id", account.name)
        self.succeeded(account)
        return response

    @property
    def commit_shares_a_trip(self) -> bool:
        """Whether a commit made now would share its trip to the database with others
        (``SnapshotStore.busy``): then output waiting for it is worth sending along."""
        return self.services.store.busy

    def succeeded(self, account: Account) -> None:
        """``account`` served this request: its error streak ends, the affinity is kept."""
        self.services.pool.succeeded(account)
        if self._request_id is not None:  # it met a server failure on the way
            self.services.pool.served(self._request_id)
        self.services.pool.remember_affinity(self.affinity_key, account)
        self.services.metrics.attempt(account.name, "ok")

    def observe_headers(self, account: Account, headers: Mapping[str, str]) -> None:
        """Learn the account's usage from an upstream answer's headers."""
        self.services.pool.observe_headers(account, headers)

    def observe_rate_limits(self, account: Account, event: Any) -> str | None:
        """Learn the account's usage from a ``codex.rate_limits`` event (parsed); returns the
        event the client gets in its place (the pool's, ``signals``), or ``None`` to pass it
        on as it is."""
        if isinstance(event, dict):
            self.services.pool.observe_rate_limits(account, event)
        return signals.rate_limits_event(self.services, self.scope, event)

    def client_headers(self, upstream: Mapping[str, str]) -> dict[str, str]:
        """The headers the client gets with an upstream answer: the pool's rate limits."""
        return signals.client_headers(self.services, self.scope, upstream, self.request.model)

    # -- helpers --------------------------------------------------------------------------

    async def _moved_away_from(self, live: Account) -> bool:
        """Whether a request anchored on ``live``'s socket belongs elsewhere: its delta holds
        items another eligible account produced last. (A resumed Codex session prewarms a new
        socket with no input, wherever it landed, then sends its whole history anchored on
        that prewarm.)"""
        if keys := keys_of(self.request.input_items):
            await self._look_up_owners(keys)
        if not self.owners:
            return False
        owner = latest_owner(self.request.input_items, self.owners)
        if owner is None or owner == live.name or not self.admission.may_use(owner):
            return False
        account = self.services.pool.get(owner)
        return account is not None and self.services.pool.eligible(account)

    async def _look_up_owners(self, keys: list[int]) -> None:
        """Learn who produced the items of ``keys`` (``keys_of``: none empty)."""
        keys = [key for key in keys if key not in self._looked_up]
        if keys:
            self._looked_up.update(keys)
            self.owners = {**self.owners, **await self.services.store.owners(self.scope, keys)}

    def _attempt_on(self, account: Account) -> None:
        self._tried.add(account.name)
        self.record.attempts += 1
        self.record.account = account.name

    def _again(self, account: Account) -> None:
        """The next attempt goes to ``account`` once more."""
        self._tried.discard(account.name)
        self._retry_on = account

    @property
    def request_id(self) -> RequestId:
        """What makes another request "the same request" as this one (``pool.RequestId``): a
        digest of the client key's scope and the body, computed on the first failure that
        needs it, never on the way of a request that meets none."""
        if self._request_id is None:
            digest = hashlib.blake2b(self.scope.encode(), digest_size=16)
            digest.update(b"\0")
            raw = self.request.raw
            digest.update(raw if raw is not None else orjson.dumps(self.request.body))
            self._request_id = digest.digest()
        return self._request_id

    def _failed(self, account: Account, failure: Failure, *, implicated: bool) -> None:
        """A failure held against ``account``: a server failure counts once per request."""
        self._rate_limited_only = False
        request = self.request_id if implicated else None
        self.services.pool.failed(account, failure.describe(), request=request)
        self.services.metrics.attempt(account.name, "error")


def handshake_account(services: Services, affinity_key: str | None, scope: str) -> Account | None:
    """The account for an upstream socket opened at a client's WebSocket handshake, before
    any request: the one a new conversation of the client key ``scope`` would get."""
    settings = services.keys.settings(scope)
    allowed = settings.accounts if settings is not None else None
    exclude = [] if allowed is None else [a.name for a in services.pool.accounts]
    exclude = [name for name in exclude if allowed is not None and name not in allowed]
    return services.pool.choose(
        prefer=None, affinity_key=affinity_key, exclude=exclude, retry_refused=False
    )


def turn_state_headers(
    services: Services, account: Account, headers: Mapping[str, str]
) -> Mapping[str, str]:
    """``headers`` (as the client named them) for ``account``: a turn state goes only to the
    account that issued it."""
    value = turn_states.in_any_case(headers)
    if value is None or services.pool.turn_state_owner(value) == account.name:
        return headers
    return turn_states.without_header(headers)


def learn_headers(services: Services, account: Account, headers: Mapping[str, str]) -> None:
    """Learn ``account``'s usage from the headers of an upstream answer outside a request."""
    services.pool.observe_headers(account, headers)


async def reauthorize(services: Services, account: Account, sent: Credentials) -> bool:
    """After the upstream answered 401 to ``sent``: refresh the account's token (S5); whether
    it was renewed, so that the same account may be tried again. Nothing to refresh with makes
    the account unusable until its credentials change or a later request tries it again
    (``Pool.unauthorized``); a refresh that failed for a transient reason cools it down."""
    try:
        renewed = await services.credentials.refresh_after_401(account.name, sent.access_token)
    except RefreshUnavailable as exc:
        services.pool.failed(account, f"token refresh failed: {exc}")
        return False
    if not renewed:
        services.pool.unauthorized(account)
    return renewed


def affinity_key(headers: Mapping[str, str], request: CreateRequest) -> str | None:
    return headers.get("session-id") or headers.get("thread-id") or request.prompt_cache_key
