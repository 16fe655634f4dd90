"""The HTTP path end to end: client → codexlb → fake upstream, all on loopback."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from codexlb.sse import SSEDecoder
from codexlb.testing.fake_upstream import Fault
from tests.harness import (
    CODEX_PATH,
    Balancer,
    Fake,
    auth,
    eventually,
    locked_database,
    refuse_snapshots,
    stream_turn,
    user_message,
    without_ids_and_reasoning,
)


async def test_three_turn_chain_reaches_upstream_as_exact_rebuilt_input(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    first = await stream_turn(http, lb.url, {"input": [user_message("one")]})
    second = await stream_turn(
        http,
        lb.url,
        {"input": [user_message("two")], "previous_response_id": first.response_id},
    )
    third = await stream_turn(
        http,
        lb.url,
        {"input": [user_message("three")], "previous_response_id": second.response_id},
    )
    assert third.status == 200
    assert third.output_items[-1]["content"][0]["text"] == "echo: three"

    sent = fake.received[-1]
    assert "previous_response_id" not in sent.body
    assert sent.body["stream"] is True
    assert sent.body["input"] == [
        user_message("one"),
        *first.output_items,
        user_message("two"),
        *second.output_items,
        user_message("three"),
    ]
    # Every continuation stayed on the account that served its parent.
    assert len({r.account for r in fake.received}) == 1


async def test_continuation_fails_over_when_origin_cools_down(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    first = await stream_turn(http, lb.url, {"input": [user_message("one")]})
    origin = fake.received[-1].account
    assert origin is not None
    fake.script(Fault.status(429, resets_in=600), account=origin)

    second = await stream_turn(
        http,
        lb.url,
        {"input": [user_message("two")], "previous_response_id": first.response_id},
    )

    assert second.status == 200
    assert "response.failed" not in second.types
    served = fake.received[-1]
    assert served.account != origin
    # Another account gets the conversation without reasoning and without server item ids.
    assert served.body["input"] == [
        user_message("one"),
        *without_ids_and_reasoning(first.output_items),
        user_message("two"),
    ]
    account = lb.services.pool.get(origin)
    assert account is not None
    assert account.cooldown_until > time.time() + 500


@pytest.mark.parametrize("who", ["another key", "unknown"])
async def test_foreign_or_unknown_previous_response_is_not_found(
    who: str, lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    theirs = await stream_turn(http, lb.url, {"input": [user_message("secret")]}, client="bob")
    target = theirs.response_id if who == "another key" else "resp_does_not_exist"
    before = len(fake.received)

    result = await stream_turn(
        http, lb.url, {"input": [user_message("steal")], "previous_response_id": target}
    )

    assert result.status == 400
    assert result.events[0] == {
        "error": {
            "message": f"Previous response with id '{target}' not found.",
            "type": "invalid_request_error",
            "code": "previous_response_not_found",
            "param": "previous_response_id",
        }
    }
    assert len(fake.received) == before


async def test_follow_up_sent_the_instant_completed_arrives_finds_its_parent(
    lb: Balancer, http: aiohttp.ClientSession
) -> None:
    previous: str | None = None
    for turn in range(30):
        body: dict[str, Any] = {"input": [user_message(f"turn {turn}")]}
        if previous is not None:
            body["previous_response_id"] = previous
        result = await stream_turn(http, lb.url, body)  # returns at response.completed
        assert result.status == 200, result.events
        previous = result.response_id


async def test_200_concurrent_streams_all_succeed_and_are_replayable(
    lb: Balancer, fake: Fake
) -> None:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        firsts = await asyncio.gather(
            *(stream_turn(http, lb.url, {"input": [user_message(f"c{i}")]}) for i in range(200))
        )
        assert [r.status for r in firsts] == [200] * 200
        ids = [r.response_id for r in firsts]
        follow_ups = await asyncio.gather(
            *(
                stream_turn(
                    http,
                    lb.url,
                    {"input": [user_message("next")], "previous_response_id": response_id},
                )
                for response_id in ids
            )
        )
    assert [r.status for r in follow_ups] == [200] * 200
    assert all("response.completed" in r.types for r in follow_ups)
    assert lb.services.store.batches_committed < 200  # group commit batched the concurrent writes


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b'{"model": "m", "input": 5}', "input"),
        (b'{"model": "m", "input": ["text"]}', "input[0]"),
        (b'{"model": "m", "stream": "yes"}', "stream"),
        (b'{"model": 7}', "model"),
        (b'{"model": "m", "previous_response_id": 12}', "previous_response_id"),
        (b'{"model": "m", "tools": {}}', "tools"),
        (b'{"input": []}', "model"),
    ],
)
async def test_bad_bodies_get_400_and_reach_no_upstream(
    body: bytes, param: str | None, lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    async with http.post(
        lb.url + CODEX_PATH,
        data=body,
        headers={**auth(), "Content-Type": "application/json"},
    ) as response:
        assert response.status == 400
        error = (await response.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_request"
    assert error["param"] == param
    assert fake.received == []


async def test_missing_or_wrong_client_key_is_401(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}):
        async with http.post(
            lb.url + CODEX_PATH, json={"model": "m", "input": "hi"}, headers=headers
        ) as response:
            assert response.status == 401
            assert (await response.json())["error"]["code"] == "invalid_api_key"
    assert fake.received == []


async def test_upstream_sees_account_credentials_and_client_codex_headers(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    await stream_turn(
        http,
        lb.url,
        {"input": "hi"},
        headers={
            "session-id": "sess-1",
            "originator": "codex_cli_rs",
            "chatgpt-account-id": "client-account",
            "x-forwarded-for": "10.0.0.1",
            "cookie": "a=b",
        },
    )
    sent = fake.received[-1]
    assert sent.account is not None
    account = next(a for a in fake.accounts.values() if a.name == sent.account)
    assert sent.headers["authorization"] == f"Bearer {account.access_token}"
    assert sent.headers["chatgpt-account-id"] == account.chatgpt_account_id
    assert sent.headers["session-id"] == "sess-1"
    assert sent.headers["originator"] == "codex_cli_rs"
    assert "x-forwarded-for" not in sent.headers
    assert "cookie" not in sent.headers


async def test_non_streaming_request_is_assembled_from_a_stream(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    async with http.post(
        lb.url + "/v1/responses",
        json={"model": "gpt-5", "input": "assemble me", "stream": False},
        headers=auth(),
    ) as response:
        assert response.status == 200
        body = await response.json()
    assert fake.received[-1].body["stream"] is True
    assert body["status"] == "completed"
    assert [item["type"] for item in body["output"]] == ["reasoning", "message"]
    assert body["output"][1]["content"][0]["text"] == "echo: assemble me"

    async with http.get(lb.url + f"/v1/responses/{body['id']}", headers=auth()) as stored:
        assert stored.status == 200
        assert (await stored.json())["output"] == body["output"]
    async with http.get(lb.url + f"/v1/responses/{body['id']}", headers=auth("bob")) as other:
        assert other.status == 404


@pytest.mark.parametrize(
    "fault",
    [
        Fault.status(500),
        Fault.status(429, resets_in=300),
        Fault.status(429, error_code="rate_limit_exceeded", retry_after=30),
        Fault.drop_after(0),
        Fault.drop_after(2),
        Fault.failed("server_error"),
    ],
    ids=["500", "usage-limit", "rate-limit", "drop-at-once", "drop-after-created", "failed"],
)
async def test_failure_before_visible_output_fails_over_invisibly(
    fault: Fault, lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    fake.script(fault)
    result = await stream_turn(http, lb.url, {"input": [user_message("hi")]})
    assert result.status == 200
    assert result.types[0] == "response.created"
    assert result.types.count("response.created") == 1
    assert result.types[-1] == "response.completed"
    assert len(fake.received) == 2
    assert fake.received[0].account != fake.received[1].account


async def test_drop_after_visible_output_fails_the_response_cleanly(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    fake.script(Fault.drop_after(5))
    result = await stream_turn(http, lb.url, {"input": [user_message("hi")]})
    assert result.status == 200
    assert result.types[-1] == "response.failed"
    assert result.events[-1]["response"]["error"]["code"] == "stream_incomplete"
    assert len(fake.received) == 1
    # The failed response was not stored: continuing it is not possible.
    failed_id = result.events[0]["response"]["id"]
    again = await stream_turn(
        http, lb.url, {"input": [user_message("x")], "previous_response_id": failed_id}
    )
    assert again.status == 400


async def test_output_streams_to_the_client_before_the_response_completes(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    fake.script(Fault.slow_finish(0.5))
    arrivals: list[tuple[float, str]] = []
    decoder = SSEDecoder()
    payload = {"model": "gpt-5-codex", "stream": True, "input": [user_message("hi")]}
    async with http.post(lb.url + CODEX_PATH, json=payload, headers=auth()) as response:
        async for chunk in response.content.iter_any():
            arrivals += [(time.monotonic(), str(kind)) for _, kind, _ in decoder.feed(chunk)]

    kinds = [kind for _, kind in arrivals]
    assert kinds[0] == "response.created"
    assert kinds[-1] == "response.completed"
    output_done = arrivals[kinds.index("response.output_item.done")][0]
    assert arrivals[-1][0] - output_done >= 0.4


async def test_a_response_the_database_refuses_is_a_500_before_any_output(
    lb: Balancer, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    await refuse_snapshots(tmp_path / "codexlb.db")
    payload = {"model": "gpt-5-codex", "stream": False, "input": [user_message("hi")]}

    async with http.post(lb.url + CODEX_PATH, json=payload, headers=auth()) as response:
        status, body = response.status, await response.json()

    assert status == 500
    assert body["error"]["type"] == "server_error"
    assert body["error"]["code"] == "server_error"
    assert "could not store the response" in body["error"]["message"]


async def next_events(response: aiohttp.ClientResponse, decoder: SSEDecoder) -> list[str]:
    """The types of the events in the next piece of a stream ([] at its end)."""
    return [str(kind) for _, kind, _ in decoder.feed(await response.content.readany())]


@pytest.mark.parametrize("refused", [False, True])
async def test_output_goes_out_before_its_commit_unless_the_store_is_busy(
    refused: bool, lb: Balancer, fake: Fake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Each response arrives from the upstream in one piece, and commits wait on a locked
    database. The first finds the store idle: its output goes out while its commit waits.
    The second completes while the first's commit is under way: its output waits for its own
    commit and goes out with it, so a refused commit is still a plain 500."""
    database = tmp_path / "codexlb.db"
    if refused:
        await refuse_snapshots(database)
    payload = {"model": "gpt-5-codex", "stream": True, "input": [user_message("hi")]}
    first_decoder = SSEDecoder()
    async with locked_database(database):
        first = await http.post(lb.url + CODEX_PATH, json=payload, headers=auth())
        assert first.status == 200
        kinds: list[str] = []
        while "response.output_item.done" not in kinds:
            kinds += await asyncio.wait_for(next_events(first, first_decoder), 5)
        second = asyncio.create_task(http.post(lb.url + CODEX_PATH, json=payload, headers=auth()))
        await eventually(lambda: len(fake.received) == 2)  # the upstream answered the second
        with pytest.raises(TimeoutError):  # the first's terminal event waits for the commit
            await asyncio.wait_for(next_events(first, first_decoder), 0.5)
        assert not second.done()  # and nothing of the second, not even its status line
    while piece := await asyncio.wait_for(next_events(first, first_decoder), 5):
        kinds += piece
    first.release()
    async with await asyncio.wait_for(second, 5) as response:
        second_status, second_body = response.status, await response.read()

    if refused:
        assert kinds[-1] == "response.failed"
        assert second_status == 500
        assert b"could not store the response" in second_body
    else:
        assert kinds[-1] == "response.completed"
        assert second_status == 200
        assert [kind for _, kind, _ in SSEDecoder().feed(second_body)] == kinds


async def test_a_response_the_database_refuses_after_output_ends_failed(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    await refuse_snapshots(tmp_path / "codexlb.db")
    fake.script(Fault.slow_finish(0.2))

    result = await asyncio.wait_for(stream_turn(http, lb.url, {"input": [user_message("hi")]}), 10)

    assert result.status == 200
    assert "response.output_item.done" in result.types
    assert "response.completed" not in result.types
    assert result.types[-1] == "response.failed"
    assert result.events[-1]["response"]["error"]["code"] == "server_error"
    failed_id = result.events[-1]["response"]["id"]
    again = await stream_turn(
        http, lb.url, {"input": [user_message("x")], "previous_response_id": failed_id}
    )
    assert again.status == 400


async def test_whole_pool_rate_limited_gives_429_with_retry_after(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    for account in ("a", "b", "c"):
        fake.script(Fault.status(429, resets_in=120), account=account)
    result = await stream_turn(http, lb.url, {"input": "hi"})
    assert result.status == 429
    error = result.events[0]["error"]
    assert error["type"] == error["code"] == "usage_limit_reached"
    assert error["resets_at"] > 0
    assert 100 <= int(result.headers["Retry-After"]) <= 121

    # While the pool is out, nothing more is sent upstream.
    before = len(fake.received)
    again = await stream_turn(http, lb.url, {"input": "hi"})
    assert again.status == 429
    assert len(fake.received) == before


async def test_every_account_failing_gives_502(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    fake.script(Fault.status(500), Fault.status(502), Fault.status(503))
    result = await stream_turn(http, lb.url, {"input": "hi"})
    assert result.status == 502
    assert result.events[0]["error"]["type"] == "server_error"
    assert result.events[0]["error"]["code"] == "upstream_error"


async def test_client_error_from_upstream_is_passed_through(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    fake.script(Fault.status(400, error_code="context_length_exceeded"))
    result = await stream_turn(http, lb.url, {"input": "hi"})
    assert result.status == 400
    assert result.events[0]["error"]["code"] == "context_length_exceeded"
    assert len(fake.received) == 1


async def test_reasoning_from_another_account_is_dropped_and_retried(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    foreign = {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "enc:zz:00"}
    result = await stream_turn(http, lb.url, {"input": [user_message("a"), foreign]})
    assert result.status == 200
    assert fake.received[-1].body["input"] == [user_message("a")]


async def test_oversized_body_is_413_payload_too_large(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    limit = lb.services.config.limits.max_body_bytes
    body = b'{"model": "m", "input": "' + b"x" * limit + b'"}'
    async with http.post(
        lb.url + CODEX_PATH,
        data=io.BytesIO(body),
        headers={**auth(), "Content-Type": "application/json"},
    ) as response:
        assert response.status == 413
        assert (await response.json())["error"]["code"] == "payload_too_large"
    assert fake.received == []


async def test_client_disconnect_mid_stream_releases_the_account(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    fake.script(Fault.stall_after(4))
    async with http.post(
        lb.url + CODEX_PATH,
        json={"model": "m", "input": "hi", "stream": True},
        headers=auth(),
    ) as response:
        await response.content.readuntil(b"response.output_item.added")
        response.close()
    await fake.wait_until(lambda: fake.disconnects == 1, timeout=10)
    for account in lb.services.pool.accounts:
        assert account.inflight == 0


async def test_oversized_chunked_body_is_413_too(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    limit = lb.services.config.limits.max_body_bytes
    block = b"x" * (1024 * 1024)

    async def body() -> AsyncIterator[bytes]:
        yield b'{"model": "m", "input": "'
        for _ in range(limit // len(block) + 1):
            yield block
        yield b'"}'

    async with http.post(
        lb.url + CODEX_PATH, data=body(), headers={**auth(), "Content-Type": "application/json"}
    ) as response:
        assert response.status == 413
        assert (await response.json())["error"]["code"] == "payload_too_large"
    assert fake.received == []
