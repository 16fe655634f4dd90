"""A conversation resent whole (as Codex CLI does on every new socket and every HTTP request)
keeps to its account and sends each account only the reasoning it can read, on both transports.

The fake upstream refuses, like the real one, reasoning another account encrypted
(``invalid_encrypted_content``), and every request it received is checked for such reasoning.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from codexlb.testing.events import foreign_reasoning, reasoning_owner
from codexlb.testing.fake_upstream import Fault, ReceivedRequest
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

Transport = str
TRANSPORTS = ["http", "ws"]


@pytest.fixture
def config(fake: Fake, tmp_path: Path) -> dict[str, Any]:
    return config_data(fake.url, f"sqlite+aiosqlite:///{tmp_path / 'codexlb.db'}")


@pytest.fixture
async def balancer(config: dict[str, Any], tmp_path: Path) -> AsyncIterator[Balancer]:
    async with serve(make_config(config, tmp_path)) as lb:
        yield lb


async def turn(
    http: aiohttp.ClientSession, lb: Balancer, transport: Transport, input_items: list[Any]
) -> list[dict[str, Any]]:
    """One request carrying the whole history and no anchor, as Codex sends it over HTTP and
    on a new socket; the events the client got."""
    if transport == "http":
        return (await stream_turn(http, lb.url, {"input": input_items})).events
    async with http.ws_connect(ws_url(lb.url), headers=auth()) as ws:
        return await ws_turn(ws, {"input": input_items})


def output_of(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    assert events[-1]["type"] == "response.completed", events[-1]
    return [e["item"] for e in events if e.get("type") == "response.output_item.done"]


def turns(fake: Fake) -> list[ReceivedRequest]:
    """The response requests the upstream received (not the handshakes)."""
    return [r for r in fake.received if isinstance(r.body, dict) and "input" in r.body]


def reasoning_owners(request: ReceivedRequest) -> list[str | None]:
    return [
        reasoning_owner(item.get("encrypted_content"))
        for item in request.body["input"]
        if item.get("type") == "reasoning"
    ]


def assert_no_foreign_reasoning(fake: Fake) -> None:
    for request in turns(fake):
        assert request.account is not None
        foreign = foreign_reasoning(request.body["input"], request.account)
        assert foreign is None, f"{request.account} received reasoning {foreign} of another"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_each_account_gets_its_own_reasoning_and_no_other(
    transport: Transport, fake: Fake, balancer: Balancer, http: aiohttp.ClientSession
) -> None:
    history: list[Any] = [user_message("one")]
    history += output_of(await turn(http, balancer, transport, history))
    first = turns(fake)[-1].account
    assert first is not None
    # The conversation's account runs out: the next turn moves to another one.
    fake.script(Fault.status(429, error_code="usage_limit_reached", resets_in=60), account=first)
    history.append(user_message("two"))
    history += output_of(await turn(http, balancer, transport, history))
    second = turns(fake)[-1].account
    assert second not in (None, first)
    assert reasoning_owners(turns(fake)[-1]) == []  # the first account's was dropped

    history.append(user_message("three"))
    history += output_of(await turn(http, balancer, transport, history))

    third = turns(fake)[-1]
    assert third.account == second  # where the conversation went last
    assert reasoning_owners(third) == [second]  # its own reasoning kept
    assert len(turns(fake)) == 4  # the 429, then one request a turn: nothing was refused
    assert_no_foreign_reasoning(fake)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_resumed_conversation_returns_to_its_account_after_a_restart(
    transport: Transport,
    fake: Fake,
    database_url: str,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    # On PostgreSQL the second process may as well be another replica.
    config = config_data(fake.url, database_url)
    history: list[Any] = [user_message("one")]
    async with serve(make_config(config, tmp_path)) as lb:
        history += output_of(await turn(http, lb, transport, history))
    origin = turns(fake)[-1].account
    assert origin is not None
    fake.set_usage(origin, 90)

    async with serve(make_config(config, tmp_path)) as lb:
        # Another conversation first, so that the new process learns how used the account
        # is: on its own, the strategy would now send new work elsewhere.
        await turn(http, lb, transport, [user_message("unrelated")])
        assert turns(fake)[-1].account == origin
        history.append(user_message("two"))
        history += output_of(await turn(http, lb, transport, history))

    resumed = turns(fake)[-1]
    assert resumed.account == origin
    assert reasoning_owners(resumed) == [origin]
    assert_no_foreign_reasoning(fake)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_reasoning_codexlb_never_saw_is_refused_once_then_left_out(
    transport: Transport, fake: Fake, balancer: Balancer, http: aiohttp.ClientSession
) -> None:
    unknown = {"type": "reasoning", "summary": [], "encrypted_content": "enc:elsewhere:00ff"}
    history = [user_message("one"), unknown, user_message("two")]

    events = await turn(http, balancer, transport, history)

    assert events[-1]["type"] == "response.completed", events
    refused, retried = turns(fake)
    assert refused.account == retried.account  # the same account, once more
    assert reasoning_owners(refused) == ["elsewhere"]
    assert retried.body["input"] == [user_message("one"), user_message("two")]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(
    ("fault", "status"),
    [
        (Fault.failed("context_length_exceeded"), 400),
        (Fault.ws_error(400, "invalid_prompt"), 400),
    ],
    ids=["failed", "error"],
)
async def test_a_turn_that_fails_upstream_is_logged_and_counted_with_its_status(
    transport: Transport,
    fault: Fault,
    status: int,
    fake: Fake,
    balancer: Balancer,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake.script(fault)

    with caplog.at_level(logging.INFO, logger="codexlb.requests"):
        events = await turn(http, balancer, transport, [user_message("one")])

    # Over HTTP an error event is an error status with its body.
    assert events[-1].get("type") in ("response.failed", "error") or events[-1]["error"], events
    lines: list[Mapping[str, Any]] = [
        getattr(record, "fields", {})
        for record in caplog.records
        if record.name.endswith("requests")
    ]
    assert [line["status"] for line in lines] == [status]
    async with http.get(balancer.url + "/metrics") as response:
        metrics = await response.text()
    assert (
        f'codexlb_requests_total{{route="responses",status="{status}",transport="{transport}"}} 1.0'
        in metrics
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_replay_leaves_out_reasoning_its_stored_input_carried_from_another_account(
    transport: Transport, fake: Fake, balancer: Balancer, http: aiohttp.ClientSession
) -> None:
    history: list[Any] = [user_message("one")]
    history += output_of(await turn(http, balancer, transport, history))
    first = turns(fake)[-1].account
    fake.script(Fault.status(429, error_code="usage_limit_reached", resets_in=60), account=first)
    history.append(user_message("two"))
    second_events = await turn(http, balancer, transport, history)
    second = turns(fake)[-1].account
    assert second not in (None, first)

    # Continued by id on a new socket (or over HTTP): the stored input of the parent, which
    # holds the first account's reasoning as the client sent it, is replayed to its account.
    anchor = second_events[-1]["response"]["id"]
    if transport == "http":
        await stream_turn(
            http, balancer.url, {"input": [user_message("three")], "previous_response_id": anchor}
        )
    else:
        async with http.ws_connect(ws_url(balancer.url), headers=auth()) as ws:
            events = await ws_turn(
                ws, {"input": [user_message("three")], "previous_response_id": anchor}
            )
            assert events[-1]["type"] == "response.completed", events

    replayed = turns(fake)[-1]
    assert replayed.account == second
    assert reasoning_owners(replayed) == [second]
    assert len(turns(fake)) == 4  # nothing refused
    assert_no_foreign_reasoning(fake)


async def test_a_history_anchored_on_an_empty_prewarm_goes_back_to_its_account(
    fake: Fake, balancer: Balancer, http: aiohttp.ClientSession
) -> None:
    # A resumed Codex session over WebSocket: a new socket, a prewarm with no input (it lands
    # wherever the strategy says), then the whole history anchored on that prewarm.
    history: list[Any] = [user_message("one")]
    history += output_of(await turn(http, balancer, "http", history))
    origin = turns(fake)[-1].account
    assert origin is not None
    fake.set_usage(origin, 90)  # once the pool has learned it, new work goes elsewhere
    for n in range(6):
        await turn(http, balancer, "http", [user_message(f"learn the usage {n}")])
        if turns(fake)[-1].account == origin:
            break
    assert turns(fake)[-1].account == origin

    async with http.ws_connect(ws_url(balancer.url), headers=auth()) as ws:
        prewarm = await ws_turn(ws, {"input": [], "generate": False})
        assert turns(fake)[-1].account != origin
        history.append(user_message("two"))
        events = await ws_turn(
            ws, {"input": history, "previous_response_id": prewarm[-1]["response"]["id"]}
        )
        assert events[-1]["type"] == "response.completed", events
        resumed = turns(fake)[-1]
        assert resumed.account == origin
        assert reasoning_owners(resumed) == [origin]
        # The next delta continues on the socket the conversation moved to, anchored.
        output = output_of(events)
        follow_up = await ws_turn(
            ws,
            {
                "input": [user_message("three")],
                "previous_response_id": events[-1]["response"]["id"],
            },
        )
        assert follow_up[-1]["type"] == "response.completed", follow_up
    assert turns(fake)[-1].account == origin
    assert turns(fake)[-1].body.get("previous_response_id") == events[-1]["response"]["id"]
    assert output
    assert_no_foreign_reasoning(fake)


async def test_a_live_delta_carries_only_the_reasoning_its_account_can_read(
    fake: Fake, balancer: Balancer, http: aiohttp.ClientSession
) -> None:
    session = {"session-id": "S"}  # Codex's: the socket's early account follows it

    async def http_turn(items: list[Any]) -> list[dict[str, Any]]:
        return output_of(
            (await stream_turn(http, balancer.url, {"input": items}, headers=session)).events
        )

    history: list[Any] = [user_message("one")]
    history += await http_turn(history)
    first = turns(fake)[-1].account
    fake.script(Fault.status(429, error_code="usage_limit_reached", resets_in=60), account=first)
    history.append(user_message("two"))
    history += await http_turn(history)
    second = turns(fake)[-1].account
    assert second not in (None, first)

    async with http.ws_connect(ws_url(balancer.url), headers={**auth(), **session}) as ws:
        prewarm = await ws_turn(ws, {"input": [], "generate": False})
        assert turns(fake)[-1].account == second
        history.append(user_message("three"))
        anchor = prewarm[-1]["response"]["id"]
        await ws_turn(ws, {"input": history, "previous_response_id": anchor})
    resumed = turns(fake)[-1]
    assert resumed.account == second
    assert resumed.body["previous_response_id"] == anchor  # live: forwarded on its socket
    assert reasoning_owners(resumed) == [second]  # the first account's reasoning left out
    assert len(fake.handshakes) == 1
    assert_no_foreign_reasoning(fake)
