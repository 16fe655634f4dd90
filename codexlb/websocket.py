"""A lean WebSocket client for the upstream's event sockets.

A Responses WebSocket streams hundreds of small events per response, each in a frame of its
own. aiohttp's client turns every frame into a message object, decodes its text and wakes its
reader once per message; the relay would then encode and write each one again. This client,
a plain ``asyncio.Protocol`` like ``http1``'s, hands its reader everything that arrived
together in one wake-up, as ``frames.Message`` tuples whose bytes can go on to the client
unchanged.

It does what the relay needs and no more: the opening handshake (``httptools``), with
permessage-deflate offered when asked; text messages sent masked; pings answered, and a ping
sent when the socket has been quiet for ``HEARTBEAT_SECONDS``; flow control both ways; and the
closing handshake. Whatever goes wrong ends the socket: ``receive`` then raises
``SocketClosed`` with the reason.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import ssl
from collections.abc import Mapping

import httptools
from yarl import URL

from codexlb.frames import (
    CLOSE,
    PING,
    PONG,
    TEXT,
    FrameError,
    FrameReader,
    Inflater,
    Message,
    client_frame,
    close_payload,
)
from codexlb.http1 import ConnectFailed, header_fields, open_connection, origin_of, remember

HEARTBEAT_SECONDS = 30.0
"""A socket quiet this long is pinged; one that stays quiet as long again is dead."""
MAX_BUFFERED_BYTES = 1024 * 1024
"""Bytes received and not yet taken by the reader before the socket stops reading."""
COMPRESS_LARGER_THAN = 64 * 1024
"""On a socket that negotiated permessage-deflate, messages above this size are sent
compressed (each with a context of its own); smaller ones are not worth the CPU."""
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_HEADER_NAMES: dict[bytes, str] = {}


class HandshakeRefused(Exception):
    """The server answered the opening handshake with an HTTP status other than 101."""

    def __init__(self, status: int, headers: Mapping[str, str]) -> None:
        super().__init__(f"handshake refused with HTTP {status}")
        self.status = status
        self.headers = headers


class SocketClosed(Exception):
    """The socket ended: closed by either side, broken, or dead."""


class UpstreamSocket(asyncio.Protocol):
    """One client WebSocket connection (see the module's docstring)."""

    __slots__ = (
        "_buffered",
        "_close_sent",
        "_drain",
        "_handshake",
        "_heartbeat",
        "_key",
        "_last_received",
        "_loop",
        "_lost",
        "_max",
        "_offered_deflate",
        "_parser",
        "_ping_at",
        "_reader",
        "_ready",
        "_runs_of",
        "_waiter",
        "close_reason",
        "closed",
        "deflate",
        "headers",
        "status",
        "transport",
    )

    def __init__(
        self,
        key: str,
        max_message_bytes: int,
        offered_deflate: bool,
        runs_of: tuple[bytes, ...] = (),
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.status = 0
        self.headers: dict[str, str] = {}
        """The handshake answer's headers: lower-cased names, repeated fields joined."""
        self.deflate = False
        """Whether permessage-deflate was negotiated."""
        self.closed = False
        """No more messages will arrive."""
        self.close_reason = "the upstream closed the socket"
        self._key = key
        self._max = max_message_bytes
        self._offered_deflate = offered_deflate
        self._runs_of = runs_of
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self._handshake: asyncio.Future[None] = self._loop.create_future()
        self._reader: FrameReader | None = None
        self._ready: list[Message] = []
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._close_sent = False
        self._lost: asyncio.Future[None] = self._loop.create_future()
        self._drain: asyncio.Future[None] | None = None
        self._last_received = self._loop.time()
        self._ping_at: float | None = None
        self._heartbeat: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's do not subclass asyncio.Transport).
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        if reader is None:
            self._handshake_data(data)
            return
        self._last_received = self._loop.time()
        try:
            messages = reader.feed(data)
        except FrameError as exc:
            self._fail(f"the upstream broke the WebSocket protocol: {exc}")
            return
        if not messages:
            return
        if reader.control:
            reader.control = False
            messages = self._answer_control(messages)
        if self._ready:
            self._ready += messages
        else:
            self._ready = messages
        self._buffered += len(data)
        if self._buffered > MAX_BUFFERED_BYTES and self.transport is not None:
            self.transport.pause_reading()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
            if exc is not None:
                self.close_reason = f"the upstream connection broke: {exc}"
        if not self._handshake.done():
            self._handshake.set_exception(ConnectFailed("connection closed during the handshake"))
        if not self._lost.done():
            self._lost.set_result(None)
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        self._wake()
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_exception(ConnectionResetError(self.close_reason))

    def pause_writing(self) -> None:
        self._drain = self._loop.create_future()

    def resume_writing(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    # -- the opening handshake (httptools callbacks) -------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        key = _HEADER_NAMES.get(name) or remember(
            _HEADER_NAMES, name, name.decode("latin-1").lower()
        )
        text = value.decode("latin-1")
        earlier = self.headers.get(key)
        self.headers[key] = text if earlier is None else f"{earlier}, {text}"

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        self.status = self._parser.get_status_code()
        if self.status != 101 and not self._handshake.done():
            self._handshake.set_result(None)  # refused: the caller reads status and headers

    def _handshake_data(self, data: bytes) -> None:
        parser = self._parser
        if parser is None or self._handshake.done():
            return  # the rest of a refusal's answer: not read
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._parser = None
            self._upgraded(data[upgrade.args[0] :])
        except httptools.HttpParserError as exc:
            self._handshake.set_exception(ConnectFailed(f"invalid handshake answer: {exc}"))

    def _upgraded(self, rest: bytes) -> None:
        """A 101 arrived: check it, then read frames (``rest`` may hold the first ones)."""
        try:
            inflater = self._accept()
        except ConnectFailed as exc:
            self._handshake.set_exception(exc)
            return
        self._reader = FrameReader(self._max, inflater, self._runs_of)
        self._handshake.set_result(None)
        self._heartbeat = self._loop.call_later(HEARTBEAT_SECONDS, self._beat)
        if rest:
            self.data_received(rest)

    def _accept(self) -> Inflater | None:
        headers = self.headers
        if self.status != 101 or headers.get("upgrade", "").lower() != "websocket":
            raise ConnectFailed("the handshake answer is not a WebSocket upgrade")
        digest = hashlib.sha1(self._key.encode() + _GUID).digest()  # RFC 6455's choice
        if headers.get("sec-websocket-accept") != base64.b64encode(digest).decode():
            raise ConnectFailed("the handshake answer has a wrong Sec-WebSocket-Accept")
        extensions = headers.get("sec-websocket-extensions")
        if not extensions:
            return None
        inflater = _deflate_answer(extensions) if self._offered_deflate else None
        if inflater is None:
            raise ConnectFailed(f"the upstream chose an extension not offered: {extensions}")
        self.deflate = True
        return inflater

    # -- used by the relay ------------------------------------------------------------------

    async def receive(self, idle_seconds: float) -> list[Message]:
        """The messages that arrived since the last call, waiting up to ``idle_seconds``
        for some; ``SocketClosed`` once the socket ended, ``TimeoutError`` on silence."""
        if not self._ready:
            if self.closed:
                raise SocketClosed(self.close_reason)
            waiter = self._waiter = self._loop.create_future()
            timer = self._loop.call_later(idle_seconds, _expire, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
            if not self._ready:
                raise SocketClosed(self.close_reason)
        ready, self._ready = self._ready, []
        if self._buffered > MAX_BUFFERED_BYTES and self.transport is not None:
            self.transport.resume_reading()
        self._buffered = 0
        return ready

    async def send_text(self, payload: bytes) -> None:
        """Send one text message; ``ConnectionResetError`` if the socket is closed."""
        transport = self.transport
        if self.closed or self._close_sent or transport is None or transport.is_closing():
            raise ConnectionResetError(self.close_reason)
        compress = self.deflate and len(payload) > COMPRESS_LARGER_THAN
        transport.write(client_frame(payload, TEXT, compress=compress))
        if self._drain is not None:
            await self._drain

    async def close(self, seconds: float) -> None:
        """The closing handshake: a close frame, then up to ``seconds`` for the
        server to end the connection; past it, the connection is cut."""
        transport = self.transport
        if transport is None:
            return
        if not self._close_sent and not self.closed and not transport.is_closing():
            self._close_sent = True
            transport.write(client_frame(close_payload(1000), CLOSE))
        self.closed = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await asyncio.shield(self._lost)
        transport.abort()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    # -- inside -----------------------------------------------------------------------------

    def _answer_control(self, messages: list[Message]) -> list[Message]:
        """Answer the control frames among ``messages``; the data messages before a close."""
        data: list[Message] = []
        for message in messages:
            opcode = message[0]
            if opcode < CLOSE:
                data.append(message)
            elif opcode == PING:
                self._write(client_frame(message[2], PONG))
            elif opcode == CLOSE:
                if not self._close_sent:
                    self._close_sent = True
                    self._write(client_frame(message[2][:2], CLOSE))
                self.closed = True
                if self.transport is not None:
                    self.transport.close()
                break
        return data

    def _beat(self) -> None:
        if self.closed:
            return
        now = self._loop.time()
        if self._ping_at is not None:
            if self._last_received < self._ping_at:
                self._fail(f"no answer to a ping in {HEARTBEAT_SECONDS:g} s")
                return
            self._ping_at = None
        quiet = now - self._last_received
        if quiet >= HEARTBEAT_SECONDS:
            self._write(client_frame(b"", PING))
            self._ping_at = now
            delay = HEARTBEAT_SECONDS
        else:
            delay = HEARTBEAT_SECONDS - quiet
        self._heartbeat = self._loop.call_later(delay, self._beat)

    def _write(self, frame: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(frame)

    def _fail(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self.close_reason = reason
        if self.transport is not None:
            self.transport.abort()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


async def connect(
    url: URL,
    headers: Mapping[str, str],
    *,
    connect_seconds: float,
    max_message_bytes: int,
    offer_deflate: bool = False,
    ssl_context: ssl.SSLContext | None = None,
    runs_of: tuple[bytes, ...] = (),
) -> UpstreamSocket:
    """Open a WebSocket to ``url`` (``http``/``https``) within ``connect_seconds``; text
    frames starting with one of ``runs_of`` come out in runs (``frames.FrameReader``).

    ``ConnectFailed`` when no socket opened (no connection, no answer in time, an answer that
    is not a valid upgrade); ``HandshakeRefused`` when the server answered with a status.
    """
    key = base64.b64encode(os.urandom(16)).decode()
    host = url.host if url.is_default_port() else f"{url.host}:{url.port}"
    extension = (
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
        if offer_deflate
        else ""
    )
    head = (
        f"GET {url.raw_path_qs} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"{extension}{header_fields(headers)}\r\n"
    ).encode("utf-8", "surrogateescape")
    deadline = asyncio.get_running_loop().time() + connect_seconds
    socket = await open_connection(
        lambda: UpstreamSocket(key, max_message_bytes, offer_deflate, runs_of),
        origin_of(url),
        connect_seconds,
        ssl_context,
    )
    assert socket.transport is not None
    socket.transport.write(head)
    try:
        async with asyncio.timeout_at(deadline):
            await socket._handshake
    except TimeoutError:
        socket.abort()
        raise ConnectFailed("the WebSocket handshake timed out") from None
    except ConnectFailed:
        socket.abort()
        raise
    if socket.status != 101:
        socket.abort()
        raise HandshakeRefused(socket.status, socket.headers)
    return socket


def _deflate_answer(extensions: str) -> Inflater | None:
    """The inflater for a server's permessage-deflate answer, ``None`` if it is not one
    this client offered (RFC 7692 §7)."""
    name, *parameters = (part.strip() for part in extensions.split(";"))
    if name.lower() != "permessage-deflate" or "," in extensions:
        return None
    takeover = True
    for parameter in parameters:
        key, _, value = parameter.partition("=")
        key = key.strip().lower()
        value = value.strip().strip('"')
        if key == "server_no_context_takeover":
            takeover = False
        elif key == "server_max_window_bits":
            if not value.isdigit() or not 8 <= int(value) <= 15:
                return None
        elif key not in ("client_no_context_takeover", "client_max_window_bits"):
            return None
    return Inflater(takeover=takeover)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())
