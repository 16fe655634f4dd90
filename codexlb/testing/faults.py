"""Scripted failures of the fake upstream and the OpenAI-shaped errors it answers with.

A `Fault` is a plain value. `FakeUpstream.script` queues faults; each response request that
authenticates pops one and suffers it (see `FakeUpstream`). The kinds:

    status           an HTTP error answer (over WebSocket: an ``error`` event with that status)
    ws_error         an ``error`` event over WebSocket (HTTP: the status, 500 when None)
    handshake        refuses the next WebSocket upgrade with an HTTP error (HTTP: like status)
    slow_first_byte  waits, then answers normally
    slow_finish      sends every event but the last, waits, then sends the last one
    drop_after       sends N events, then drops the connection without any terminator
    stall_after      sends N events, then holds the response open until the peer hangs up
    failed           ``response.created`` then ``response.failed``
    raw              an answer given byte for byte: status, headers, body (WebSocket: one
                     text frame with the body, whatever the status)
    flood            ``response.created``, then one unit of bytes (WebSocket: one text frame)
                     over and over, never a terminal event

`UpstreamError` is the rendering shared by faults and the fake's own validation errors: one
value gives the HTTP answer and the WebSocket ``error`` event.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

FaultKind = Literal[
    "status",
    "ws_error",
    "handshake",
    "slow_first_byte",
    "slow_finish",
    "drop_after",
    "stall_after",
    "failed",
    "raw",
    "flood",
]

PRIMARY_WINDOW_MINUTES = 300

_RATE_LIMIT_CODES = frozenset({"usage_limit_reached", "rate_limit_exceeded"})
_INVALID_REQUEST_CODES = frozenset(
    {
        "invalid_request",
        "invalid_api_key",
        "token_expired",
        "previous_response_not_found",
        "invalid_encrypted_content",
        "websocket_connection_limit_reached",
        "context_length_exceeded",
    }
)
_DEFAULT_CODES = {
    400: "invalid_request",
    401: "invalid_api_key",
    403: "forbidden",
    404: "not_found",
    429: "usage_limit_reached",
}
_MESSAGES = {
    "usage_limit_reached": "The usage limit has been reached",
    "rate_limit_exceeded": "Rate limit reached. Please try again later.",
    "invalid_api_key": "Incorrect API key provided.",
    "token_expired": "Provided authentication token is expired. Please try signing in again.",
    "server_error": "An error occurred while processing your request.",
    "previous_response_not_found": "Previous response not found.",
    "invalid_encrypted_content": "The encrypted content could not be verified.",
    "websocket_connection_limit_reached": (
        "Responses websocket connection limit reached (60 minutes). "
        "Create a new websocket connection to continue."
    ),
    "context_length_exceeded": "Your input exceeds the context window of this model.",
}


@dataclass(frozen=True)
class UpstreamError:
    """An error answer: HTTP status, the OpenAI error object, extra response headers.

    ``ws_status`` False renders the WebSocket event without ``status`` (Codex ignores such an
    event unless its code is one it knows).
    """

    status: int
    error: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    ws_status: bool = True

    def http_body(self) -> bytes:
        return json.dumps({"error": self.error}).encode()

    def ws_event(self) -> dict[str, Any]:
        event: dict[str, Any] = {"type": "error"}
        if self.ws_status:
            event["status"] = self.status
        event["error"] = self.error
        if self.headers:
            event["headers"] = dict(self.headers)
        return event


def openai_error(
    status: int,
    code: str | None = None,
    *,
    now: float,
    message: str | None = None,
    param: str | None = None,
    resets_in: float | None = None,
    retry_after: float | None = None,
    ws_status: bool = True,
) -> UpstreamError:
    """Render an error the way the upstream does.

    ``code`` defaults from the status (429: ``usage_limit_reached``, 401: ``invalid_api_key``,
    5xx: ``server_error``). A 429 carries ``x-codex-primary-used-percent: 100`` and
    ``x-codex-primary-reset-at``, at ``now + resets_in`` (else ``+ retry_after``, else the end of
    a fresh primary window). ``resets_in`` adds ``resets_at`` (epoch seconds, rounded up) and
    ``resets_in_seconds`` to the error object. ``retry_after`` gives ``Retry-After`` in seconds,
    formatted with ``%g`` so that tests may use fractions, and ``retry-after-ms``.
    """
    if code is None:
        code = _DEFAULT_CODES.get(status, "server_error" if status >= 500 else "invalid_request")
    error: dict[str, Any] = {
        "message": message or _MESSAGES.get(code, f"Upstream error ({code})."),
        "type": _error_type(status if ws_status else None, code),
        "code": code,
        "param": param,
    }
    headers: dict[str, str] = {}
    if code == "usage_limit_reached":
        error["plan_type"] = "pro"
    if resets_in is not None:
        error["resets_at"] = math.ceil(now + resets_in)
        error["resets_in_seconds"] = math.ceil(resets_in)
    if retry_after is not None:
        headers["Retry-After"] = f"{retry_after:g}"
        headers["retry-after-ms"] = str(round(retry_after * 1000))
    if status == 429:
        reset_in = resets_in if resets_in is not None else retry_after
        if reset_in is None:
            reset_in = PRIMARY_WINDOW_MINUTES * 60.0
        headers["x-codex-primary-used-percent"] = "100"
        headers["x-codex-primary-window-minutes"] = str(PRIMARY_WINDOW_MINUTES)
        headers["x-codex-primary-reset-at"] = str(math.ceil(now + reset_in))
    return UpstreamError(status, error, headers, ws_status)


def _error_type(status: int | None, code: str) -> str:
    if code in _RATE_LIMIT_CODES:
        return code
    if code in _INVALID_REQUEST_CODES:
        return "invalid_request_error"
    if status is None or status >= 500:
        return "server_error"
    return "invalid_request_error"


@dataclass(frozen=True)
class Fault:
    """One scripted failure. Build it with the classmethods, not the constructor."""

    kind: FaultKind
    http_status: int | None = None
    code: str | None = None
    resets_in: float | None = None
    retry_after: float | None = None
    seconds: float = 0.0
    events: int = 0
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    binary: bool = False
    """A WebSocket ``flood`` of binary frames rather than text ones."""

    @classmethod
    def status(
        cls,
        code: int,
        *,
        error_code: str | None = None,
        resets_in: float | None = None,
        retry_after: float | None = None,
    ) -> Fault:
        """Answer with HTTP ``code`` and an OpenAI error body (see `openai_error`).

        Over WebSocket the same error goes out as an ``error`` event with ``status: code``.
        """
        _check_status(code)
        return cls(
            "status",
            http_status=code,
            code=error_code,
            resets_in=resets_in,
            retry_after=retry_after,
        )

    @classmethod
    def ws_error(cls, status: int | None, code: str) -> Fault:
        """Over WebSocket, send ``{"type": "error", "status"?, "error"}`` instead of a response.

        ``status`` None omits the field. The socket stays open. Over HTTP this is
        ``Fault.status(status or 500, error_code=code)``.
        """
        if status is not None:
            _check_status(status)
        return cls("ws_error", http_status=status, code=code)

    @classmethod
    def handshake(
        cls, status: int, *, error_code: str | None = None, retry_after: float | None = None
    ) -> Fault:
        """Refuse the next WebSocket upgrade (of the scripted account) with HTTP ``status``.

        Only a handshake at the head of the queue consumes it; a response request that pops it
        is answered like `Fault.status`.
        """
        _check_status(status)
        return cls("handshake", http_status=status, code=error_code, retry_after=retry_after)

    @classmethod
    def slow_first_byte(cls, seconds: float) -> Fault:
        """Wait ``seconds`` before the response headers (WebSocket: the first frame)."""
        if seconds < 0:
            raise ValueError("seconds must be >= 0")
        return cls("slow_first_byte", seconds=seconds)

    @classmethod
    def slow_finish(cls, seconds: float) -> Fault:
        """Send every response event but the last at once, wait ``seconds``, then send the
        last one (``response.completed``), as a model does that streams its output over time."""
        if seconds < 0:
            raise ValueError("seconds must be >= 0")
        return cls("slow_finish", seconds=seconds)

    @classmethod
    def drop_after(cls, events: int) -> Fault:
        """Send the first ``events`` response events, then close the TCP connection at once.

        HTTP: status 200 and those events, no chunked terminator. WebSocket: no close frame;
        ``events=0`` closes right after the ``response.create`` arrives, before any frame.
        """
        if events < 0:
            raise ValueError("events must be >= 0")
        return cls("drop_after", events=events)

    @classmethod
    def stall_after(cls, events: int) -> Fault:
        """Send the first ``events`` response events, then send nothing more.

        The response stays open until the peer hangs up (counted in
        `FakeUpstream.disconnects`) or the fake closes (then the connection is dropped).
        """
        if events < 0:
            raise ValueError("events must be >= 0")
        return cls("stall_after", events=events)

    @classmethod
    def failed(cls, code: str = "server_error") -> Fault:
        """Stream ``response.created`` then ``response.failed`` with ``response.error.code``."""
        return cls("failed", code=code)

    @classmethod
    def raw(
        cls, body: bytes, *, status: int = 200, headers: Mapping[str, str] | None = None
    ) -> Fault:
        """Answer with exactly ``status``, ``headers`` and ``body``, as a misbehaving upstream
        (or a proxy in front of it) might. Over WebSocket: ``body`` as one text frame."""
        return cls("raw", http_status=status, body=body, headers=tuple((headers or {}).items()))

    @classmethod
    def flood(cls, unit: bytes, times: int, *, binary: bool = False) -> Fault:
        """``response.created``, then ``unit`` ``times`` times and nothing else (HTTP: raw
        stream bytes, written as they are; WebSocket: a text frame each, or with ``binary`` a
        binary frame), then a hang-up."""
        if times < 0:
            raise ValueError("times must be >= 0")
        return cls("flood", body=unit, events=times, binary=binary)

    @property
    def is_error(self) -> bool:
        """Whether the fault answers with an error instead of a response stream."""
        return self.kind in ("status", "ws_error", "handshake")

    def error(self, *, now: float, previous_response_id: str | None = None) -> UpstreamError:
        """The error answer of an error fault (see `is_error`)."""
        if not self.is_error:
            raise ValueError(f"a {self.kind} fault is not an error answer")
        status = self.http_status or 500
        message = param = None
        if self.code == "previous_response_not_found":
            param = "previous_response_id"
            if previous_response_id is not None:
                message = previous_response_not_found_message(previous_response_id)
        return openai_error(
            status,
            self.code,
            now=now,
            message=message,
            param=param,
            resets_in=self.resets_in,
            retry_after=self.retry_after,
            ws_status=self.kind != "ws_error" or self.http_status is not None,
        )


def previous_response_not_found_message(response_id: str) -> str:
    return f"Previous response with id '{response_id}' not found."


def _check_status(status: int) -> None:
    if not 400 <= status <= 599:
        raise ValueError(f"an error status must be 4xx or 5xx, not {status}")
