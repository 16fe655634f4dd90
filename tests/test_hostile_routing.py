"""Routing that one hostile client cannot turn against the others (SPEC S4), over both
transports: a request the upstream cannot process fails alone, an account refused twice comes
back by itself when its upstream does, and opening client sockets does not open upstream
sockets without bound."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from codexlb.config import Config
from codexlb.pool import (
    FAILED_REQUESTS_REMEMBERED,
    SUSPECT_SECONDS,
    SUSPECTS_CAPACITY,
    Account,
    Pool,
)
from codexlb.testing.events import last_user_text
from codexlb.testing.fake_upstream import Fault
from tests.harness import (
    Balancer,
    Fake,
    auth,
    config_data,
    make_config,
    serve,
    stream_turn,
    user_message,
    ws_turn,
    ws_url,
)

POISON = "a request the upstream cannot process"
NOW = 1_750_000_000.0


class FakeClock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def make_pool(clock: FakeClock, *, routing: dict[str, Any] | None = None) -> Pool:
    config = Config.model_validate(
        {
            "accounts": [{"name": n, "access_token": f"at-{n}"} for n in ("a", "b")],
            "routing": routing or {},
        }
    )
    return Pool(config, clock=clock)


def account(pool: Pool, name: str) -> Account:
    found = pool.get(name)
    assert found is not None
    return found


def choose(pool: Pool) -> str | None:
    chosen = pool.choose(prefer=None, affinity_key=None, exclude=())
    return chosen.name if chosen is not None else None


async def turn(
    http: aiohttp.ClientSession, lb: Balancer, transport: str, text: str, client: str
) -> dict[str, Any]:
    """One new conversation of ``client``: the last event it got, or its error body with the
    HTTP status (over WebSocket the ``error`` event has its own)."""
    body = {"input": [user_message(text)]}
    if transport == "http":
        result = await stream_turn(http, lb.url, body, client=client)
        if result.status != 200:
            return {"status": result.status, **result.events[-1]}
        return result.events[-1]
    async with http.ws_connect(ws_url(lb.url), headers=auth(client)) as ws:
        return (await ws_turn(ws, body))[-1]


def poisoned(fake: Fake) -> list[str | None]:
    """The accounts the poison request reached, in order."""
    return [
        r.account
        for r in fake.received
        if isinstance(r.body, dict) and last_user_text(r.body.get("input")) == POISON
    ]


@pytest.fixture
async def slow_cooling(fake: Fake, tmp_path: Path) -> AsyncIterator[Balancer]:
    """codexlb whose error cooldowns last long enough to be seen."""
    data = config_data(
        fake.url,
        f"sqlite+aiosqlite:///{tmp_path / 'lb.db'}",
        routing={"error_cooldown_seconds": 30, "max_error_cooldown_seconds": 60},
    )
    async with serve(make_config(data, tmp_path)) as lb:
        yield lb


@pytest.mark.parametrize("transport", ["http", "ws"])
@pytest.mark.parametrize("fault", [Fault.status(500), Fault.drop_after(0)], ids=["500", "dropped"])
async def test_a_poison_request_fails_alone_and_cools_down_no_more_than_one_account(
    transport: str,
    fault: Fault,
    fake: Fake,
    slow_cooling: Balancer,
    http: aiohttp.ClientSession,
) -> None:
    lb = slow_cooling
    pool = lb.services.pool
    fake.poison(POISON, fault)

    for n in range(6):
        before = len(poisoned(fake))
        failed = await turn(http, lb, transport, POISON, "alice")
        assert failed.get("status") == 502, failed
        assert failed["error"]["code"] == "upstream_error"
        tried = poisoned(fake)[before:]
        # Two accounts the first time; once it is known, one.
        assert 1 <= len(tried) <= (2 if n == 0 else 1), tried
        assert len(set(tried)) == len(tried)

        served = await turn(http, lb, transport, f"bob's work {n}", "bob")
        assert served.get("type") == "response.completed", served

    states = [a.state(pool.now()) for a in pool.accounts]
    assert states.count("cooling_down") <= 1, states
    assert sum(a.error_streak for a in pool.accounts) <= 1


def test_a_streak_counts_distinct_requests() -> None:
    clock = FakeClock()
    pool = make_pool(clock, routing={"error_cooldown_seconds": 2})
    a = account(pool, "a")

    pool.failed(a, "HTTP 500", request=b"poison")
    assert (a.error_streak, a.cooldown_until) == (1, NOW + 2)
    clock.now += 10
    for _ in range(5):
        pool.failed(a, "HTTP 500", request=b"poison")
    assert (a.error_streak, a.cooldown_until) == (1, NOW + 2)

    pool.failed(a, "HTTP 500", request=b"another")
    pool.failed(a, "connect error")  # not the request's doing: always counted
    assert a.error_streak == 3
    pool.succeeded(a)
    pool.failed(a, "HTTP 500", request=b"poison")  # after a success, the streak starts over
    assert a.error_streak == 1
    assert a.cooldown_until == clock.now + 2


def test_an_account_remembers_a_bounded_number_of_failed_requests() -> None:
    pool = make_pool(FakeClock())
    a = account(pool, "a")
    for n in range(FAILED_REQUESTS_REMEMBERED * 4):
        pool.failed(a, "HTTP 500", request=n.to_bytes(4))
    assert len(a.learned.failed_requests) == FAILED_REQUESTS_REMEMBERED


def test_a_given_up_request_stays_suspect_for_a_while_in_bounded_memory() -> None:
    clock = FakeClock()
    pool = make_pool(clock)
    pool.give_up(b"poison")
    assert pool.suspect(b"poison")
    assert not pool.suspect(b"another")
    pool.served(b"poison")
    assert not pool.suspect(b"poison")

    pool.give_up(b"poison")
    clock.now += SUSPECT_SECONDS
    assert not pool.suspect(b"poison")

    for n in range(SUSPECTS_CAPACITY + 10):
        pool.give_up(n.to_bytes(4))
    assert not pool.suspect((0).to_bytes(4))
    assert pool.suspect((SUSPECTS_CAPACITY + 9).to_bytes(4))


def test_refused_credentials_are_tried_by_one_request_at_growing_intervals() -> None:
    clock = FakeClock()
    pool = make_pool(
        clock,
        routing={"unauthorized_retry_seconds": 600, "max_unauthorized_retry_seconds": 2000},
    )
    a = account(pool, "a")
    pool.unauthorized(a)
    assert a.state(clock.now) == "unusable"

    tried = []
    for _ in range(4):
        chosen = {choose(pool) for _ in range(5)}
        assert chosen == {"b"}  # not yet
        clock.now = a.retry_at
        tried.append(clock.now)
        assert [choose(pool) for _ in range(5)] == ["a", "b", "b", "b", "b"]
        pool.unauthorized(a)  # refused again
    assert [later - earlier for earlier, later in itertools.pairwise([NOW, *tried])] == [
        600,
        1200,
        2000,
        2000,
    ]

    clock.now = a.retry_at
    assert choose(pool) == "a"
    pool.succeeded(a)
    assert a.state(clock.now) == "ok"
    assert a.retry_at == 0.0


def test_refused_credentials_are_never_tried_again_when_so_configured() -> None:
    clock = FakeClock()
    pool = make_pool(clock, routing={"unauthorized_retry_seconds": 0})
    a = account(pool, "a")
    pool.unauthorized(a)
    clock.now += 10**9
    assert {choose(pool) for _ in range(5)} == {"b"}


def test_a_handshake_does_not_try_refused_credentials() -> None:
    clock = FakeClock()
    pool = make_pool(clock, routing={"unauthorized_retry_seconds": 1})
    pool.unauthorized(account(pool, "a"))
    clock.now += 5
    chosen = pool.choose(prefer=None, affinity_key=None, exclude=(), retry_refused=False)
    assert chosen is not None
    assert chosen.name == "b"


# -- credentials refused twice ------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["http", "ws"])
async def test_an_account_refused_twice_is_tried_again_and_comes_back(
    transport: str, fake: Fake, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    data = config_data(
        fake.url,
        f"sqlite+aiosqlite:///{tmp_path / 'lb.db'}",
        routing={"unauthorized_retry_seconds": 0.4, "max_unauthorized_retry_seconds": 60},
    )
    async with serve(make_config(data, tmp_path)) as lb:
        pool = lb.services.pool
        a = pool.get("a")
        assert a is not None
        fake.revoke_token("tok-a")

        def refused() -> int:
            return sum(
                1
                for r in fake.received
                if r.account is None and r.headers.get("authorization") == "Bearer tok-a"
            )

        n = 0
        while refused() == 0:
            n += 1
            done = await turn(http, lb, transport, f"while a is refused {n}", "alice")
            assert done.get("type") == "response.completed", done
        assert a.state(pool.now()) == "unusable"

        # Still refused: tried again now and then, never hammered (0.4 s, then 0.8 s, ...).
        started = time.monotonic()
        while time.monotonic() - started < 1.5:
            n += 1
            done = await turn(http, lb, transport, f"while a is refused {n}", "alice")
            assert done.get("type") == "response.completed", done
        assert 2 <= refused() <= 4, refused()
        assert a.state(pool.now()) == "unusable"

        fake.accept_token("a", "tok-a")
        async with asyncio.timeout(10):
            while not fake.requests_for("a"):
                n += 1
                done = await turn(http, lb, transport, f"after a recovered {n}", "alice")
                assert done.get("type") == "response.completed", done
        assert a.state(pool.now()) == "ok"
        assert a.retry_at == 0.0


# -- client sockets and upstream sockets ---------------------------------------------------------


async def test_client_sockets_open_upstream_sockets_early_only_up_to_the_cap(
    fake: Fake, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    data = config_data(
        fake.url,
        f"sqlite+aiosqlite:///{tmp_path / 'lb.db'}",
        routing={"early_websockets_per_key": 2},
    )
    async with serve(make_config(data, tmp_path)) as lb, AsyncExitStack() as stack:
        sockets = [
            await stack.enter_async_context(http.ws_connect(ws_url(lb.url), headers=auth()))
            for _ in range(6)
        ]
        assert len(fake.handshakes) == 2
        # The early ones relayed the upstream's handshake headers; the others none.
        assert [ws._response.headers.get("x-models-etag") is not None for ws in sockets] == [
            True,
            True,
            False,
            False,
            False,
            False,
        ]
        # Another key has its own count.
        await stack.enter_async_context(http.ws_connect(ws_url(lb.url), headers=auth("bob")))
        assert len(fake.handshakes) == 3

        for n, ws in enumerate(sockets):
            events = await ws_turn(ws, {"input": [user_message(f"turn {n}")]})
            assert events[-1]["type"] == "response.completed", events[-1]
        assert len(fake.handshakes) == 7

        # Sockets that carried a request no longer count: a new one connects early again.
        await stack.enter_async_context(http.ws_connect(ws_url(lb.url), headers=auth()))
        assert len(fake.handshakes) == 8
