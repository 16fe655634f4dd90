"""Token refresh end to end through codexlb (HTTP and WebSocket), on loopback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from codexlb.testing.fake_upstream import FakeAccount, Fault
from codexlb.testing.oauth import TOKEN_PATH, access_token
from tests.harness import (
    Fake,
    auth,
    completed_id,
    config_data,
    make_config,
    running_fake,
    serve,
    stream_turn,
    user_message,
    ws_turn,
    ws_url,
)

SOON = access_token("acct-b", expires_at=time.time() + 60)
ACCOUNTS = (
    FakeAccount("a", access_token="tok-a", chatgpt_account_id="acct-a", refresh_token="rt-a"),
    FakeAccount("b", access_token=SOON, chatgpt_account_id="acct-b", refresh_token="rt-b"),
)


@pytest.fixture
async def upstream() -> AsyncIterator[Fake]:
    async with running_fake(ACCOUNTS) as fake:
        yield fake


def data(upstream: Fake, tmp_path: Path, names: tuple[str, ...] = ("a",)) -> dict[str, Any]:
    d = config_data(upstream.url, f"sqlite+aiosqlite:///{tmp_path / 'lb.db'}")
    d["upstream"]["token_url"] = upstream.url + TOKEN_PATH
    d["accounts"] = [
        {
            "name": a.name,
            "access_token": a.access_token,
            "chatgpt_account_id": a.chatgpt_account_id,
            "refresh_token": a.refresh_token,
        }
        for a in ACCOUNTS
        if a.name in names
    ]
    return d


async def test_http_401_refreshes_and_retries_the_same_account(
    upstream: Fake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    upstream.script(Fault.status(401, error_code="token_expired"), account="a")
    upstream.oauth.revoke_on_refresh = True
    async with serve(make_config(data(upstream, tmp_path), tmp_path)) as lb:
        result = await stream_turn(http, lb.url, {"input": [user_message("hi")]})
        assert result.status == 200, result.events
        sent = [r.headers["authorization"] for r in upstream.requests_for("a")]
        assert sent[0] == "Bearer tok-a"
        assert sent[1] != sent[0]
        assert upstream.oauth.calls("rt-a") == 1
        assert lb.services.pool.get("a").usable  # type: ignore[union-attr]

    # A restart: the rotated tokens come from the database, the dead rt-a is never sent.
    async with serve(make_config(data(upstream, tmp_path), tmp_path)) as lb:
        assert lb.services.credentials.current("a").refresh_token == upstream.oauth.refresh_token(
            "a"
        )
        result = await stream_turn(http, lb.url, {"input": [user_message("again")]})
        assert result.status == 200
        assert upstream.requests_for("a")[-1].headers["authorization"] == sent[1]
    assert upstream.oauth.calls("rt-a") == 1


async def test_twenty_requests_hit_by_one_401_share_one_refresh(
    upstream: Fake, tmp_path: Path
) -> None:
    upstream.revoke_token("tok-a")  # every request still carrying it gets a 401
    connector = aiohttp.TCPConnector(limit=0)
    async with (
        serve(make_config(data(upstream, tmp_path), tmp_path)) as lb,
        aiohttp.ClientSession(connector=connector) as http,
    ):
        results = await asyncio.gather(
            *(stream_turn(http, lb.url, {"input": [user_message(f"r{i}")]}) for i in range(20))
        )
        assert [r.status for r in results] == [200] * 20
        later = await stream_turn(http, lb.url, {"input": [user_message("later")]})
        assert later.status == 200
    assert upstream.oauth.calls("rt-a") == 1
    refused = [r for r in upstream.received if r.account is None]
    assert [r.headers["authorization"] for r in refused] == ["Bearer tok-a"] * 20
    served = [r.headers["authorization"] for r in upstream.requests_for("a")]
    assert len(served) == 21
    assert len(set(served)) == 1  # every retry and the later request carry the one new token
    assert served[0] != "Bearer tok-a"


async def test_a_second_401_makes_the_account_unusable(
    upstream: Fake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    upstream.script(Fault.status(401), Fault.status(401), account="a")
    async with serve(make_config(data(upstream, tmp_path), tmp_path)) as lb:
        result = await stream_turn(http, lb.url, {"input": [user_message("hi")]})
        assert result.status == 502, result.events
        a = lb.services.pool.get("a")
        assert a is not None
        assert not a.usable
    assert [r.account for r in upstream.received] == ["a", "a"]
    assert upstream.oauth.calls("rt-a") == 1


async def test_proactive_refresh_before_a_request(
    upstream: Fake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    async with serve(make_config(data(upstream, tmp_path, ("b",)), tmp_path)) as lb:
        result = await stream_turn(http, lb.url, {"input": [user_message("hi")]})
        assert result.status == 200
    assert upstream.oauth.calls("rt-b") == 1
    assert upstream.requests_for("b")[0].headers["authorization"] != f"Bearer {SOON}"


async def test_websocket_handshake_401_refreshes_at_once(
    upstream: Fake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    # The early socket, opened at the client's handshake, is refused: the token is refreshed
    # right then, and the socket opened again with the new one before the client's 101.
    upstream.script(Fault.handshake(401), account="a")
    async with (
        serve(make_config(data(upstream, tmp_path), tmp_path)) as lb,
        http.ws_connect(ws_url(lb.url), headers=auth()) as ws,
    ):
        assert upstream.oauth.calls("rt-a") == 1
        assert len(upstream.handshakes) == 2
        events = await ws_turn(ws, {"input": [user_message("hi")]})
        assert completed_id(events)
    assert upstream.oauth.calls("rt-a") == 1
    assert [h.account for h in upstream.handshakes] == ["a", "a"]  # the turn used the early one
    tokens = [h.headers["authorization"] for h in upstream.handshakes]
    assert tokens[0] == "Bearer tok-a" != tokens[1]


async def test_websocket_handshake_401_twice_leaves_the_first_turn_to_refresh(
    upstream: Fake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    # Refused again with the new token: the early socket gives up; the turn's own handshake
    # goes through with that token, and nothing is refreshed a second time.
    upstream.script(Fault.handshake(401), Fault.handshake(401), account="a")
    async with (
        serve(make_config(data(upstream, tmp_path), tmp_path)) as lb,
        http.ws_connect(ws_url(lb.url), headers=auth()) as ws,
    ):
        events = await ws_turn(ws, {"input": [user_message("hi")]})
        assert completed_id(events)
    assert upstream.oauth.calls("rt-a") == 1
    tokens = [h.headers["authorization"] for h in upstream.handshakes]
    assert len(tokens) == 3
    assert tokens[0] == "Bearer tok-a" != tokens[1] == tokens[2]


async def test_websocket_401_event_refreshes_and_reconnects(
    upstream: Fake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    upstream.script(Fault.status(401, error_code="token_expired"), account="a")
    async with (
        serve(make_config(data(upstream, tmp_path), tmp_path)) as lb,
        http.ws_connect(ws_url(lb.url), headers=auth()) as ws,
    ):
        events = await ws_turn(ws, {"input": [user_message("hi")]})
        assert completed_id(events), events
    assert upstream.oauth.calls("rt-a") == 1
    assert len(upstream.handshakes) == 2
