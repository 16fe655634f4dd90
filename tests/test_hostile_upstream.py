"""A misbehaving upstream cannot hurt codexlb: whatever numbers, streams, frames, answers or
redirects it sends, routing, ``/status`` and ``/metrics`` keep working and memory stays
bounded. Over loopback, with the fake upstream scripted to misbehave."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from codexlb.catalog import CACHE_ENTRIES
from codexlb.config import TimeoutsConfig
from codexlb.testing.fake_upstream import Fault
from codexlb.token_endpoint import RefreshUnavailable, request_refresh
from codexlb.upstream import Upstream
from tests.harness import (
    ACCOUNTS,
    ADMIN_KEY,
    Balancer,
    Fake,
    auth,
    config_data,
    eventually,
    make_config,
    running_fake,
    serve,
    stream_turn,
    user_message,
    ws_turn,
    ws_url,
)

TWO = ACCOUNTS[:2]


@pytest.fixture
async def two() -> AsyncIterator[Fake]:
    async with running_fake(TWO) as fake:
        yield fake


async def turn(
    http: aiohttp.ClientSession, lb: Balancer, transport: str, text: str
) -> dict[str, Any]:
    """One new conversation: the last event, or the error body with its ``status``."""
    body = {"input": [user_message(text)]}
    if transport == "http":
        result = await stream_turn(http, lb.url, body)
        last = result.events[-1]
        return last if result.status == 200 else {"status": result.status, **last}
    async with http.ws_connect(ws_url(lb.url), headers=auth()) as ws:
        return (await ws_turn(ws, body))[-1]


async def assert_views_render(http: aiohttp.ClientSession, lb: Balancer) -> dict[str, Any]:
    """``/status`` and ``/metrics`` answer 200; the status document."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with http.get(lb.url + "/metrics", headers=admin) as response:
        assert response.status == 200, await response.text()
    async with http.get(lb.url + "/status", headers=admin) as response:
        assert response.status == 200, await response.text()
        status: dict[str, Any] = await response.json()
    return status


def lb_config(fake: Fake, tmp_path: Path, **sections: dict[str, Any]) -> Any:
    data = config_data(fake.url, f"sqlite+aiosqlite:///{tmp_path / 'lb.db'}", accounts=TWO)
    data["admin"] = {"key": ADMIN_KEY}
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return make_config(data, tmp_path)


# -- 1. numbers --------------------------------------------------------------------------------

FAR = "9.5e19"
"""An epoch some 3e12 years ahead."""


def usage_limit(error: dict[str, Any], headers: dict[str, str], transport: str) -> Fault:
    """A 429 carrying hostile numbers in its error object and headers."""
    error = {"type": "usage_limit_reached", "code": "usage_limit_reached", **error}
    if transport == "ws":
        event = {"type": "error", "status": 429, "error": error, "headers": headers}
        return Fault.raw(json.dumps(event).encode())
    body = json.dumps({"error": error}).encode()
    return Fault.raw(body, status=429, headers={"Content-Type": "application/json", **headers})


HOSTILE_429S = {
    "retry-after-inf": ({}, {"Retry-After": "inf"}),
    "retry-after-nan": ({}, {"Retry-After": "nan"}),
    "retry-after-huge": ({}, {"Retry-After": "1e300"}),
    "resets_at-1e300": ({"resets_at": 1e300}, {}),
    "resets_in-1e300": ({"resets_in_seconds": 1e300}, {}),
    "window-reset-far": (
        {},
        {"x-codex-primary-used-percent": "100", "x-codex-primary-reset-at": FAR},
    ),
}


@pytest.mark.parametrize("transport", ["http", "ws"])
@pytest.mark.parametrize("case", HOSTILE_429S)
async def test_hostile_rate_limit_numbers_leave_the_pool_serving(
    transport: str, case: str, two: Fake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    error, headers = HOSTILE_429S[case]
    async with serve(lb_config(two, tmp_path)) as lb:
        two.script(usage_limit(error, headers, transport), account="a")
        two.script(usage_limit(error, headers, transport), account="b")

        first = await turn(http, lb, transport, "into the limits")
        status = await assert_views_render(http, lb)
        again = await turn(http, lb, transport, "still limited")

    # Both accounts are rate limited, for at most a week: a clean 429, not a 500.
    assert first.get("status") == 429, first
    assert again.get("status") == 429, again
    assert {a["state"] for a in status["accounts"]} == {"rate_limited"}
    for account in status["accounts"]:
        assert account["cooldown_until"] is None or account["cooldown_until"] < "2100"


@pytest.mark.parametrize("transport", ["http", "ws"])
@pytest.mark.parametrize(
    "headers",
    [
        {"x-codex-primary-used-percent": "nan"},
        {"x-codex-primary-used-percent": "inf", "x-codex-secondary-used-percent": "-inf"},
        {"x-codex-primary-used-percent": "1e308", "x-codex-primary-reset-at": "nan"},
        {"x-codex-primary-used-percent": "100", "x-codex-primary-reset-at": FAR},
    ],
    ids=["nan", "inf", "huge-and-nan-reset", "far-reset"],
)
async def test_hostile_usage_headers_leave_the_pool_serving(
    transport: str,
    headers: dict[str, str],
    two: Fake,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    async with serve(lb_config(two, tmp_path)) as lb:
        two.set_headers("a", headers)
        two.set_usage("b", 50)  # a first
        first = await turn(http, lb, transport, "learn the numbers")
        second = await turn(http, lb, transport, "a new conversation")
        status = await assert_views_render(http, lb)

    assert first.get("type") == "response.completed", first
    assert second.get("type") == "response.completed", second
    for account in status["accounts"]:
        for window in account["usage"].values():
            assert 0 <= window["used_percent"] <= 100
            assert window["resets_at"] is None or window["resets_at"] < "2100"


@pytest.mark.parametrize(
    "rate_limits",
    [
        {"primary": {"used_percent": "nan", "reset_at": 1}},
        {"primary": {"used_percent": 1e308, "reset_at": 1e300}},
        {"primary": {"used_percent": 100, "reset_at": 9.5e19}},
        {"secondary": {"used_percent": -5, "reset_at": "soon"}},
    ],
    ids=["nan-text", "huge", "far-reset", "negative"],
)
async def test_hostile_rate_limits_events_leave_the_pool_serving(
    rate_limits: dict[str, Any], two: Fake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    async with serve(lb_config(two, tmp_path)) as lb:
        for name in ("a", "b"):
            two.set_rate_limits(name, rate_limits)
        first = await turn(http, lb, "ws", "learn the numbers")
        second = await turn(http, lb, "ws", "a new conversation")
        second_http = await turn(http, lb, "http", "and over HTTP")
        status = await assert_views_render(http, lb)

    assert first.get("type") == "response.completed", first
    assert second.get("type") in ("response.completed", "error"), second
    assert second_http.get("type") == "response.completed" or second_http["status"] == 429
    for account in status["accounts"]:
        for window in account["usage"].values():
            assert 0 <= window["used_percent"] <= 100


# -- 4. redirects ------------------------------------------------------------------------------


class Redirector:
    """Two servers on loopback: one answers every request with a redirect to the other, which
    records whatever reaches it."""

    def __init__(self, status: int = 307) -> None:
        self.status = status
        self.reached: list[dict[str, str]] = []
        self.url = ""
        self._runners: list[web.AppRunner] = []

    async def start(self) -> None:
        target_url = await self._serve(self._record)
        self._target = target_url
        self.url = await self._serve(self._redirect)

    async def close(self) -> None:
        for runner in self._runners:
            await runner.cleanup()

    async def _serve(self, handler: Any) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    async def _redirect(self, request: web.Request) -> web.Response:
        return web.Response(status=self.status, headers={"Location": self._target + request.path})

    async def _record(self, request: web.Request) -> web.Response:
        self.reached.append(dict(request.headers))
        return web.json_response({"access_token": "stolen", "models": []})


@pytest.fixture
async def redirector() -> AsyncIterator[Redirector]:
    server = Redirector()
    await server.start()
    try:
        yield server
    finally:
        await server.close()


async def test_the_token_endpoint_is_not_followed_through_a_redirect(
    redirector: Redirector,
) -> None:
    upstream = Upstream(TimeoutsConfig())
    await upstream.start()
    try:
        with pytest.raises(RefreshUnavailable) as refused:
            await request_refresh(upstream.session, redirector.url + "/oauth/token", "rt-secret")
    finally:
        await upstream.close()
    assert redirector.reached == []
    assert "rt-secret" not in str(refused.value)


@pytest.mark.parametrize("route", ["models", "http", "ws"])
async def test_no_upstream_request_follows_a_redirect(
    route: str,
    redirector: Redirector,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = config_data(redirector.url, f"sqlite+aiosqlite:///{tmp_path / 'lb.db'}", accounts=TWO)
    async with serve(make_config(data, tmp_path)) as lb:
        if route == "models":
            async with http.get(lb.url + "/backend-api/codex/models", headers=auth()) as response:
                answer = {"status": response.status, **await response.json()}
        else:
            answer = await turn(http, lb, route, "where to?")
    assert redirector.reached == []
    assert answer.get("status") == 502, answer
    assert answer["error"]["type"] == "upstream_error" or answer["error"].get("code"), answer
    assert "tok-a" not in caplog.text


# -- 2. bounded streams ------------------------------------------------------------------------

MIB = 1024 * 1024
SMALL_LIMITS = {"max_upstream_event_bytes": MIB, "max_upstream_response_bytes": MIB}


def output_item_done(transport: str) -> bytes:
    """One ``response.output_item.done`` of about 64 KiB, framed for ``transport``."""
    kind = "response.output_item.done"
    item = {"type": "message", "role": "assistant", "content": [{"text": "z" * 65536}]}
    data = json.dumps({"type": kind, "output_index": 0, "item": item}).encode()
    if transport == "ws":
        return data
    return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


async def test_an_endless_stream_of_binary_frames_ends_at_the_response_limit(
    two: Fake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    async with serve(lb_config(two, tmp_path, limits=SMALL_LIMITS)) as lb:
        two.script(Fault.flood(b"\x00" * 65536, 10**6, binary=True), account="a")
        two.set_usage("b", 50)  # a first
        async with asyncio.timeout(30):
            answer = await turn(http, lb, "ws", "binary noise")
        await eventually(lambda: two.disconnects >= 1)  # codexlb hung up long before the end
    # Nothing was visible: the turn went on to b.
    assert answer.get("type") == "response.completed", answer


@pytest.mark.parametrize("transport", ["http", "ws"])
async def test_an_endless_stream_of_output_ends_at_the_response_limit(
    transport: str, two: Fake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    async with serve(lb_config(two, tmp_path, limits=SMALL_LIMITS)) as lb:
        # 128 MiB over HTTP; over WebSocket, as long as codexlb reads.
        times = 2048 if transport == "http" else 10**6
        two.script(Fault.flood(output_item_done(transport), times), account="a")
        two.set_usage("b", 50)  # a first
        last = await turn(http, lb, transport, "flood me")
        await eventually(lambda: two.disconnects >= 1)  # codexlb hung up long before the end
        after = await turn(http, lb, transport, "and now something normal")
        await assert_views_render(http, lb)

    assert last.get("type") == "response.failed", last
    assert last["response"]["error"]["code"] == "stream_incomplete"
    assert after.get("type") == "response.completed", after


@pytest.mark.parametrize("transport", ["http", "ws"])
async def test_an_event_past_the_event_limit_is_a_broken_upstream(
    transport: str, two: Fake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    # HTTP: an event that never ends (as long as codexlb reads); WebSocket: one delta frame
    # past the socket's max_msg_size.
    if transport == "http":
        unit, times = b"data: " + b"q" * 65536, 10**6
    else:
        delta = {"type": "response.output_text.delta", "delta": "q" * (2 * MIB)}
        unit, times = json.dumps(delta).encode(), 1
    async with serve(lb_config(two, tmp_path, limits=SMALL_LIMITS)) as lb:
        for name in ("a", "b"):
            two.script(Fault.flood(unit, times), account=name)
        last = await turn(http, lb, transport, "one endless event")
        async with http.get(lb.url + "/healthz") as response:
            assert response.status == 200
        after = await turn(http, lb, transport, "and now something normal")

    assert last.get("status") == 502, last  # nothing was visible: a clean error
    assert after.get("type") == "response.completed", after


# -- 3. odd frames and answers -----------------------------------------------------------------


async def test_a_broken_error_frame_is_a_broken_upstream_and_the_socket_stays(
    two: Fake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    async with serve(lb_config(two, tmp_path)) as lb:
        two.script(Fault.raw(b'{"type":"error","status":500,"error": oops'), account="a")
        two.set_usage("b", 50)  # a first
        async with http.ws_connect(ws_url(lb.url), headers=auth()) as ws:
            first = await ws_turn(ws, {"input": [user_message("one")]})
            second = await ws_turn(ws, {"input": [user_message("two")]})
    assert first[-1]["type"] == "response.completed", first[-1]
    assert second[-1]["type"] == "response.completed", second[-1]
    assert two.pending_faults == 0


@pytest.mark.parametrize("transport", ["http", "ws"])
@pytest.mark.parametrize(
    ("status", "body", "shown_status", "shown_code"),
    [
        (418, b"<html>I am a teapot</html>", 502, "upstream_error"),
        (404, b'{"detail": "Not Found"}', 502, "upstream_error"),
        (400, b'{"error": "nope"}', 502, "upstream_error"),
        (400, b'{"error": {"message": "Bad thing.", "code": "bad_thing"}}', 400, "bad_thing"),
    ],
    ids=["html", "other-json", "error-not-an-object", "openai-shaped-kept"],
)
async def test_upstream_error_answers_reach_the_client_openai_shaped(
    transport: str,
    status: int,
    body: bytes,
    shown_status: int,
    shown_code: str,
    two: Fake,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    if transport == "ws":
        error = json.loads(body).get("error") if body.startswith(b"{") else body.decode()
        frame = {"type": "error", "status": status, "error": error}
        fault = Fault.raw(json.dumps(frame).encode())
    else:
        fault = Fault.raw(body, status=status, headers={"Content-Type": "text/html"})
    async with serve(lb_config(two, tmp_path)) as lb:
        two.script(fault, fault)
        answer = await turn(http, lb, transport, "what now?")
    assert answer.get("status") == shown_status, answer
    assert isinstance(answer["error"], dict), answer
    assert isinstance(answer["error"]["message"], str)
    assert answer["error"]["code"] == shown_code


# -- 5. bounded client-keyed caches ------------------------------------------------------------


def models_fetches(fake: Fake) -> int:
    return sum(1 for r in fake.received if r.path.endswith("/models"))


async def test_the_model_catalog_is_keyed_by_client_version_only_and_bounded(
    two: Fake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    url = "/backend-api/codex/models"
    async with serve(lb_config(two, tmp_path)) as lb:

        async def get(query: str) -> None:
            async with http.get(lb.url + url + query, headers=auth()) as response:
                assert response.status == 200

        for n in range(50):  # invented parameters are not part of the key
            await get(f"?client_version=1.0&junk={n}")
        assert models_fetches(two) == 1
        for n in range(CACHE_ENTRIES + 8):  # past the bound: the oldest is evicted
            await get(f"?client_version=2.{n}")
        assert models_fetches(two) == 1 + CACHE_ENTRIES + 8
        await get("?client_version=1.0")
        assert models_fetches(two) == 2 + CACHE_ENTRIES + 8


@pytest.mark.parametrize(
    ("event", "shown_status", "shown_code"),
    [
        ({"type": "error", "code": "weird"}, 502, "upstream_error"),
        (
            {"type": "error", "error": {"message": "Too long.", "code": "context_length_exceeded"}},
            400,
            "context_length_exceeded",
        ),
    ],
    ids=["bare", "openai-shaped"],
)
async def test_an_error_event_of_an_assembled_response_is_openai_shaped(
    event: dict[str, Any],
    shown_status: int,
    shown_code: str,
    two: Fake,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    stream = b"event: error\ndata: " + json.dumps(event).encode() + b"\n\n"
    fault = Fault.raw(stream, headers={"Content-Type": "text/event-stream"})
    async with serve(lb_config(two, tmp_path)) as lb:
        two.script(fault, fault)
        payload = {"model": "gpt-5-codex", "stream": False, "input": [user_message("hi")]}
        async with http.post(
            lb.url + "/backend-api/codex/responses", json=payload, headers=auth()
        ) as response:
            status, body = response.status, await response.json()
    assert status == shown_status, body
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["code"] == shown_code
