"""The HTTP transport: ``POST .../responses``, relayed as SSE or assembled into one object.

Upstream bytes are forwarded unchanged, event by event, while a parsed copy feeds the
``ResponseRecorder``. ``response.created``/``in_progress`` are held back until the first
visible event, and the client's response is only started then: any failure before that point
fails over to another account invisibly, or ends as a clean S1.4 error. ``response.completed``
goes out only after its snapshot is committed. Output that arrived with it goes out first when
the store is idle, so the client need not wait for a trip to the database to see it; while the
store is busy (responses completing together) it waits and goes out with ``response.completed``
in one write, since one write per response counts for more under load.

The translated APIs (S11, ``translation``) take the same path: their request becomes a
Responses request for the same ``Exchange``, and a translator they give turns each upstream
event into their own bytes where the native path forwards it unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

import orjson
from aiohttp import web

from codexlb import turn_state
from codexlb.auth import ClientKeys
from codexlb.config import ModelsConfig
from codexlb.edge import read_body
from codexlb.errors import CodexLBError, MethodNotAllowed, NotFound, SnapshotNotStored
from codexlb.exchange import Exchange, affinity_key
from codexlb.failover import Action, Failure, Phase, error_code
from codexlb.http1 import Http1Response
from codexlb.logs import RequestRecord, new_request_id
from codexlb.payload import CreateRequest
from codexlb.pool import Account
from codexlb.relay import BROKEN, COMPLETED, FAILED, HOLD, PASS, ResponseRecorder, shaped_error
from codexlb.sse import encode_event
from codexlb.translation import Door, EventTranslator, Translation, upstream_headers
from codexlb.upstream import (
    UpstreamBroken,
    UpstreamConnectError,
    UpstreamEvents,
    forward_headers,
    read_answer,
)

if TYPE_CHECKING:
    from codexlb.app import Services

log = logging.getLogger(__name__)

MAX_ERROR_BODY = 1024 * 1024


Attempt = Callable[
    [web.Request, "Exchange", Account, Mapping[str, str]], Awaitable[web.StreamResponse | None]
]
"""One try of a request on an account: the client's response, or ``None`` to try again."""


class HttpProxy:
    def __init__(self, services: Services, keys: ClientKeys) -> None:
        self.services = services
        self.keys = keys
        self._idle = services.config.timeouts.idle_seconds
        self._limits = services.config.limits

    async def create_response(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "responses", self._attempt)

    async def compact(self, request: web.Request) -> web.StreamResponse:
        """``POST .../responses/compact``: passed through to an account chosen like a turn of
        the same conversation (parent's account, then affinity), with failover."""
        return await self._serve(request, "compact", self._attempt_compact)

    async def translated(
        self, request: web.Request, door: Door, models: ModelsConfig
    ) -> web.StreamResponse:
        """Another API (S11): its request translated by ``door`` into a Responses request that
        runs through the same exchange, relay and failover as a native one, its answer
        translated back event by event."""
        return await self._serve(request, door.route, self._attempt, (door, models))

    async def side_call(self, request: web.Request) -> web.StreamResponse:
        """Any other path under the two prefixes (``images/generations``, ``alpha/search``...):
        relayed to an account chosen like a new request (session and thread affinity), with
        failover before the first byte; its answer is passed back whole, nothing is stored
        (SPEC S13)."""
        path = side_call_path(request)
        return await self._serve(
            request,
            "side",
            lambda request, exchange, account, headers: self._attempt_side(
                request, exchange, account, headers, path
            ),
            parse=CreateRequest.side_call,
        )

    async def _serve(
        self,
        request: web.Request,
        route: str,
        attempt: Attempt,
        door: tuple[Door, ModelsConfig] | None = None,
        *,
        parse: Callable[[bytes], CreateRequest] = CreateRequest.from_bytes,
    ) -> web.StreamResponse:
        record = RequestRecord("http", "", new_request_id(request.headers), route)
        bodies = self.services.bodies
        held = 0
        try:
            authorization = (
                request.headers.get("Authorization")
                if door is None
                else door[0].authorization(request.headers)
            )
            scope = self.keys.scope_for(authorization)
            record.client_key = scope
            raw = await read_body(request, self.services.config, bodies)
            held = len(raw)
            if door is None:
                create = parse(raw)
                key = affinity_key(request.headers, create)
                headers = forward_headers(request.headers)
            else:
                translation = door[0].translate(raw, door[1])
                create, key = translation.create, translation.affinity_key(request.headers)
                headers = upstream_headers(request.headers)
                attempt = functools.partial(self._attempt_translated, translation)
            del raw
            exchange = Exchange(
                self.services,
                scope=scope,
                request=create,
                affinity_key=key,
                record=record,
                stateless=door is not None,
                turn_state=turn_state.in_headers(request.headers),
            )
            response = await exchange.run(
                lambda account: attempt(request, exchange, account, headers)
            )
            record.status = response.status
            return response
        except CodexLBError as exc:
            record.status = exc.status
            raise
        finally:
            bodies.give(held)
            record.emit(self.services.metrics)

    async def _attempt(
        self,
        request: web.Request,
        exchange: Exchange,
        account: Account,
        headers: Mapping[str, str],
    ) -> web.StreamResponse | None:
        """One try of a turn on ``account``: the client's response, or ``None``."""
        respond: Callable[[Http1Response], Awaitable[web.StreamResponse | None]]
        if exchange.request.stream:  # a partial, not a closure: no frame of its own to resume
            respond = functools.partial(self._relay, request, exchange, account)
        else:
            respond = functools.partial(self._assemble, exchange, account)
        # No local keeps the body: ``_try`` drops it once sent (see ``_try``).
        return await self._try(
            exchange,
            account,
            headers,
            "/responses",
            exchange.request.upstream_body(
                input_items=exchange.upstream_input(account),
                drop_turn_state=exchange.drops_turn_state(account),
            ),
            respond,
            sse=True,
        )

    async def _attempt_translated(
        self,
        translation: Translation,
        request: web.Request,
        exchange: Exchange,
        account: Account,
        headers: Mapping[str, str],
    ) -> web.StreamResponse | None:
        """One try of a translated request on ``account``: the client's response, or ``None``."""

        respond: Callable[[Http1Response], Awaitable[web.StreamResponse | None]]
        if translation.stream:
            respond = functools.partial(
                self._relay, request, exchange, account, translate=translation.events()
            )
        else:
            respond = functools.partial(self._assemble, exchange, account, translation=translation)

        body = translation.upstream_body(
            exchange.upstream_input(account), platform=account.kind == "platform"
        )
        path = "/responses"
        return await self._try(
            exchange, account, headers, path, body, respond, sse=True, translation=translation
        )

    async def _attempt_compact(
        self,
        request: web.Request,
        exchange: Exchange,
        account: Account,
        headers: Mapping[str, str],
    ) -> web.StreamResponse | None:
        """One try of a compaction on ``account``: its JSON answer, passed through."""
        body = exchange.request.upstream_json(
            input_items=exchange.upstream_input(account),
            drop_turn_state=exchange.drops_turn_state(account),
        )
        limit = self.services.config.limits.max_body_bytes

        async def respond(upstream: Http1Response) -> web.StreamResponse:
            raw = await read_answer(upstream, limit, self._idle)
            exchange.succeeded(account)
            exchange.record.mark_first_byte()
            return web.Response(
                body=raw,
                content_type="application/json",
                headers=exchange.client_headers(upstream.headers),
            )

        path = "/responses/compact"
        return await self._try(exchange, account, headers, path, body, respond, sse=False)

    async def _attempt_side(
        self,
        request: web.Request,
        exchange: Exchange,
        account: Account,
        headers: Mapping[str, str],
        path: str,
    ) -> web.StreamResponse | None:
        """One try of a side call on ``account``: its answer, passed through whole."""
        limit = self._limits.max_upstream_response_bytes

        async def respond(upstream: Http1Response) -> web.StreamResponse:
            raw = await read_answer(upstream, limit, self._idle)
            exchange.succeeded(account)
            exchange.record.mark_first_byte()
            shown = exchange.client_headers(upstream.headers)
            content_type = upstream.headers.get("content-type")
            if content_type is not None:
                shown["Content-Type"] = content_type
            return web.Response(status=upstream.status, body=raw, headers=shown)

        body = exchange.request.raw or b""
        return await self._try(
            exchange,
            account,
            headers,
            path,
            body,
            respond,
            sse=False,
            method=request.method,
            content_type=request.headers.get("Content-Type"),
            any_success=True,
        )

    async def _try(
        self,
        exchange: Exchange,
        account: Account,
        headers: Mapping[str, str],
        path: str,
        body: bytes,
        respond: Callable[[Http1Response], Awaitable[web.StreamResponse | None]],
        *,
        sse: bool,
        translation: Translation | None = None,
        method: str = "POST",
        content_type: str | None = "application/json",
        any_success: bool = False,
    ) -> web.StreamResponse | None:
        """Send to ``account``; an error status, a connect failure or a broken answer before
        anything reached the client ends as ``None`` (try again) or a passed-through error.
        The answer is a 200, or with ``any_success`` (a side call) any 2xx."""
        try:
            upstream = await self.services.upstream.post(
                account,
                path,
                body,
                exchange.upstream_headers(account, headers),
                sse=sse,
                method=method,
                content_type=content_type,
            )
        except UpstreamConnectError as exc:
            await exchange.judge(account, Failure(Phase.CONNECT, message=str(exc)))
            return None
        # Sent: a copy of a large body need not outlive the relay, which may last minutes.
        del body
        try:
            status = upstream.status
            if status != 200 and not (any_success and 200 <= status < 300):
                return await self._refused(exchange, account, upstream, translation)
            exchange.observe_headers(account, upstream.headers)
            exchange.learn_turn_state(account, turn_state.in_headers(upstream.headers))
            return await respond(upstream)
        except UpstreamBroken as exc:
            await exchange.judge(account, Failure(Phase.BREAK, message=str(exc)))
            return None
        finally:
            upstream.release()

    async def _refused(
        self,
        exchange: Exchange,
        account: Account,
        upstream: Http1Response,
        translation: Translation | None = None,
    ) -> web.Response | None:
        """An upstream error status: tried again, or the client's own mistake passed on."""
        status = upstream.status
        try:
            raw = await read_answer(upstream, MAX_ERROR_BODY, self._idle)
        except UpstreamBroken:
            raw = b""
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        code, error = error_code(body)
        failed_status = status
        if not 400 <= status <= 599:  # a redirect, say: never followed, a broken upstream
            log.warning("account %s answered HTTP %d: taken as a bad gateway", account.name, status)
            failed_status = 502
        failure = Failure(
            Phase.STATUS,
            status=failed_status,
            code=code,
            message=error.get("message") if error is not None else None,
            headers=upstream.headers,
            error=error,
        )
        if await exchange.judge(account, failure) is not Action.PASS_ON:
            return None
        shown_status, shown = shaped_error(status, body)
        if translation is not None:
            shown_status, shown = translation.error(shown_status, shown)
        elif shown is body:
            return web.Response(status=status, body=raw, content_type="application/json")
        return web.json_response(shown, status=shown_status)

    async def _relay(
        self,
        request: web.Request,
        exchange: Exchange,
        account: Account,
        upstream: Http1Response,
        translate: EventTranslator | None = None,
    ) -> web.StreamResponse | None:
        """Relay one attempt's events; ``translate`` (another API, S11) turns each into the
        bytes the client gets instead of the event itself."""
        recorder = ResponseRecorder(max_response_bytes=self._limits.max_upstream_response_bytes)
        sink = _ClientStream(request, exchange, exchange.client_headers(upstream.headers))
        batches = self._events(upstream)
        observe, passed = recorder.observe, sink.pending.append  # once per event: bound once
        try:
            while (events := await batches.next_batch()) is not None:
                if recorder.exceeds(batches.received):
                    raise UpstreamBroken(_TOO_LARGE)
                for raw, kind, data in events:
                    if kind == "codex.rate_limits":
                        raw = _pool_rate_limits(exchange, account, raw, data)
                    step = observe(kind, data)
                    if translate is not None:
                        raw = translate(kind, data, raw)
                        if not raw and (step is PASS or step is HOLD):
                            continue
                    if step is PASS:
                        passed(raw)  # ``sink.add``
                        continue
                    if step is HOLD:
                        sink.hold(raw)
                        continue
                    if step is BROKEN:
                        raise UpstreamBroken(recorder.malformed or "malformed event")
                    if step is FAILED:
                        assert recorder.failure is not None
                        if await exchange.judge(account, recorder.failure) is not Action.PASS_ON:
                            return None
                    elif sink.pending and not exchange.commit_shares_a_trip:
                        await sink.flush()  # the output, while the commit takes its trip
                    if step is COMPLETED:
                        exchange.request.forget_raw()  # no attempt follows
                        try:
                            await exchange.commit(account, recorder)
                        except SnapshotNotStored as exc:
                            if sink.response is None:
                                raise  # nothing sent yet: a plain 500
                            raw = encode_event(recorder.failed_event(exc.code, exc.message))
                    sink.add(raw)
                    await sink.finish()
                    return sink.response
                if sink.pending and not await sink.flush():
                    return sink.response  # the client has gone
        except UpstreamBroken as exc:
            reason = str(exc)
        else:
            reason = "stream ended before its terminal event"
        if await exchange.judge(account, recorder.broken(reason)) is not Action.BREAK:
            return None
        # Visible output already reached the client: fail the response, keep the stream clean.
        ending = recorder.incomplete_event()
        if translate is None:
            sink.add(encode_event(ending))
        else:
            sink.add(translate("response.failed", orjson.dumps(ending), b""))
        await sink.finish()
        return sink.response

    async def _assemble(
        self,
        exchange: Exchange,
        account: Account,
        upstream: Http1Response,
        translation: Translation | None = None,
    ) -> web.Response | None:
        """One JSON answer from the upstream's events; ``translation`` (another API, S11)
        gives its shape."""
        recorder = ResponseRecorder(
            streaming=False, max_response_bytes=self._limits.max_upstream_response_bytes
        )
        batches = self._events(upstream)
        while (events := await batches.next_batch()) is not None:
            if recorder.exceeds(batches.received):
                raise UpstreamBroken(_TOO_LARGE)
            for _, kind, data in events:
                step = recorder.observe(kind, data)
                if step is BROKEN:
                    raise UpstreamBroken(recorder.malformed or "malformed event")
                if step is COMPLETED:
                    exchange.request.forget_raw()  # no attempt follows
                    response = await exchange.commit(account, recorder)
                    if not response.get("output"):
                        response = {**response, "output": recorder.ordered_output()}
                    exchange.record.mark_first_byte()
                    headers = exchange.client_headers(upstream.headers)
                    if translation is not None:
                        status, reply = translation.reply(response)
                        return web.json_response(reply, status=status, headers=headers)
                    return web.json_response(response, headers=headers)
                if step is FAILED:
                    failure = recorder.failure
                    assert failure is not None
                    if await exchange.judge(account, failure) is not Action.PASS_ON:
                        return None
                    if recorder.response:  # response.failed / incomplete: the response itself
                        if translation is not None:
                            response = {**recorder.response, "output": recorder.ordered_output()}
                            status, reply = translation.reply(response)
                            return web.json_response(reply, status=status)
                        return web.json_response(recorder.response)
                    error = {"error": dict(failure.error)} if failure.error else None
                    status, shown = shaped_error(failure.reported_status or 500, error)
                    if translation is not None:
                        status, shown = translation.error(status, shown)
                    return web.json_response(shown, status=status)
        raise UpstreamBroken("stream ended before its terminal event")

    def _events(self, upstream: Http1Response) -> UpstreamEvents:
        return UpstreamEvents(
            upstream, self._idle, max_event_bytes=self._limits.max_upstream_event_bytes
        )


def _pool_rate_limits(exchange: Exchange, account: Account, raw: bytes, data: bytes) -> bytes:
    """A ``codex.rate_limits`` event as the client gets it: the pool's (``signals``)."""
    try:
        event = json.loads(data)
    except ValueError:
        return raw
    shown = exchange.observe_rate_limits(account, event)
    if shown is None:
        return raw
    return b"event: codex.rate_limits\ndata: " + shown.encode() + b"\n\n"


SIDE_CALL_SEGMENT = re.compile(r"[A-Za-z0-9_~-][A-Za-z0-9._~-]*")
"""A path segment a side call may name: no dot segments, nothing encoded that could become
one upstream (the account's credentials go with the call)."""
OWN_PATHS = frozenset(
    {
        "responses",
        "responses/compact",
        "models",
        "usage",
        "chat/completions",
        "messages",
        "messages/count_tokens",
    }
)
"""codexlb's own paths under the prefixes: another method on them is refused, not relayed."""
OWN_TREES = ("responses/", "messages/")
"""Paths under codexlb's own APIs (Anthropic's ``/v1/messages`` is never an upstream path)."""
SIDE_CALL_PREFIXES = ("/backend-api/codex/", "/v1/")
SIDE_CALL_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
"""Methods whose answer carries a body to read (``HEAD``'s does not, ``OPTIONS`` is a
browser's): the others are refused."""


def side_call_path(request: web.Request) -> str:
    """The upstream path of a side call, from the route's ``tail`` (after the prefix), with
    the query; a bad path is refused (S1.4) before anything goes upstream."""
    tail: str = request.match_info["tail"]
    if request.method not in SIDE_CALL_METHODS:
        raise MethodNotAllowed(f"Method {request.method} is not relayed.")
    if tail in OWN_PATHS:
        raise MethodNotAllowed(f"Method {request.method} is not allowed on {request.path}.")
    if tail.startswith(OWN_TREES):
        raise NotFound(f"Unknown path: {request.path}")
    raw_path = request.raw_path.split("?", 1)[0]
    prefix = next((p for p in SIDE_CALL_PREFIXES if raw_path.startswith(p)), None)
    if prefix is None:
        raise NotFound(f"Unknown path: {request.path}")
    raw_tail = raw_path[len(prefix) :]
    segments = raw_tail.split("/")
    if not all(SIDE_CALL_SEGMENT.fullmatch(segment) for segment in segments):
        raise NotFound(f"Unknown path: {request.path}")
    query = request.rel_url.raw_query_string
    return "/" + raw_tail + (f"?{query}" if query else "")


_TOO_LARGE = "the response exceeds [limits] max_upstream_response_bytes"


class _EventStreamResponse(web.StreamResponse):
    """An SSE response whose headers travel with its first bytes, in one write."""

    _send_headers_immediately = False


class _ClientStream:
    """The client's side of one relayed SSE stream.

    Events wait in ``pending`` (and the not-yet-visible ones in ``held``) until ``flush``; the
    response itself starts at the first flush, so nothing reaches the client before the first
    visible event, and a failure until then can still fail over or become a clean error.
    """

    __slots__ = ("_exchange", "_headers", "_request", "gone", "held", "pending", "response")

    def __init__(
        self, request: web.Request, exchange: Exchange, headers: Mapping[str, str]
    ) -> None:
        self._request = request
        self._exchange = exchange
        self._headers = headers
        self.response: web.StreamResponse | None = None
        self.held: list[bytes] = []
        self.pending: list[bytes] = []
        self.gone = False

    def hold(self, raw: bytes) -> None:
        (self.pending if self.response is not None else self.held).append(raw)

    def add(self, raw: bytes) -> None:
        self.pending.append(raw)

    async def flush(self) -> bool:
        """Write what is pending; ``False`` once the client has gone."""
        response = await self._started()
        if not self.gone:
            try:
                await response.write(self._take())
            except ConnectionError:
                self.gone = True
        return not self.gone

    async def finish(self) -> None:
        """Write what is pending and end the stream, in one write."""
        response = await self._started()
        if not self.gone:
            # Codex hangs up right after response.completed: that is a success.
            with contextlib.suppress(ConnectionError):
                await response.write_eof(self._take())

    def _take(self) -> bytes:
        data = b"".join(self.pending)
        self.pending.clear()
        return data

    async def _started(self) -> web.StreamResponse:
        if self.response is None:
            self.response = _EventStreamResponse(
                status=200,
                headers={
                    "Content-Type": "text/event-stream",
                    "Cache-Control": "no-cache",
                    **self._headers,
                },
            )
            await self.response.prepare(self._request)
            self._exchange.record.mark_first_byte()
            self.pending[:0] = self.held
            self.held.clear()
        return self.response
