"""The fake upstream's HTTP side: Responses over SSE, the models catalog, shared helpers.

A normal answer is one `web.Response` with chunked encoding, so aiohttp writes the headers,
the whole pre-encoded event stream and the chunked terminator in a single transport write;
with ``event_writes`` each event is a chunk written on its own, as the real upstream streams.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from codexlb.testing import events
from codexlb.testing.faults import Fault, UpstreamError, openai_error
from codexlb.testing.state import FakeAccount, UpstreamState

MODELS_ETAG = '"fake-models-1"'


@dataclass(frozen=True)
class _Arrival:
    """A POST that authenticated and drew no error fault."""

    account: FakeAccount
    body: Any
    request_id: str
    fault: Fault | None


async def _arrive(state: UpstreamState, request: web.Request) -> _Arrival | web.Response:
    """Record a POST, authenticate it and draw its fault: the arrival, or the error answer."""
    headers = lower_headers(request.headers)
    account = state.authenticate(headers)
    body = parse_json(await request.read())
    state.record(state.received, "http", request.path, account, headers, body)
    request_id = events.new_id("req")
    if account is None:
        return error_response(unauthorized(), request_id)
    fault = state.take_fault(account.name, body=body)
    if fault is not None and fault.is_error:
        previous = body.get("previous_response_id") if isinstance(body, dict) else None
        error = fault.error(now=time.time(), previous_response_id=previous)
        return error_response(error, request_id)
    if fault is not None and fault.kind == "raw":
        return web.Response(
            status=fault.http_status or 200, body=fault.body, headers=dict(fault.headers)
        )
    return _Arrival(account, body, request_id, fault)


async def post_response(state: UpstreamState, request: web.Request) -> web.StreamResponse:
    """``POST .../responses``: an SSE stream, an error, or a scripted fault."""
    arrival = await _arrive(state, request)
    if isinstance(arrival, web.Response):
        return arrival
    account, body, request_id, fault = (
        arrival.account,
        arrival.body,
        arrival.request_id,
        arrival.fault,
    )
    problem = state.check(body, account, transport="http", last_response_id=None)
    if problem is not None:
        return error_response(problem, request_id)
    assert isinstance(body, dict)
    response_events = state.plan_events(body, account, fault)
    reply_headers = {
        **state.rate_limit_headers(account.name),
        "x-request-id": request_id,
        "x-models-etag": MODELS_ETAG,
        "Content-Type": "text/event-stream",
        "Cache-Control": "no-cache",
    }
    if isinstance(body.get("model"), str):
        reply_headers["openai-model"] = body["model"]
    issued = state.new_turn_state(account.name)
    if issued is not None:
        reply_headers["x-codex-turn-state"] = issued
    try:
        if fault is not None and fault.kind == "slow_first_byte":
            await state.wait_closing(fault.seconds)
        if fault is not None and fault.kind == "flood":
            return await _flood(state, request, reply_headers, response_events[0], fault)
        if fault is None or fault.kind not in ("drop_after", "stall_after", "slow_finish"):
            if state.event_writes:
                return await _stream_each(state, request, reply_headers, response_events)
            response = web.Response(body=events.encode_sse(response_events), headers=reply_headers)
            response.enable_chunked_encoding()
            return response
        stream = web.StreamResponse(headers=reply_headers)
        await stream.prepare(request)
        if fault.kind == "slow_finish":
            await stream.write(events.encode_sse(response_events[:-1]))
            await state.wait_closing(fault.seconds)
            try:
                await stream.write_eof(events.encode_sse(response_events[-1:]))
            except ConnectionError:
                state.count_disconnect()
            return stream
        if fault.events:
            await stream.write(events.encode_sse(response_events[: fault.events]))
        if fault.kind == "stall_after":
            await state.wait_closing(None)
        drop_connection(request)
        return stream
    except asyncio.CancelledError:
        state.count_disconnect()
        raise


async def _stream_each(
    state: UpstreamState,
    request: web.Request,
    headers: Mapping[str, str],
    response_events: Sequence[Mapping[str, Any]],
) -> web.StreamResponse:
    """Every event its own chunk, each written on its own (the real upstream's shape); stops
    early once the peer has gone."""
    encoded = [events.encode_sse([event]) for event in response_events]
    stream = web.StreamResponse(headers=headers)
    stream.enable_chunked_encoding()
    try:
        await stream.prepare(request)
        for chunk in encoded:
            await stream.write(chunk)
        await stream.write_eof()
    except ConnectionError:
        state.count_disconnect()
    return stream


async def _flood(
    state: UpstreamState,
    request: web.Request,
    headers: Mapping[str, str],
    created: Mapping[str, Any],
    fault: Fault,
) -> web.StreamResponse:
    """``response.created``, then ``fault.body`` ``fault.events`` times, then a hang-up; stops
    early once the peer has gone."""
    stream = web.StreamResponse(headers=headers)
    await stream.prepare(request)
    try:
        await stream.write(events.encode_sse([created]))
        for _ in range(fault.events):
            await stream.write(fault.body)
    except ConnectionError:
        state.count_disconnect()
        return stream
    drop_connection(request)
    return stream


async def compact(state: UpstreamState, request: web.Request) -> web.StreamResponse:
    """``POST .../responses/compact``: the history replaced by one summary message."""
    arrival = await _arrive(state, request)
    if isinstance(arrival, web.Response):
        return arrival
    body, request_id = arrival.body, arrival.request_id
    if not isinstance(body, dict) or "previous_response_id" in body:
        problem = openai_error(400, "invalid_request", now=time.time())
        return error_response(problem, request_id)
    items = body.get("input")
    summary = events.message_item(f"compacted {len(items) if isinstance(items, list) else 0} items")
    return web.json_response({"output": [summary]}, headers={"x-request-id": request_id})


async def models(state: UpstreamState, request: web.Request) -> web.StreamResponse:
    """``GET .../models``: an empty catalog with an ``ETag`` (304 on a matching
    ``If-None-Match``); Codex then falls back to its bundled list."""
    headers = lower_headers(request.headers)
    account = state.authenticate(headers)
    state.record(state.received, "http", request.path, account, headers, None)
    request_id = events.new_id("req")
    if account is None:
        return error_response(unauthorized(), request_id)
    reply_headers = {"ETag": MODELS_ETAG, "x-request-id": request_id}
    if headers.get("if-none-match") == MODELS_ETAG:
        return web.Response(status=304, headers=reply_headers)
    return web.json_response({"models": []}, headers=reply_headers)


TINY_PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQ"
    "AAAABJRU5ErkJggg=="
)
"""A 1x1 PNG, base64: the image every ``images/*`` call of the fake answers."""


async def side_call(state: UpstreamState, request: web.Request) -> web.StreamResponse:
    """Any other path under a prefix (``images/generations``, ``alpha/search``...): recorded
    like a response request (faults apply); ``images/*`` answers a tiny image, anything else
    ``{"object": "side_call", "path", "query", "account", "method", "body"}``."""
    arrival = await _arrive(state, request)
    if isinstance(arrival, web.Response):
        return arrival
    headers = {"x-request-id": arrival.request_id, **state.rate_limit_headers(arrival.account.name)}
    if request.match_info["tail"].startswith("images/"):
        answer: dict[str, Any] = {"created": int(time.time()), "data": [{"b64_json": TINY_PNG}]}
    else:
        answer = {
            "object": "side_call",
            "path": request.path,
            "query": request.query_string,
            "account": arrival.account.name,
            "method": request.method,
            "body": arrival.body,
        }
    return web.json_response(answer, headers=headers)


def lower_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def parse_json(data: bytes | str) -> Any:
    """The parsed JSON value, or None when ``data`` is not JSON."""
    try:
        return json.loads(data)
    except ValueError:
        return None


def unauthorized() -> UpstreamError:
    return openai_error(401, "invalid_api_key", now=time.time())


def error_response(error: UpstreamError, request_id: str) -> web.Response:
    return web.Response(
        status=error.status,
        body=error.http_body(),
        content_type="application/json",
        headers={**error.headers, "x-request-id": request_id},
    )


def drop_connection(request: web.Request) -> None:
    """Close the TCP connection once what was written is flushed: no chunked terminator, no
    WebSocket close frame. aiohttp's own final write then fails quietly as a lost peer."""
    if request.transport is not None:
        request.transport.close()
