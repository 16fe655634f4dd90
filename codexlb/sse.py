"""A pure, incremental decoder of Server-Sent Events.

Feed it the byte chunks of a stream as they arrive; it returns the complete events so far,
each carrying the exact bytes it was framed in, so a relay can forward what it received
unchanged while it observes the events' types. Comment-only blocks (keep-alives) come out as
events without a type, so not a byte of the stream is lost. Data is left as bytes: a relay
parses the JSON of just the few events it needs.

Events are plain tuples ``(raw, type, data)`` (see ``Event``): a relay makes one for every
event it forwards, and a tuple costs a fraction of an object with named fields.
"""

from __future__ import annotations

from typing import Any

import orjson

Event = tuple[bytes, str | None, bytes]
"""``(raw, type, data)``: the event's exact bytes, through the blank line that ended it; its
type (the ``event:`` field, else the ``type`` member of its JSON data, else ``None``); its
``data:`` lines joined with newlines."""

_SEPARATORS = (b"\n\n", b"\r\n\r\n", b"\r\r")
_KNOWN_HEADS: dict[bytes, str] = {}
"""``event: <type>`` lines seen before, decoded (a stream repeats a handful of types)."""
_KNOWN_HEADS_LIMIT = 256


class EventTooLarge(ValueError):
    """An event grew past the decoder's ``max_event_bytes`` without its blank line."""


class SSEDecoder:
    """Splits a byte stream into events; keeps the unfinished tail between ``feed`` calls.

    Each byte is scanned for a separator once: an unfinished event waits in a buffer that
    grows by the new bytes only, and only those are searched, so an event that arrives in a
    million pieces costs what it costs in one. ``max_event_bytes`` bounds that buffer
    (``EventTooLarge``).
    """

    __slots__ = ("_buffer", "_max_event", "_scanned")

    def __init__(self, max_event_bytes: int | None = None) -> None:
        self._buffer = bytearray()
        self._scanned = 0
        """How much of ``_buffer`` is known to hold no complete separator."""
        self._max_event = max_event_bytes

    def feed(self, chunk: bytes) -> list[Event]:
        if self._buffer:
            buffer = self._buffer
            buffer += chunk
            start = max(self._scanned - 3, 0)  # a separator may straddle the old end
            if (
                buffer.find(b"\n\n", start) < 0
                and buffer.find(b"\r\r", start) < 0
                and buffer.find(b"\r\n\r\n", start) < 0
            ):
                self._scanned = len(buffer)
                self._check_size()
                return []
            whole = bytes(buffer)
            buffer.clear()
        else:
            whole = chunk
        events = self._split(whole)
        if self._buffer:  # an unfinished event kept (``_keep``)
            self._check_size()
        return events

    def flush(self) -> list[Event]:
        """The last event of a stream that ended without its blank line, if any."""
        tail = bytes(self._buffer)
        self._buffer.clear()
        self._scanned = 0
        if not tail.strip():
            return []
        return [_parse_block(tail, tail.rstrip(b"\r\n"))]

    @property
    def pending(self) -> bool:
        return bool(self._buffer.strip())

    def _check_size(self) -> None:
        if self._max_event is not None and len(self._buffer) > self._max_event:
            self._buffer.clear()
            self._scanned = 0
            raise EventTooLarge(f"an event exceeds {self._max_event} bytes")

    def _keep(self, tail: bytes) -> None:
        """Keep ``tail`` (which holds no separator) for the next ``feed``."""
        self._buffer += tail
        self._scanned = len(tail)

    def _split(self, buffer: bytes) -> list[Event]:
        # ``find`` rather than ``in``: for bytes, ``in`` first tries its operand as an integer
        # and formats an error message for each miss.
        if buffer.find(b"\r") >= 0:
            return self._feed_any_framing(buffer)
        # The usual framing: blocks end with a blank line, most are ``event: <type>`` then
        # one ``data:`` line.
        blocks = buffer.split(b"\n\n")
        tail = blocks.pop()
        if tail:
            self._keep(tail)
        events: list[Event] = []
        for block in blocks:
            head, separator, data = block.partition(b"\ndata: ")
            kind = _KNOWN_HEADS.get(head)
            if kind is None and separator and head.startswith(b"event: ") and head.find(b"\n") < 0:
                kind = head[7:].decode("utf-8", "replace")
                if len(_KNOWN_HEADS) < _KNOWN_HEADS_LIMIT:
                    _KNOWN_HEADS[head] = kind
            if kind is not None and data.find(b"\n") < 0:
                events.append((block + b"\n\n", kind, data))
            else:
                events.append(_parse_block(block + b"\n\n", block))
        return events

    def _feed_any_framing(self, buffer: bytes) -> list[Event]:
        events: list[Event] = []
        start = 0
        while True:
            end, separator_length = _find_separator(buffer, start)
            if end < 0:
                break
            events.append(_parse_block(buffer[start : end + separator_length], buffer[start:end]))
            start = end + separator_length
        if start < len(buffer):
            self._keep(buffer[start:])
        return events


def _find_separator(buffer: bytes, start: int) -> tuple[int, int]:
    best, best_len = -1, 0
    for sep in _SEPARATORS:
        pos = buffer.find(sep, start)
        if pos >= 0 and (best < 0 or pos < best):
            best, best_len = pos, len(sep)
    return best, best_len


def _parse_block(raw: bytes, body: bytes) -> Event:
    kind: str | None = None
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
            kind = value.decode("utf-8", "replace")
    data = b"\n".join(data_lines)
    if kind is None and data:
        kind = type_of(data)
    return raw, kind, data


def type_of(data: bytes) -> str | None:
    """The ``type`` member of an event's JSON data, if it has one."""
    try:
        return type_member(orjson.loads(data))
    except orjson.JSONDecodeError:
        return None


def type_member(payload: Any) -> str | None:
    """The ``type`` member of parsed JSON, if it is an object with a string ``type``."""
    kind = payload.get("type") if isinstance(payload, dict) else None
    return kind if isinstance(kind, str) else None


def encode_event(payload: dict[str, Any]) -> bytes:
    """Frame one event the way the Responses API does: ``event: <type>`` then its JSON data."""
    return (
        b"event: " + str(payload["type"]).encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"
    )
