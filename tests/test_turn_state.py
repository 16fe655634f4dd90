"""Turn state stays with its account, and Responses Lite passes through (SPEC S13).

The fake issues a new turn state with every response (``issue_turn_states``) and logs what it
receives, so each test checks that no account ever received a turn state another issued, and
that the Lite markers reached the upstream as the client sent them, also in replays."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from codexlb.testing.fake_upstream import Fault
from tests.harness import (
    CODEX_PATH,
    Balancer,
    Fake,
    auth,
    completed_id,
    config_data,
    make_config,
    serve,
    stream_turn,
    user_message,
    ws_events,
    ws_turn,
    ws_url,
)

LITE_HEADER = "x-openai-internal-codex-responses-lite"
LITE_METADATA = "ws_request_header_x_openai_internal_codex_responses_lite"
ADDITIONAL_TOOLS = {
    "type": "additional_tools",
    "tools": [{"type": "function", "name": "shell", "parameters": {"type": "object"}}],
}
RATE_LIMITED = Fault.status(429, error_code="usage_limit_reached", resets_in=600)


@pytest.fixture
async def rr(fake: Fake, tmp_path: Path) -> AsyncIterator[Balancer]:
    """codexlb spreading new work round robin over a, b, c: without a preference a second
    request lands on another account than the first."""
    fake.issue_turn_states = True
    data = config_data(
        fake.url,
        f"sqlite+aiosqlite:///{tmp_path / 'lb.db'}",
        routing={"strategy": "round_robin"},
    )
    async with serve(make_config(data, tmp_path)) as balancer:
        yield balancer


def assert_turn_states_stayed_home(fake: Fake) -> list[tuple[str | None, str]]:
    received = fake.turn_states_received()
    for account, value in received:
        assert fake.turn_states.get(value) == account, (account, value)
    return received


async def test_http_turn_state_prefers_its_account_and_never_leaves_it(
    rr: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    first = await stream_turn(http, rr.url, {"input": [user_message("run it")]})
    issued = first.headers["x-codex-turn-state"]
    home = fake.turn_states[issued]
    # The next request of the turn carries it back: it goes to the account that issued it.
    headers = {"x-codex-turn-state": issued}
    second = await stream_turn(http, rr.url, {"input": [user_message("go on")]}, headers=headers)
    assert second.status == 200
    assert fake.received[-1].account == home
    assert fake.received[-1].headers["x-codex-turn-state"] == issued
    # That account is rate limited now: the turn fails over, and the state stays behind.
    fake.script(RATE_LIMITED, account=home)
    third = await stream_turn(http, rr.url, {"input": [user_message("more")]}, headers=headers)
    assert third.status == 200
    moved = fake.received[-1]
    assert moved.account != home
    assert "x-codex-turn-state" not in moved.headers
    received = assert_turn_states_stayed_home(fake)
    assert (home, issued) in received


async def test_an_unknown_turn_state_goes_nowhere(
    rr: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    headers = {"x-codex-turn-state": "ts-from-elsewhere"}
    result = await stream_turn(http, rr.url, {"input": [user_message("hi")]}, headers=headers)
    assert result.status == 200
    assert fake.turn_states_received() == []


async def test_websocket_turn_state_stays_with_its_account_across_failover(
    rr: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    async with http.ws_connect(ws_url(rr.url), headers=auth()) as ws:
        first = await ws_turn(ws, {"input": [user_message("run it")]})
        [metadata] = [e for e in first if e["type"] == "response.metadata"]
        issued = metadata["headers"]["x-codex-turn-state"]
        home = fake.turn_states[issued]
        follow_up = {
            "input": [user_message("go on")],
            "previous_response_id": completed_id(first),
            "client_metadata": {"x-codex-turn-state": issued, "other": "kept"},
        }
        second = await ws_turn(ws, follow_up)
        assert fake.received[-1].account == home
        assert fake.received[-1].body["client_metadata"]["x-codex-turn-state"] == issued
        # The account refuses the next request: the turn moves, replayed, without the state.
        fake.script(RATE_LIMITED, account=home)
        events = await ws_turn(ws, {**follow_up, "previous_response_id": completed_id(second)})
        assert events[-1]["type"] == "response.completed"
    moved = fake.received[-1]
    assert moved.account != home
    assert moved.body["client_metadata"] == {"other": "kept"}
    assert "previous_response_id" not in moved.body  # a replay
    assert (home, issued) in assert_turn_states_stayed_home(fake)


async def test_lite_request_reaches_the_upstream_intact_over_http_and_in_a_replay(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    lite = {
        "input": [ADDITIONAL_TOOLS, user_message("hi")],
        "parallel_tool_calls": False,
        "client_metadata": {LITE_METADATA: "true"},
    }
    headers = {LITE_HEADER: "true"}
    first = await stream_turn(http, lb.url, lite, headers=headers)
    sent = fake.received[-1]
    assert sent.headers[LITE_HEADER] == "true"
    assert sent.body["input"][0] == ADDITIONAL_TOOLS
    assert sent.body["client_metadata"] == {LITE_METADATA: "true"}
    assert sent.body["parallel_tool_calls"] is False
    # A follow-up by previous_response_id over HTTP is a replay: the item is in it, unchanged.
    follow = {
        "input": [user_message("again")],
        "previous_response_id": first.response_id,
        "client_metadata": {LITE_METADATA: "true"},
    }
    second = await stream_turn(http, lb.url, follow, headers=headers)
    assert second.status == 200
    replayed = fake.received[-1]
    assert replayed.body["input"][0] == ADDITIONAL_TOOLS
    assert replayed.headers[LITE_HEADER] == "true"
    assert replayed.body["client_metadata"] == {LITE_METADATA: "true"}


async def test_lite_websocket_frame_with_stream_true_is_accepted_and_replayed_intact(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    headers = {**auth(), LITE_HEADER: "true"}
    async with http.ws_connect(ws_url(lb.url), headers=headers) as ws:
        prewarm = {
            "input": [],
            "generate": False,
            "stream": True,
            "client_metadata": {LITE_METADATA: "true"},
        }
        warm = await ws_turn(ws, prewarm)
        turn = {
            "input": [ADDITIONAL_TOOLS, user_message("hi")],
            "stream": True,
            "previous_response_id": completed_id(warm),
            "client_metadata": {LITE_METADATA: "true"},
        }
        first = await ws_turn(ws, turn)
        assert first[-1]["type"] == "response.completed"
        sent = fake.received[-1]
        assert sent.body["stream"] is True
        assert sent.body["input"][0] == ADDITIONAL_TOOLS
        assert sent.body["client_metadata"] == {LITE_METADATA: "true"}
        assert sent.headers[LITE_HEADER] == "true"
        home = sent.account
        # The socket's account refuses the next request: replayed on another, Lite intact.
        fake.script(RATE_LIMITED, account=home)
        await ws.send_str(
            json.dumps(
                {
                    "type": "response.create",
                    "model": "gpt-5-codex",
                    "stream": True,
                    "input": [user_message("more")],
                    "previous_response_id": completed_id(first),
                    "client_metadata": {LITE_METADATA: "true"},
                }
            )
        )
        events = await ws_events(ws)
        assert events[-1]["type"] == "response.completed"
    replayed = fake.received[-1]
    assert replayed.account != home
    assert "previous_response_id" not in replayed.body
    assert ADDITIONAL_TOOLS in replayed.body["input"]
    assert replayed.body["stream"] is True
    assert replayed.body["client_metadata"] == {LITE_METADATA: "true"}
    handshake = [h for h in fake.handshakes if h.account == replayed.account][-1]
    assert handshake.headers[LITE_HEADER] == "true"
    assert CODEX_PATH in handshake.path
