"""The incremental SSE decoder: framing, chunk boundaries, exact raw bytes."""

from __future__ import annotations

import json
import time
from typing import Any

import orjson
import pytest

from codexlb.sse import Event, EventTooLarge, SSEDecoder, encode_event

CREATED = {"type": "response.created", "response": {"id": "resp_1", "status": "in_progress"}}
DELTA = {"type": "response.output_text.delta", "delta": "héllo\nworld"}
COMPLETED = {"type": "response.completed", "response": {"id": "resp_1", "usage": None}}
STREAM = b"".join(encode_event(p) for p in (CREATED, DELTA, COMPLETED))


def decode_in_chunks(stream: bytes, size: int) -> list[Event]:
    decoder = SSEDecoder()
    events: list[Event] = []
    for start in range(0, len(stream), size):
        events.extend(decoder.feed(stream[start : start + size]))
    events.extend(decoder.flush())
    return events


@pytest.mark.parametrize("size", [1, 2, 3, 7, 16, 64, len(STREAM)])
def test_any_chunking_yields_the_same_events_and_exact_bytes(size: int) -> None:
    events = decode_in_chunks(STREAM, size)

    assert [kind for _, kind, _ in events] == [
        "response.created",
        "response.output_text.delta",
        "response.completed",
    ]
    assert [orjson.loads(data) for _, _, data in events] == [CREATED, DELTA, COMPLETED]
    assert b"".join(raw for raw, _, _ in events) == STREAM


def test_split_inside_a_multibyte_character() -> None:
    stream = 'data: {"delta": "héllo"}\n\n'.encode()
    cut = stream.index("é".encode()) + 1
    decoder = SSEDecoder()

    assert decoder.feed(stream[:cut]) == []
    assert decoder.pending
    [(raw, kind, data)] = decoder.feed(stream[cut:])
    assert orjson.loads(data) == {"delta": "héllo"}
    assert kind is None
    assert raw == stream
    assert not decoder.pending


@pytest.mark.parametrize("size", [1, 5, 1000])
def test_crlf_framing(size: int) -> None:
    stream = b'event: a\r\ndata: {"x": 1}\r\n\r\nevent: b\r\ndata: {"x": 2}\r\n\r\n'

    events = decode_in_chunks(stream, size)

    assert [(kind, orjson.loads(data)) for _, kind, data in events] == [
        ("a", {"x": 1}),
        ("b", {"x": 2}),
    ]
    assert b"".join(raw for raw, _, _ in events) == stream


def test_cr_only_framing() -> None:
    events = SSEDecoder().feed(b"event: a\rdata: 1\r\revent: b\rdata: 2\r\r")

    assert [(kind, data) for _, kind, data in events] == [("a", b"1"), ("b", b"2")]
    assert [raw for raw, _, _ in events] == [b"event: a\rdata: 1\r\r", b"event: b\rdata: 2\r\r"]


@pytest.mark.parametrize(
    "keepalive", [b": keep-alive\n\n", b":\n\n", b"\n\n", b": ping\r\n\r\n"], ids=repr
)
def test_comments_and_blank_blocks_are_typeless_events_kept_in_raw(keepalive: bytes) -> None:
    stream = keepalive + encode_event(CREATED) + keepalive + encode_event(COMPLETED) + keepalive

    events = decode_in_chunks(stream, 3)

    assert [kind for _, kind, _ in events] == [
        None,
        "response.created",
        None,
        "response.completed",
        None,
    ]
    assert b"".join(raw for raw, _, _ in events) == stream


def test_comment_line_inside_an_event_is_skipped_but_kept_in_raw() -> None:
    block = b"event: x\n: note\ndata: 1\n\n"

    [(raw, kind, data)] = SSEDecoder().feed(block)

    assert (kind, data, raw) == ("x", b"1", block)


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
    [(raw, kind, decoded)] = SSEDecoder().feed(block)

    assert decoded == data
    assert kind is None
    assert raw == block


def test_multi_line_json_parses() -> None:
    [(_raw, kind, data)] = SSEDecoder().feed(b'data: {"type":\ndata: "response.done", "n": 2}\n\n')

    assert orjson.loads(data) == {"type": "response.done", "n": 2}
    assert kind == "response.done"


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
    [(_raw, kind, _data)] = SSEDecoder().feed(block)

    assert kind == expected


def test_other_fields_are_ignored() -> None:
    [(_raw, kind, data)] = SSEDecoder().feed(b"id: 7\nretry: 1000\nevent: x\ndata: 1\n\n")

    assert (kind, data) == ("x", b"1")


def test_non_json_data_has_no_type_and_is_kept_as_bytes() -> None:
    block = b"data: not json\n\n"

    [(raw, kind, data)] = SSEDecoder().feed(block)

    assert kind is None
    assert isinstance(data, bytes)
    assert data == b"not json"
    assert raw == block


@pytest.mark.parametrize("size", [1, 4, 1000])
def test_event_lines_seen_before_new_and_again_decode_the_same(size: int) -> None:
    blocks = [
        b"event: test.cache.a\ndata: 1\n\n",
        b"event: test.cache.a\ndata: 2\n\n",
        b'event: test.cache.b\ndata: {"type": "other"}\n\n',
        b"event: test.cache.a\ndata: x\ndata: y\n\n",
        b"event: test.cache.a\n: note\ndata: 3\n\n",
        b"event: test.cache.b\ndata: 4\nid: 9\n\n",
        b"event: test.cache.a\n\n",
        b"event: test.cache.a\ndata: 5\n\n",
    ]
    stream = b"".join(blocks)

    events = decode_in_chunks(stream, size)
    again = [event for block in blocks for event in SSEDecoder().feed(block)]

    expected: list[Event] = [
        (blocks[0], "test.cache.a", b"1"),
        (blocks[1], "test.cache.a", b"2"),
        (blocks[2], "test.cache.b", b'{"type": "other"}'),
        (blocks[3], "test.cache.a", b"x\ny"),
        (blocks[4], "test.cache.a", b"3"),
        (blocks[5], "test.cache.b", b"4"),
        (blocks[6], "test.cache.a", b""),
        (blocks[7], "test.cache.a", b"5"),
    ]
    assert events == expected
    assert again == expected


def test_cached_event_line_then_multi_line_data_takes_the_general_path() -> None:
    decoder = SSEDecoder()

    [first] = decoder.feed(b"event: a\ndata: 1\n\n")
    [(raw, kind, data)] = decoder.feed(b"event: a\ndata: x\ndata: y\n\n")

    assert first == (b"event: a\ndata: 1\n\n", "a", b"1")
    assert (raw, kind, data) == (b"event: a\ndata: x\ndata: y\n\n", "a", b"x\ny")


@pytest.mark.parametrize("tail", [b"data: 1", b"data: 1\n", b"data: 1\r\n"])
def test_flush_returns_an_unterminated_last_event(tail: bytes) -> None:
    decoder = SSEDecoder()
    stream = encode_event(CREATED) + tail

    events = decoder.feed(stream)
    assert [kind for _, kind, _ in events] == ["response.created"]
    assert decoder.pending

    [last] = decoder.flush()
    raw, kind, data = last
    assert (data, raw) == (b"1", tail)
    assert kind is None
    assert b"".join(raw for raw, _, _ in [*events, last]) == stream
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

    [(raw, kind, data)] = decoder.flush()

    assert (kind, raw, data) == (None, b": comment\n", b"")


def test_decoder_is_reusable_after_flush() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"data: partial")
    decoder.flush()

    [(raw, kind, data)] = decoder.feed(encode_event(COMPLETED))

    assert orjson.loads(data) == COMPLETED
    assert kind == "response.completed"
    assert raw == encode_event(COMPLETED)


@pytest.mark.parametrize("payload", [CREATED, DELTA, COMPLETED, {"type": "t", "s": "a\r\nb"}])
def test_encode_event_round_trip(payload: dict[str, Any]) -> None:
    encoded = encode_event(payload)

    [(raw, kind, data)] = SSEDecoder().feed(encoded)

    assert encoded.startswith(f"event: {payload['type']}\ndata: ".encode())
    assert encoded.endswith(b"\n\n")
    assert encoded.count(b"\n") == 3
    assert raw == encoded
    assert kind == payload["type"]
    assert orjson.loads(data) == payload
    assert json.loads(data) == payload


@pytest.mark.parametrize("framing", [b"\n\n", b"\r\n\r\n"])
def test_a_long_event_in_small_chunks_is_decoded_in_linear_time(framing: bytes) -> None:
    """32 MiB in 16 KiB pieces: each byte is scanned once (a decoder that re-scans or copies
    the whole unfinished event per piece takes tens of seconds here)."""
    piece = b"x" * (16 * 1024)
    decoder = SSEDecoder()
    started = time.perf_counter()
    assert decoder.feed(b"data: ") == []
    for _ in range(2048):
        assert decoder.feed(piece) == []
    (event,) = decoder.feed(framing)
    elapsed = time.perf_counter() - started
    assert len(event[2]) == 32 * 1024 * 1024
    assert elapsed < 2.0, f"{elapsed:.1f}s"


@pytest.mark.parametrize("size", [1, 3, 1000])
def test_an_event_past_the_limit_is_refused(size: int) -> None:
    decoder = SSEDecoder(max_event_bytes=4096)
    stream = encode_event(DELTA) + b"data: " + b"y" * 5000
    pieces = [stream[start : start + size] for start in range(0, len(stream), size)]

    def feed_all() -> None:
        for piece in pieces:
            decoder.feed(piece)

    with pytest.raises(EventTooLarge):
        feed_all()


def test_events_within_the_limit_pass_whatever_the_chunking() -> None:
    decoder = SSEDecoder(max_event_bytes=len(STREAM))
    events = [event for _ in range(50) for event in decoder.feed(STREAM)]
    assert [kind for _, kind, _ in events] == [
        "response.created",
        "response.output_text.delta",
        "response.completed",
    ] * 50
