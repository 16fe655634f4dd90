"""One response's life, shared by both transports.

An ``Exchange`` picks the account for each attempt (the parent's account first, then soft
affinity, then the strategy), builds the upstream body (the client's bytes as-is, or the
conversation replayed from snapshots, S3), learns from each failure (cooldowns, S4), and
commits the snapshot before the terminal event goes out (S2). A ``ResponseRecorder`` watches
the events of one attempt: what is visible yet, the output items, the terminal event.

The transports (``http_proxy``, ``ws_proxy``) only frame bytes around it.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import Enum, auto
from typing import Any, Protocol, TypeVar

import orjson

from codexlb.config import Config
from codexlb.credentials import Credentials
from codexlb.errors import SnapshotNotStored
from codexlb.failover import Action, Failure, Phase, verdict
from codexlb.metrics import Metrics
from codexlb.payload import CreateRequest
from codexlb.pool import Account, Pool
from codexlb.provenance import keys_of, latest_owner, readable_by
from codexlb.refresh import CredentialManager
from codexlb.replay import rebuild_input, strip_reasoning
from codexlb.store import Snapshot, SnapshotStore
from codexlb.token_endpoint import RefreshUnavailable
from codexlb.upstream import Upstream

log = logging.getLogger("codexlb.requests")

R = TypeVar("R")
PASS_ON = Action.PASS_ON

BROKEN_STREAM_STATUS = 502
"""The status a response is logged with when its upstream broke after visible output."""
HELD_BACK = frozenset(
    {"response.created", "response.in_progress", "codex.rate_limits", "response.metadata"}
)
"""Events that show no output: held back until the first one that does."""
_NOTABLE = frozenset(
    {
        None,
        *HELD_BACK,
        "response.output_item.done",
        "response.completed",
        "response.failed",
        "response.incomplete",
        "error",
    }
)
"""Event types ``ResponseRecorder.observe`` looks at more closely than "visible output"."""


@dataclass(frozen=True)
class Services:
    """Everything an exchange needs, built once by the app factory."""

    config: Config
    pool: Pool
    store: SnapshotStore
    upstream: Upstream
    credentials: CredentialManager
    metrics: Metrics = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "metrics", Metrics(lambda: [*self.pool.accounts, *self.pool.draining])
        )


class HasJson(Protocol):
    def json(self) -> Any: ...


EventData = bytes | HasJson
"""An event's data: its JSON text as received (SSE), or an object that parses it once (WS)."""


class Step(Enum):
    HOLD = auto()
    """Not visible yet (created / in_progress): keep it until something visible comes."""
    PASS = auto()
    COMPLETED = auto()
    FAILED = auto()
    """``response.failed`` / ``response.incomplete`` / ``error``: see ``failure_code``."""


HOLD, PASS, COMPLETED, FAILED = Step.HOLD, Step.PASS, Step.COMPLETED, Step.FAILED
"""The steps by plain name, for the per-event code: on Python 3.11 each ``Step.X`` goes
through ``EnumType.__getattr__``, about a thousand instructions."""


class ResponseRecorder:
    """Watches one attempt's events; parses only the few it must."""

    __slots__ = ("_created", "failure", "output_items", "response", "streaming", "visible")

    def __init__(self, *, streaming: bool = True) -> None:
        self.streaming = streaming
        """When false (an assembled response) nothing reaches the client before the end."""
        self.visible = False
        self._created: EventData | None = None
        self.output_items: dict[int, Any] = {}
        self.response: dict[str, Any] | None = None
        self.failure: Failure | None = None
        """The failure event that ended the attempt, as a value for ``failover.verdict``."""

    def observe(self, kind: str | None, event: EventData) -> Step:
        if kind not in _NOTABLE:  # output of any kind (deltas mostly): visible, passed on
            self.visible = self.streaming
            return PASS
        if kind is None:  # a keep-alive comment: harmless, but not output either
            return PASS if self.visible else HOLD
        if kind in HELD_BACK:
            if kind == "response.created":
                self._created = event  # parsed only if the stream breaks (see started_response)
            return PASS if self.visible else HOLD
        if kind == "response.output_item.done":
            self.visible = self.streaming
            payload = _json_object(event)
            index = payload.get("output_index")
            item = payload.get("item")
            if item is not None:
                self.output_items[index if isinstance(index, int) else len(self.output_items)] = (
                    item
                )
            return PASS
        if kind == "response.completed":
            response = _json_object(event).get("response")
            self.response = response if isinstance(response, dict) else {}
            return COMPLETED
        if kind in ("response.failed", "response.incomplete"):
            response = _json_object(event).get("response")
            self.response = response if isinstance(response, dict) else {}
            error = self.response.get("error")
            self.failure = Failure(
                Phase.EVENT,
                code=_failure_code(self.response, kind),
                message=_message(error),
                error=error if isinstance(error, dict) else None,
                visible=self.visible,
                incomplete=kind == "response.incomplete",
            )
            return FAILED
        # The one left: "error".
        payload = _json_object(event)
        error = payload.get("error")
        code = error.get("code") if isinstance(error, dict) else payload.get("code")
        status = payload.get("status")
        headers = payload.get("headers")
        self.failure = Failure(
            Phase.EVENT,
            status=status if type(status) is int else None,
            code=code if isinstance(code, str) else "error",
            message=_message(error),
            headers=_header_map(headers) if isinstance(headers, dict) else {},
            error=error if isinstance(error, dict) else None,
            visible=self.visible,
        )
        return FAILED

    def started_response(self) -> dict[str, Any]:
        """The response object as far as known: the terminal one, else the created one."""
        if self.response is not None:
            return self.response
        if self._created is not None:
            response = _json_object(self._created).get("response")
            if isinstance(response, dict):
                return response
        return {}

    def incomplete_event(self) -> dict[str, Any]:
        """The ``response.failed`` (``stream_incomplete``) that ends a response whose upstream
        broke after visible output: the client keeps its connection and may retry."""
        return self.failed_event(
            "stream_incomplete", "The upstream connection ended before the response completed."
        )

    def failed_event(self, code: str, message: str) -> dict[str, Any]:
        """A ``response.failed`` that ends this response after visible output."""
        response = dict(self.started_response())
        response.update(status="failed", error={"code": code, "message": message})
        return {"type": "response.failed", "response": response}

    def ordered_output(self) -> list[Any]:
        if self.output_items:
            return [self.output_items[i] for i in sorted(self.output_items)]
        output = (self.response or {}).get("output")
        return list(output) if isinstance(output, list) else []

    def broken(self, reason: str) -> Failure:
        """The failure of a stream that ended, or went silent, before its terminal event."""
        return Failure(Phase.BREAK, message=reason, visible=self.visible)


_REQUEST_LINE = " ".join(
    f"{name}=%s"
    for name in (
        "request_id",
        "key",
        "account",
        "route",
        "transport",
        "attempts",
        "status",
        "ttfb_ms",
        "duration_ms",
        "input_tokens",
        "output_tokens",
    )
)


@dataclass(slots=True)
class RequestRecord:
    """The facts of one request's log line (SPEC S6)."""

    transport: str
    client_key: str
    request_id: str
    route: str = "responses"
    started: float = field(default_factory=time.perf_counter)
    account: str | None = None
    attempts: int = 0
    status: int = 0
    first_byte: float | None = None
    usage: Mapping[str, Any] | None = None
    failed_with: int | None = None
    """The status of the failure a response ended in after its transport answered 200 (a
    streamed ``response.failed`` or ``error``): what the log line and metrics show."""

    def mark_first_byte(self) -> None:
        if self.first_byte is None:
            self.first_byte = time.perf_counter()

    def emit(self, metrics: Metrics) -> None:
        """The request's log line and metrics."""
        usage = self.usage or {}
        duration = time.perf_counter() - self.started
        first_byte = self.first_byte - self.started if self.first_byte else None
        status = self.failed_with or self.status
        metrics.request(self.route, self.transport, status, first_byte, duration)
        if not log.isEnabledFor(logging.INFO):
            return
        fields = {
            "request_id": self.request_id,
            "key": self.client_key or None,
            "account": self.account,
            "route": self.route,
            "transport": self.transport,
            "attempts": self.attempts,
            "status": status,
            "ttfb_ms": round(first_byte * 1000, 1) if first_byte is not None else None,
            "duration_ms": round(duration * 1000, 1),
            "input_tokens": usage.get("input_tokens"),
            "output_tokens": usage.get("output_tokens"),
        }
        log.info(
            _REQUEST_LINE,
            *["-" if value is None else value for value in fields.values()],
            extra={"fields": fields},
        )


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
    ) -> None:
        self.services = services
        self.scope = scope
        self.request = request
        self.affinity_key = affinity_key
        self.record = record
        self.chain: list[Snapshot] = []
        self.owners: Mapping[str, str] = {}
        """Which account produced the items the client sent, as far as the store knows
        (``provenance``): key → account."""
        self.live = False
        """This attempt forwards ``previous_response_id`` to the socket that made it (S3.1)."""
        self.sent = Credentials()
        """The credentials of the account as this attempt began: named again after a 401."""
        self._history_loaded = False
        self._tried: set[str] = set()
        self._rate_limited: set[str] = set()
        self._rate_limited_only = True
        self._strip_reasoning = False
        self._reconnected = False
        self._refreshed: set[str] = set()
        """Accounts whose 401 this exchange already answered with a refresh (once each)."""
        self._retry_on: Account | None = None

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
        pool = self.services.pool
        account = live_on if live_on is not None and pool.eligible(live_on) else None
        self.live = account is not None
        while True:
            if account is None:
                self.live = False
                await self.load_history()
                account = self.next_account(prefer=prefer)
            else:
                self._attempt_on(account)
            with pool.lease(account):
                # Refresh a token that expires soon (S5); the pool's account follows it.
                await self.services.credentials.ensure_fresh(account.name)
                self.sent = account.credentials
                result = await attempt(account)
            if result is not None:
                return result
            account = None

    async def load_history(self) -> None:
        """Read what the store knows of this request's conversation, once: the ancestry of
        ``previous_response_id`` (raises S1.4's not-found error), and which accounts
        produced the items the client sent (``provenance``)."""
        if self._history_loaded:
            return
        store = self.services.store
        sent = self.request.input_items
        previous = self.request.previous_response_id
        if previous is not None:
            self.chain = await store.chain(self.scope, previous)
            sent = [item for snapshot in self.chain for item in snapshot.input_items] + sent
        keys = keys_of(sent)
        if keys:
            self.owners = await store.owners(self.scope, keys)
        self._history_loaded = True

    @property
    def origin_account(self) -> str | None:
        """The account the conversation was on: the parent's, else the one that produced the
        latest input item codexlb relayed."""
        if self.chain:
            return self.chain[-1].account
        return latest_owner(self.request.input_items, self.owners) if self.owners else None

    def next_account(self, *, prefer: str | None = None) -> Account:
        """The account for the next attempt; raises when none is left (S1.4).

        A retry on the same account comes first (see ``judge``), then the conversation's
        account, then ``prefer``, then affinity and the strategy. Attempts on accounts that
        answered with a rate limit do not count against ``max_attempts``: a 429 never reaches
        a client while an eligible account is left untried (S4).
        """
        retry, self._retry_on = self._retry_on, None
        if retry is not None:
            self._attempt_on(retry)
            return retry
        pool = self.services.pool
        max_attempts = pool.routing.max_attempts  # live: the pool follows config reloads
        account = None
        if len(self._tried - self._rate_limited) < max_attempts:
            account = pool.choose(
                prefer=self.origin_account or prefer,
                affinity_key=self.affinity_key,
                exclude=self._tried,
            )
        if account is None:
            raise pool.exhausted(rate_limited=bool(self._tried) and self._rate_limited_only)
        self._attempt_on(account)
        return account

    def upstream_input(self, account: Account) -> list[Any] | None:
        """The input to send to ``account``, or ``None`` when the client's is sent as-is.

        Reasoning goes only where it can be read: a replay leaves out the output reasoning of
        other accounts (S3.2), and any input loses the reasoning the store knows another
        account minted (a client resends whatever it was given); after a refusal
        (``Action.WITHOUT_REASONING``) no reasoning goes at all.
        """
        if self.live:
            return None
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
        failure = replace(
            failure,
            live_anchor=self.live,
            reasoning_stripped=self._strip_reasoning,
            refreshed=account.name in self._refreshed,
            reconnected=self._reconnected,
        )
        action = verdict(failure)
        metrics = self.services.metrics
        pool = self.services.pool
        if action is PASS_ON:
            metrics.attempt(account.name, "client_error")
            self.record.failed_with = failure.reported_status
        elif action is Action.BREAK:
            self._failed(account, failure)
            self.record.failed_with = BROKEN_STREAM_STATUS
        elif action is Action.COOL_DOWN:
            self._failed(account, failure)
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
        if isinstance(response_id, str):
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
        else:
            log.warning("account %s completed a response without an id", account.name)
        self.succeeded(account)
        return response

    def succeeded(self, account: Account) -> None:
        """``account`` served this request: its error streak ends, the affinity is kept."""
        self.services.pool.succeeded(account)
        self.services.pool.remember_affinity(self.affinity_key, account)
        self.services.metrics.attempt(account.name, "ok")

    def observe_headers(self, account: Account, headers: Mapping[str, str]) -> None:
        """Learn the account's usage from an upstream answer's headers."""
        self.services.pool.observe_headers(account, headers)

    def observe_rate_limits(self, account: Account, event: Any) -> None:
        """Learn the account's usage from a ``codex.rate_limits`` event."""
        if isinstance(event, dict):
            self.services.pool.observe_rate_limits(account, event)

    # -- helpers --------------------------------------------------------------------------

    def _attempt_on(self, account: Account) -> None:
        self._tried.add(account.name)
        self.record.attempts += 1
        self.record.account = account.name

    def _again(self, account: Account) -> None:
        """The next attempt goes to ``account`` once more."""
        self._tried.discard(account.name)
        self._retry_on = account

    def _failed(self, account: Account, failure: Failure) -> None:
        self._rate_limited_only = False
        self.services.pool.failed(account, failure.describe())
        self.services.metrics.attempt(account.name, "error")


def handshake_account(services: Services, affinity_key: str | None) -> Account | None:
    """The account for an upstream socket opened at a client's WebSocket handshake, before
    any request: the one a new conversation would get."""
    return services.pool.choose(prefer=None, affinity_key=affinity_key, exclude=())


def learn_headers(services: Services, account: Account, headers: Mapping[str, str]) -> None:
    """Learn ``account``'s usage from the headers of an upstream answer outside a request."""
    services.pool.observe_headers(account, headers)


async def reauthorize(services: Services, account: Account, sent: Credentials) -> bool:
    """After the upstream answered 401 to ``sent``: refresh the account's token (S5); whether
    it was renewed, so that the same account may be tried again. Nothing to refresh with makes
    the account unusable until its credentials change; a refresh that failed for a transient
    reason cools it down."""
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


_REQUEST_IDS = itertools.count(1)
_PROCESS_TAG = secrets.token_hex(4)


def new_request_id(headers: Mapping[str, str]) -> str:
    """The id of one request's log line, unique to this process's run.

    With the client's ``x-client-request-id`` it is that id, a dot and a sequence number:
    Codex sends one id for every turn on a WebSocket and for each retry of a turn, so its id
    alone would not tell those lines apart (and as a prefix it still finds them all).
    """
    number = next(_REQUEST_IDS)
    client_id = headers.get("x-client-request-id")
    return f"{client_id}.{number}" if client_id else f"lb-{_PROCESS_TAG}-{number}"


def error_code(body: Any) -> tuple[str | None, Mapping[str, Any] | None]:
    """The ``code`` (or ``type``) of an OpenAI-shaped error body, and the error object."""
    if not isinstance(body, dict):
        return None, None
    error = body.get("error")
    if not isinstance(error, dict):
        return None, None
    code = error.get("code") or error.get("type")
    return (code if isinstance(code, str) else None), error


def _json_object(event: EventData) -> dict[str, Any]:
    try:
        payload = orjson.loads(event) if isinstance(event, bytes) else event.json()
    except ValueError:
        return {}
    return payload if isinstance(payload, dict) else {}


def _message(error: Any) -> str | None:
    message = error.get("message") if isinstance(error, dict) else None
    return message if isinstance(message, str) else None


def _header_map(headers: dict[Any, Any]) -> dict[str, str]:
    return {str(name).lower(): str(value) for name, value in headers.items()}


def _failure_code(response: dict[str, Any], kind: str) -> str:
    error = response.get("error")
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        return str(error["code"])
    details = response.get("incomplete_details")
    if kind == "response.incomplete" and isinstance(details, dict):
        return str(details.get("reason") or "incomplete")
    return "failed"
