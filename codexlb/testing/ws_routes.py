"""The fake upstream's WebSocket mode: ``GET .../responses`` upgraded, one response at a time.

Each text frame ``{"type": "response.create", ...}`` starts one response; its events go out one
JSON object per text frame, after a ``codex.rate_limits`` frame. Errors are ``error`` events
and leave the socket open. The socket remembers only the id of its last completed response,
the one ``previous_response_id`` it can continue from.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence

from aiohttp import WSMessage, WSMsgType, web

from codexlb.testing import events
from codexlb.testing.faults import Fault, openai_error
from codexlb.testing.http_routes import (
    MODELS_ETAG,
    drop_connection,
    error_response,
    lower_headers,
    parse_json,
    unauthorized,
)
from codexlb.testing.state import FakeAccount, UpstreamState

CLOSE_TIMEOUT = 2.0
"""Seconds to wait for the peer's close frame when the fake closes a socket."""


async def websocket(state: UpstreamState, request: web.Request) -> web.StreamResponse:
    """Authenticate the handshake (401 before any upgrade), then serve the socket.

    The 101 carries ``x-request-id`` and the account's rate-limit headers; ``openai-model``
    is absent because no model has been requested yet.
    """
    headers = lower_headers(request.headers)
    account = state.authenticate(headers)
    request_id = events.new_id("req")
    ws = web.WebSocketResponse(max_msg_size=0, compress=state.ws_compression, timeout=CLOSE_TIMEOUT)
    if not ws.can_prepare(request).ok:
        state.record(state.received, "http", request.path, account, headers, None)
        error = openai_error(405, "method_not_allowed", now=time.time(), message="Use POST.")
        return error_response(error, request_id)
    state.record(state.handshakes, "ws", request.path, account, headers, None)
    if account is None:
        state.record(state.received, "ws", request.path, None, headers, None)
        return error_response(unauthorized(), request_id)
    fault = state.take_fault(account.name, handshake=True)
    if fault is not None:
        state.record(state.received, "ws", request.path, account, headers, None)
        return error_response(fault.error(now=time.time()), request_id)
    ws.headers.update(state.rate_limit_headers(account.name))
    ws.headers.update({"x-request-id": request_id, "x-models-etag": MODELS_ETAG})
    await ws.prepare(request)
    await _Session(state, request, ws, account, headers).run()
    return ws


class _Session:
    """One upstream socket: reads frames and answers them in order."""

    def __init__(
        self,
        state: UpstreamState,
        request: web.Request,
        ws: web.WebSocketResponse,
        account: FakeAccount,
        headers: Mapping[str, str],
    ) -> None:
        self.state = state
        self.request = request
        self.ws = ws
        self.account = account
        self.headers = headers
        self.last_response_id: str | None = None
        self.responding = False

    async def run(self) -> None:
        """Serve until the peer closes, the connection drops, or a fault ends the socket."""
        self.state.sockets.add(self.ws)
        self.state.notify()
        try:
            async for message in self.ws:
                if message.type is WSMsgType.ERROR or not await self._answer(message):
                    break
        except asyncio.CancelledError:
            if self.responding:
                self.state.count_disconnect()
            raise
        finally:
            self.state.sockets.discard(self.ws)
            self.state.notify()

    async def _answer(self, message: WSMessage) -> bool:
        """Answer one frame; False when the socket is over (dropped or hung up)."""
        body = parse_json(message.data) if message.type is WSMsgType.TEXT else None
        self._record(body)
        if not isinstance(body, dict) or body.get("type") != "response.create":
            not_a_request = openai_error(
                400,
                "invalid_request",
                now=time.time(),
                message='Expected a JSON text frame {"type": "response.create", ...}.',
                param="type",
            )
            return await self._send([events.encode_json(not_a_request.ws_event())])
        fault = self.state.take_fault(self.account.name, body=body)
        if fault is not None and fault.is_error:
            previous = body.get("previous_response_id")
            error = fault.error(now=time.time(), previous_response_id=previous)
            return await self._send([events.encode_json(error.ws_event())])
        problem = self.state.check(
            body, self.account, transport="ws", last_response_id=self.last_response_id
        )
        if problem is not None:
            return await self._send([events.encode_json(problem.ws_event())])
        if fault is not None and fault.kind == "raw":
            return await self._send([fault.body.decode("utf-8", "replace")])
        if fault is not None and fault.kind == "flood":
            return await self._flood(body, fault)
        if fault is not None and fault.kind == "drop_after" and fault.events == 0:
            drop_connection(self.request)
            return False
        response_events = self.state.plan_events(body, self.account, fault)
        frames = [events.encode_json(self.state.rate_limits_frame(self.account.name))]
        issued = self.state.new_turn_state(self.account.name)
        if issued is not None:
            metadata = {"type": "response.metadata", "headers": {"x-codex-turn-state": issued}}
            frames.append(events.encode_json(metadata))
        lead = len(frames)  # frames before the response's own events
        frames += [events.encode_json(event) for event in response_events]
        self.responding = True
        if fault is not None and fault.kind == "slow_first_byte":
            await self.state.wait_closing(fault.seconds)
        if fault is not None and fault.kind in ("drop_after", "stall_after"):
            frames = frames[: fault.events + lead]
        if fault is not None and fault.kind == "slow_finish":
            if not await self._send(frames[:-1]):
                self.state.count_disconnect()
                return False
            await self.state.wait_closing(fault.seconds)
            frames = frames[-1:]
        if not await self._send(frames):
            self.state.count_disconnect()
            return False
        if fault is not None and fault.kind == "drop_after":
            drop_connection(self.request)
            return False
        if fault is not None and fault.kind == "stall_after":
            return await self._stall()
        self.responding = False
        last = response_events[-1]
        if last["type"] == "response.completed":
            self.last_response_id = last["response"]["id"]
        return True

    async def _flood(self, body: Mapping[str, object], fault: Fault) -> bool:
        """``response.created``, then ``fault.body`` as a text (or binary) frame
        ``fault.events`` times, then the socket drops. Always False: the socket is over."""
        created = self.state.plan_events(body, self.account, None)[0]
        unit = fault.body if fault.binary else fault.body.decode("utf-8", "replace")
        self.responding = True
        if await self._send([events.encode_json(created)]):
            for _ in range(fault.events):
                if not await self._send([unit]):
                    self.state.count_disconnect()
                    return False
        drop_connection(self.request)
        return False

    async def _stall(self) -> bool:
        """Hold a stalled response until the socket closes; frames that arrive meanwhile are
        recorded and not answered. Always False: the socket is over."""
        async for message in self.ws:
            if message.type is WSMsgType.ERROR:
                break
            self._record(parse_json(message.data) if message.type is WSMsgType.TEXT else None)
        self.state.count_disconnect()
        return False

    async def _send(self, frames: Sequence[str | bytes]) -> bool:
        """Send frames, text for ``str`` and binary for ``bytes``; False if the peer is gone."""
        try:
            for frame in frames:
                if isinstance(frame, str):
                    await self.ws.send_str(frame)
                else:
                    await self.ws.send_bytes(frame)
        except ConnectionError:
            return False
        return True

    def _record(self, body: object) -> None:
        self.state.record(
            self.state.received, "ws", self.request.path, self.account, self.headers, body
        )
