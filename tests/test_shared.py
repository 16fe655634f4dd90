"""What the replicas share (SPEC S12): counters, the merge of account knowledge, and what one
replica tells another over PostgreSQL, hostile notifications included."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from codexlb.knowledge import Knowledge, merged
from codexlb.pool import Pool
from codexlb.shared import CHANNEL, LocalState, PostgresState
from codexlb.testing.faults import Fault
from tests.conftest import POSTGRES_ADMIN_URL
from tests.harness import (
    CODEX_PATH,
    Balancer,
    Fake,
    auth,
    config_data,
    eventually,
    make_config,
    serve,
    stream_turn,
    user_message,
    ws_turn,
    ws_url,
)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_a_local_counter_admits_its_limit_per_rolling_window() -> None:
    clock = Clock(1000.25)
    counters = LocalState(clock)
    taken = [await counters.take("k", limit=3, window=60) for _ in range(4)]
    assert [t.admitted for t in taken] == [True, True, True, False]
    assert taken[3].used == 3
    assert taken[3].retry_after == pytest.approx(59.75)
    clock.now += 59.0  # the first second is still in the window
    assert not (await counters.take("k", limit=3, window=60)).admitted
    assert (await counters.take("other", limit=3, window=60)).admitted
    assert await counters.used("k", window=60) == 3
    clock.now += 1.0
    assert await counters.used("k", window=60) == 0
    assert (await counters.take("k", limit=3, window=60)).admitted
    assert await counters.used("nothing", window=60) == 0


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_replicas_racing_for_a_shared_counter_take_exactly_its_limit(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    config = make_config({"database": {"url": str(engine.url)}}, tmp_path)
    states = [PostgresState(engine, Pool(config), config.database) for _ in range(3)]
    try:
        taken = await asyncio.gather(
            *(s.take("rpm:alice", limit=7, window=60) for s in states for _ in range(8))
        )
        assert [await s.used("rpm:alice", window=60) for s in states] == [7, 7, 7]
    finally:
        await asyncio.gather(*(s.close() for s in states))
    assert sum(t.admitted for t in taken) == 7
    assert sorted(t.used for t in taken if t.admitted) == list(range(1, 8))
    refused = [t for t in taken if not t.admitted]
    assert all(t.used == 7 and 0 < t.retry_after <= 60 for t in refused)


def knowledge(**values: Any) -> Knowledge:
    return Knowledge(identity="id", **values)


NEWS = [
    knowledge(cooldown_until=100.0, rate_limited_until=100.0, reason="rate limited"),
    knowledge(cooldown_until=50.0, reason="server error"),
    knowledge(usage_at=10.0, primary_used=40.0, primary_resets_at=500.0),
    knowledge(usage_at=20.0, primary_used=60.0, primary_resets_at=500.0),
    knowledge(refused="abc", retry_at=300.0, refused_at=30.0),
    knowledge(refused=None, refused_at=40.0),
]


def test_knowledge_merges_to_the_same_whatever_the_order() -> None:
    results = set()
    for order in itertools.permutations(NEWS):
        result = None
        for news in order:
            result = merged(result, news)
        results.add(result)
    assert results == {
        knowledge(
            cooldown_until=100.0,
            rate_limited_until=100.0,
            reason="rate limited",
            usage_at=20.0,
            primary_used=60.0,
            primary_resets_at=500.0,
            refused=None,
            refused_at=40.0,
        )
    }


def test_knowledge_of_another_identity_replaces_what_was_known() -> None:
    old = knowledge(cooldown_until=100.0, reason="rate limited")
    new = Knowledge(identity="other", usage_at=1.0, primary_used=5.0)
    assert merged(old, new) == new


@pytest.mark.parametrize(
    "row",
    [
        {"identity": 1},
        {"identity": "id", "cooldown_until": "soon"},
        {"identity": "id", "cooldown_until": float("inf")},
        {"identity": "id", "usage_at": True},
        {"identity": "id", "reason": 3},
    ],
)
def test_knowledge_refuses_what_is_not_knowledge(row: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must be"):
        Knowledge.from_row({**knowledge().row(), **row})


async def test_with_sqlite_nothing_is_shared_and_limits_still_hold(
    fake: Fake, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    data = config_data(fake.url, f"sqlite+aiosqlite:///{tmp_path / 'lb.db'}")
    data["api_keys"][0]["requests_per_minute"] = 2
    async with serve(make_config(data, tmp_path)) as lb:
        assert isinstance(lb.services.shared, LocalState)
        assert lb.services.pool.observer is None  # the pool tells no one: no round trip
        first = await stream_turn(http, lb.url, {"input": [user_message("one")]})
        assert first.status == 200
        async with http.ws_connect(ws_url(lb.url), headers=auth()) as ws:
            events = await ws_turn(ws, {"input": [user_message("two")]})
            assert events[-1]["type"] == "response.completed"
            events = await ws_turn(ws, {"input": [user_message("three")]})
            assert events[-1]["type"] == "error"
            assert events[-1]["status"] == 429
            assert events[-1]["error"]["code"] == "rate_limit_exceeded"
            events = await ws_turn(ws, {"input": [user_message("still open")]})
            assert events[-1]["status"] == 429
        async with http.post(
            lb.url + CODEX_PATH,
            json={"model": "gpt-5-codex", "input": [user_message("four")]},
            headers=auth(),
        ) as response:
            assert response.status == 429
            assert (await response.json())["error"]["type"] == "requests"
            assert 1 <= int(response.headers["Retry-After"]) <= 60
        bob = await stream_turn(http, lb.url, {"input": [user_message("b")]}, client="bob")
        assert bob.status == 200
    assert len(fake.received) == 3


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_usage_and_refused_credentials_reach_the_other_replica(
    database_url: str, fake: Fake, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    data = config_data(fake.url, database_url, routing={"strategy": "round_robin"})
    config = make_config(data, tmp_path)
    async with serve(config) as one, serve(config) as two:
        pool = two.services.pool
        a = pool.get("a")
        assert a is not None
        fake.set_usage("a", 42.0)
        turn = await stream_turn(http, one.url, {"input": [user_message("hi")]})
        assert turn.status == 200
        assert fake.received[-1].account == "a"
        await eventually(lambda: a.primary.used_percent == 42.0, timeout=1.0)

        fake.revoke_token("tok-a")  # a second 401 after the refresh: unusable (no refresh token)
        for _ in range(3):
            turn = await stream_turn(http, one.url, {"input": [user_message("hi")]})
            assert turn.status == 200
        assert not one.services.pool.get("a").usable  # type: ignore[union-attr]
        await eventually(lambda: not a.usable, timeout=1.0)
        assert a.state(pool.now()) == "unusable"
        assert a.last_error == "unauthorized"


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_hostile_notifications_are_dropped_and_the_replica_keeps_listening(
    database_url: str,
    fake: Fake,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = make_config(config_data(fake.url, database_url), tmp_path)
    async with serve(config) as lb:
        hostile = [
            "not json",
            "[]",
            json.dumps({"r": 7}),
            json.dumps({"r": "x", "k": "nope"}),
            json.dumps({"r": "x", "k": [{"account": "a", "identity": 5}]}),
            json.dumps({"r": "x", "a": [["slot", "a"]]}),
            json.dumps({"r": "x", "a": [["s" * 300, "a", 4e9]]}),
            json.dumps({"r": "x", "i": [{"a": -1}]}),
            json.dumps({"r": "x", "i": [{"a": True}]}),
            json.dumps({"r": "x", "k": [{"account": "nobody", "identity": "id"}]}),
        ]
        pin = json.dumps({"r": "x", "a": [["sess-1", "c", 4e9]]})
        connection = await asyncpg.connect(_plain(database_url))
        try:
            for payload in [*hostile, pin]:
                await connection.execute("SELECT pg_notify($1, $2)", CHANNEL, payload)
        finally:
            await connection.close()
        await eventually(lambda: _pinned(lb, "sess-1") == "c", timeout=2.0)
        assert lb.services.pool.get("a").elsewhere == 0  # type: ignore[union-attr]
        turn = await stream_turn(
            http, lb.url, {"input": [user_message("hi")]}, headers={"session-id": "sess-1"}
        )
        assert turn.status == 200
        assert fake.received[-1].account == "c"
    dropped = [r for r in caplog.records if "malformed notification" in r.getMessage()]
    assert len(dropped) == len(hostile)


def _pinned(lb: Balancer, slot: str) -> str | None:
    return lb.services.pool._affinity_account(slot, lb.services.pool.now())


def _plain(database_url: str) -> str:
    assert POSTGRES_ADMIN_URL
    return database_url.replace("postgresql+asyncpg://", "postgresql://", 1)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_usage_reported_again_unchanged_is_not_written_again(
    database_url: str, fake: Fake, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    data = config_data(fake.url, database_url, routing={"strategy": "round_robin"})
    told: list[str] = []
    listener = await asyncpg.connect(_plain(database_url))
    try:
        await listener.add_listener(
            CHANNEL,
            lambda _c, _p, _ch, payload: told.extend(
                entry["account"] for entry in json.loads(payload).get("k", [])
            ),
        )
        async with serve(make_config(data, tmp_path)) as lb:
            for round_ in range(3):
                for _ in range(3):  # one request on each account
                    turn = await stream_turn(http, lb.url, {"input": [user_message("hi")]})
                    assert turn.status == 200
                await eventually(lambda: len(told) >= 3, timeout=2.0)
                if round_ == 1:
                    fake.set_usage("b", 55.0)
            await eventually(lambda: len(told) >= 4, timeout=2.0)
        assert sorted(told) == ["a", "b", "b", "c"]
    finally:
        await listener.close()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_replica_whose_listening_connection_dies_reconnects_and_catches_up(
    database_url: str, fake: Fake, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    config = make_config(config_data(fake.url, database_url), tmp_path)
    async with serve(config) as one, serve(config) as two:
        shared = two.services.shared
        assert isinstance(shared, PostgresState)
        listener = shared._listener
        assert listener is not None
        admin = await asyncpg.connect(_plain(database_url))
        try:
            await admin.execute("SELECT pg_terminate_backend($1)", listener.get_server_pid())
        finally:
            await admin.close()
        await eventually(lambda: shared._listener is not listener, timeout=1.0)
        # Learned by the first replica while the second may not be listening yet.
        fake.script(Fault.status(429, resets_in=3600), account="a")
        while fake.pending_faults:
            turn = await stream_turn(http, one.url, {"input": [user_message("hi")]})
            assert turn.status == 200
        a = two.services.pool.get("a")
        assert a is not None
        await eventually(lambda: a.state(time.time()) == "rate_limited", timeout=3.0)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_gauge_of_one_replica_counts_at_the_others_while_it_lives(
    database_url: str, fake: Fake, tmp_path: Path
) -> None:
    """What a per-key ``max_inflight`` needs: each replica's requests in flight per key."""
    config = make_config(config_data(fake.url, database_url), tmp_path)
    carried = {"key:alice": 2}
    async with serve(config) as two:
        other = two.services.shared
        async with serve(config) as one:
            one.services.shared.add_gauges(lambda: carried)
            one.services.shared.gauges_changed()
            await eventually(lambda: other.elsewhere("key:alice") == 2, timeout=1.0)
            carried["key:alice"] = 0
            one.services.shared.gauges_changed()
            await eventually(lambda: other.elsewhere("key:alice") == 0, timeout=1.0)
            carried["key:alice"] = 3
            one.services.shared.gauges_changed()
            await eventually(lambda: other.elsewhere("key:alice") == 3, timeout=1.0)
            assert one.services.shared.elsewhere("key:alice") == 0
        await eventually(lambda: other.elsewhere("key:alice") == 0, timeout=1.0)
