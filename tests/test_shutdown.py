"""SIGTERM while client WebSockets are open: turns in flight finish, idle sockets are closed
with 1001 so that clients reconnect at once, and ``codexlb serve`` exits promptly."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import aiohttp

from codexlb.testing.fake_upstream import Fault
from tests.harness import (
    Fake,
    auth,
    child_config,
    eventually,
    start_child,
    user_message,
    ws_events,
    ws_url,
)


def create(text: str) -> str:
    return json.dumps(
        {"type": "response.create", "model": "gpt-5-codex", "input": [user_message(text)]}
    )


async def test_sigterm_with_an_idle_websocket_exits_within_seconds(
    fake: Fake, tmp_path: Path
) -> None:
    server = await start_child(child_config(tmp_path, fake))
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(ws_url(server.url), headers=auth()) as ws,
    ):
        await ws.send_str(create("one"))
        assert (await ws_events(ws))[-1]["type"] == "response.completed"

        started = time.monotonic()
        server.signal(signal.SIGTERM)
        closing = await ws.receive(timeout=5)
        assert closing.type == aiohttp.WSMsgType.CLOSE, closing
        assert closing.data == aiohttp.WSCloseCode.GOING_AWAY
        assert await server.wait() == 0
    assert time.monotonic() - started < 5
    assert any("codexlb stopped" in line for line in server.log), server.log


async def test_sigterm_lets_the_turn_in_flight_finish_then_closes_its_socket(
    fake: Fake, tmp_path: Path
) -> None:
    fake.script(Fault.slow_finish(1.0))
    server = await start_child(child_config(tmp_path, fake))
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(ws_url(server.url), headers=auth()) as ws,
    ):
        await ws.send_str(create("slow"))
        first = await ws.receive(timeout=5)  # the turn is under way: output is streaming
        assert first.type == aiohttp.WSMsgType.TEXT, first
        server.signal(signal.SIGTERM)
        await eventually(lambda: any("shutting down" in line for line in server.log))
        # A request sent while draining gets an answer: the close frame, after the turn.
        await ws.send_str(create("during the drain"))

        events = [json.loads(first.data), *await ws_events(ws)]
        assert events[-1]["type"] == "response.completed", events
        closing = await ws.receive(timeout=5)
        assert closing.type == aiohttp.WSMsgType.CLOSE, closing
        assert closing.data == aiohttp.WSCloseCode.GOING_AWAY
        assert await server.wait() == 0
    assert len([r for r in fake.received if isinstance(r.body, dict)]) == 1
