"""The client-facing edge: what a client may hold before and while a handler serves it.

Left to itself, aiohttp's server accepts every connection, waits for a request's head without
a deadline, and logs a malformed request as a traceback quoting its raw bytes (a client key, a
body). ``EdgeRunner`` builds the server out of ``ClientConnection``s, which add:

- a cap on client connections open at once (``[limits] max_connections``, lowered at start to
  what the file-descriptor limit can hold: each client connection may need an upstream one):
  one more is answered 503 (S1.4, ``Retry-After``) and closed, and a throttled warning says so;
- a deadline for a request's head (``[timeouts] client_header_seconds``), counted from the
  connection's start or, on a kept-alive connection, from the request's first byte; an idle
  kept-alive connection closes after ``client_keepalive_seconds`` (aiohttp's own timer);
- one short, throttled line for a malformed request, without its bytes.

Bodies are read by ``read_body``: no more than ``max_body_bytes``, with a deadline between
two reads (``client_body_seconds``), against a ``BodyBudget`` shared by every request body and
WebSocket message held at once (``max_body_bytes_in_flight``). Over the budget a request is
refused at once with 503 and ``Retry-After: 1``, as a proxy under memory pressure sheds load:
waiting would hold the connection and its socket buffers for nothing the client can see, while
Codex and the OpenAI SDKs retry a 503 after a pause.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from codexlb.config import Config
from codexlb.errors import InvalidRequest, PayloadTooLarge, RequestTimeout, ServerBusy
from codexlb.logs import Throttled

log = logging.getLogger(__name__)

FDS_PER_CONNECTION = 2
"""A client connection and the upstream connection it may hold."""
FDS_RESERVED = 64
"""For the listening socket, the database, log and configuration files."""
REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    b"Retry-After: 1\r\n"
    b"Connection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s"
)


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard limit; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
        else:
            soft = hard
    return soft


def connection_cap(config: Config, fd_limit: int | None = None) -> int:
    """``max_connections``, lowered to what ``fd_limit`` (the process's soft limit on open
    files) can hold, with a warning when it must be."""
    wanted = config.limits.max_connections
    if fd_limit is None:
        fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if fd_limit == resource.RLIM_INFINITY:
        return wanted
    room = max(1, (fd_limit - FDS_RESERVED) // FDS_PER_CONNECTION)
    if room < wanted:
        log.warning(
            "[limits] max_connections = %d needs more open files than the limit of %d "
            "allows; serving at most %d client connections",
            wanted,
            fd_limit,
            room,
        )
        return room
    return wanted


class BodyBudget:
    """The bytes of request bodies and WebSocket messages held at once, against a limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, size: int) -> None:
        """Hold ``size`` more bytes, or raise ``ServerBusy`` when they do not fit."""
        if self.held + size > self.limit:
            raise ServerBusy("codexlb holds as many request bodies as it may; retry shortly.")
        self.held += size

    def give(self, size: int) -> None:
        self.held -= size


async def read_body(request: web.Request, config: Config, budget: BodyBudget) -> bytes:
    """The whole body of ``request``, held in ``budget`` (the caller gives back its length).

    A declared length over the limit is refused before a byte is read, and so is one the budget
    cannot hold; a chunked body is counted as it arrives. The chunks are joined once, or not at
    all when one holds the whole body (aiohttp's ``read()`` makes two full copies).
    """
    limit = config.limits.max_body_bytes
    declared = request.content_length
    if declared is not None and declared > limit:
        raise PayloadTooLarge(limit)
    held = declared or 0
    budget.take(held)
    try:
        chunks: list[bytes] = []
        size = 0
        content = request.content
        chunk = content.read_nowait()  # what came with the head: most bodies, whole
        while True:
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(limit)
                if size > held:
                    budget.take(size - held)
                    held = size
                chunks.append(chunk)
            if content.at_eof():
                break
            chunk = await _next_chunk(request, config.timeouts.client_body_seconds)
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        del chunks
        budget.give(held - len(body))
    except BaseException:
        budget.give(held)
        raise
    return body


async def _next_chunk(request: web.Request, silence: float) -> bytes:
    """The next piece of a body still arriving (empty at its end), within ``silence``."""
    try:
        async with asyncio.timeout(silence):
            return await request.content.readany()
    except TimeoutError:
        if isinstance(request.protocol, ClientConnection):
            request.protocol.stop_lingering()
        raise RequestTimeout(
            f"The request body did not arrive within {silence:g} s of silence."
        ) from None


class EdgeRunner(web.AppRunner):
    """The ``AppRunner`` whose server is made of ``ClientConnection``s."""

    def __init__(self, app: web.Application, config: Config, **kwargs: Any) -> None:
        super().__init__(app, keepalive_timeout=config.timeouts.client_keepalive_seconds, **kwargs)
        self._config = config

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # starts the app up
        return EdgeServer(
            plain.request_handler,
            config=self._config,
            request_factory=plain.request_factory,
            loop=asyncio.get_running_loop(),
            **self._kwargs,
        )


class EdgeServer(web.Server):
    """The protocol factory: one ``ClientConnection`` per client connection, within the cap."""

    def __init__(self, handler: Any, *, config: Config, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.header_seconds = config.timeouts.client_header_seconds
        self.cap = connection_cap(config)
        self.open = 0
        self.over_cap = Throttled(log, logging.WARNING)
        self.slow_heads = Throttled(log, logging.INFO)
        self.malformed = Throttled(log, logging.INFO)
        inner = self.request_factory

        def request_factory(message: Any, payload: Any, protocol: Any, *args: Any) -> Any:
            if isinstance(protocol, ClientConnection):
                protocol.head_arrived()
            return inner(message, payload, protocol, *args)

        self.request_factory = request_factory

    def __call__(self) -> web.RequestHandler:
        return ClientConnection(self, loop=self._loop, **self._kwargs)


class ClientConnection(web.RequestHandler):
    """aiohttp's connection handler with the edge's deadline, cap and quiet parse errors."""

    def __init__(self, manager: EdgeServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._edge = manager
        self._counted = False
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        edge = self._edge
        if edge.open >= edge.cap:
            edge.over_cap(
                "refused a client connection: %d are open, the cap ([limits] max_connections)",
                edge.open,
            )
            body = ServerBusy("codexlb is at its connection limit; retry shortly.").body()
            self.transport.write(REFUSED % (len(body), body))  # type: ignore[union-attr]
            self.force_close()
            return
        edge.open += 1
        self._counted = True
        self._arm_head_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._counted:
            self._counted = False
            self._edge.open -= 1
        self.head_arrived()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # Bytes of a kept-alive connection's next request whose head is not complete yet
        # (``start()`` still waits on ``_waiter``: never during a request or a WebSocket) start
        # the head's deadline. A head that arrived whole, as nearly all do, needs no timer.
        waiter = self._waiter
        if self._head_timer is None and waiter is not None and not waiter.done():
            self._arm_head_timer()

    def head_arrived(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def stop_lingering(self) -> None:
        """Close as soon as the response is out instead of reading what is left of the body
        (for a client that stopped sending it)."""
        self._lingering_time = 0.0

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A request aiohttp could not parse: one short, throttled line and an S1.4 answer.
        aiohttp's own line is a traceback, and its answer a text, quoting the bytes it could not
        parse (a client key, a body)."""
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        self._edge.malformed(
            "refused a malformed request from %s: %s (status %d)",
            _peer(self.peername),
            type(exc).__name__,
            status,
        )
        error = InvalidRequest(f"Malformed HTTP request ({type(exc).__name__}).")
        response = web.Response(status=status, body=error.body(), content_type="application/json")
        response.force_close()
        return response

    def _arm_head_timer(self) -> None:
        self._head_timer = self._loop.call_later(self._edge.header_seconds, self._head_late)

    def _head_late(self) -> None:
        self._head_timer = None
        if self._waiter is not None and not self._waiter.done():  # still no complete head
            self._edge.slow_heads(
                "closed a client connection from %s: no complete request head within %g s",
                _peer(self.peername),
                self._edge.header_seconds,
            )
            self.force_close()


def _peer(peername: Any) -> str:
    if isinstance(peername, tuple) and peername:
        return str(peername[0])
    return "-"
