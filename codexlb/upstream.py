"""The connections towards the upstream accounts, and the one boundary of their errors.

Streamed POSTs go through the lean ``http1`` client and WebSockets through the lean
``websocket`` client (the relay's hot paths); the model catalog and token refreshes through one
``aiohttp.ClientSession``. Whatever the clients raise becomes, here and only here, one of::

    UpstreamError
     ├── UpstreamConnectError   no answer: connect failure, time-out before a response head
     ├── UpstreamRefused        a WebSocket upgrade answered with an HTTP status (and headers)
     └── UpstreamBroken         an answer that broke off, failed or went silent mid-way

An HTTP answer with an error status is not an error here: its status and body are read like
any answer (``read_answer``). A WebSocket's frames are read by its owner, which sees a close
or a time-out as the end of the socket.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import aiohttp
from yarl import URL

from codexlb import pool_view, websocket
from codexlb.config import TimeoutsConfig
from codexlb.http1 import ConnectFailed, Http1Client, Http1Error, Http1Response, remember
from codexlb.pool import Account
from codexlb.sse import Event, EventTooLarge, SSEDecoder
from codexlb.websocket import UpstreamSocket

HOP_BY_HOP = frozenset(
    {
        "host",
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "content-type",
        "content-encoding",
        "accept",
        "accept-encoding",
        "authorization",
        "chatgpt-account-id",
        "cookie",
        "forwarded",
        "via",
        "x-real-ip",
        "openai-organization",
        "openai-project",
    }
)
"""Client headers never forwarded: hop-by-hop, proxy and credential headers, and those that
would pick an organization or project for the account's credentials."""


WEBSOCKET_BETA = "responses_websockets=2026-02-06"


class UpstreamError(Exception):
    """Something went wrong towards the upstream."""


class UpstreamConnectError(UpstreamError):
    """The upstream could not be reached or did not answer in time."""


class UpstreamBroken(UpstreamError):
    """An upstream answer ended, failed or went silent before it was whole."""


class RedirectRefused(aiohttp.ClientError):
    """An upstream (API, model catalog, token endpoint) answered with a redirect. None is ever
    followed: the request carried credentials that must not travel to another address."""

    def __init__(self, status: int) -> None:
        super().__init__(f"redirect (HTTP {status}) refused")
        self.status = status


async def refuse_redirects(
    request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
) -> aiohttp.ClientResponse:
    """The session's middleware: a redirect answer fails the request as ``RedirectRefused``
    (an ``aiohttp.ClientError``, so every caller already treats it as an upstream failure),
    before aiohttp could follow it with the request's headers, tokens included."""
    response = await handler(request)
    if response.status in _REDIRECTS:
        response.release()
        raise RedirectRefused(response.status)
    return response


_REDIRECTS = frozenset({301, 302, 303, 307, 308})


class UpstreamRefused(UpstreamError):
    """The upstream answered a WebSocket handshake with an HTTP error status."""

    def __init__(self, status: int, headers: Mapping[str, str]) -> None:
        super().__init__(f"handshake refused with HTTP {status}")
        self.status = status
        self.headers = headers


RELAYED_HEADERS = frozenset({"x-models-etag", "x-request-id"})
RELAYED_PREFIXES = ("x-codex-", "x-ratelimit-")
"""Upstream response headers passed back to the client (PROTOCOL §2): turn state, the
models ETag, request id and rate limits."""


# Header names' verdicts, remembered per direction (``http1.remember``).
_relayed_names: dict[str, bool] = {}
_relayed_beside_pool: dict[str, bool] = {}
_forwarded_names: dict[str, bool] = {}


def relayed_headers(
    headers: Mapping[str, str], model: str | None, *, beside_pool_limits: bool = False
) -> dict[str, str]:
    """The upstream's useful response headers; ``openai-model`` only when it matches the
    requested model (Codex warns of a reroute otherwise). ``beside_pool_limits``: without the
    account's rate-limit headers, which the pool's replace (``signals``)."""
    known = _relayed_beside_pool if beside_pool_limits else _relayed_names
    relayed: dict[str, str] = {}
    for name, value in headers.items():
        relay = known.get(name)
        if relay is None:
            lower = name.lower()
            relay = lower in RELAYED_HEADERS or lower.startswith(RELAYED_PREFIXES)
            if beside_pool_limits and lower in pool_view.RATE_LIMIT_HEADERS:
                relay = False
            remember(known, name, relay)
        if relay:
            relayed[name] = value
    upstream_model = headers.get("openai-model")
    if upstream_model is not None and upstream_model == model:
        relayed["openai-model"] = upstream_model
    return relayed


def forward_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The client's headers that travel upstream (SPEC S1.3, PROTOCOL §2)."""
    forwarded: dict[str, str] = {}
    for name, value in headers.items():
        forward = _forwarded_names.get(name)
        if forward is None:
            lower = name.lower()
            forward = not (
                lower in HOP_BY_HOP or lower.startswith(("x-forwarded-", "sec-websocket-"))
            )
            remember(_forwarded_names, name, forward)
        if forward:
            forwarded[name] = value
    return forwarded


class Upstream:
    def __init__(self, timeouts: TimeoutsConfig, *, websocket_compression: bool = False) -> None:
        self._timeouts = timeouts
        self._websocket_compression = websocket_compression
        self._session: aiohttp.ClientSession | None = None
        self._http: Http1Client | None = None

    async def start(self) -> None:
        self._http = Http1Client(connect_timeout=self._timeouts.connect_seconds)
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=60)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=self._timeouts.connect_seconds,
                sock_read=self._timeouts.idle_seconds,
            ),
            skip_auto_headers=("User-Agent",),
            cookie_jar=aiohttp.DummyCookieJar(),
            middlewares=(refuse_redirects,),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._http is not None:
            await self._http.close()
            self._http = None

    @property
    def http(self) -> Http1Client:
        assert self._http is not None, "Upstream.start() was not awaited"
        return self._http

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "Upstream.start() was not awaited"
        return self._session

    async def post(
        self,
        account: Account,
        path: str,
        body: bytes,
        headers: Mapping[str, str],
        *,
        sse: bool,
        method: str = "POST",
        content_type: str | None = "application/json",
    ) -> Http1Response:
        """POST ``body`` to ``account`` (or send it with another ``method``: a side call);
        returns once the response headers arrived. The caller reads the answer and then
        ``release()``s it."""
        request_headers = dict(headers)
        request_headers.update(account.credentials.auth_headers())
        if content_type is not None:
            request_headers["Content-Type"] = content_type
        request_headers["Accept"] = "text/event-stream" if sse else "application/json"
        request_headers["Accept-Encoding"] = "identity"
        try:
            response = await self.http.post(
                _url(account.base_url, path),
                request_headers,
                body,
                first_byte_timeout=self._timeouts.first_byte_seconds,
                method=method,
            )
        except ConnectFailed as exc:
            raise UpstreamConnectError(str(exc)) from exc
        return response

    async def websocket(
        self,
        account: Account,
        path: str,
        headers: Mapping[str, str],
        *,
        max_msg_size: int,
        runs_of: tuple[bytes, ...] = (),
    ) -> UpstreamSocket:
        """Open a Responses WebSocket to ``account`` (offering permessage-deflate if set);
        ``runs_of`` as for ``websocket.connect``."""
        request_headers = {k: v for k, v in headers.items() if k.lower() != "openai-beta"}
        request_headers.update(account.credentials.auth_headers())
        request_headers["OpenAI-Beta"] = WEBSOCKET_BETA
        try:
            return await websocket.connect(
                _url(account.base_url, path),
                request_headers,
                connect_seconds=self._timeouts.connect_seconds,
                max_message_bytes=max_msg_size,
                offer_deflate=self._websocket_compression,
                runs_of=runs_of,
            )
        except websocket.HandshakeRefused as exc:
            if exc.status in _REDIRECTS:
                raise UpstreamConnectError(f"redirect (HTTP {exc.status}) refused") from exc
            raise UpstreamRefused(exc.status, exc.headers) from exc
        except ConnectFailed as exc:
            raise UpstreamConnectError(str(exc)) from exc


@functools.lru_cache(maxsize=1024)
def _url(base_url: str, path: str) -> URL:
    """Parsed once per account and path, not once per request."""
    return URL(base_url + path)


async def read_answer(response: Http1Response, limit: int, idle_timeout: float) -> bytes:
    """The whole body of a non-streamed answer (an error status's, a compaction's, a side
    call's), at most ``limit`` bytes; ``UpstreamBroken`` when it does not arrive whole or is
    larger."""
    try:
        body = await response.read(limit + 1, idle_timeout)
    except Http1Error as exc:
        raise UpstreamBroken(f"answer broke off: {exc}") from exc
    if len(body) > limit:
        raise UpstreamBroken(f"answer larger than {limit} bytes")
    if not response.complete:
        raise UpstreamBroken("answer incomplete")
    return body


class UpstreamEvents:
    """The upstream's events, one list per arrival, then ``None``; ``UpstreamBroken`` on
    failure. (A plain object, not an async generator: one is made for every response.)"""

    __slots__ = ("_decoder", "_ended", "_idle", "_upstream", "received")

    def __init__(
        self, upstream: Http1Response, idle_timeout: float, *, max_event_bytes: int | None = None
    ) -> None:
        self._upstream = upstream
        self._idle = idle_timeout
        self._decoder = SSEDecoder(max_event_bytes)
        self._ended = False
        self.received = 0
        """Bytes of the stream read so far (the recorder decides when that is too many)."""

    async def next_batch(self) -> list[Event] | None:
        while not self._ended:
            try:
                chunk = await self._upstream.next_chunk(self._idle)
            except Http1Error as exc:
                raise UpstreamBroken(f"stream failed: {exc}") from exc
            if chunk is None:
                self._ended = True
                return self._decoder.flush() or None
            self.received += len(chunk)
            try:
                events = self._decoder.feed(chunk)
            except EventTooLarge as exc:
                raise UpstreamBroken(f"{exc} ([limits] max_upstream_event_bytes)") from exc
            if events:
                return events
        return None
