"""A pure, incremental decoder of Server-Sent Events.

Feed it the byte chunks of a stream as they arrive; it returns the complete events so far,
each carrying the exact bytes it was framed in (``raw``), so a relay can forward what it
received unchanged while it observes a parsed copy. Comment-only blocks (keep-alives) come
out as events without a type, so not a byte of the stream is lost. Event data is decoded as
JSON only on demand: a relay reads the ``event:`` line of most events and parses just the few
it needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

_SEPARATORS = (b"\n\n", b"\r\n\r\n", b"\r\r")


@dataclass(slots=True)
class SSEEvent:
    raw: bytes
    """The event's bytes exactly as received, including the blank line that ended it."""
    event: str | None
    """The ``event:`` field, if the event had one."""
    data: bytes
    """The ``data:`` lines joined with newlines."""
    _parsed: Any = field(default=None, repr=False)

    def json(self) -> Any:
        """The data decoded as JSON (cached); raises ``ValueError`` when it is not JSON."""
        if self._parsed is None:
            self._parsed = orjson.loads(self.data)
        return self._parsed

    @property
    def type(self) -> str | None:
        """The event's type: its ``event:`` field, else the ``type`` member of its data."""
        return self.event if self.event is not None else type_of(self)


def type_of(event: Any) -> str | None:
    """The ``type`` member of an event's JSON (``event.json()``), if it has one."""
    try:
        payload = event.json()
    except ValueError:
        return None
    kind = payload.get("type") if isinstance(payload, dict) else None
    return kind if isinstance(kind, str) else None


class SSEDecoder:
    """Splits a byte stream into events; keeps the unfinished tail between ``feed`` calls."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        buffer = self._buffer + chunk if self._buffer else chunk
        events: list[SSEEvent] = []
        start = 0
        if b"\r" not in buffer:  # the usual framing: one fast search per event
            while (end := buffer.find(b"\n\n", start)) >= 0:
                events.append(_parse_lf_block(buffer[start : end + 2], buffer[start:end]))
                start = end + 2
        else:
            while True:
                end, sep_len = _find_separator(buffer, start)
                if end < 0:
                    break
                events.append(_parse_block(buffer[start : end + sep_len], buffer[start:end]))
                start = end + sep_len
        self._buffer = buffer[start:]
        return events

    def flush(self) -> list[SSEEvent]:
        """The last event of a stream that ended without its blank line, if any."""
        tail, self._buffer = self._buffer, b""
        if not tail.strip():
            return []
        return [_parse_block(tail, tail.rstrip(b"\r\n"))]

    @property
    def pending(self) -> bool:
        return bool(self._buffer.strip())


def _find_separator(buffer: bytes, start: int) -> tuple[int, int]:
    best, best_len = -1, 0
    for sep in _SEPARATORS:
        pos = buffer.find(sep, start)
        if pos >= 0 and (best < 0 or pos < best):
            best, best_len = pos, len(sep)
    return best, best_len


def _parse_lf_block(raw: bytes, body: bytes) -> SSEEvent:
    """A block known to hold no CR: the common ``event: <type>\ndata: <one line>`` is split
    with two searches, anything else goes the general way."""
    if body.startswith(b"event: "):
        newline = body.find(b"\n")
        if (
            newline > 0
            and body.startswith(b"data: ", newline + 1)
            and body.find(b"\n", newline + 1) < 0
        ):
            kind = body[7:newline].decode("utf-8", "replace")
            return SSEEvent(raw=raw, event=kind, data=body[newline + 7 :])
    return _parse_block(raw, body)


def _parse_block(raw: bytes, body: bytes) -> SSEEvent:
    event: str | None = None
    data_lines: list[bytes] = []
    for line in body.splitlines():
        if not line or line.startswith(b":"):
            continue
        name, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            data_lines.append(value)
        elif name == b"event":
            event = value.decode("utf-8", "replace")
    return SSEEvent(raw=raw, event=event, data=b"\n".join(data_lines))


def encode_event(payload: dict[str, Any]) -> bytes:
    """Frame one event the way the Responses API does: ``event: <type>`` then its JSON data."""
    return (
        b"event: " + str(payload["type"]).encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"
    )
