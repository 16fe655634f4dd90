"""The incremental SSE decoder: framing, chunk boundaries, exact raw bytes."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from codexlb.sse import SSEDecoder, SSEEvent, encode_event

CREATED = {"type": "response.created", "response": {"id": "resp_1", "status": "in_progress"}}
DELTA = {"type": "response.output_text.delta", "delta": "héllo\nworld"}
COMPLETED = {"type": "response.completed", "response": {"id": "resp_1", "usage": None}}
STREAM = b"".join(encode_event(p) for p in (CREATED, DELTA, COMPLETED))


def decode_in_chunks(stream: bytes, size: int) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events: list[SSEEvent] = []
    for start in range(0, len(stream), size):
        events.extend(decoder.feed(stream[start : start + size]))
    events.extend(decoder.flush())
    return events


@pytest.mark.parametrize("size", [1, 2, 3, 7, 16, 64, len(STREAM)])
def test_any_chunking_yields_the_same_events_and_exact_bytes(size: int) -> None:
    events = decode_in_chunks(STREAM, size)

    assert [e.type for e in events] == [
        "response.created",
        "response.output_text.delta",
        "response.completed",
    ]
    assert [e.json() for e in events] == [CREATED, DELTA, COMPLETED]
    assert b"".join(e.raw for e in events) == STREAM


def test_split_inside_a_multibyte_character() -> None:
    stream = 'data: {"delta": "héllo"}\n\n'.encode()
    cut = stream.index("é".encode()) + 1
    decoder = SSEDecoder()

    assert decoder.feed(stream[:cut]) == []
    assert decoder.pending
    [event] = decoder.feed(stream[cut:])
    assert event.json() == {"delta": "héllo"}
    assert event.raw == stream
    assert not decoder.pending


@pytest.mark.parametrize("size", [1, 5, 1000])
def test_crlf_framing(size: int) -> None:
    stream = b'event: a\r\ndata: {"x": 1}\r\n\r\nevent: b\r\ndata: {"x": 2}\r\n\r\n'

    events = decode_in_chunks(stream, size)

    assert [(e.event, e.json()) for e in events] == [("a", {"x": 1}), ("b", {"x": 2})]
    assert b"".join(e.raw for e in events) == stream


def test_cr_only_framing() -> None:
    events = SSEDecoder().feed(b"event: a\rdata: 1\r\revent: b\rdata: 2\r\r")

    assert [(e.event, e.data) for e in events] == [("a", b"1"), ("b", b"2")]


@pytest.mark.parametrize(
    "keepalive", [b": keep-alive\n\n", b":\n\n", b"\n\n", b": ping\r\n\r\n"], ids=repr
)
def test_comments_and_blank_blocks_are_typeless_events_kept_in_raw(keepalive: bytes) -> None:
    stream = keepalive + encode_event(CREATED) + keepalive + encode_event(COMPLETED) + keepalive

    events = decode_in_chunks(stream, 3)

    assert [e.type for e in events] == [None, "response.created", None, "response.completed", None]
    assert b"".join(e.raw for e in events) == stream


def test_comment_line_inside_an_event_is_skipped_but_kept_in_raw() -> None:
    block = b"event: x\n: note\ndata: 1\n\n"

    [event] = SSEDecoder().feed(block)

    assert (event.event, event.data, event.raw) == ("x", b"1", block)


@pytest.mark.parametrize(
    ("block", "data"),
    [
        (b"data: line one\ndata: line two\n\n", b"line one\nline two"),
        (b'data: {"a":\ndata:  1}\n\n', b'{"a":\n 1}'),
        (b"data:no-space\n\n", b"no-space"),
        (b"data\n\n", b""),
    ],
    ids=["two-lines", "json-over-lines", "no-space", "bare-field"],
)
def test_data_lines_are_joined_with_newlines(block: bytes, data: bytes) -> None:
    [event] = SSEDecoder().feed(block)

    assert event.data == data
    assert event.event is None


def test_multi_line_json_parses() -> None:
    [event] = SSEDecoder().feed(b'data: {"type":\ndata: "response.done", "n": 2}\n\n')

    assert event.json() == {"type": "response.done", "n": 2}
    assert event.type == "response.done"


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        (b'event: from.line\ndata: {"type": "from.data"}\n\n', "from.line"),
        (b'data: {"type": "from.data"}\n\n', "from.data"),
        (b"data: [DONE]\n\n", None),
        (b'data: {"type": 5}\n\n', None),
        (b'data: ["type"]\n\n', None),
        (b"event: only\n\n", "only"),
    ],
)
def test_type_comes_from_event_line_else_from_json(block: bytes, expected: str | None) -> None:
    [event] = SSEDecoder().feed(block)

    assert event.type == expected


def test_other_fields_are_ignored() -> None:
    [event] = SSEDecoder().feed(b"id: 7\nretry: 1000\nevent: x\ndata: 1\n\n")

    assert (event.event, event.data) == ("x", b"1")


def test_json_raises_value_error_for_non_json() -> None:
    [event] = SSEDecoder().feed(b"data: not json\n\n")

    with pytest.raises(orjson.JSONDecodeError):
        event.json()


@pytest.mark.parametrize("tail", [b"data: 1", b"data: 1\n", b"data: 1\r\n"])
def test_flush_returns_an_unterminated_last_event(tail: bytes) -> None:
    decoder = SSEDecoder()
    stream = encode_event(CREATED) + tail

    events = decoder.feed(stream)
    assert [e.type for e in events] == ["response.created"]
    assert decoder.pending

    [last] = decoder.flush()
    assert (last.data, last.raw) == (b"1", tail)
    assert b"".join(e.raw for e in [*events, last]) == stream
    assert not decoder.pending
    assert decoder.flush() == []


@pytest.mark.parametrize("tail", [b"", b"\n", b"  \r\n"])
def test_flush_without_an_event_returns_nothing(tail: bytes) -> None:
    decoder = SSEDecoder()
    decoder.feed(encode_event(CREATED) + tail)

    assert decoder.flush() == []


def test_flush_keeps_an_unterminated_comment() -> None:
    decoder = SSEDecoder()
    decoder.feed(encode_event(CREATED) + b": comment\n")

    [tail] = decoder.flush()

    assert (tail.type, tail.raw) == (None, b": comment\n")


def test_decoder_is_reusable_after_flush() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"data: partial")
    decoder.flush()

    [event] = decoder.feed(encode_event(COMPLETED))

    assert event.json() == COMPLETED


@pytest.mark.parametrize("payload", [CREATED, DELTA, COMPLETED, {"type": "t", "s": "a\r\nb"}])
def test_encode_event_round_trip(payload: dict[str, Any]) -> None:
    raw = encode_event(payload)

    [event] = SSEDecoder().feed(raw)

    assert raw.startswith(f"event: {payload['type']}\ndata: ".encode())
    assert raw.endswith(b"\n\n")
    assert raw.count(b"\n") == 3
    assert event.raw == raw
    assert event.event == payload["type"]
    assert event.json() == payload
    assert json.loads(event.data) == payload
