"""What an upstream failure means for the response it hit: one pure verdict (SPEC S3.3, S4).

Both transports describe every upstream failure as a ``Failure`` value, and ``Exchange`` applies
the ``Action`` that ``verdict`` gives it::

    where it happened   status / code      what the client saw       →  action
    ------------------  -----------------  ------------------------     ----------------
    anywhere            any                output visible, an event     PASS_ON
    anywhere            any                output visible, a break      BREAK
    event               previous_response_not_found, live anchor        REPLAY
    status / event      invalid_encrypted_content (first time)          WITHOUT_REASONING
    event               websocket_connection_limit_reached (first)      RECONNECT, then NEXT
    status / handshake  401 (first time for the account)                REFRESH, then UNUSABLE
    status / event      429, or a rate-limit code                       RATE_LIMITED
    end / status/event  a server failure of a suspect request           GIVE_UP
    connect / end       (no answer, or a stream that broke off)         COOL_DOWN
    handshake           any other refusal of the upgrade                COOL_DOWN
    status / event      5xx, 403, 408, or a retryable code              COOL_DOWN
    status / event      anything else: the client's own mistake         PASS_ON

Every action but ``PASS_ON``, ``BREAK`` and ``GIVE_UP`` is invisible to the client: the
request is tried again, on the same account (``REFRESH``, ``REPLAY``, ``RECONNECT``,
``WITHOUT_REASONING``) or on the next one. ``tests/test_failover.py`` holds the table, a row per
upstream behaviour of PROTOCOL.md §5.

A *server failure* (``Failure.implicates_request``: a 5xx or a retryable code, or a stream that
broke off before output) may be the request's doing as much as the account's: an upstream that
cannot process a request fails it on every account. So a request that already met one on
another account (``suspect``) stops there (``GIVE_UP``: the client gets S1.4's 502 and the
account is not held responsible) instead of cooling down account after account. A connect error,
a refused handshake, a 403 or a 408 happen before the upstream read the request, or speak of the
account: they fail over up to ``max_attempts`` as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any

RATE_LIMIT_CODES = frozenset({"usage_limit_reached", "rate_limit_exceeded", "insufficient_quota"})
RETRYABLE_CODES = frozenset(
    {"server_error", "internal_error", "overloaded", "server_is_overloaded", "slow_down"}
)
PREVIOUS_NOT_FOUND = "previous_response_not_found"
UNREADABLE_REASONING = "invalid_encrypted_content"
"""The upstream's refusal of reasoning another account encrypted."""
CONNECTION_LIMIT = "websocket_connection_limit_reached"
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
FAILING_OVER_STATUSES = frozenset({403, 408})
"""Client-error statuses that say more about the account than about the request."""


class Phase(Enum):
    CONNECT = auto()
    """No answer: the connection failed or timed out before a response head."""
    HANDSHAKE = auto()
    """A WebSocket upgrade refused with an HTTP status."""
    STATUS = auto()
    """An HTTP answer with an error status."""
    EVENT = auto()
    """A failure event: ``error``, ``response.failed`` or ``response.incomplete``."""
    BREAK = auto()
    """The stream or socket ended (or went silent) before its terminal event."""


class Action(Enum):
    PASS_ON = auto()
    """The client gets the upstream's answer."""
    BREAK = auto()
    """Output already reached the client: the response ends as ``stream_incomplete``."""
    COOL_DOWN = auto()
    """Back the account off (a short, growing cooldown) and try the next one."""
    RATE_LIMITED = auto()
    """Cool the account down until its reset time and try the next one."""
    NEXT = auto()
    """Try the next account; nothing is held against this one."""
    REFRESH = auto()
    """Refresh the account's token (S5) and try it once more."""
    UNUSABLE = auto()
    """The account's credentials are refused even fresh: out until they change."""
    REPLAY = auto()
    """The upstream did not know the forwarded anchor: replay on the same account (S3.3)."""
    RECONNECT = auto()
    """The socket reached its lifetime: a new one on the same account, with replay."""
    WITHOUT_REASONING = auto()
    """The account cannot read reasoning in the input: the same account without any."""
    GIVE_UP = auto()
    """A server failure of a request that met one on another account too: the request is the
    likely cause. No failover, no cooldown; the client gets a 502 (S1.4 ``upstream_error``)."""


KEEPS_SOCKET = frozenset({Action.REPLAY, Action.WITHOUT_REASONING})
"""Actions after which the retry may go on the same upstream socket."""


@dataclass(frozen=True, slots=True)
class Failure:
    """One upstream failure, as a value."""

    phase: Phase
    status: int | None = None
    """The HTTP status: of the answer or refused handshake, or an ``error`` event's own."""
    code: str | None = None
    message: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    """Response headers (or those an ``error`` event carries): reset times."""
    error: Mapping[str, Any] | None = None
    """The OpenAI error object, when there was one (``resets_at``)."""
    incomplete: bool = False
    """A ``response.incomplete``: an answer cut short by design (``max_output_tokens``)."""
    usage: Mapping[str, Any] | None = None
    """The ``usage`` a failed or incomplete response reported: tokens the key spent."""
    visible: bool = False
    """Output of this response already reached the client."""
    live_anchor: bool = False
    """The request went with its ``previous_response_id`` on a socket that made it."""
    reasoning_stripped: bool = False
    refreshed: bool = False
    """The account's token was already refreshed for this request."""
    reconnected: bool = False
    """The socket was already renewed for this request."""
    suspect: bool = False
    """The request already met a server failure on another account (in this exchange, or
    recently when a client sent the same request before: ``Pool.suspect``)."""

    @property
    def implicates_request(self) -> bool:
        """A server failure: one the request itself may have caused (see the module)."""
        if self.phase is Phase.BREAK:
            return True
        if self.phase is Phase.STATUS or self.phase is Phase.EVENT:
            status = self.status
            return (status is not None and status >= 500) or self.code in RETRYABLE_CODES
        return False

    @property
    def reported_status(self) -> int | None:
        """The status a client that gets this failure is counted with: the upstream's own,
        else one that fits its code; none for an incomplete response."""
        if self.status is not None:
            return self.status
        return None if self.incomplete else status_for(self.code)

    def describe(self) -> str:
        """For log lines: what happened, without any secret."""
        what = {
            Phase.CONNECT: "no answer",
            Phase.HANDSHAKE: "handshake refused",
            Phase.STATUS: "HTTP error",
            Phase.EVENT: "failure event",
            Phase.BREAK: "stream broke off",
        }[self.phase]
        details = [str(part) for part in (self.status, self.code) if part is not None]
        if self.message and self.phase in (Phase.CONNECT, Phase.BREAK):
            details.append(self.message)
        return f"{what} ({', '.join(details)})" if details else what


def verdict(failure: Failure) -> Action:
    """What to do after ``failure`` (see the module's table)."""
    phase, status, code = failure.phase, failure.status, failure.code
    if failure.visible:
        return Action.PASS_ON if phase is Phase.EVENT else Action.BREAK
    if failure.live_anchor and _previous_not_found(failure):
        return Action.REPLAY
    if code == UNREADABLE_REASONING and not failure.reasoning_stripped:
        return Action.WITHOUT_REASONING
    if code == CONNECTION_LIMIT:
        return Action.NEXT if failure.reconnected else Action.RECONNECT
    if status == 401:
        return Action.UNUSABLE if failure.refreshed else Action.REFRESH
    if status == 429 or code in RATE_LIMIT_CODES:
        return Action.RATE_LIMITED
    if failure.suspect and failure.implicates_request:
        return Action.GIVE_UP
    if phase in (Phase.CONNECT, Phase.BREAK, Phase.HANDSHAKE):
        return Action.COOL_DOWN
    if status is not None and (status >= 500 or status in FAILING_OVER_STATUSES):
        return Action.COOL_DOWN
    if code in RETRYABLE_CODES:
        return Action.COOL_DOWN
    return Action.PASS_ON


def status_for(code: str | None) -> int:
    """The HTTP status of an upstream failure that came with a ``code`` and no status."""
    if code in RATE_LIMIT_CODES:
        return 429
    if code in REQUEST_ERROR_CODES:
        return 400
    return 500


def error_code(body: Any) -> tuple[str | None, Mapping[str, Any] | None]:
    """The ``code`` (or ``type``) of an OpenAI-shaped error body, and the error object."""
    if not isinstance(body, dict):
        return None, None
    error = body.get("error")
    if not isinstance(error, dict):
        return None, None
    code = error.get("code") or error.get("type")
    return (code if isinstance(code, str) else None), error


def _previous_not_found(failure: Failure) -> bool:
    if failure.code == PREVIOUS_NOT_FOUND:
        return True
    return failure.message is not None and "Invalid 'previous_response_id'" in failure.message
