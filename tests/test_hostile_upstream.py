"""A misbehaving upstream cannot hurt codexlb: whatever numbers, streams, frames, answers or
redirects it sends, routing, ``/status`` and ``/metrics`` keep working and memory stays
bounded. Over loopback, with the fake upstream scripted to misbehave."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from codexlb.testing.fake_upstream import Fault
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

TWO = ACCOUNTS[:2]


@pytest.fixture
async def two() -> AsyncIterator[Fake]:
    async with running_fake(TWO) as fake:
        yield fake


async def turn(
    http: aiohttp.ClientSession, lb: Balancer, transport: str, text: str
) -> dict[str, Any]:
    """One new conversation: the last event, or the error body with its ``status``."""
    body = {"input": [user_message(text)]}
    if transport == "http":
        result = await stream_turn(http, lb.url, body)
        last = result.events[-1]
        return last if result.status == 200 else {"status": result.status, **last}
    async with http.ws_connect(ws_url(lb.url), headers=auth()) as ws:
        return (await ws_turn(ws, body))[-1]


async def assert_views_render(http: aiohttp.ClientSession, lb: Balancer) -> dict[str, Any]:
    """``/status`` and ``/metrics`` answer 200; the status document."""
    async with http.get(lb.url + "/metrics") as response:
        assert response.status == 200, await response.text()
    async with http.get(lb.url + "/status", headers=auth()) as response:
        assert response.status == 200, await response.text()
        status: dict[str, Any] = await response.json()
    return status


def lb_config(fake: Fake, tmp_path: Path, **sections: dict[str, Any]) -> Any:
    data = config_data(fake.url, f"sqlite+aiosqlite:///{tmp_path / 'lb.db'}", accounts=TWO)
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return make_config(data, tmp_path)


# -- 1. numbers --------------------------------------------------------------------------------

FAR = "9.5e19"
"""An epoch some 3e12 years ahead."""


def usage_limit(error: dict[str, Any], headers: dict[str, str], transport: str) -> Fault:
    """A 429 carrying hostile numbers in its error object and headers."""
    error = {"type": "usage_limit_reached", "code": "usage_limit_reached", **error}
    if transport == "ws":
        event = {"type": "error", "status": 429, "error": error, "headers": headers}
        return Fault.raw(json.dumps(event).encode())
    body = json.dumps({"error": error}).encode()
    return Fault.raw(body, status=429, headers={"Content-Type": "application/json", **headers})


HOSTILE_429S = {
    "retry-after-inf": ({}, {"Retry-After": "inf"}),
    "retry-after-nan": ({}, {"Retry-After": "nan"}),
    "retry-after-huge": ({}, {"Retry-After": "1e300"}),
    "resets_at-1e300": ({"resets_at": 1e300}, {}),
    "resets_in-1e300": ({"resets_in_seconds": 1e300}, {}),
    "window-reset-far": (
        {},
        {"x-codex-primary-used-percent": "100", "x-codex-primary-reset-at": FAR},
    ),
}


@pytest.mark.parametrize("transport", ["http", "ws"])
@pytest.mark.parametrize("case", HOSTILE_429S)
async def test_hostile_rate_limit_numbers_leave_the_pool_serving(
    transport: str, case: str, two: Fake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    error, headers = HOSTILE_429S[case]
    async with serve(lb_config(two, tmp_path)) as lb:
        two.script(usage_limit(error, headers, transport), account="a")
        two.script(usage_limit(error, headers, transport), account="b")

        first = await turn(http, lb, transport, "into the limits")
        status = await assert_views_render(http, lb)
        again = await turn(http, lb, transport, "still limited")

    # Both accounts are rate limited, for at most a week: a clean 429, not a 500.
    assert first.get("status") == 429, first
    assert again.get("status") == 429, again
    assert {a["state"] for a in status["accounts"]} == {"rate_limited"}
    for account in status["accounts"]:
        assert account["cooldown_until"] is None or account["cooldown_until"] < "2100"


@pytest.mark.parametrize("transport", ["http", "ws"])
@pytest.mark.parametrize(
    "headers",
    [
        {"x-codex-primary-used-percent": "nan"},
        {"x-codex-primary-used-percent": "inf", "x-codex-secondary-used-percent": "-inf"},
        {"x-codex-primary-used-percent": "1e308", "x-codex-primary-reset-at": "nan"},
        {"x-codex-primary-used-percent": "100", "x-codex-primary-reset-at": FAR},
    ],
    ids=["nan", "inf", "huge-and-nan-reset", "far-reset"],
)
async def test_hostile_usage_headers_leave_the_pool_serving(
    transport: str,
    headers: dict[str, str],
    two: Fake,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    async with serve(lb_config(two, tmp_path)) as lb:
        two.set_headers("a", headers)
        two.set_usage("b", 50)  # a first
        first = await turn(http, lb, transport, "learn the numbers")
        second = await turn(http, lb, transport, "a new conversation")
        status = await assert_views_render(http, lb)

    assert first.get("type") == "response.completed", first
    assert second.get("type") == "response.completed", second
    for account in status["accounts"]:
        for window in account["usage"].values():
            assert 0 <= window["used_percent"] <= 100
            assert window["resets_at"] is None or window["resets_at"] < "2100"


@pytest.mark.parametrize(
    "rate_limits",
    [
        {"primary": {"used_percent": "nan", "reset_at": 1}},
        {"primary": {"used_percent": 1e308, "reset_at": 1e300}},
        {"primary": {"used_percent": 100, "reset_at": 9.5e19}},
        {"secondary": {"used_percent": -5, "reset_at": "soon"}},
    ],
    ids=["nan-text", "huge", "far-reset", "negative"],
)
async def test_hostile_rate_limits_events_leave_the_pool_serving(
    rate_limits: dict[str, Any], two: Fake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    async with serve(lb_config(two, tmp_path)) as lb:
        for name in ("a", "b"):
            two.set_rate_limits(name, rate_limits)
        first = await turn(http, lb, "ws", "learn the numbers")
        second = await turn(http, lb, "ws", "a new conversation")
        second_http = await turn(http, lb, "http", "and over HTTP")
        status = await assert_views_render(http, lb)

    assert first.get("type") == "response.completed", first
    assert second.get("type") in ("response.completed", "error"), second
    assert second_http.get("type") == "response.completed" or second_http["status"] == 429
    for account in status["accounts"]:
        for window in account["usage"].values():
            assert 0 <= window["used_percent"] <= 100
