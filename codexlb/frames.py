"""WebSocket frames (RFC 6455) as bytes, sans I/O.

The WebSocket relay passes an upstream's frames to the client as the bytes they arrived in: a
server's frames are unmasked on both legs, so a complete, uncompressed text frame can go on
unchanged. ``FrameReader`` splits the upstream's byte stream into messages without decoding
them; each message is a plain tuple ``(opcode, head, payload)`` (see ``Message``) whose
``head + payload`` is one unmasked, uncompressed frame a server may send as it is (or, for a
run of plain frames, several). A message that came fragmented or compressed is reassembled,
inflated and given a head of its own.

Control frames (ping, pong, close) come out as messages too; the socket that owns the reader
answers them. Everything a peer could get wrong (a masked server frame, reserved bits, a
control frame too long, a message over the size limit, text that is not UTF-8) is a
``FrameError``: the connection cannot go on.

``client_frame`` and ``server_frame`` build the frames codexlb writes itself.
"""

from __future__ import annotations

import os
import struct
import zlib

from codexlb.shim import websocket_mask

CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
RUN = -1
"""Not an opcode: the ``Message`` of a run of plain text frames (see ``FrameReader``)."""

Message = tuple[int, bytes, bytes]
"""``(opcode, head, payload)``: ``head + payload`` is the message as one unmasked,
uncompressed frame with FIN set; for a ``RUN``, ``payload`` is its frames as they came."""

_FIN = 0x80
_RSV1 = 0x40
_RSV_ALL = 0x70
_MASKED = 0x80
_DEFLATE_TAIL = b"\x00\x00\xff\xff"
_PACK_16 = struct.Struct("!BBH").pack
_PACK_64 = struct.Struct("!BBQ").pack


class FrameError(Exception):
    """The peer broke the protocol; the connection cannot go on."""


class Inflater:
    """permessage-deflate (RFC 7692) for what the peer sends: one inflate context for the
    connection, or a fresh one per message when the peer said ``no_context_takeover``."""

    __slots__ = ("_context", "_takeover")

    def __init__(self, *, takeover: bool = True) -> None:
        # The largest window inflates what any smaller one deflated.
        self._takeover = takeover
        self._context = zlib.decompressobj(-15)

    def inflate(self, payload: bytes, limit: int) -> bytes:
        if not self._takeover:
            self._context = zlib.decompressobj(-15)
        try:
            data = self._context.decompress(payload + _DEFLATE_TAIL, limit + 1)
        except zlib.error as exc:
            raise FrameError(f"a compressed message that does not inflate: {exc}") from None
        if len(data) > limit:
            raise FrameError(f"a message larger than {limit} bytes once inflated")
        return data


class FrameReader:
    """Splits a server's byte stream into messages (see the module's docstring).

    The common frame (complete, final, uncompressed text) costs a few comparisons and two
    slices. A frame that arrives in many pieces is joined once, when its last piece is in: a
    64 MiB frame read 64 KiB at a time costs what it costs in one piece.

    Text frames whose payload starts with one of ``runs_of`` are plain: their owner passes them
    on without looking further. Plain frames that arrived together, one after another, come
    out as one ``RUN`` message holding their bytes as they came (each frame still checked);
    a response of hundreds of small deltas then costs a message per read, not per event.
    """

    __slots__ = (
        "_fragments",
        "_fragments_size",
        "_inflater",
        "_max",
        "_need",
        "_pending",
        "_pending_size",
        "_rest",
        "_runs_of",
        "control",
    )

    def __init__(
        self,
        max_message_bytes: int,
        inflater: Inflater | None = None,
        runs_of: tuple[bytes, ...] = (),
    ) -> None:
        self._max = max_message_bytes
        self._inflater = inflater
        self._runs_of = runs_of
        self._rest = b""
        """The start of a frame whose head is not complete yet (under 14 bytes)."""
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._need = 0
        """The size of the frame being gathered in ``_pending`` (its head was complete)."""
        self._fragments: list[bytes] | None = None
        """A fragmented message so far: its opcode and RSV1 byte first, then its payloads."""
        self._fragments_size = 0
        self.control = False
        """A control frame came out since the owner last cleared this."""

    def feed(self, data: bytes) -> list[Message]:
        if self._need:
            self._pending.append(data)
            self._pending_size += len(data)
            if self._pending_size < self._need:
                return []
            data = b"".join(self._pending)
            self._pending.clear()
            self._pending_size = self._need = 0
        elif self._rest:
            data = self._rest + data
            self._rest = b""
        messages: list[Message] = []
        append = messages.append
        runs_of = self._runs_of
        run = -1
        """Where the run of plain frames that ends at ``position`` starts, if one does."""
        position = 0
        size = len(data)
        while size - position >= 2:
            first = data[position]
            length = data[position + 1]
            if length < 126:
                body = position + 2
            elif length == 126:
                body = position + 4
                if body > size:
                    break
                length = (data[position + 2] << 8) | data[position + 3]
            elif length == 127:
                body = position + 10
                if body > size:
                    break
                length = int.from_bytes(data[position + 2 : body], "big")
            else:
                raise FrameError("a masked frame from the server")
            if length > self._max:
                raise FrameError(f"a frame larger than {self._max} bytes")
            end = body + length
            if end > size:
                self._need = end - position
                break
            message: Message | None
            if first == 0x81 and self._fragments is None:  # final, uncompressed text: as is
                payload = data[body:end]
                if not payload.isascii():
                    _check_utf8(payload)
                if payload.startswith(runs_of):
                    if run < 0:
                        run = position
                    position = end
                    continue
                message = (TEXT, data[position:body], payload)
            else:
                message = self._frame(first, data[body:end])
            if run >= 0:
                append((RUN, b"", data[run:position]))
                run = -1
            if message is not None:
                append(message)
            position = end
        if run >= 0:
            append((RUN, b"", data[run:position]))
        if position < size:
            if self._need:
                self._pending.append(data[position:])
                self._pending_size = size - position
            else:
                self._rest = data[position:]
        return messages

    def _frame(self, first: int, payload: bytes) -> Message | None:
        """Any frame but the common one: control frames, fragments, compressed messages."""
        opcode = first & 0x0F
        fin = first & _FIN
        rsv = first & _RSV_ALL
        if rsv and not (rsv == _RSV1 and self._inflater is not None and opcode in (TEXT, BINARY)):
            raise FrameError("a frame with reserved bits set")  # RSV1 only on a first frame
        if opcode >= CLOSE:
            if opcode not in (CLOSE, PING, PONG):
                raise FrameError(f"a frame with the unknown opcode {opcode}")
            if not fin or len(payload) > 125:
                raise FrameError("a control frame that is fragmented or too long")
            self.control = True
            return (opcode, b"", payload)
        if opcode == CONTINUATION:
            fragments = self._fragments
            if fragments is None:
                raise FrameError("a continuation frame with no message to continue")
            self._gather(fragments, payload)
            if not fin:
                return None
            self._fragments = None
            header = fragments[0]
            return self._message(header[0], bool(header[1]), b"".join(fragments[1:]))
        if opcode not in (TEXT, BINARY):
            raise FrameError(f"a frame with the unknown opcode {opcode}")
        if self._fragments is not None:
            raise FrameError("a new message before the fragmented one ended")
        if not fin:
            self._fragments = [bytes((opcode, rsv))]
            self._fragments_size = 0
            self._gather(self._fragments, payload)
            return None
        return self._message(opcode, bool(rsv), payload)

    def _gather(self, fragments: list[bytes], payload: bytes) -> None:
        self._fragments_size += len(payload)
        if self._fragments_size > self._max:
            raise FrameError(f"a message larger than {self._max} bytes")
        fragments.append(payload)

    def _message(self, opcode: int, compressed: bool, payload: bytes) -> Message:
        if compressed:
            assert self._inflater is not None
            payload = self._inflater.inflate(payload, self._max)
        if opcode == TEXT and not payload.isascii():
            _check_utf8(payload)
        return (opcode, frame_head(opcode, len(payload)), payload)


def _check_utf8(payload: bytes) -> None:
    try:
        payload.decode()
    except UnicodeDecodeError:
        raise FrameError("a text message that is not UTF-8") from None


def frame_head(opcode: int, length: int, *, rsv: int = 0, masked: bool = False) -> bytes:
    """The head of one final frame of ``length`` payload bytes (without its mask key)."""
    first = _FIN | rsv | opcode
    mask = _MASKED if masked else 0
    if length < 126:
        return bytes((first, length | mask))
    if length < 65536:
        return _PACK_16(first, 126 | mask, length)
    return _PACK_64(first, 127 | mask, length)


def server_frame(payload: bytes, opcode: int = TEXT) -> bytes:
    """One unmasked frame, as a server writes it."""
    return frame_head(opcode, len(payload)) + payload


def client_frame(payload: bytes, opcode: int = TEXT, *, compress: bool = False) -> bytes:
    """One masked frame, as a client writes it; ``compress`` deflates it with a context of
    its own (valid on any connection that negotiated permessage-deflate)."""
    rsv = 0
    if compress:
        deflate = zlib.compressobj(zlib.Z_BEST_SPEED, zlib.DEFLATED, -15)
        payload = deflate.compress(payload) + deflate.flush(zlib.Z_SYNC_FLUSH)
        payload = payload.removesuffix(_DEFLATE_TAIL)
        rsv = _RSV1
    key = os.urandom(4)
    masked = bytearray(payload)
    websocket_mask(key, masked)
    return frame_head(opcode, len(payload), rsv=rsv, masked=True) + key + masked


def close_payload(code: int, reason: str = "") -> bytes:
    return code.to_bytes(2, "big") + reason.encode()[:123]
