"""Client keys for a team (SPEC S9): per-key settings, their enforcement before anything goes
upstream, on HTTP and WebSocket alike, and their reload.

Time in the windows is driven through the ledger's clock (``Services.ledger.clock``), which the
keys' expiry and request windows read too: no test waits for a window to move on.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from codexlb.app import RELOADER, make_runner
from codexlb.config import ConfigError, load_config, parse_config
from codexlb.testing.fake_upstream import Fault
from codexlb.usage import FIVE_HOURS, MINUTE, WEEK
from tests.harness import (
    ADMIN_KEY,
    CLIENT_KEYS,
    Balancer,
    Fake,
    auth,
    config_data,
    eventually,
    make_config,
    serve,
    stream_turn,
    user_message,
    write_toml,
    ws_turn,
    ws_url,
)

START = 1_800_000_000.0
"""The clock's start: an epoch second inside a minute, far from the real time."""


class Clock:
    def __init__(self, now: float = START + 7) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def keyed(fake: Fake, tmp_path: Path, **settings: Mapping[str, Any]) -> dict[str, Any]:
    """The harness configuration with ``settings`` added to the named client keys."""
    data = config_data(fake.url, f"sqlite+aiosqlite:///{tmp_path / 'codexlb.db'}")
    for entry in data["api_keys"]:
        entry.update(settings.get(entry["name"], {}))
    return data


@asynccontextmanager
async def limited(
    fake: Fake, tmp_path: Path, **settings: Mapping[str, Any]
) -> AsyncIterator[tuple[Balancer, Clock]]:
    clock = Clock()
    async with serve(make_config(keyed(fake, tmp_path, **settings), tmp_path)) as lb:
        lb.services.ledger.clock = clock
        yield lb, clock


async def turn(
    http: aiohttp.ClientSession, lb: Balancer, client: str = "alice", **body: Any
) -> tuple[int, dict[str, Any], Mapping[str, str]]:
    """One streamed turn: its status, the completed response (or the error body), headers."""
    result = await stream_turn(
        http, lb.url, {"input": [user_message("hello")], **body}, client=client
    )
    if result.status != 200:
        return result.status, result.events[0], result.headers
    return 200, result.completed, result.headers


def tokens(response: Mapping[str, Any]) -> int:
    usage = response["usage"]
    return int(usage["input_tokens"] + usage["output_tokens"])


# --- configuration -------------------------------------------------------------------------


def test_every_setting_of_a_key_is_typed(tmp_path: Path) -> None:
    data = {
        "accounts": [{"name": "work-1", "access_token": "t"}],
        "api_keys": [
            {
                "name": "alice",
                "key": "k",
                "models": ["gpt-5.4"],
                "accounts": ["work-1"],
                "expires_at": "2027-01-01T00:00:00Z",
                "requests_per_minute": 60,
                "max_inflight": 4,
                "tokens_per_5h": 2_000_000,
                "tokens_per_week": 20_000_000,
            }
        ],
    }
    [key] = parse_config(data, source=tmp_path / "c.toml").api_keys
    assert key.models == ("gpt-5.4",)
    assert key.accounts == ("work-1",)
    assert key.expires_at is not None
    assert key.expires_at.timestamp() == 1798761600
    assert (key.requests_per_minute, key.max_inflight) == (60, 4)
    assert (key.tokens_per_5h, key.tokens_per_week) == (2_000_000, 20_000_000)


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("tokens_per_hour", 5, "api_keys[1].tokens_per_hour: Extra inputs are not permitted"),
        ("requests_per_minute", 0, "api_keys[1].requests_per_minute: Input should be greater"),
        ("max_inflight", "four", "api_keys[1].max_inflight: Input should be a valid integer"),
        ("models", "gpt-5.4", "api_keys[1].models: Input should be a valid tuple"),
        ("expires_at", "soon", "api_keys[1].expires_at: Input should be a valid datetime"),
        ("accounts", ["work-1", "work-9"], "api_keys[1].accounts: no account named 'work-9'"),
    ],
)
def test_a_bad_setting_names_its_key_path(
    tmp_path: Path, setting: str, value: object, message: str
) -> None:
    path = write_toml(
        tmp_path / "codexlb.toml",
        {
            "accounts": [{"name": "work-1", "access_token": "t"}],
            "api_keys": [
                {"name": "bob", "key": "b"},
                {"name": "alice", "key": "k", setting: value},
            ],
        },
    )
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert str(raised.value).startswith(f"{path}: ")
    assert message in str(raised.value)


# --- each limit refuses exactly when it should, and frees up -------------------------------


async def test_requests_per_minute(fake: Fake, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    async with limited(fake, tmp_path, alice={"requests_per_minute": 2}) as (lb, clock):
        assert (await turn(http, lb))[0] == 200
        clock.now += 30
        assert (await turn(http, lb))[0] == 200
        status, body, headers = await turn(http, lb)
        assert status == 429
        assert body["error"]["type"] == "requests"
        assert body["error"]["code"] == "rate_limit_exceeded"
        assert "requests_per_minute of 2" in body["error"]["message"]
        assert headers["Retry-After"] == "30"  # the first leaves the window then
        assert (await turn(http, lb, "bob"))[0] == 200  # another key is not concerned
        received = len(fake.received)
        clock.now += 29.5
        assert (await turn(http, lb))[0] == 429
        assert len(fake.received) == received  # refused before anything went upstream
        clock.now += 0.5
        assert (await turn(http, lb))[0] == 200


async def test_max_inflight(fake: Fake, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    async with limited(fake, tmp_path, alice={"max_inflight": 1}) as (lb, _):
        fake.script(Fault.slow_first_byte(1.0))
        first = asyncio.create_task(turn(http, lb))
        await eventually(lambda: lb.services.limits.inflight("alice") == 1)
        status, body, headers = await turn(http, lb)
        assert (status, body["error"]["code"], headers["Retry-After"]) == (
            429,
            "rate_limit_exceeded",
            "1",
        )
        assert "max_inflight of 1" in body["error"]["message"]
        assert (await turn(http, lb, "bob"))[0] == 200
        assert (await first)[0] == 200
        assert lb.services.limits.inflight("alice") == 0
        assert (await turn(http, lb))[0] == 200


async def test_tokens_per_5h_of_one_key_leave_the_other_served(
    fake: Fake, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with limited(fake, tmp_path, alice={"tokens_per_5h": 50}, bob={"tokens_per_5h": 50}) as (
        lb,
        clock,
    ):
        first_minute = int(clock.now // MINUTE) * MINUTE
        status, response, _ = await turn(http, lb)
        assert status == 200
        assert tokens(response) < 50
        clock.now += 120
        status, response, _ = await turn(http, lb)  # crosses the limit: allowed to finish
        assert status == 200
        status, body, headers = await turn(http, lb)
        assert status == 429
        error = body["error"]
        assert (error["type"], error["code"]) == ("usage_limit_reached", "usage_limit_reached")
        assert "tokens_per_5h limit of 50" in error["message"]
        assert "API key 'alice'" in error["message"]
        # Two turns of ~30 tokens each: the first leaving the window frees it.
        assert error["resets_at"] == first_minute + FIVE_HOURS + MINUTE
        assert int(headers["Retry-After"]) == error["resets_at"] - int(clock.now)
        # What Codex CLI names in the sentence it shows (tests/test_codex_key_limits.py).
        assert headers["x-codex-limit-name"] == "API key 'alice' (tokens_per_5h = 50)"
        assert (await turn(http, lb, "bob"))[0] == 200  # bob keeps being served
        clock.now = error["resets_at"] - 1
        assert (await turn(http, lb))[0] == 429
        clock.now = error["resets_at"]
        assert (await turn(http, lb))[0] == 200


async def test_tokens_per_week(fake: Fake, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    async with limited(fake, tmp_path, alice={"tokens_per_week": 1}) as (lb, clock):
        first_minute = int(clock.now // MINUTE) * MINUTE
        assert (await turn(http, lb))[0] == 200
        clock.now += FIVE_HOURS + MINUTE  # the 5 hours have passed; the week has not
        status, body, _ = await turn(http, lb)
        assert status == 429
        assert "tokens_per_week limit of 1" in body["error"]["message"]
        assert body["error"]["resets_at"] == first_minute + WEEK + MINUTE
        clock.now = body["error"]["resets_at"]
        assert (await turn(http, lb))[0] == 200


async def test_over_websocket_the_refusal_is_an_error_event_and_the_socket_stays(
    fake: Fake, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with (
        limited(fake, tmp_path, alice={"tokens_per_5h": 1}) as (lb, clock),
        http.ws_connect(ws_url(lb.url), headers=auth()) as ws,
    ):
        events = await ws_turn(ws, {"input": [user_message("hi")]})
        assert events[-1]["type"] == "response.completed"
        [error] = await ws_turn(ws, {"input": [user_message("again")]})
        assert error["type"] == "error"
        assert error["status"] == 429
        assert error["error"]["code"] == "usage_limit_reached"
        assert "tokens_per_5h" in error["error"]["message"]
        assert int(error["headers"]["Retry-After"]) > 0
        assert error["headers"]["x-codex-limit-name"] == "API key 'alice' (tokens_per_5h = 1)"
        clock.now = error["error"]["resets_at"]
        events = await ws_turn(ws, {"input": [user_message("later")]})
        assert events[-1]["type"] == "response.completed"


async def test_an_expired_key_is_refused_everywhere(
    fake: Fake, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    expires = START + 3600
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires))
    async with limited(fake, tmp_path, alice={"expires_at": stamp}) as (lb, clock):
        async with http.ws_connect(ws_url(lb.url), headers=auth()) as ws:
            assert (await turn(http, lb))[0] == 200
            clock.now = expires
            status, body, _ = await turn(http, lb)
            assert status == 401
            assert body["error"]["code"] == "invalid_api_key"
            assert f"expired at {stamp}" in body["error"]["message"]
            # The socket opened before: its next turn is refused, the socket stays open.
            [error] = await ws_turn(ws, {"input": [user_message("hi")]})
            assert (error["status"], error["error"]["code"]) == (401, "invalid_api_key")
            assert not ws.closed
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(ws_url(lb.url), headers=auth())
        assert refused.value.status == 401
        async with http.get(lb.url + "/v1/usage", headers=auth()) as response:
            assert response.status == 401
        assert (await turn(http, lb, "bob"))[0] == 200


async def test_models_a_key_may_use(
    fake: Fake, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with limited(fake, tmp_path, alice={"models": ["gpt-5.4"]}) as (lb, _):
        status, body, _ = await turn(http, lb, model="gpt-5-codex")
        assert status == 404
        assert body["error"] == {
            "message": "The model 'gpt-5-codex' does not exist or this API key may not use it.",
            "type": "invalid_request_error",
            "code": "model_not_found",
            "param": "model",
        }
        assert fake.received == []
        assert (await turn(http, lb, model="gpt-5.4"))[0] == 200
        assert (await turn(http, lb, "bob", model="gpt-5-codex"))[0] == 200
        async with http.post(
            lb.url + "/v1/responses/compact",
            json={"model": "gpt-5-codex", "input": [user_message("x")]},
            headers=auth(),
        ) as response:
            assert response.status == 404  # compaction obeys the same rule


async def test_a_key_draws_only_from_its_accounts(
    fake: Fake, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    fake.set_usage("b", 90.0)  # the strategy would rather take another account
    async with limited(fake, tmp_path, alice={"accounts": ["b"]}) as (lb, _):
        for _ in range(4):
            assert (await turn(http, lb))[0] == 200
        for _ in range(3):  # each handshake opens its upstream socket at once
            async with http.ws_connect(ws_url(lb.url), headers=auth()) as ws:
                for text in ("one", "two"):
                    events = await ws_turn(ws, {"input": [user_message(text)]})
                    assert events[-1]["type"] == "response.completed"
        assert {handshake.account for handshake in fake.handshakes} == {"b"}
        for version in ("1", "2", "3"):  # each a catalog of its own, fetched upstream
            async with http.get(
                lb.url + f"/backend-api/codex/models?client_version={version}", headers=auth()
            ) as response:
                assert response.status == 200
        assert {request.account for request in fake.received} == {"b"}
        fake.script(Fault.status(429), account="b")
        status, body, _ = await turn(http, lb)
        assert status == 429  # b is exhausted: no other account is tried
        assert body["error"]["code"] == "usage_limit_reached"
        assert {request.account for request in fake.received} == {"b"}


# --- reload ---------------------------------------------------------------------------------


@asynccontextmanager
async def served_from_file(
    fake: Fake, tmp_path: Path, data: dict[str, Any]
) -> AsyncIterator[tuple[Balancer, Callable[[Callable[[dict[str, Any]], None]], Any]]]:
    path = write_toml(tmp_path / "codexlb.toml", data)
    runner = make_runner(load_config(path), config_path=path, shutdown_timeout=5, watch_interval=60)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        reloader = runner.app[RELOADER]

        async def reload(edit: Callable[[dict[str, Any]], None]) -> None:
            edit(data)
            write_toml(path, data)
            assert await reloader.reload("test")

        yield Balancer(f"http://{host}:{port}", runner.app), reload
    finally:
        await runner.cleanup()


async def test_keys_and_their_limits_follow_a_reload(
    fake: Fake, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    data = keyed(fake, tmp_path)
    async with served_from_file(fake, tmp_path, data) as (lb, reload):
        carol = "sk-lb-carol-0123456789"

        def add_carol_limit_alice(data: dict[str, Any]) -> None:
            data["api_keys"].append({"name": "carol", "key": carol})
            data["api_keys"][0]["requests_per_minute"] = 1

        await reload(add_carol_limit_alice)
        headers = {"Authorization": f"Bearer {carol}"}
        async with http.post(
            lb.url + "/v1/responses",
            json={"model": "m", "input": [user_message("hi")]},
            headers=headers,
        ) as response:
            assert response.status == 200
        assert (await turn(http, lb))[0] == 200
        assert (await turn(http, lb))[0] == 429

        # bob is removed while a request of his runs: it finishes, the next is refused.
        fake.script(Fault.slow_first_byte(0.5))
        sent = len(fake.received)
        running = asyncio.create_task(turn(http, lb, "bob"))
        await eventually(lambda: len(fake.received) > sent)

        def remove_bob(data: dict[str, Any]) -> None:
            data["api_keys"] = [k for k in data["api_keys"] if k["name"] != "bob"]

        await reload(remove_bob)
        assert (await running)[0] == 200
        status, body, _ = await turn(http, lb, "bob")
        assert (status, body["error"]["code"]) == (401, "invalid_api_key")


async def test_a_removed_key_s_open_socket_takes_no_new_turn(
    fake: Fake, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with (
        served_from_file(fake, tmp_path, keyed(fake, tmp_path)) as (lb, reload),
        http.ws_connect(ws_url(lb.url), headers=auth("bob")) as ws,
    ):
        events = await ws_turn(ws, {"input": [user_message("hi")]})
        assert events[-1]["type"] == "response.completed"

        def remove_bob(data: dict[str, Any]) -> None:
            data["api_keys"] = [k for k in data["api_keys"] if k["name"] != "bob"]

        await reload(remove_bob)
        [error] = await ws_turn(ws, {"input": [user_message("again")]})
        assert (error["status"], error["error"]["code"]) == (401, "invalid_api_key")


async def test_a_continuation_replays_onto_the_key_s_own_account(
    fake: Fake, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """A conversation served on one account continues on the key's own account once the key
    is restricted to it, with the history replayed there."""
    data = keyed(fake, tmp_path)
    async with served_from_file(fake, tmp_path, data) as (lb, reload):
        status, first, _ = await turn(http, lb)
        assert status == 200
        parent_account = fake.received[-1].account
        own = next(name for name in ("a", "b", "c") if name != parent_account)

        def restrict(data: dict[str, Any]) -> None:
            data["api_keys"][0]["accounts"] = [own]

        await reload(restrict)
        result = await stream_turn(
            http,
            lb.url,
            {"previous_response_id": first["id"], "input": [user_message("next")]},
        )
        assert result.status == 200
        sent = fake.received[-1]
        assert sent.account == own
        body = sent.body
        assert "previous_response_id" not in body  # replayed, not anchored
        texts = json.dumps(body["input"])
        assert "hello" in texts
        assert "next" in texts

        # Over WebSocket too: the socket's continuation goes to its own account.
        async with http.ws_connect(ws_url(lb.url), headers=auth()) as ws:
            events = await ws_turn(
                ws, {"previous_response_id": first["id"], "input": [user_message("ws")]}
            )
            assert events[-1]["type"] == "response.completed"
        assert fake.received[-1].account == own


async def test_client_keys_do_not_see_the_pool_status(
    fake: Fake, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    data = keyed(fake, tmp_path)
    data["admin"] = {"key": ADMIN_KEY}
    async with serve(make_config(data, tmp_path)) as lb:
        for key in CLIENT_KEYS.values():
            async with http.get(
                lb.url + "/status", headers={"Authorization": f"Bearer {key}"}
            ) as response:
                assert response.status == 401
                assert (await response.json())["error"]["code"] == "invalid_api_key"
        async with http.get(
            lb.url + "/status", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        ) as response:
            assert response.status == 200


async def test_a_reload_that_would_open_access_on_a_public_bind_is_rejected(
    fake: Fake, tmp_path: Path, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    data = keyed(fake, tmp_path)
    data["server"] = {"host": "0.0.0.0", "port": 0}  # the test binds loopback all the same
    async with served_from_file(fake, tmp_path, data) as (lb, reload):

        def remove_every_key(data: dict[str, Any]) -> None:
            data["api_keys"] = []

        with pytest.raises(AssertionError):
            await reload(remove_every_key)
        assert "would open access on 0.0.0.0" in caplog.text
        async with http.post(
            lb.url + "/v1/responses", json={"model": "m", "input": []}
        ) as response:
            assert response.status == 401


async def test_codex_usage_shows_a_keys_own_window_when_it_is_fuller(
    fake: Fake, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with limited(fake, tmp_path, alice={"tokens_per_5h": 50}) as (lb, _):
        status, response, _ = await turn(http, lb)
        assert status == 200
        spent = tokens(response)
        async with http.get(lb.url + "/backend-api/wham/usage", headers=auth()) as answer:
            primary = (await answer.json())["rate_limit"]["primary_window"]
        assert primary["used_percent"] == math.ceil(100 * spent / 50)
        async with http.get(lb.url + "/backend-api/wham/usage", headers=auth("bob")) as answer:
            # bob has no limits: the pool's window (the fake reports 0% used)
            assert (await answer.json())["rate_limit"]["primary_window"]["used_percent"] < 10
