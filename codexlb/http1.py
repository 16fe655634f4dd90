"""A lean keep-alive HTTP/1.1 client for the upstream's streamed responses.

The relay's hot path is one POST per response whose body is a stream of SSE bytes. aiohttp's
client spends about 165 µs of CPU on each such request here; this client, built on llhttp
(``httptools``) and a plain ``asyncio.Protocol``, spends about 45 µs (``bench/http_sse.py``
shows the effect on throughput). It does only what the relay needs: POST with a body, a
status and headers, the body as it arrives (chunked or not), keep-alive reuse, TLS, and the
three time limits. WebSockets and everything else still use aiohttp.

A request on a pooled connection that the server closed while it sat idle is sent again once
on a fresh connection, when not a byte of the answer had arrived.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import ssl
from collections.abc import Callable, Mapping
from typing import TypeVar, cast

import httptools
from yarl import URL

MAX_BUFFERED_BYTES = 1024 * 1024
"""Body bytes buffered before the connection stops reading from the socket."""
MAX_IDLE_CONNECTIONS = 256
"""Idle keep-alive connections kept per origin."""

Origin = tuple[str, str, int]
K = TypeVar("K")
V = TypeVar("V")
_BREAKS = frozenset("\r\n\x00")

KNOWN_NAMES_LIMIT = 1024
"""Entries in each table of header names remembered (see ``remember``)."""
_HEADER_NAMES: dict[bytes, str] = {}
"""Raw response header names, decoded and lower-cased."""


class Http1Error(Exception):
    """The connection failed, timed out, or the server broke the protocol."""


class ConnectFailed(Http1Error):
    """No response headers: the request may be tried elsewhere."""


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection; carries one response at a time."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        """Kept: ``get_running_loop`` makes a system call (``getpid``) on every call."""
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._parser: httptools.HttpResponseParser | None = None
        self._response: Http1Response | None = None

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's do not subclass asyncio.Transport).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._parser is None:
            self._fail(Http1Error("data received outside a response"))
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(Http1Error(f"invalid HTTP from upstream: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response = self._response
        if response is not None and not response.complete:
            response._broken(Http1Error("connection closed by upstream"))

    # -- llhttp callbacks -----------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._response is not None:
            headers = self._response.headers
            key = _HEADER_NAMES.get(name) or _header_name(name)
            text = value.decode("latin-1")
            earlier = headers.get(key)
            headers[key] = text if earlier is None else f"{earlier}, {text}"

    def on_headers_complete(self) -> None:
        if self._parser is not None and self._response is not None:
            self._response._headers_done(self._parser.get_status_code())

    def on_body(self, body: bytes) -> None:
        if self._response is not None:
            self._response._body(body)

    def on_message_complete(self) -> None:
        assert self._parser is not None
        if self._response is not None:
            self._response._complete(self._parser.should_keep_alive())

    # -- used by the client -----------------------------------------------------------------

    def send(self, request: bytes, body: bytes, response: Http1Response) -> None:
        assert self.transport is not None
        self._parser = httptools.HttpResponseParser(self)
        self._response = response
        self.transport.writelines((request, body))

    def detach(self) -> None:
        self._parser = None
        self._response = None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _fail(self, exc: Http1Error) -> None:
        if self._response is not None:
            self._response._broken(exc)
        if self.transport is not None:
            self.transport.abort()


class Http1Response:
    """A response whose body is read as it arrives; ``release()`` when done with it."""

    def __init__(self, client: Http1Client, origin: Origin, connection: _Connection) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        """Lower-cased names; a repeated field's values joined with ``", "`` (RFC 9110)."""
        self.complete = False
        self._client = client
        self._origin = origin
        self._connection = connection
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._keep_alive = False
        self._error: Http1Error | None = None
        self._started = False
        self._waiter: asyncio.Future[None] | None = None
        self._headers_future: asyncio.Future[None] = connection.loop.create_future()
        self._released = False

    async def next_chunk(self, idle_timeout: float) -> bytes | None:
        """The body received since the last call (waiting for some), or ``None`` at its end;
        raises ``Http1Error`` if it breaks or goes silent for ``idle_timeout`` seconds.

        A plain coroutine rather than an async iterator: it runs for every piece of every
        relayed response.
        """
        chunks = self._chunks
        while not chunks:
            if self.complete:
                return None
            if self._error is not None:
                raise self._error
            await self._wait(idle_timeout)
        if len(chunks) == 1:
            chunk = chunks.popleft()
        else:  # several arrived meanwhile: one piece, so the relay frames and writes once
            chunk = b"".join(chunks)
            chunks.clear()
        self._buffered -= len(chunk)
        if self._buffered < MAX_BUFFERED_BYTES // 2:
            self._resume()
        return chunk

    async def read(self, limit: int, idle_timeout: float) -> bytes:
        """Up to ``limit`` bytes of the body (for error answers)."""
        parts: list[bytes] = []
        size = 0
        while size < limit and (chunk := await self.next_chunk(idle_timeout)) is not None:
            parts.append(chunk)
            size += len(chunk)
        return b"".join(parts)[:limit]

    def release(self) -> None:
        """Return the connection to the pool if the response was read to its end."""
        if self._released:
            return
        self._released = True
        connection = self._connection
        connection.detach()
        if self.complete and self._keep_alive and not connection.closed:
            self._client._put(self._origin, connection)
        else:
            connection.close()

    # -- fed by the connection --------------------------------------------------------------

    def _headers_done(self, status: int) -> None:
        self._started = True
        self.status = status
        if not self._headers_future.done():
            self._headers_future.set_result(None)

    def _body(self, chunk: bytes) -> None:
        self._started = True
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered > MAX_BUFFERED_BYTES and self._connection.transport is not None:
            self._connection.transport.pause_reading()
        self._wake()

    def _complete(self, keep_alive: bool) -> None:
        self.complete = True
        self._keep_alive = keep_alive
        self._wake()

    def _broken(self, exc: Http1Error) -> None:
        if self._error is None:
            self._error = exc
        if not self._headers_future.done():
            self._headers_future.set_exception(exc)
        self._wake()

    # -- helpers ---------------------------------------------------------------------------

    async def _wait(self, seconds: float) -> None:
        """Until more body arrives, or ``seconds`` of silence (a bare timer: cheaper than a
        timeout context on the hot path)."""
        loop = self._connection.loop
        waiter = self._waiter = loop.create_future()
        handle = loop.call_later(seconds, _expire, waiter)
        try:
            await waiter
        finally:
            handle.cancel()
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _resume(self) -> None:
        transport = self._connection.transport
        if transport is not None and not transport.is_closing() and not transport.is_reading():
            transport.resume_reading()


def remember(known: dict[K, V], name: K, value: V) -> V:
    """Record what was worked out about a header name, while ``known`` holds fewer than
    ``KNOWN_NAMES_LIMIT`` names: the same few dozen come with every request and response, and
    a dictionary hit costs less than decoding, lower-casing or matching a name again."""
    if len(known) < KNOWN_NAMES_LIMIT:
        known[name] = value
    return value


def _header_name(raw: bytes) -> str:
    """A header name as ``Http1Response.headers`` keys it."""
    return remember(_HEADER_NAMES, raw, raw.decode("latin-1").lower())


class _NoHeadersInTime(Exception):
    pass


def _expire_headers(headers: asyncio.Future[None]) -> None:
    # A bare timer rather than a timeout context: this runs once per relayed request.
    if not headers.done():
        headers.set_exception(_NoHeadersInTime())


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(Http1Error("upstream went silent"))


class Http1Client:
    """Keep-alive connections per origin, for ``POST`` requests with streamed answers."""

    def __init__(self, *, connect_timeout: float, ssl_context: ssl.SSLContext | None = None):
        self._connect_timeout = connect_timeout
        self._ssl = ssl_context
        self._idle: dict[Origin, list[_Connection]] = {}
        self._closed = False

    async def post(
        self,
        url: URL,
        headers: Mapping[str, str],
        body: bytes,
        *,
        first_byte_timeout: float,
        method: str = "POST",
    ) -> Http1Response:
        """Send the request; returns once the response headers arrived.

        Raises ``ConnectFailed`` when no answer came (connect error, time-out, a connection
        that died before answering).
        """
        if self._closed:
            raise ConnectFailed("client is closed")
        origin = origin_of(url)
        request = _request_head(url, headers, len(body), method)
        for attempt in range(2):
            connection = self._idle_connection(origin) if attempt == 0 else None
            fresh = connection is None
            if connection is None:
                connection = await self._connect(origin)
            response = Http1Response(self, origin, connection)
            connection.send(request, body, response)
            head = response._headers_future
            timer = connection.loop.call_later(first_byte_timeout, _expire_headers, head)
            try:
                await head
            except _NoHeadersInTime:
                response.release()
                raise ConnectFailed("no response headers in time") from None
            except Http1Error as exc:
                response.release()
                if fresh or response._started:
                    raise ConnectFailed(str(exc)) from exc
                continue  # a pooled connection the server had closed: once more, fresh
            except BaseException:
                response.release()
                raise
            finally:
                timer.cancel()
            return response
        raise ConnectFailed("unreachable")  # pragma: no cover - the loop returns or raises

    async def close(self) -> None:
        self._closed = True
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()

    def _idle_connection(self, origin: Origin) -> _Connection | None:
        pool = self._idle.get(origin)
        while pool:
            connection = pool.pop()
            if not connection.closed:
                return connection
        return None

    def _put(self, origin: Origin, connection: _Connection) -> None:
        pool = self._idle.setdefault(origin, [])
        if self._closed or len(pool) >= MAX_IDLE_CONNECTIONS:
            connection.close()
        else:
            pool.append(connection)

    async def _connect(self, origin: Origin) -> _Connection:
        return await open_connection(_Connection, origin, self._connect_timeout, self._ssl)


P = TypeVar("P", bound=asyncio.Protocol)


async def open_connection(
    factory: Callable[[], P], origin: Origin, seconds: float, context: ssl.SSLContext | None
) -> P:
    """A TCP (TLS for https) connection to ``origin`` with ``factory``'s protocol;
    ``ConnectFailed`` when none opens in ``seconds``."""
    scheme, host, port = origin
    context = (context or _default_context()) if scheme == "https" else None
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(seconds):
            _, protocol = await loop.create_connection(
                factory, host, port, ssl=context, server_hostname=host if context else None
            )
    except TimeoutError:
        raise ConnectFailed(f"connecting to {host}:{port} timed out") from None
    except (OSError, ssl.SSLError) as exc:
        raise ConnectFailed(f"cannot connect to {host}:{port}: {exc}") from exc
    return protocol


@functools.cache
def _default_context() -> ssl.SSLContext:
    return ssl.create_default_context()


def origin_of(url: URL) -> Origin:
    if url.scheme not in ("http", "https") or url.host is None:
        raise ConnectFailed(f"unsupported upstream URL {url}")
    return (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))


def _request_head(url: URL, headers: Mapping[str, str], length: int, method: str) -> bytes:
    head = f"{_request_line(url, method)}{header_fields(headers)}Content-Length: {length}\r\n\r\n"
    # aiohttp decodes incoming header bytes as UTF-8 with surrogateescape: this restores them.
    return head.encode("utf-8", "surrogateescape")


def header_fields(headers: Mapping[str, str]) -> str:
    """``headers`` as the lines of a request head; ``ConnectFailed`` if one would break it."""
    fields = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
    # Each field adds one CR and one LF; any more came from inside a name or value.
    count = len(headers)
    if fields.count("\n") != count or fields.count("\r") != count or "\x00" in fields:
        name = next(name for name, value in headers.items() if _BREAKS.intersection(name + value))
        raise ConnectFailed(f"header {name!r} holds a line break")
    return fields


@functools.lru_cache(maxsize=256)
def _request_line(url: URL, method: str) -> str:
    """The request line and ``Host`` field of a request to ``url`` (once per URL)."""
    host = url.host if url.is_default_port() else f"{url.host}:{url.port}"
    return f"{method} {url.raw_path_qs} HTTP/1.1\r\nHost: {host}\r\n"
