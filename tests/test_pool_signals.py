"""Rate-limit signals describe the pool (SPEC S13): the ``x-codex-*`` headers of HTTP answers
and WebSocket 101s, and ``codex.rate_limits`` events over SSE and WebSocket, show the mean of
the pool's accounts, not the account that served."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from codexlb.testing.fake_upstream import FakeAccount
from tests.harness import (
    Balancer,
    Fake,
    auth,
    config_data,
    make_config,
    running_fake,
    serve,
    stream_turn,
    user_message,
    ws_turn,
    ws_url,
)

TWO = (
    FakeAccount("a", access_token="tok-a", chatgpt_account_id="acct-a", used_percent=20),
    FakeAccount("b", access_token="tok-b", chatgpt_account_id="acct-b", used_percent=60),
)


@pytest.fixture
async def two() -> AsyncIterator[Fake]:
    async with running_fake(TWO) as upstream:
        yield upstream


@pytest.fixture
async def pool(two: Fake, tmp_path: Path) -> AsyncIterator[Balancer]:
    data = config_data(two.url, f"sqlite+aiosqlite:///{tmp_path / 'lb.db'}", accounts=TWO)
    async with serve(make_config(data, tmp_path)) as balancer:
        yield balancer


async def learn_both(lb: Balancer, http: aiohttp.ClientSession) -> list[str]:
    """Two turns: the least-used strategy sends them to both accounts; their headers."""
    shown = []
    for text in ("one", "two"):
        result = await stream_turn(http, lb.url, {"input": [user_message(text)]})
        assert result.status == 200
        shown.append(result.headers["x-codex-primary-used-percent"])
    return shown


async def test_http_headers_show_the_pool_mean(
    pool: Balancer, two: Fake, http: aiohttp.ClientSession
) -> None:
    shown = await learn_both(pool, http)
    assert {r.account for r in two.received} == {"a", "b"}
    assert shown[-1] == "40"  # (20 + 60) / 2, whichever account served
    result = await stream_turn(http, pool.url, {"input": [user_message("three")]})
    assert result.headers["x-codex-primary-used-percent"] == "40"
    assert result.headers["x-codex-primary-window-minutes"] == "300"
    assert result.headers["x-codex-secondary-used-percent"] == "0"


async def test_an_exhausted_account_leaves_the_mean(
    pool: Balancer, two: Fake, http: aiohttp.ClientSession
) -> None:
    two.set_usage("b", 100)
    shown = await learn_both(pool, http)
    # b reported 100%: the pool's headroom is a's alone.
    assert shown[-1] == "20"


async def test_credits_are_summed(pool: Balancer, two: Fake, http: aiohttp.ClientSession) -> None:
    for name, balance in (("a", "10"), ("b", "4.5")):
        two.set_headers(
            name,
            {
                "x-codex-credits-has-credits": "true",
                "x-codex-credits-unlimited": "false",
                "x-codex-credits-balance": balance,
            },
        )
    await learn_both(pool, http)
    result = await stream_turn(http, pool.url, {"input": [user_message("three")]})
    assert result.headers["x-codex-credits-balance"] == "14.5"
    assert result.headers["x-codex-credits-has-credits"] == "true"


async def test_websocket_101_and_events_show_the_pool(
    pool: Balancer, two: Fake, http: aiohttp.ClientSession
) -> None:
    await learn_both(pool, http)
    async with http.ws_connect(ws_url(pool.url), headers=auth()) as ws:
        assert ws._response.headers["x-codex-primary-used-percent"] == "40"
        for text in ("w1", "w2"):
            events = await ws_turn(ws, {"input": [user_message(text)]})
            limits = [e for e in events if e["type"] == "codex.rate_limits"]
            assert len(limits) == 1
            assert limits[0]["rate_limits"]["primary"]["used_percent"] == 40
            assert limits[0]["rate_limits"]["primary"]["window_minutes"] == 300
            assert limits[0]["plan_type"] == "pro"


async def test_websocket_events_learn_what_they_report(
    pool: Balancer, two: Fake, http: aiohttp.ClientSession
) -> None:
    await learn_both(pool, http)
    two.set_rate_limits("a", {"primary": {"used_percent": 80, "window_minutes": 300}})
    two.set_rate_limits("b", {"primary": {"used_percent": 80, "window_minutes": 300}})
    async with http.ws_connect(ws_url(pool.url), headers=auth()) as ws:
        events = await ws_turn(ws, {"input": [user_message("w")]})
    served = next(e for e in events if e["type"] == "codex.rate_limits")
    # The serving account's event says 80; the other account is still known at its figure.
    assert served["rate_limits"]["primary"]["used_percent"] in (50, 70)


@pytest.mark.parametrize("path", ["/backend-api/wham/usage", "/api/codex/usage"])
async def test_usage_endpoints_answer_the_pool_in_codex_schema(
    pool: Balancer, http: aiohttp.ClientSession, path: str
) -> None:
    await learn_both(pool, http)
    async with http.get(pool.url + path, headers=auth()) as response:
        assert response.status == 200
        payload = await response.json()
    primary = payload["rate_limit"]["primary_window"]
    assert primary["used_percent"] == 40
    assert primary["limit_window_seconds"] == 18000
    assert set(primary) == {
        "used_percent",
        "limit_window_seconds",
        "reset_after_seconds",
        "reset_at",
    }
    assert payload["rate_limit"]["allowed"] is True
    assert payload["rate_limit"]["limit_reached"] is False
    assert payload["plan_type"] == "pro"
    assert payload["credits"]["has_credits"] is False


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/backend-api/wham/rate-limit-reset-credits", {"credits": [], "available_count": 0}),
        ("/api/codex/rate-limit-reset-credits", {"credits": [], "available_count": 0}),
        ("/backend-api/wham/settings/user", {"commit_attribution_enabled": False}),
        (
            "/backend-api/ps/plugins/installed",
            {"plugins": [], "pagination": {"limit": 0, "next_page_token": None}},
        ),
        (
            "/backend-api/ps/plugins/suggested/codex",
            {"plugins": [], "pagination": {"limit": 0, "next_page_token": None}},
        ),
    ],
)
async def test_account_calls_get_quiet_answers(
    pool: Balancer, two: Fake, http: aiohttp.ClientSession, path: str, expected: object
) -> None:
    async with http.get(pool.url + path, headers=auth()) as response:
        assert response.status == 200
        assert await response.json() == expected
    async with http.get(pool.url + path) as response:
        assert response.status == 401
    assert two.received == []  # nothing of it goes upstream


async def test_accounts_check_names_the_callers_account(
    pool: Balancer, http: aiohttp.ClientSession
) -> None:
    headers = {**auth(), "chatgpt-account-id": "acct-own"}
    async with http.get(pool.url + "/backend-api/wham/accounts/check", headers=headers) as answer:
        body = await answer.json()
    assert body["accounts"] == [
        {
            "id": "acct-own",
            "workspace_backend_origin": pool.url,
            "account_routing_override": "NO_CONSTRAINT",
        }
    ]


async def test_the_apps_mcp_server_offers_nothing(
    pool: Balancer, two: Fake, http: aiohttp.ClientSession
) -> None:
    url = pool.url + "/backend-api/ps/mcp"

    async def call(message: object) -> aiohttp.ClientResponse:
        async with http.post(url, json=message, headers=auth()) as response:
            await response.read()
            return response

    initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize"}
    initialize["params"] = {"protocolVersion": "2025-06-18", "capabilities": {}}
    async with http.post(url, json=initialize, headers=auth()) as response:
        result = (await response.json())["result"]
    assert result["protocolVersion"] == "2025-06-18"
    assert result["serverInfo"]["name"] == "codexlb"
    notified = await call({"jsonrpc": "2.0", "method": "notifications/initialized"})
    assert notified.status == 202
    async with http.post(
        url, json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, headers=auth()
    ) as response:
        assert await response.json() == {"jsonrpc": "2.0", "id": 2, "result": {"tools": []}}
    async with http.post(
        url, json={"jsonrpc": "2.0", "id": 3, "method": "tools/call"}, headers=auth()
    ) as response:
        assert (await response.json())["error"]["code"] == -32601
    async with http.post(
        url, data=b"[1, 2]", headers={**auth(), "Content-Type": "application/json"}
    ) as response:
        assert response.status == 400
    async with http.post(url, json=initialize) as response:
        assert response.status == 401
    assert two.received == []


async def test_a_key_limited_to_some_accounts_sees_only_theirs(
    two: Fake, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    data = config_data(two.url, f"sqlite+aiosqlite:///{tmp_path / 'lb.db'}", accounts=TWO)
    for entry in data["api_keys"]:
        if entry["name"] == "bob":
            entry["accounts"] = ["b"]
    async with serve(make_config(data, tmp_path)) as lb:
        await learn_both(lb, http)  # alice: both accounts, mean 40
        result = await stream_turn(http, lb.url, {"input": [user_message("b")]}, client="bob")
        assert result.status == 200
        # bob's turn went to b (now at 80 after it): b's figure alone, not the pool's mean
        assert int(result.headers["x-codex-primary-used-percent"]) >= 60
        async with http.get(lb.url + "/backend-api/wham/usage", headers=auth("bob")) as answer:
            assert (await answer.json())["rate_limit"]["primary_window"]["used_percent"] >= 60
        async with http.get(lb.url + "/backend-api/wham/usage", headers=auth()) as answer:
            assert (await answer.json())["rate_limit"]["primary_window"]["used_percent"] < 60
