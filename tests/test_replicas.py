"""Several codexlb processes sharing one PostgreSQL database serve one pool (SPEC S7, S12)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from codexlb.sse import SSEDecoder
from codexlb.testing.faults import Fault
from tests.harness import (
    ADMIN_KEY,
    CODEX_PATH,
    ChildServer,
    Fake,
    auth,
    config_data,
    eventually,
    make_config,
    serve,
    start_child,
    stream_turn,
    user_message,
    write_toml,
    ws_turn,
    ws_url,
)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_conversation_continues_through_another_replica(
    database_url: str, fake: Fake, tmp_path: Path
) -> None:
    config = make_config(config_data(fake.url, database_url), tmp_path)
    async with (
        serve(config) as first_replica,
        serve(config) as second_replica,
        aiohttp.ClientSession() as http,
    ):
        one = await stream_turn(http, first_replica.url, {"input": [user_message("one")]})
        two = await stream_turn(
            http,
            second_replica.url,
            {"input": [user_message("two")], "previous_response_id": one.response_id},
        )
        three = await stream_turn(
            http,
            first_replica.url,
            {"input": [user_message("three")], "previous_response_id": two.response_id},
        )
    assert three.status == 200, three.events
    assert fake.received[-1].body["input"] == [
        user_message("one"),
        *one.output_items,
        user_message("two"),
        *two.output_items,
        user_message("three"),
    ]


# --- Replicas act as one balancer (SPEC S12): three ``codexlb serve`` processes ------------

STATUS_TIMEOUT = 1.0
"""S12: what one replica learns is known to the others within a second."""


def replica_config(
    fake: Fake, database_url: str, database: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Round robin, so that a replica that knew nothing would try every account in turn."""
    data = config_data(fake.url, database_url, admin={"key": ADMIN_KEY}, database=database or {})
    data["routing"]["strategy"] = "round_robin"
    return data


@asynccontextmanager
async def replicas(
    config: Mapping[str, Any], tmp_path: Path, count: int = 3
) -> AsyncIterator[list[ChildServer]]:
    """``count`` processes of ``codexlb serve`` on one configuration, stopped (SIGTERM, exit 0)
    afterwards unless a test killed them."""
    config_file = write_toml(tmp_path / "codexlb.toml", config)
    servers = list(await asyncio.gather(*(start_child(config_file) for _ in range(count))))
    try:
        yield servers
    finally:
        codes = await asyncio.gather(*(server.stop() for server in servers))
        for server, code in zip(servers, codes, strict=True):
            assert server.process.returncode in (0, -signal.SIGKILL), (code, server.log[-20:])


async def status_of(http: aiohttp.ClientSession, server: ChildServer) -> dict[str, Any]:
    async with http.get(
        server.url + "/status", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    ) as response:
        assert response.status == 200
        return {a["name"]: a for a in (await response.json())["accounts"]}


async def until(check: Callable[[], Awaitable[bool]], timeout: float) -> None:  # noqa: ASYNC109
    """Poll ``check`` until it holds (the state is in other processes: no event to await)."""
    async with asyncio.timeout(timeout):
        while not await check():  # noqa: ASYNC110 (nothing to await: the state is elsewhere)
            await asyncio.sleep(0.02)


def served_by(fake: Fake, count: int) -> list[str | None]:
    """The accounts of the fake's last ``count`` requests."""
    return [request.account for request in fake.received[-count:]]


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_rate_limit_met_by_one_replica_is_respected_by_the_others_and_a_joiner(
    database_url: str, fake: Fake, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    config = replica_config(fake, database_url)
    async with replicas(config, tmp_path) as (one, two, three):
        fake.script(Fault.status(429, resets_in=3600), account="a")
        for _ in range(3):  # round robin reaches account a within three requests
            turn = await stream_turn(http, one.url, {"input": [user_message("hi")]})
            assert turn.status == 200, turn.events
            if not fake.pending_faults:
                break
        assert not fake.pending_faults
        tried_a = len(fake.requests_for("a"))

        async def known_everywhere() -> bool:
            states = [(await status_of(http, s))["a"]["state"] for s in (two, three)]
            return states == ["rate_limited", "rate_limited"]

        await until(known_everywhere, STATUS_TIMEOUT)
        for server in (two, three, two, three, two, three):
            turn = await stream_turn(http, server.url, {"input": [user_message("hi")]})
            assert turn.status == 200, turn.events
        assert len(fake.requests_for("a")) == tried_a
        assert set(served_by(fake, 6)) == {"b", "c"}

        joiner = await start_child(tmp_path / "codexlb.toml")
        try:
            status = await status_of(http, joiner)
            assert status["a"]["state"] == "rate_limited"
            assert status["a"]["last_error"] == "rate limited"
            for _ in range(3):
                turn = await stream_turn(http, joiner.url, {"input": [user_message("hi")]})
                assert turn.status == 200, turn.events
            assert len(fake.requests_for("a")) == tried_a
        finally:
            assert await joiner.stop() == 0


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_session_pinned_by_one_replica_is_honoured_by_the_others(
    database_url: str, fake: Fake, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    config = replica_config(fake, database_url)
    session = {"session-id": "0199a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"}
    async with replicas(config, tmp_path) as (one, two, three):
        first = await stream_turn(http, one.url, {"input": [user_message("warm")]})
        assert first.status == 200
        pinned = await stream_turn(http, one.url, {"input": [user_message("pin")]}, headers=session)
        assert pinned.status == 200
        (account,) = served_by(fake, 1)
        assert account != served_by(fake, 2)[0]  # round robin moved on: the pin is the cause
        await asyncio.sleep(STATUS_TIMEOUT)  # the bound S12 sets; nothing else to wait on
        for server in (two, three, two, three):
            turn = await stream_turn(
                http, server.url, {"input": [user_message("again")]}, headers=session
            )
            assert turn.status == 200, turn.events
        assert served_by(fake, 4) == [account] * 4
        headers = {**auth(), **session}
        async with http.ws_connect(ws_url(three.url), headers=headers) as ws:  # same over WS
            for text in ("socket", "socket again"):
                events = await ws_turn(ws, {"input": [user_message(text)]})
                assert events[-1]["type"] == "response.completed", events[-1]
                assert served_by(fake, 1) == [account]


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_key_limited_to_30_requests_per_minute_gets_30_across_three_replicas(
    database_url: str, fake: Fake, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    config = replica_config(fake, database_url)
    config["api_keys"][0]["requests_per_minute"] = 30  # alice
    async with replicas(config, tmp_path) as servers:
        turns = []
        for _ in range(5):
            turns += await asyncio.gather(
                *(
                    stream_turn(http, server.url, {"input": [user_message("count me")]})
                    for server in servers
                    for _ in range(3)
                )
            )
        refused = [t for t in turns if t.status != 200]
        assert len(turns) - len(refused) == 30
        assert len(fake.received) == 30
        assert {t.status for t in refused} == {429}
        for turn in refused:
            assert turn.events[0]["error"]["type"] == "requests"
            assert turn.events[0]["error"]["code"] == "rate_limit_exceeded"
            assert 1 <= int(turn.headers["Retry-After"]) <= 60
        bob = await stream_turn(http, servers[0].url, {"input": [user_message("me")]}, client="bob")
        assert bob.status == 200  # another key has its own count, and none here


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_replica_killed_mid_stream_leaves_no_account_busy(
    database_url: str, fake: Fake, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    config = replica_config(
        fake,
        database_url,
        database={"heartbeat_seconds": 0.2, "replica_timeout_seconds": 1.0},
    )
    for account in config["accounts"]:
        account["max_inflight"] = 1
    async with replicas(config, tmp_path) as (one, two, doomed):
        started = await stream_turn(http, doomed.url, {"input": [user_message("one")]})
        assert started.status == 200
        fake.script(Fault.stall_after(4))
        response = await http.post(
            doomed.url + CODEX_PATH,
            json={"model": "gpt-5-codex", "stream": True, "input": [user_message("stall")]},
            headers=auth(),
        )
        try:
            assert response.status == 200
            decoder = SSEDecoder()
            async for chunk in response.content.iter_any():
                kinds = [kind for _, kind, _ in decoder.feed(chunk)]
                if any(k not in ("response.created", "response.in_progress") for k in kinds):
                    break  # visible output: the stream is under way
            (busy,) = served_by(fake, 1)
            assert busy is not None

            async def seen_busy() -> bool:
                states = [(await status_of(http, s))[busy]["state"] for s in (one, two)]
                return states == ["busy", "busy"]

            await until(seen_busy, STATUS_TIMEOUT)
            doomed.process.kill()
            assert await doomed.wait() == -signal.SIGKILL
        finally:
            response.close()

        async def nothing_busy() -> bool:
            for server in (one, two):
                status = await status_of(http, server)
                if any(a["inflight"] or a["state"] != "ok" for a in status.values()):
                    return False
            return True

        await until(nothing_busy, 5.0)  # the dead replica is dropped after 1 s of silence
        continued = await stream_turn(
            http,
            one.url,
            {"input": [user_message("two")], "previous_response_id": started.response_id},
        )
        assert continued.status == 200, continued.events
        for server in (one, two, one, two):
            turn = await stream_turn(http, server.url, {"input": [user_message("more")]})
            assert turn.status == 200, turn.events
        assert busy in served_by(fake, 4)  # the account the dead replica held serves again


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_key_s_max_inflight_counts_its_requests_on_every_replica(
    database_url: str, fake: Fake, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    data = config_data(fake.url, database_url)
    data["api_keys"][0]["max_inflight"] = 1  # alice
    config = make_config(data, tmp_path)
    async with serve(config) as one, serve(config) as two:
        fake.script(Fault.slow_first_byte(1.0))
        first = asyncio.create_task(stream_turn(http, one.url, {"input": [user_message("a")]}))
        limits = two.services.limits
        await eventually(lambda: limits.inflight("alice") == 1, timeout=1.0)
        refused = await stream_turn(http, two.url, {"input": [user_message("b")]})
        assert refused.status == 429
        assert "max_inflight of 1" in refused.events[0]["error"]["message"]
        assert (await first).status == 200
        await eventually(lambda: limits.inflight("alice") == 0, timeout=1.0)
        again = await stream_turn(http, two.url, {"input": [user_message("c")]})
        assert again.status == 200
