"""Routing over loopback (SPEC S4): soft affinity, least used, round robin; in-process codexlb
in front of the fake upstream."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from codexlb.testing.fake_upstream import Fault
from tests.harness import Balancer, Fake, config_data, make_config, serve, stream_turn, user_message


async def turn(
    http: aiohttp.ClientSession,
    lb: Balancer,
    fake: Fake,
    text: str,
    *,
    headers: Mapping[str, str] | None = None,
    **body: Any,
) -> str:
    """One new conversation; the account that completed it."""
    result = await stream_turn(
        http, lb.url, {"input": [user_message(text)], **body}, headers=headers
    )
    assert result.status == 200, result.events
    assert result.response_id
    return str(fake.received[-1].account)


@pytest.mark.parametrize("via", ["session-id", "thread-id", "prompt_cache_key"])
async def test_a_session_sticks_to_its_account_and_moves_when_it_cools_down(
    via: str, lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    def keyed(session: str) -> dict[str, Any]:
        if via == "prompt_cache_key":
            return {"prompt_cache_key": session}
        return {"headers": {via: session}}

    home = await turn(http, lb, fake, "first", **keyed("S"))
    others: list[str] = []
    for n in range(6):
        assert await turn(http, lb, fake, f"again {n}", **keyed("S")) == home
        others.append(await turn(http, lb, fake, f"other {n}", **keyed(f"T{n}")))
    assert len(set(others)) > 1  # without the key, new work spreads

    fake.script(Fault.status(429, error_code="usage_limit_reached", resets_in=600), account=home)
    moved = await turn(http, lb, fake, "cooled", **keyed("S"))

    assert moved != home
    assert [r.account for r in fake.received[-2:]] == [home, moved]
    for n in range(4):
        assert await turn(http, lb, fake, f"after {n}", **keyed("S")) == moved


async def test_new_conversations_go_to_the_least_used_account(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    usage = {"a": 95.0, "b": 10.0, "c": 95.0}
    for name, percent in usage.items():
        fake.set_usage(name, percent)
    for n in range(10):  # usage is learned from the upstream's headers: let each answer once
        if all(fake.requests_for(name) for name in usage):
            break
        await turn(http, lb, fake, f"warm-up {n}")
    pool = lb.services.pool
    assert {a.name: a.primary.used_percent for a in pool.accounts} == usage
    before = Counter(r.account for r in fake.received)

    await asyncio.gather(*(turn(http, lb, fake, f"new {n}") for n in range(40)))

    served = Counter(r.account for r in fake.received) - before
    assert served.total() == 40
    assert served["b"] >= 36, served


async def test_round_robin_spreads_evenly(
    fake: Fake, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    data = config_data(
        fake.url,
        f"sqlite+aiosqlite:///{tmp_path / 'codexlb.db'}",
        routing={"strategy": "round_robin"},
    )
    fake.set_usage("a", 90.0)  # usage does not steer round robin
    async with serve(make_config(data, tmp_path)) as lb:
        served = Counter([await turn(http, lb, fake, f"n {n}") for n in range(30)])

    assert served == {"a": 10, "b": 10, "c": 10}
