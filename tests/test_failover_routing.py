"""Routing answers Codex can live with, over both transports (SPEC S4): a 429 never reaches a
client while an account is left untried, and a pool whose accounts all back off after errors
still serves as soon as one of them can."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from codexlb.testing.fake_upstream import FakeAccount, Fault
from tests.harness import (
    ACCOUNTS,
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

FOUR = (*ACCOUNTS, FakeAccount("d", access_token="tok-d", chatgpt_account_id="acct-d"))
USAGE_LIMIT = Fault.status(429, error_code="usage_limit_reached", resets_in=600)


async def turn(
    http: aiohttp.ClientSession, lb: Balancer, transport: str, text: str
) -> dict[str, Any]:
    """One new conversation; the last event or error body the client got."""
    body = {"input": [user_message(text)]}
    if transport == "http":
        result = await stream_turn(http, lb.url, body)
        return (
            result.events[-1]
            if result.status == 200
            else {"status": result.status, **result.events[-1]}
        )
    async with http.ws_connect(ws_url(lb.url), headers=auth()) as ws:
        return (await ws_turn(ws, body))[-1]


@pytest.fixture
async def four() -> AsyncIterator[Fake]:
    async with running_fake(FOUR) as fake:
        yield fake


@pytest.mark.parametrize("transport", ["http", "ws"])
async def test_no_429_while_an_account_is_left_untried(
    transport: str, four: Fake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    data = config_data(four.url, f"sqlite+aiosqlite:///{tmp_path / 'lb.db'}", accounts=FOUR)
    async with serve(make_config(data, tmp_path)) as lb:
        # The pool learns that d is the most used, so that it comes last.
        four.set_usage("d", 90)
        for n in range(8):
            if four.requests_for("d"):
                break
            await turn(http, lb, "http", f"warm-up {n}")
        assert four.requests_for("d")
        for name in ("a", "b", "c"):
            four.script(USAGE_LIMIT, account=name)

        last = await turn(http, lb, transport, "past three limits")

    assert last.get("type") == "response.completed", last  # max_attempts is 3
    assert four.received[-1].account == "d"
    assert four.pending_faults == 0


@pytest.mark.parametrize("transport", ["http", "ws"])
async def test_a_pool_backing_off_after_errors_serves_as_soon_as_one_can(
    transport: str, fake: Fake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    data = config_data(
        fake.url,
        f"sqlite+aiosqlite:///{tmp_path / 'lb.db'}",
        routing={"error_cooldown_seconds": 30, "max_error_cooldown_seconds": 60},
    )
    async with serve(make_config(data, tmp_path)) as lb:
        # 403s speak of the accounts (three 500s would speak of the request: it would stop
        # after two accounts, see tests/test_hostile_routing.py).
        fake.script(Fault.status(403), Fault.status(403), Fault.status(403))
        failed = await turn(http, lb, transport, "three faults")
        assert failed.get("status") == 502, failed
        pool = lb.services.pool
        assert {a.state(pool.now()) for a in pool.accounts} == {"cooling_down"}

        served = await turn(http, lb, transport, "the upstream is back")

        assert served.get("type") == "response.completed", served
        assert len([r for r in fake.received if r.body]) == 4
        # The account that served is back in the pool at once; the others still back off.
        states = sorted(a.state(pool.now()) for a in pool.accounts)
        assert states == ["cooling_down", "cooling_down", "ok"]
