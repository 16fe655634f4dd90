"""The WebSocket transport: Responses WebSocket mode on both paths.

One ``ClientSocket`` per client connection runs in the handler's coroutine and is the only
owner of its upstream socket: it opens one at the client's handshake (so the upstream's 101
headers reach the client), bound to one account, unless its client key already holds
``early_websockets_per_key`` such sockets that carry no request yet (``EarlySockets``: opening
client sockets must not open upstream sockets without bound); it replaces it (after a
failure, or when the conversation must move to another account) only from that coroutine.
Responses run one at a time in arrival order.

Each ``response.create`` is one ``Exchange``: the socket supplies the attempt (connect if the
account has no open socket here, send, relay the frames) and hands every upstream failure to
``Exchange.judge``; what a failure means is ``failover.verdict``'s, as over HTTP. An anchor
produced on the open socket is forwarded as it is (S3.1) unless the delta belongs to another
account; any other anchor is replayed. Every ``error`` event codexlb sends carries ``status``.

The upstream socket is codexlb's own client (``websocket``): the frames that arrived together
are relayed together, each looked at by its type (plain output, most of a stream, in runs:
``relay.PLAIN_OUTPUT``), and those the client may see are written to the client's connection
as the bytes they came in (``shim.ClientFrames``), in one write.

At shutdown (``WsProxy.shutdown``) idle client sockets close at once with 1001 and busy ones
right after their turn, so clients reconnect instead of holding the server up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web

from codexlb import signals, turn_state
from codexlb.auth import ClientKeys
from codexlb.credentials import Credentials
from codexlb.errors import (
    CodexLBError,
    InvalidRequest,
    PayloadTooLarge,
    SnapshotNotStored,
)
from codexlb.exchange import (
    Exchange,
    affinity_key,
    handshake_account,
    learn_headers,
    reauthorize,
    turn_state_headers,
)
from codexlb.failover import KEEPS_SOCKET, Action, Failure, Phase
from codexlb.frames import RUN, frame_head, server_frame
from codexlb.frames import TEXT as TEXT_FRAME
from codexlb.http1 import remember
from codexlb.logs import RequestRecord, new_request_id
from codexlb.payload import CreateRequest
from codexlb.pool import Account
from codexlb.relay import (
    BROKEN,
    COMPLETED,
    FAILED,
    HOLD,
    PASS,
    PLAIN_OUTPUT,
    PLAIN_PREFIXES,
    ResponseRecorder,
    shaped_error,
)
from codexlb.shim import ClientFrames, send_uncompressed_by_default
from codexlb.sse import type_member
from codexlb.upstream import (
    UpstreamConnectError,
    UpstreamRefused,
    forward_headers,
)
from codexlb.websocket import SocketClosed, UpstreamSocket

if TYPE_CHECKING:
    from codexlb.app import Services

log = logging.getLogger(__name__)

CLIENT_HEARTBEAT_SECONDS = 30.0
UPSTREAM_CLOSE_SECONDS = 2.0
"""Longest wait for an upstream socket's closing handshake before the connection is cut."""
TEXT, BINARY = aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY
"""For the per-message code: on Python 3.11 each ``WSMsgType.X`` goes through
``EnumType.__getattr__``."""
GOING_AWAY = aiohttp.WSCloseCode.GOING_AWAY
POLICY_VIOLATION = aiohttp.WSCloseCode.POLICY_VIOLATION
MESSAGE_SLACK_BYTES = 1024 * 1024
"""Read past ``max_body_bytes`` by this much: a message just over the limit gets its error
event on a socket that stays open."""


class ClientWebSocket(web.WebSocketResponse):
    """The client's socket: a message too large to read ends in an S1.4 error event.

    aiohttp reads a message up to ``max_msg_size`` bytes (``max_body_bytes`` and a little
    slack): a message over the limit but within the slack is read whole, answered with the
    error event and the socket goes on. Beyond that aiohttp stops at the frame's header, or
    stops inflating a compressed frame at the size, so memory stays bounded; the rest of the
    message is still on its way and cannot be skipped, so the socket closes. It would close
    with 1009, which clients report as a broken connection: the error event goes out first,
    and the close is 1008 (policy violation) naming the limit.
    """

    def __init__(self, *, limit: int, **kwargs: Any) -> None:
        super().__init__(max_msg_size=limit + MESSAGE_SLACK_BYTES, **kwargs)
        self.limit = limit

    async def close(
        self, *, code: int = aiohttp.WSCloseCode.OK, message: bytes = b"", drain: bool = True
    ) -> bool:
        if code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG and not self.closed:
            with contextlib.suppress(ConnectionError):
                await self.send_str(error_event(PayloadTooLarge(self.limit)))
            code, message = POLICY_VIOLATION, b"message over max_body_bytes"
        return await super().close(code=code, message=message, drain=drain)


class ClientGone(Exception):
    """The client socket closed; its upstream work stops."""


_TYPES: dict[bytes, str] = {}
"""Event types seen before, decoded (a stream repeats a handful)."""


def event_type(payload: bytes) -> str | None:
    """An upstream event's type. The upstream writes ``type`` first: it is read from the
    bytes, and the event is parsed only when it does not start that way."""
    if payload.startswith(b'{"type":"'):
        end = payload.find(b'"', 9, 137)
        if end > 0:
            raw = payload[9:end]
            kind = _TYPES.get(raw)
            if kind is not None:
                return kind
            if b"\\" not in raw:
                return remember(_TYPES, raw, raw.decode())
    try:
        return type_member(orjson.loads(payload))
    except orjson.JSONDecodeError:
        return None


class WsProxy:
    """The WebSocket endpoint and the client sockets it holds open."""

    def __init__(self, services: Services, keys: ClientKeys) -> None:
        self.services = services
        self.keys = keys
        self._sockets: set[ClientSocket] = set()
        self._early = EarlySockets(services)
        self._draining = False

    async def shutdown(self, app: web.Application) -> None:
        """At shutdown (``on_shutdown``): close the idle client sockets with 1001 (going away)
        so that clients reconnect at once; a socket busy with a turn closes once the turn has
        ended. Without this, an idle socket would hold the shutdown until its timeout."""
        self._draining = True
        await asyncio.gather(*(socket.drain() for socket in list(self._sockets)))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        scope = self.keys.scope_for(request.headers.get("Authorization"))
        client = ClientWebSocket(
            heartbeat=CLIENT_HEARTBEAT_SECONDS,
            limit=self.services.config.limits.max_body_bytes,
            compress=self.services.config.server.websocket_compression,
        )
        socket = ClientSocket(self.services, client, scope, request.headers, self._early)
        self._sockets.add(socket)
        try:
            # The upstream's 101 carries headers Codex reads (turn state, models ETag, rate
            # limits): open it first when an account is at hand, and pass them on.
            client.headers.update(await socket.connect_early())
            await client.prepare(request)
            send_uncompressed_by_default(client)
            socket.frames = ClientFrames(client)
            gauge = self.services.metrics.websockets.labels("client")
            gauge.inc()
            try:
                if self._draining:  # the server began shutting down during the handshake
                    await socket.drain()
                await socket.run()
            finally:
                gauge.dec()
        finally:
            self._sockets.discard(socket)
            await socket.close()
        return client


class EarlySockets:
    """Upstream sockets opened at client handshakes that carried no request yet, counted per
    client key and bounded by ``[routing] early_websockets_per_key``: a client opening many
    sockets gets upstream sockets for the first few only; the others connect at their first
    request (their handshake then relays no upstream headers; Codex reads the same rate limits
    from the ``codex.rate_limits`` event of each response)."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self._idle: dict[str, int] = {}
        self._capped: set[str] = set()
        """Keys at the cap, logged once until they fall below it."""

    def reserve(self, scope: str) -> bool:
        """Whether a handshake of ``scope`` may open an upstream socket; ``release`` it then."""
        idle = self._idle.get(scope, 0)
        if idle >= self.services.pool.routing.early_websockets_per_key:
            if scope not in self._capped:
                self._capped.add(scope)
                log.info(
                    "client key %s holds %d upstream sockets that carry no request yet: its "
                    "new sockets connect upstream at their first request",
                    scope or "(open access)",
                    idle,
                )
            return False
        self._idle[scope] = idle + 1
        return True

    def release(self, scope: str) -> None:
        idle = self._idle[scope] - 1
        if idle:
            self._idle[scope] = idle
        else:
            del self._idle[scope]
        self._capped.discard(scope)


class ClientSocket:
    """One client connection and the upstream socket it owns."""

    def __init__(
        self,
        services: Services,
        client: web.WebSocketResponse,
        scope: str,
        headers: Mapping[str, str],
        early: EarlySockets,
    ) -> None:
        self.services = services
        self.early = early
        self._early_reserved = False
        """This socket counts in ``early`` until its first request."""
        self.client = client
        self.scope = scope
        self.headers = headers
        self.forwarded = forward_headers(headers)
        self.affinity_key = headers.get("session-id") or headers.get("thread-id")
        self.frames: ClientFrames | None = None
        """Where frames to the client are written, once its socket is prepared."""
        self.upstream: UpstreamSocket | None = None
        self.account: Account | None = None
        self.sent = Credentials()
        """The credentials the upstream socket was opened with."""
        self.last_response_id: str | None = None
        """The last response completed on the current upstream socket (a live anchor)."""
        self.busy = False
        """Whether a client message is being answered."""
        self.draining = False
        """The server is shutting down: the socket closes once it is not busy."""

    async def run(self) -> None:
        limit = self.services.config.limits.max_body_bytes
        try:
            async for message in self.client:
                if self.draining:  # read before the socket closed: the client will resend it
                    break
                self.busy = True
                try:
                    if message.type == TEXT:
                        text: str = message.data
                        # Up to 4 bytes a character: only a long text is worth counting.
                        if len(text) * 4 > limit and len(text.encode()) > limit:
                            await self._send_error(PayloadTooLarge(limit))
                        else:
                            await self._on_held_text(text)
                    elif message.type == BINARY:
                        await self._send_error(
                            InvalidRequest(
                                "Binary frames are not supported; send JSON text frames."
                            )
                        )
                finally:
                    self.busy = False
                if self.draining:
                    break
        except ClientGone:
            pass
        await self._close_client()

    async def drain(self) -> None:
        """Close the client socket (1001) now if it is idle, else once its turn has ended."""
        self.draining = True
        if not self.busy:
            await self._close_client()

    async def _close_client(self) -> None:
        if self.client.prepared and not self.client.closed:
            with contextlib.suppress(ConnectionError):
                if self.draining:
                    await self.client.close(code=GOING_AWAY, message=b"codexlb is shutting down")
                else:
                    await self.client.close()

    async def connect_early(self) -> Mapping[str, str]:
        """Open the upstream socket before the client's handshake completes, if an account is
        eligible and the client key is under its count of such sockets (``EarlySockets``);
        returns the upstream handshake headers to relay. Failures are left to the first
        ``response.create``."""
        if not self.early.reserve(self.scope):
            return {}
        self._early_reserved = True
        account = handshake_account(self.services, self.affinity_key, self.scope)
        if account is None:
            self._release_early()
            return {}
        await self.services.credentials.ensure_fresh(account.name)
        if not await self._connect_early_to(account):
            self._release_early()
            return {}
        assert self.upstream is not None
        headers = self.upstream.headers
        learn_headers(self.services, account, headers)
        return signals.client_headers(self.services, self.scope, headers, model=None)

    async def _connect_early_to(self, account: Account) -> bool:
        """Whether the early upstream socket opened; a 401 refreshes the token at once and
        tries once more, so the first ``response.create`` finds a fresh token."""
        for may_retry in (True, False):
            try:
                await self._connect(account)
                return True
            except (UpstreamConnectError, UpstreamRefused) as exc:
                log.info("early upstream socket on %s failed: %s", account.name, exc)
                refused = isinstance(exc, UpstreamRefused) and exc.status == 401
                if not (
                    may_retry and refused and await reauthorize(self.services, account, self.sent)
                ):
                    return False
        return False

    async def close(self) -> None:
        self._release_early()
        await self._drop_upstream()
        await self._close_client()

    async def _on_held_text(self, text: str) -> None:
        """Answer ``text`` while the body budget holds it, as an HTTP body is held."""
        bodies = self.services.bodies
        try:
            bodies.take(len(text))
        except CodexLBError as exc:
            await self._send_error(exc)
            return
        try:
            await self._on_text(text)
        finally:
            bodies.give(len(text))

    def _release_early(self) -> None:
        if self._early_reserved:
            self._early_reserved = False
            self.early.release(self.scope)

    async def _on_text(self, text: str) -> None:
        try:
            body = orjson.loads(text)
        except ValueError:
            await self._send_error(InvalidRequest("The message is not valid JSON."))
            return
        if not isinstance(body, dict):
            await self._send_error(InvalidRequest("The message must be a JSON object."))
            return
        if body.get("type") != "response.create":
            await self._send_error(
                InvalidRequest(
                    f"Unsupported message type {body.get('type')!r}; expected 'response.create'.",
                    param="type",
                )
            )
            return
        del body["type"]
        self._release_early()  # its upstream socket, if early, is no longer idle
        record = RequestRecord("ws", self.scope, new_request_id(self.headers))
        try:
            request = CreateRequest.from_body(body, text)
            exchange = Exchange(
                self.services,
                scope=self.scope,
                request=request,
                affinity_key=affinity_key(self.headers, request),
                record=record,
            )
            record.status = await self._respond(exchange, text)
        except CodexLBError as exc:
            record.status = exc.status
            await self._send_error(exc)
        finally:
            record.emit(self.services.metrics)

    async def _respond(self, exchange: Exchange, text: str) -> int:
        """Serve one ``response.create``; returns the status for the log line."""
        anchor = exchange.request.previous_response_id
        live = anchor is not None and anchor == self.last_response_id
        return await exchange.run(
            lambda account: self._attempt(exchange, account, text),
            live_on=self.account if live and self.upstream is not None else None,
            prefer=self.account.name if self.account is not None else None,
        )

    async def _attempt(self, exchange: Exchange, account: Account, text: str) -> int | None:
        """One try on ``account``, on the open upstream socket if it is that account's."""
        if account is not self.account or self.upstream is None:
            await self._drop_upstream()
            try:
                await self._connect(account)
            except UpstreamConnectError as exc:
                await exchange.judge(account, Failure(Phase.CONNECT, message=str(exc)))
                return None
            except UpstreamRefused as exc:
                failure = Failure(Phase.HANDSHAKE, status=exc.status, headers=exc.headers)
                await exchange.judge(account, failure)
                return None
        changed = exchange.upstream_input(account)
        message = (
            exchange.request.upstream_message(
                input_items=changed,
                anchored=exchange.live,
                drop_turn_state=exchange.drops_turn_state(account),
            )
            or text
        )
        return await self._relay(exchange, account, message)

    async def _connect(self, account: Account) -> None:
        self.sent = account.credentials  # what the handshake sends: named again on a 401
        self.upstream = await self.services.upstream.websocket(
            account,
            "/responses",
            turn_state_headers(self.services, account, self.forwarded),
            max_msg_size=self.services.config.limits.max_upstream_event_bytes,
            runs_of=PLAIN_PREFIXES,
        )
        self.services.metrics.websockets.labels("upstream").inc()
        self.account = account
        self.last_response_id = None

    async def _drop_upstream(self) -> None:
        upstream, self.upstream = self.upstream, None
        self.last_response_id = None
        if upstream is not None:
            self.services.metrics.websockets.labels("upstream").dec()
            await upstream.close(UPSTREAM_CLOSE_SECONDS)

    async def _relay(self, exchange: Exchange, account: Account, message: str) -> int | None:
        """Send one request on the upstream socket and relay its events to the client: the
        status for the log line, or ``None`` to try again.

        The frames that arrived together are relayed together: each is looked at by its type
        (``event_type``), but plain output comes in runs the reader gathered (``RUN``), and
        those the client may see go out as they came, in one write.
        """
        upstream = self.upstream
        assert upstream is not None
        limits = self.services.config.limits
        recorder = ResponseRecorder(max_response_bytes=limits.max_upstream_response_bytes)
        observe = recorder.observe
        record = exchange.record
        received_size = 0
        held: list[bytes] = []
        """Frames kept back (``HOLD``), as head and payload."""
        idle = self.services.config.timeouts.idle_seconds
        try:
            await upstream.send_text(message.encode())
        except ConnectionError:
            return await self._broken(exchange, account, recorder, "upstream socket closed")
        while True:
            try:
                batch = await upstream.receive(idle)
            except SocketClosed as exc:
                reason = f"{exc} before the terminal event"
                return await self._broken(exchange, account, recorder, reason)
            except TimeoutError:
                reason = "the upstream went silent before the terminal event"
                return await self._broken(exchange, account, recorder, reason)
            out: list[bytes] = []
            for opcode, head, payload in batch:
                received_size += len(payload)  # binary frames count too, though not relayed
                if recorder.exceeds(received_size):
                    await self._write(out, record)
                    reason = "the response exceeds [limits] max_upstream_response_bytes"
                    return await self._broken(exchange, account, recorder, reason)
                if opcode == RUN:  # plain output events that arrived together
                    kind: str | None = PLAIN_OUTPUT[0]
                elif opcode != TEXT_FRAME:
                    continue  # binary frames carry nothing for the client
                else:
                    kind = event_type(payload)
                if kind == "codex.rate_limits":
                    with contextlib.suppress(ValueError):
                        pooled = exchange.observe_rate_limits(account, orjson.loads(payload))
                        if pooled is not None:  # the pool's limits, in place of the account's
                            payload = pooled.encode()
                            head = frame_head(TEXT_FRAME, len(payload))
                elif kind == "response.metadata":
                    with contextlib.suppress(ValueError):
                        found = turn_state.in_metadata_event(orjson.loads(payload))
                        exchange.learn_turn_state(account, found)
                step = observe(kind, payload)
                if step is HOLD:
                    held += (head, payload)
                    continue
                if step is PASS:
                    if held:
                        out += held
                        held.clear()
                    out += (head, payload)
                    continue
                # The attempt ends here: what came before goes out first.
                await self._write(out, record)
                out = []
                if step is BROKEN:
                    reason = recorder.malformed or "malformed event"
                    return await self._broken(exchange, account, recorder, reason)
                if step is FAILED:
                    failure = recorder.failure
                    assert failure is not None
                    action = await exchange.judge(account, failure, sent=self.sent)
                    if action is not Action.PASS_ON:
                        if action not in KEEPS_SOCKET:
                            await self._drop_upstream()
                        return None
                    self.last_response_id = None
                    if kind == "error":
                        shown = _with_status(payload, failure.reported_status)
                        if shown is not payload:
                            head, payload = b"", server_frame(shown)
                elif step is COMPLETED:
                    try:
                        await exchange.commit(account, recorder)
                    except SnapshotNotStored as exc:
                        if not recorder.visible:
                            raise  # nothing sent yet: an error event
                        event = recorder.failed_event(exc.code, exc.message)
                        head, payload = b"", server_frame(orjson.dumps(event))
                    response_id = (recorder.response or {}).get("id")
                    self.last_response_id = response_id if isinstance(response_id, str) else None
                await self._write([*held, head, payload], record)
                return 200
            if out:
                await self._write(out, record)

    async def _broken(
        self, exchange: Exchange, account: Account, recorder: ResponseRecorder, reason: str
    ) -> int | None:
        """The upstream socket ended before the terminal event: try again, or, after visible
        output, end the response as ``stream_incomplete`` (the next request opens a new
        socket)."""
        await self._drop_upstream()
        if await exchange.judge(account, recorder.broken(reason)) is not Action.BREAK:
            return None
        await self._write([server_frame(orjson.dumps(recorder.incomplete_event()))])
        return 200

    async def _write(self, frames: list[bytes], record: RequestRecord | None = None) -> None:
        """Write whole frames to the client in one write (the first one of a response is
        its ``record``'s first byte)."""
        if not frames:
            return
        if record is not None:
            record.mark_first_byte()
        assert self.frames is not None
        try:
            await self.frames.write(b"".join(frames) if len(frames) > 1 else frames[0])
        except ConnectionError as exc:
            raise ClientGone from exc

    async def _send_error(self, error: CodexLBError) -> None:
        await self._write([server_frame(error_event(error).encode())])


def error_event(error: CodexLBError) -> str:
    """The S1.4 ``error`` event for ``error``, always with its ``status``."""
    event = {
        "type": "error",
        # S1.4: an oversize message is a 400 over WebSocket (413 over HTTP).
        "status": 400 if isinstance(error, PayloadTooLarge) else error.status,
        "error": error.error_object(),
    }
    headers = error.headers()
    if headers:
        event["headers"] = headers
    return orjson.dumps(event).decode()


def _with_status(payload: bytes, status: int | None) -> bytes:
    """An upstream ``error`` event as the client gets it (S1.4, the same rule as HTTP's
    ``relay.shaped_error``): with a ``status`` when it has none (Codex ignores those), and a 502
    ``upstream_error`` in place of one that carries no OpenAI error object. ``payload`` itself
    when it is shown as it came."""
    event = orjson.loads(payload)
    own = event.get("status") if isinstance(event, dict) else None
    shown_status, shown = shaped_error(own if type(own) is int else status or 500, event)
    if shown is event and type(own) is int:
        return payload
    return orjson.dumps({**shown, "type": "error", "status": shown_status})
