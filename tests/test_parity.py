"""The same upstream failure, through HTTP and through WebSocket, ends the same way for the
client and for the pool: one rule, whatever the transport."""

from __future__ import annotations

import time

import aiohttp
import pytest

from codexlb.testing.fake_upstream import Fault
from codexlb.testing.faults import PRIMARY_WINDOW_MINUTES
from tests.harness import Balancer, Fake, auth, stream_turn, user_message, ws_turn, ws_url

TRANSPORTS = ["http", "ws"]


async def turn(http: aiohttp.ClientSession, lb: Balancer, transport: str) -> list[str]:
    """One new conversation; the types of the events the client got (an HTTP error status
    as ``"HTTP <status>"``)."""
    body = {"input": [user_message("hello")]}
    if transport == "http":
        result = await stream_turn(http, lb.url, body)
        return result.types if result.status == 200 else [f"HTTP {result.status}"]
    async with http.ws_connect(ws_url(lb.url), headers=auth()) as ws:
        return [str(event["type"]) for event in await ws_turn(ws, body)]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("status", [403, 408, 500, 503])
async def test_statuses_that_say_more_about_the_account_fail_over(
    transport: str, status: int, fake: Fake, lb: Balancer, http: aiohttp.ClientSession
) -> None:
    fake.script(Fault.status(status))
    pool = lb.services.pool
    before = pool.now()

    types = await turn(http, lb, transport)

    assert types[-1] == "response.completed", types
    refused, served = [r for r in fake.received if r.body][-2:]
    assert refused.account != served.account
    cooled = pool.get(str(refused.account))
    assert cooled is not None
    # Cooled down by the failure (the harness's cooldown is short: a loaded machine may see it
    # end before this line, so the time it was set to is what is checked).
    assert cooled.cooldown_until > before
    assert cooled.rate_limited_until <= before


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_rate_limit_cools_the_account_until_the_reset_its_headers_give(
    transport: str, fake: Fake, lb: Balancer, http: aiohttp.ClientSession
) -> None:
    # No reset in the error object: it is known from the usage headers alone (over
    # WebSocket, those the error event carries): the end of the full primary window.
    fake.script(Fault.status(429, error_code="usage_limit_reached"))

    types = await turn(http, lb, transport)

    assert types[-1] == "response.completed", types
    limited = lb.services.pool.get(str([r for r in fake.received if r.body][-2].account))
    assert limited is not None
    window = PRIMARY_WINDOW_MINUTES * 60
    assert limited.rate_limited_until == pytest.approx(time.time() + window, abs=5)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_request_the_upstream_refuses_is_passed_on_and_cools_nothing(
    transport: str, fake: Fake, lb: Balancer, http: aiohttp.ClientSession
) -> None:
    fake.script(Fault.status(400, error_code="invalid_prompt"))

    types = await turn(http, lb, transport)

    assert types == (["HTTP 400"] if transport == "http" else ["error"])
    pool = lb.services.pool
    assert {a.state(pool.now()) for a in pool.accounts} == {"ok"}


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_request_failing_on_two_accounts_ends_there_with_a_502(
    transport: str, fake: Fake, lb: Balancer, http: aiohttp.ClientSession
) -> None:
    fake.script(Fault.status(500), Fault.status(502), Fault.status(503))

    types = await turn(http, lb, transport)

    assert types == (["HTTP 502"] if transport == "http" else ["error"])
    assert fake.pending_faults == 1  # the third account was not tried
    assert sorted(a.error_streak for a in lb.services.pool.accounts) == [0, 0, 1]
