"""WebSocket frames as bytes: the reader's messages, its refusals, and the frames codexlb writes."""

from __future__ import annotations

import zlib

import pytest

from codexlb.frames import (
    BINARY,
    CLOSE,
    CONTINUATION,
    PING,
    RUN,
    TEXT,
    FrameError,
    FrameReader,
    Inflater,
    client_frame,
    frame_head,
    server_frame,
)

LIMIT = 1 << 20


def raw(
    opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, masked: bool = False
) -> bytes:
    """A frame built by hand, independently of ``frame_head``."""
    first = (0x80 if fin else 0) | rsv | opcode
    mask_bit = 0x80 if masked else 0
    n = len(payload)
    if n < 126:
        head = bytes([first, mask_bit | n])
    elif n < 65536:
        head = bytes([first, mask_bit | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([first, mask_bit | 127]) + n.to_bytes(8, "big")
    return head + (b"\0\0\0\0" if masked else b"") + payload


def deflated(payload: bytes, context: zlib._Compress | None = None) -> bytes:
    context = context or zlib.compressobj(6, zlib.DEFLATED, -15)
    return (context.compress(payload) + context.flush(zlib.Z_SYNC_FLUSH)).removesuffix(
        b"\x00\x00\xff\xff"
    )


def read(
    *chunks: bytes,
    inflater: Inflater | None = None,
    limit: int = LIMIT,
    runs_of: tuple[bytes, ...] = (),
) -> list[tuple[int, bytes, bytes]]:
    reader = FrameReader(limit, inflater, runs_of)
    messages = []
    for chunk in chunks:
        messages += reader.feed(chunk)
    return messages


@pytest.mark.parametrize("size", [0, 5, 125, 126, 65535, 65536, 200_000])
def test_a_text_frame_comes_out_as_the_bytes_it_came_in(size: int) -> None:
    payload = b'{"type":"x","d":"' + b"a" * size + b'"}'
    frame = raw(TEXT, payload)
    [(opcode, head, body)] = read(frame)
    assert opcode == TEXT
    assert head + body == frame
    assert body == payload


def test_every_split_of_a_stream_gives_the_same_messages() -> None:
    stream = raw(TEXT, b'{"type":"a"}') + raw(TEXT, b"b" * 300) + raw(BINARY, b"\x00\x01")
    whole = read(stream)
    assert [m[2] for m in whole] == [b'{"type":"a"}', b"b" * 300, b"\x00\x01"]
    for cut in range(1, len(stream)):
        assert read(stream[:cut], stream[cut:]) == whole, cut
    assert read(*(stream[i : i + 1] for i in range(len(stream)))) == whole


PLAIN = (b'{"type":"delta"',)
DELTAS = [raw(TEXT, b'{"type":"delta","d":"%s"}' % (b"x" * n)) for n in (1, 130, 70_000)]


def test_plain_frames_that_arrive_together_come_out_as_one_run_as_they_came() -> None:
    other = raw(TEXT, b'{"type":"done"}')
    stream = DELTAS[0] + DELTAS[1] + other + DELTAS[2] + raw(PING, b"p") + DELTAS[0]
    assert read(stream, runs_of=PLAIN) == [
        (RUN, b"", DELTAS[0] + DELTAS[1]),
        (TEXT, other[:2], other[2:]),
        (RUN, b"", DELTAS[2]),
        (PING, b"", b"p"),
        (RUN, b"", DELTAS[0]),
    ]


def test_every_split_of_a_stream_with_runs_gives_the_same_bytes_and_messages() -> None:
    other = raw(TEXT, b'{"type":"done"}')
    stream = DELTAS[0] + DELTAS[1] + other + DELTAS[0] + raw(BINARY, b"b")
    whole = read(stream, runs_of=PLAIN)
    for cut in range(1, len(stream)):
        messages = read(stream[:cut], stream[cut:], runs_of=PLAIN)
        assert b"".join(head + body for _, head, body in messages) == stream, cut
        assert [m for m in messages if m[0] != RUN] == [m for m in whole if m[0] != RUN], cut


@pytest.mark.parametrize(
    "frame",
    [
        raw(TEXT, b'{"type":"del'),  # the prefix runs on past the frame's end
        raw(TEXT, b'{"type":"delta"}', fin=False) + raw(CONTINUATION, b""),
        raw(BINARY, b'{"type":"delta"}'),
    ],
)
def test_only_whole_text_frames_that_start_plain_are_runs(frame: bytes) -> None:
    stream = frame + raw(TEXT, b'ta"}')
    assert RUN not in [opcode for opcode, _, _ in read(stream, runs_of=PLAIN)]


def test_a_plain_frame_must_be_utf8_too() -> None:
    assert read(raw(TEXT, '{"type":"delta","d":"é ✓"}'.encode()), runs_of=PLAIN)[0][0] == RUN
    with pytest.raises(FrameError, match="UTF-8"):
        read(DELTAS[0] + raw(TEXT, b'{"type":"delta","d":"\xff"}'), runs_of=PLAIN)


def test_a_large_frame_in_many_pieces_is_whole() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB, not text
    frame = raw(BINARY, payload)
    pieces = [frame[i : i + 1000] for i in range(0, len(frame), 1000)]
    [(opcode, head, body)] = read(*pieces, limit=2 << 20)
    assert (opcode, head + body) == (BINARY, frame)


def test_fragments_come_out_as_one_message_with_a_head_of_its_own() -> None:
    stream = (
        raw(TEXT, b'{"type":', fin=False)
        + raw(PING, b"hi")
        + raw(CONTINUATION, b'"x"', fin=False)
        + raw(CONTINUATION, b"}")
    )
    ping, message = read(stream)
    assert ping == (PING, b"", b"hi")
    assert message == (TEXT, frame_head(TEXT, 12), b'{"type":"x"}')


def test_compressed_messages_inflate_with_the_context_taken_over() -> None:
    context = zlib.compressobj(6, zlib.DEFLATED, -15)
    first = b'{"type":"response.output_text.delta","delta":"hello"}'
    second = b'{"type":"response.output_text.delta","delta":"hello again"}'
    stream = raw(TEXT, deflated(first, context), rsv=0x40) + raw(
        TEXT, deflated(second, context), rsv=0x40
    )
    messages = read(stream, inflater=Inflater())
    assert [m[2] for m in messages] == [first, second]
    assert all(head + body == server_frame(body) for _, head, body in messages)


def test_without_context_takeover_each_message_inflates_alone() -> None:
    payloads = [b"one " * 50, b"two " * 50]
    stream = b"".join(raw(TEXT, deflated(p), rsv=0x40) for p in payloads)
    assert [m[2] for m in read(stream, inflater=Inflater(takeover=False))] == payloads


@pytest.mark.parametrize(
    ("stream", "inflater", "reason"),
    [
        (raw(TEXT, b"x", masked=True), None, "masked"),
        (raw(TEXT, b"x", rsv=0x40), None, "reserved"),
        (raw(TEXT, b"x", rsv=0x20), Inflater(), "reserved"),
        (raw(CONTINUATION, b"x", rsv=0x40), Inflater(), "reserved"),
        (raw(0x3, b"x"), None, "opcode"),
        (raw(0xB, b"x"), None, "opcode"),
        (raw(PING, b"x" * 126), None, "control"),
        (raw(CLOSE, b"\x03\xe8", fin=False), None, "control"),
        (raw(CONTINUATION, b"x"), None, "continuation"),
        (raw(TEXT, b"x", fin=False) + raw(TEXT, b"y"), None, "before the fragmented"),
        (raw(TEXT, b"\xff\xfe"), None, "UTF-8"),
        (raw(TEXT, b"ok", fin=False) + raw(CONTINUATION, b"\xc3"), None, "UTF-8"),
        (raw(TEXT, b"not deflate", rsv=0x40), Inflater(), "inflate"),
    ],
)
def test_what_a_server_must_not_send_ends_the_socket(
    stream: bytes, inflater: Inflater | None, reason: str
) -> None:
    with pytest.raises(FrameError, match=reason):
        read(stream, inflater=inflater)


def test_a_frame_over_the_limit_is_refused_at_its_head() -> None:
    head = raw(BINARY, b"x" * 70_000)[:10]
    with pytest.raises(FrameError, match="larger than 65536"):
        read(head, limit=65536)


def test_fragments_over_the_limit_are_refused() -> None:
    stream = raw(TEXT, b"a" * 100, fin=False) + raw(CONTINUATION, b"a" * 100, fin=False)
    with pytest.raises(FrameError, match="larger than 150"):
        read(stream, limit=150)


def test_a_deflate_bomb_is_refused_at_the_limit() -> None:
    bomb = raw(TEXT, deflated(b"a" * (10 << 20)), rsv=0x40)
    assert len(bomb) < 20_000
    with pytest.raises(FrameError, match="once inflated"):
        read(bomb, inflater=Inflater(), limit=LIMIT)


def test_multibyte_text_passes() -> None:
    payload = '{"type":"x","d":"héllo ✓ 🚀"}'.encode()
    assert read(raw(TEXT, payload))[0][2] == payload


def unmask(frame: bytes) -> tuple[int, bytes]:
    length = frame[1] & 0x7F
    offset = 2 + {126: 2, 127: 8}.get(length, 0)
    key, body = frame[offset : offset + 4], frame[offset + 4 :]
    assert frame[1] & 0x80, "a client frame must be masked"
    return frame[0], bytes(b ^ key[i % 4] for i, b in enumerate(body))


@pytest.mark.parametrize("size", [0, 100, 70_000])
def test_client_frames_are_masked_and_unmask_to_the_payload(size: int) -> None:
    payload = bytes(i % 251 for i in range(size))
    first, body = unmask(client_frame(payload))
    assert first == 0x80 | TEXT
    assert body == payload


def test_a_compressed_client_frame_inflates_to_the_payload() -> None:
    payload = b"history " * 20_000
    first, body = unmask(client_frame(payload, compress=True))
    assert first == 0x80 | 0x40 | TEXT
    assert len(body) < len(payload) // 10
    assert zlib.decompressobj(-15).decompress(body + b"\x00\x00\xff\xff") == payload
