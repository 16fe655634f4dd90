"""Durable accounting of what each client key used (SPEC S9): ``key_usage`` in minute
buckets, ``GET /v1/usage``, ``codexlb usage``; across a restart, and shared by two servers on
one PostgreSQL database."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from codexlb.testing.events import encode_sse, response_object
from codexlb.testing.fake_upstream import Fault
from codexlb.usage import DAY, FIVE_HOURS, MINUTE, frees_at
from tests.harness import (
    Balancer,
    Fake,
    auth,
    config_data,
    make_config,
    running_child,
    serve,
    stream_turn,
    user_message,
    write_toml,
)
from tests.test_cli import codexlb
from tests.test_key_limits import START, Clock

T = dict[str, int]


def zero() -> T:
    return {
        "requests": 0,
        "input_tokens": 0,
        "cached_input_tokens": 0,
        "output_tokens": 0,
        "reasoning_tokens": 0,
    }


def added(total: T, usage: Mapping[str, Any] | None) -> T:
    total = {**total, "requests": total["requests"] + 1}
    if usage:
        total["input_tokens"] += usage["input_tokens"]
        total["cached_input_tokens"] += usage["input_tokens_details"]["cached_tokens"]
        total["output_tokens"] += usage["output_tokens"]
        total["reasoning_tokens"] += usage["output_tokens_details"]["reasoning_tokens"]
    return total


def tokens(total: T) -> int:
    return total["input_tokens"] + total["output_tokens"]


async def completed_usage(
    http: aiohttp.ClientSession, lb: Balancer, text: str, client: str = "alice"
) -> dict[str, Any]:
    result = await stream_turn(http, lb.url, {"input": [user_message(text)]}, client=client)
    assert result.status == 200, result.events
    usage: dict[str, Any] = result.completed["usage"]
    return usage


async def usage_of(http: aiohttp.ClientSession, lb: Balancer, client: str = "alice") -> Any:
    async with http.get(lb.url + "/v1/usage", headers=auth(client)) as response:
        assert response.status == 200
        return await response.json()


def data_for(fake: Fake, database_url: str, **alice: Any) -> dict[str, Any]:
    data = config_data(fake.url, database_url)
    data["api_keys"][0].update(alice)
    return data


def test_a_window_frees_as_its_oldest_minutes_leave() -> None:
    minutes = [(0, 30), (60, 30), (120, 30)]
    assert frees_at(minutes, FIVE_HOURS, 100) is None
    assert frees_at(minutes, FIVE_HOURS, 90) == 0 + FIVE_HOURS + MINUTE
    assert frees_at(minutes, FIVE_HOURS, 60) == 60 + FIVE_HOURS + MINUTE
    assert frees_at(minutes, FIVE_HOURS, 1) == 120 + FIVE_HOURS + MINUTE


async def test_usage_matches_what_the_upstream_reported_per_window(
    fake: Fake, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    clock = Clock()
    data = data_for(
        fake,
        f"sqlite+aiosqlite:///{tmp_path / 'codexlb.db'}",
        tokens_per_5h=10_000,
        tokens_per_week=100_000,
        requests_per_minute=100,
        models=["gpt-5-codex"],
    )
    async with serve(make_config(data, tmp_path)) as lb:
        lb.services.ledger.clock = clock
        week_ago = zero()
        week_ago = added(week_ago, await completed_usage(http, lb, "eight days ago"))
        clock.now += 8 * DAY
        older = zero()
        for text in ("one", "two words here"):
            older = added(older, await completed_usage(http, lb, text))
        clock.now += 6 * 3600
        recent = zero()
        first_recent_minute = int(clock.now // MINUTE) * MINUTE
        recent = added(recent, await completed_usage(http, lb, "three"))
        clock.now += 90
        recent = added(recent, await completed_usage(http, lb, "four and more"))
        # A response that fails with usage: its tokens count too.
        failed = response_object({"model": "gpt-5-codex"}, "resp_failed", 0, "failed")
        failed["error"] = {"code": "context_length_exceeded", "message": "too long"}
        failed_usage = {
            "input_tokens": 7,
            "input_tokens_details": {"cached_tokens": 3},
            "output_tokens": 0,
            "output_tokens_details": {"reasoning_tokens": 0},
        }
        failed["usage"] = failed_usage
        fake.script(
            Fault.raw(
                encode_sse([{"type": "response.failed", "response": failed}]),
                headers={"Content-Type": "text/event-stream"},
            )
        )
        result = await stream_turn(http, lb.url, {"input": [user_message("x")]})
        assert result.types[-1] == "response.failed"
        recent = added(recent, failed_usage)
        # A request that failed before any output: a request, no tokens.
        fake.script(*[Fault.status(500)] * 3)
        result = await stream_turn(http, lb.url, {"input": [user_message("y")]})
        assert result.status == 502
        recent = added(recent, None)
        bob = await completed_usage(http, lb, "bob's", client="bob")

        found = await usage_of(http, lb)
        assert found["object"] == "usage"
        assert found["key"] == "alice"
        assert found["limits"] == {
            "models": ["gpt-5-codex"],
            "accounts": None,
            "expires_at": None,
            "requests_per_minute": 100,
            "max_inflight": None,
            "tokens_per_5h": 10_000,
            "tokens_per_week": 100_000,
        }
        # "four", the failed one and the 502: "three" was 90 s before.
        assert found["windows"]["minute"] == {"requests": 3, "limit": 100}
        assert found["windows"]["5h"] == {
            "tokens": tokens(recent),
            "limit": 10_000,
            "resets_at": first_recent_minute + FIVE_HOURS + MINUTE,
        }
        week = {"tokens": tokens(recent) + tokens(older), "limit": 100_000}
        assert {k: found["windows"]["week"][k] for k in week} == week
        seven_days = {k: recent[k] + older[k] for k in recent}
        thirty_days = {k: seven_days[k] + week_ago[k] for k in recent}
        assert found["totals"]["7d"] == seven_days
        assert found["totals"]["30d"] == thirty_days
        today_start = clock.now // DAY * DAY
        assert found["totals"]["today"]["requests"] <= seven_days["requests"]
        if today_start <= START + 8 * DAY:
            assert found["totals"]["today"] == seven_days

        found_bob = await usage_of(http, lb, "bob")
        assert found_bob["key"] == "bob"
        assert found_bob["totals"]["30d"] == added(zero(), bob)
        assert found_bob["limits"]["tokens_per_5h"] is None
        assert found_bob["windows"]["5h"]["limit"] is None


async def test_usage_and_limits_survive_a_restart(
    fake: Fake, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    clock = Clock()
    data = data_for(fake, f"sqlite+aiosqlite:///{tmp_path / 'codexlb.db'}", tokens_per_5h=1)
    async with serve(make_config(data, tmp_path)) as lb:
        lb.services.ledger.clock = clock
        total = added(zero(), await completed_usage(http, lb, "hello"))
    async with serve(make_config(data, tmp_path)) as lb:
        lb.services.ledger.clock = clock
        found = await usage_of(http, lb)
        assert found["totals"]["today"] == total
        assert found["windows"]["5h"]["tokens"] == tokens(total)
        result = await stream_turn(http, lb.url, {"input": [user_message("again")]})
        assert result.status == 429
        assert result.events[0]["error"]["code"] == "usage_limit_reached"


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_two_servers_on_postgresql_share_usage_and_limits(
    fake: Fake, tmp_path: Path, http: aiohttp.ClientSession, database_url: str
) -> None:
    clock = Clock()
    data = data_for(fake, database_url, tokens_per_5h=1)
    async with AsyncExitStack() as stack:
        one = await stack.enter_async_context(serve(make_config(data, tmp_path)))
        two = await stack.enter_async_context(serve(make_config(data, tmp_path)))
        for lb in (one, two):
            lb.services.ledger.clock = clock
        total = added(zero(), await completed_usage(http, one, "hello"))
        await one.services.ledger.flush()  # what its writer does a moment later anyway
        clock.now += 2  # past the other's cached windows
        found = await usage_of(http, two)
        assert found["totals"]["today"] == total
        result = await stream_turn(http, two.url, {"input": [user_message("again")]})
        assert result.status == 429
        assert "tokens_per_5h" in result.events[0]["error"]["message"]
        assert (await completed_usage(http, two, "bob", client="bob"))["input_tokens"] > 0


async def test_the_usage_command_groups_the_totals(
    fake: Fake, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    data = config_data(fake.url, f"sqlite+aiosqlite:///{tmp_path / 'codexlb.db'}")
    path = write_toml(tmp_path / "codexlb.toml", data)
    alice, bob = zero(), zero()
    async with serve(make_config(data, tmp_path)) as lb:
        for text in ("one", "two"):
            alice = added(alice, await completed_usage(http, lb, text))
        bob = added(bob, await completed_usage(http, lb, "three", client="bob"))
        accounts = {request.account for request in fake.received}

    def usage(*args: str) -> Any:
        done = codexlb("usage", "--config", str(path), *args)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout) if "--json" in args else done.stdout

    report = await asyncio.to_thread(usage, "--json")
    assert report["by"] == "key"
    rows = sorted([("alice", alice), ("bob", bob)], key=lambda row: (-tokens(row[1]), row[0]))
    assert report["rows"] == [{"key": name, **total} for name, total in rows]
    by_account = (await asyncio.to_thread(usage, "--by", "account", "--json"))["rows"]
    assert {row["account"] for row in by_account} == accounts
    assert sum(row["requests"] for row in by_account) == 3
    [today] = (await asyncio.to_thread(usage, "--by", "day", "--since", "30d", "--json"))["rows"]
    assert today["requests"] == 3
    table = await asyncio.to_thread(usage, "--by", "model")
    assert "gpt-5-codex" in table
    assert "requests" in table
    refused = await asyncio.to_thread(codexlb, "usage", "--config", str(path), "--since", "soon")
    assert refused.returncode == 2
    assert "'soon' is not a duration" in refused.stderr


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_two_codexlb_processes_on_postgresql_share_a_key_s_tokens(
    fake: Fake, tmp_path: Path, http: aiohttp.ClientSession, database_url: str
) -> None:
    """Two ``codexlb serve`` processes: what a key spent through one is refused by the other
    (once written, a fraction of a second later) and counted in its ``GET /v1/usage``."""
    data = data_for(fake, database_url, tokens_per_5h=1)
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    async with (
        running_child(write_toml(tmp_path / "one" / "codexlb.toml", data)) as one,
        running_child(write_toml(tmp_path / "two" / "codexlb.toml", data)) as two,
    ):
        result = await stream_turn(http, one.url, {"input": [user_message("hello")]})
        assert result.status == 200
        spent = tokens(added(zero(), result.completed["usage"]))
        async with asyncio.timeout(10):
            while True:  # one writes its usage a fraction of a second after the response
                async with http.get(two.url + "/v1/usage", headers=auth()) as response:
                    found = await response.json()
                if found["windows"]["5h"]["tokens"] == spent:
                    break
                await asyncio.sleep(0.1)
        assert found["totals"]["today"]["requests"] == 1
        refused = await stream_turn(http, two.url, {"input": [user_message("again")]})
        assert refused.status == 429
        assert "tokens_per_5h" in refused.events[0]["error"]["message"]
        other = await stream_turn(http, two.url, {"input": [user_message("hi")]}, client="bob")
        assert other.status == 200  # another key is served
