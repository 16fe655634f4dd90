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
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum, auto
from typing import Any, Protocol

import orjson

from codexlb.config import Config
from codexlb.credentials import Credentials
from codexlb.errors import SnapshotNotStored
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

RATE_LIMIT_CODES = frozenset({"usage_limit_reached", "rate_limit_exceeded", "insufficient_quota"})
RETRYABLE_CODES = frozenset(
    {"server_error", "internal_error", "overloaded", "server_is_overloaded", "slow_down"}
)
PREVIOUS_NOT_FOUND = "previous_response_not_found"
UNREADABLE_REASONING = "invalid_encrypted_content"
"""The upstream's refusal of reasoning another account encrypted."""
REQUEST_ERROR_CODES = frozenset(
    {
        PREVIOUS_NOT_FOUND,
        UNREADABLE_REASONING,
        "invalid_request",
        "invalid_request_error",
        "invalid_prompt",
        "context_length_exceeded",
    }
)
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

    __slots__ = (
        "_created",
        "failure_code",
        "failure_status",
        "output_items",
        "response",
        "streaming",
        "visible",
    )

    def __init__(self, *, streaming: bool = True) -> None:
        self.streaming = streaming
        """When false (an assembled response) nothing reaches the client before the end."""
        self.visible = False
        self._created: EventData | None = None
        self.output_items: dict[int, Any] = {}
        self.response: dict[str, Any] | None = None
        self.failure_code: str | None = None
        self.failure_status: int | None = None
        """The HTTP status of a failure: an ``error`` event's own, else ``status_for`` its
        code; ``None`` for ``response.incomplete``, an answer cut short by design."""

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
            self.failure_code = _failure_code(self.response, kind)
            if kind == "response.failed":
                self.failure_status = status_for(self.failure_code)
            return FAILED
        # The one left: "error".
        payload = _json_object(event)
        error = payload.get("error")
        code = error.get("code") if isinstance(error, dict) else payload.get("code")
        self.failure_code = code if isinstance(code, str) else "error"
        status = payload.get("status")
        self.failure_status = status if type(status) is int else status_for(self.failure_code)
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

    def retryable_failure(self) -> bool:
        """A failure before anything visible that another account may not share."""
        return not self.visible and (
            self.failure_code in RETRYABLE_CODES or self.failure_code in RATE_LIMIT_CODES
        )


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


class Exchange:
    """Account choice, upstream body and snapshot commit for one ``response.create``."""

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
        self._history_loaded = False
        self.tried: set[str] = set()
        self.rate_limited_only = True
        self.strip_reasoning = False
        self.reauthorized: set[str] = set()
        """Accounts whose 401 this exchange already answered with a refresh (once each)."""
        self._retry_on: Account | None = None

    async def load_history(self) -> None:
        """Read what the store knows of this request's conversation, once: the ancestry of
        ``previous_response_id`` (raises S1.4's not-found error), or else which accounts
        produced the items of the input (``provenance``)."""
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

        The parent's account comes first, then ``prefer`` (a transport's open socket).
        """
        retry, self._retry_on = self._retry_on, None
        if retry is not None:  # after a token refresh: the same account once more (S4)
            self.attempt_on(retry)
            return retry
        pool = self.services.pool
        max_attempts = pool.routing.max_attempts  # live: the pool follows config reloads
        account = None
        if len(self.tried) < max_attempts:
            account = pool.choose(
                prefer=self.origin_account or prefer,
                affinity_key=self.affinity_key,
                exclude=self.tried,
            )
        if account is None:
            raise pool.exhausted(rate_limited=bool(self.tried) and self.rate_limited_only)
        self.attempt_on(account)
        return account

    def attempt_on(self, account: Account) -> None:
        """Count an attempt on ``account`` (chosen here, or a transport's live socket)."""
        self.tried.add(account.name)
        self.record.attempts += 1
        self.record.account = account.name

    def retry_same_account(self, account: Account) -> None:
        """Allow one more attempt on ``account``."""
        self.tried.discard(account.name)

    def retry_without_reasoning(self, account: Account, code: str | None) -> bool:
        """After ``code`` from ``account`` before anything was visible: whether it is the
        refusal of reasoning the account cannot read, answered (once per request) by sending
        the same account the input without any reasoning."""
        if code != UNREADABLE_REASONING or self.strip_reasoning:
            return False
        log.info("account %s refused reasoning it cannot read: retrying without", account.name)
        self.services.metrics.attempt(account.name, "unreadable_reasoning")
        self.strip_reasoning = True
        self.tried.discard(account.name)
        self._retry_on = account
        return True

    def upstream_input(self, account: Account) -> list[Any] | None:
        """The input to send to ``account``, or ``None`` when the client's is sent as-is.

        Reasoning goes only where it can be read: a replay leaves out the output reasoning of
        other accounts (S3.2), and any input loses the reasoning the store knows another
        account minted (a client resends whatever it was given); after a refusal
        (``retry_without_reasoning``) no reasoning goes at all.
        """
        if self.chain:
            items = rebuild_input(self.chain, self.request.input_items, account.name)
            self.services.metrics.replay(
                len(items), same_account=self.chain[-1].account == account.name
            )
        else:
            items = self.request.input_items
        if self.strip_reasoning:
            return strip_reasoning(items)
        readable = readable_by(items, self.owners, account.name) if self.owners else None
        if readable is not None:
            return readable
        return items if self.chain else None

    # -- outcomes -------------------------------------------------------------------------

    def failed(self, account: Account, reason: str) -> None:
        self.rate_limited_only = False
        self.services.pool.failed(account, reason)
        self.services.metrics.attempt(account.name, "error")

    def rate_limited(
        self, account: Account, headers: Mapping[str, str], error: Mapping[str, Any] | None
    ) -> None:
        self.services.pool.rate_limited(account, headers=headers, error=error)
        self.services.metrics.attempt(account.name, "rate_limited")

    async def prepare(self, account: Account) -> None:
        """Before an attempt on ``account``: refresh its token if it expires soon (S5).

        The pool's ``account.credentials`` follow (``Pool.credentials_changed``); take the
        credentials an attempt sends from there, right before sending.
        """
        await self.services.credentials.ensure_fresh(account.name)

    async def unauthorized(self, account: Account, sent: Credentials) -> None:
        """The upstream answered 401 to ``sent`` (S4): the first time per account, refresh
        and let ``next_account`` retry the same account; a second 401, or nothing to refresh
        with, makes the account unusable until its credentials change. A refresh that failed
        for a transient reason cools the account down instead."""
        self.rate_limited_only = False
        self.services.metrics.attempt(account.name, "unauthorized")
        if account.name in self.reauthorized:
            self.services.pool.unauthorized(account)
            return
        self.reauthorized.add(account.name)
        if await reauthorize(self.services, account, sent):
            self.tried.discard(account.name)
            self._retry_on = account

    def refused_by_upstream(self, account: Account, status: int | None) -> None:
        """The upstream found fault with the request itself; its answer, with ``status`` (none
        for ``response.incomplete``), goes to the client."""
        self.services.metrics.attempt(account.name, "client_error")
        self.record.failed_with = status

    def broke(self, account: Account, reason: str) -> None:
        """The upstream broke off after visible output: the response ends as
        ``stream_incomplete``."""
        self.failed(account, reason)
        self.record.failed_with = BROKEN_STREAM_STATUS

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
                raise SnapshotNotStored from exc
            self.services.metrics.snapshot_write.observe(time.perf_counter() - queued)
        else:
            log.warning("account %s completed a response without an id", account.name)
        self.succeeded(account)
        return response

    def succeeded(self, account: Account) -> None:
        """``account`` served this request: reset its error streak, remember the affinity."""
        self.services.pool.succeeded(account)
        self.services.pool.remember_affinity(self.affinity_key, account)
        self.services.metrics.attempt(account.name, "ok")


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
    """The client's ``x-client-request-id``, else an id unique to this process's run."""
    return headers.get("x-client-request-id") or f"lb-{_PROCESS_TAG}-{next(_REQUEST_IDS)}"


def error_code(body: Any) -> tuple[str | None, Mapping[str, Any] | None]:
    """The ``code`` (or ``type``) of an OpenAI-shaped error body, and the error object."""
    if not isinstance(body, dict):
        return None, None
    error = body.get("error")
    if not isinstance(error, dict):
        return None, None
    code = error.get("code") or error.get("type")
    return (code if isinstance(code, str) else None), error


def status_for(code: str | None) -> int:
    """The HTTP status of an upstream failure that came with a ``code`` and no status."""
    if code in RATE_LIMIT_CODES:
        return 429
    if code in REQUEST_ERROR_CODES:
        return 400
    return 500


def _json_object(event: EventData) -> dict[str, Any]:
    try:
        payload = orjson.loads(event) if isinstance(event, bytes) else event.json()
    except ValueError:
        return {}
    return payload if isinstance(payload, dict) else {}


def _failure_code(response: dict[str, Any], kind: str) -> str:
    error = response.get("error")
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        return str(error["code"])
    details = response.get("incomplete_details")
    if kind == "response.incomplete" and isinstance(details, dict):
        return str(details.get("reason") or "incomplete")
    return "failed"
