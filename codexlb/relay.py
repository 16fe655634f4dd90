"""The relay of one attempt, sans I/O: upstream events in, steps out.

Both transports read upstream events their own way (HTTP in batches of what arrived
together, WebSocket frame by frame) and feed each to one ``ResponseRecorder``, which answers
with a ``Step``::

    HOLD       not visible yet (created, in_progress, rate limits, metadata): keep it back
    PASS       send it (with what was held, the first time)
    COMPLETED  commit the snapshot, then send it
    FAILED     a failure event: ``recorder.failure`` says what it was, for the verdict
    BROKEN     an event that cannot be what its type says (a failure or terminal event
               that is not JSON): the attempt ends as a broken upstream (``recorder.broken``)

and keeps what the exchange needs: whether output is visible yet, the output items in
``output_index`` order, the terminal response. It also writes the two endings codexlb adds
itself: ``response.failed`` with ``stream_incomplete`` for a stream that broke off after
visible output, and with the code of a refused snapshot. Nothing else is parsed: most events
(the deltas) are passed on by their type alone.

It also decides the bounds of what an upstream may send (``exceeds``): the transports count
the bytes of a response as they arrive (HTTP per batch of events, WebSocket per frame; a single
event is bounded by the SSE decoder and the socket's ``max_msg_size``), and a response past
``max_response_bytes`` ends as a broken upstream. ``shaped_error`` is the one rule for what a
client sees of an upstream error answer: S1.4's shape, always.
"""

from __future__ import annotations

from enum import Enum, auto
from typing import Any, Protocol

import orjson

from codexlb.failover import Failure, Phase

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
PLAIN_OUTPUT = (
    "response.output_text.delta",
    "response.reasoning_summary_text.delta",
    "response.reasoning_text.delta",
    "response.function_call_arguments.delta",
    "response.custom_tool_call_input.delta",
)
"""The events most of a stream is made of: output and nothing more, passed on by type alone."""
PLAIN_PREFIXES = tuple(b'{"type":"%s"' % kind.encode() for kind in PLAIN_OUTPUT)
"""How a plain event's JSON starts as the upstream writes it (``type`` first): the WebSocket
reader gathers the frames that start so into runs (``frames.FrameReader``)."""


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
    """``response.failed`` / ``response.incomplete`` / ``error``: see ``failure``."""
    BROKEN = auto()
    """A failure or terminal event that is not JSON: see ``broken``."""


HOLD, PASS, COMPLETED, FAILED, BROKEN = (
    Step.HOLD,
    Step.PASS,
    Step.COMPLETED,
    Step.FAILED,
    Step.BROKEN,
)
"""The steps by plain name, for the per-event code: on Python 3.11 each ``Step.X`` goes
through ``EnumType.__getattr__``, about a thousand instructions."""


class ResponseRecorder:
    """Watches one attempt's events; parses only the few it must."""

    __slots__ = (
        "_created",
        "failure",
        "malformed",
        "max_response_bytes",
        "output_items",
        "response",
        "streaming",
        "visible",
    )

    def __init__(self, *, streaming: bool = True, max_response_bytes: int | None = None) -> None:
        self.streaming = streaming
        self.max_response_bytes = max_response_bytes
        self.malformed: str | None = None
        """Why the last ``BROKEN`` step was taken."""
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
            done = _json_object(event) or {}
            index = done.get("output_index")
            item = done.get("item")
            if item is not None:
                self.output_items[index if isinstance(index, int) else len(self.output_items)] = (
                    item
                )
            return PASS
        payload = _json_object(event)
        if payload is None:
            self.malformed = f"a {kind} event that is not JSON"
            return BROKEN
        if kind == "response.completed":
            response = payload.get("response")
            self.response = response if isinstance(response, dict) else {}
            return COMPLETED
        if kind in ("response.failed", "response.incomplete"):
            response = payload.get("response")
            self.response = response if isinstance(response, dict) else {}
            error = self.response.get("error")
            usage = self.response.get("usage")
            self.failure = Failure(
                Phase.EVENT,
                usage=usage if isinstance(usage, dict) else None,
                code=_failure_code(self.response, kind),
                message=_message(error),
                error=error if isinstance(error, dict) else None,
                visible=self.visible,
                incomplete=kind == "response.incomplete",
            )
            return FAILED
        # The one left: "error".
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

    def exceeds(self, received: int) -> bool:
        """Whether ``received`` bytes of this response are past the limit: then the attempt
        ends as ``broken("...")``."""
        limit = self.max_response_bytes
        return limit is not None and received > limit

    def started_response(self) -> dict[str, Any]:
        """The response object as far as known: the terminal one, else the created one."""
        if self.response is not None:
            return self.response
        if self._created is not None:
            response = (_json_object(self._created) or {}).get("response")
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


def _json_object(event: EventData) -> dict[str, Any] | None:
    """The event's JSON object (``{}`` for other JSON), ``None`` when it is not JSON."""
    try:
        payload = orjson.loads(event) if isinstance(event, bytes) else event.json()
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else {}


def shaped_error(status: int, body: Any) -> tuple[int, dict[str, Any]]:
    """What a client sees of an upstream error answer it is given (S1.4): the upstream's own
    status and body when the body is an OpenAI error (``{"error": {"message": ...}}``) and the
    status an error status; otherwise a 502 ``upstream_error`` that names the status."""
    error = body.get("error") if isinstance(body, dict) else None
    if 400 <= status <= 599 and isinstance(error, dict) and isinstance(error.get("message"), str):
        return status, body
    return 502, {
        "error": {
            "message": f"The upstream answered with an unexpected HTTP {status}.",
            "type": "server_error",
            "code": "upstream_error",
            "param": None,
        }
    }


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
