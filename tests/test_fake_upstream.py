"""The fake upstream over real loopback sockets: framing, auth, continuity rules, faults."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
import zlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from codexlb.testing.events import split_text
from codexlb.testing.fake_upstream import FakeAccount, FakeUpstream, Fault, parse_account

ACCOUNTS = (
    FakeAccount("a", access_token="tok-a", chatgpt_account_id="acct-a", used_percent=12.5),
    FakeAccount("b", access_token="tok-b", chatgpt_account_id="acct-b"),
    FakeAccount("p", api_key="sk-p"),
)
AUTH = {
    "a": {"Authorization": "Bearer tok-a", "chatgpt-account-id": "acct-a"},
    "b": {"Authorization": "Bearer tok-b", "chatgpt-account-id": "acct-b"},
    "p": {"Authorization": "Bearer sk-p"},
}
PATH = "/backend-api/codex/responses"
MESSAGE_EVENTS = [
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.delta",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]
NORMAL_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.output_item.done",
    *MESSAGE_EVENTS,
    "response.completed",
]


@dataclass
class Served:
    fake: FakeUpstream
    url: str
    http: aiohttp.ClientSession


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    fake = FakeUpstream(ACCOUNTS)
    url = await fake.start()
    try:
        async with aiohttp.ClientSession() as http:
            yield Served(fake, url, http)
    finally:
        await fake.close()


def user(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def request_body(text: str = "hello", **fields: Any) -> dict[str, Any]:
    return {"model": "gpt-test", "input": [user(text)], "stream": True, **fields}


def parse_sse(raw: str) -> list[dict[str, Any]]:
    """Decode strictly: every block is exactly ``event: <type>`` then ``data: <json>``."""
    assert raw.endswith("\n\n")
    events = []
    for block in raw[:-2].split("\n\n"):
        event_line, data_line = block.split("\n")
        event = json.loads(data_line.removeprefix("data: "))
        assert event_line == f"event: {event['type']}"
        events.append(event)
    return events


async def post(
    served: Served, body: Any, account: str = "a", path: str = PATH
) -> tuple[int, Mapping[str, str], Any]:
    """Status, headers and the decoded events (or the JSON error body)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with served.http.post(served.url + path, data=data, headers=AUTH[account]) as response:
        text = await response.text()
        if response.content_type == "text/event-stream":
            return response.status, response.headers, parse_sse(text)
        return response.status, response.headers, json.loads(text)


async def read_to_end(reply: aiohttp.ClientResponse) -> tuple[bytes, Exception | None]:
    """The body bytes that arrived, and the error that ended the body early, if any."""
    received = b""
    try:
        async for chunk in reply.content.iter_any():
            received += chunk
    except aiohttp.ClientPayloadError as error:
        return received, error
    return received, None


def types(events: list[dict[str, Any]]) -> list[str]:
    return [event["type"] for event in events]


async def test_http_stream_has_the_backend_event_sequence_and_headers(served: Served) -> None:
    status, headers, events = await post(served, request_body("hello", extra={"kept": 1}))

    assert status == 200
    assert types(events) == NORMAL_EVENTS
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    created = events[0]["response"]
    assert created["id"].startswith("resp_")
    assert (created["status"], created["model"], created["output"]) == (
        "in_progress",
        "gpt-test",
        [],
    )
    reasoning = events[3]["item"]
    assert reasoning["id"].startswith("rs_")
    assert reasoning["encrypted_content"].startswith("enc:a:")
    message = events[-2]["item"]
    assert message["id"].startswith("msg_")
    assert message["content"] == [{"type": "output_text", "text": "echo: hello", "annotations": []}]
    deltas = [event["delta"] for event in events if event["type"] == "response.output_text.delta"]
    assert "".join(deltas) == "echo: hello"
    assert [event["output_index"] for event in events if "output_index" in event] == [0, 0] + [
        1
    ] * 8
    completed = events[-1]["response"]
    assert completed["id"] == created["id"]
    assert completed["status"] == "completed"
    assert completed["output"] == []
    usage = completed["usage"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert usage["input_tokens_details"] == {"cached_tokens": 0}
    assert headers["openai-model"] == "gpt-test"
    assert headers["x-request-id"].startswith("req_")
    assert headers["x-codex-primary-used-percent"] == "12.5"
    assert headers["x-codex-primary-window-minutes"] == "300"
    assert int(headers["x-codex-primary-reset-at"]) > time.time()
    assert {"x-codex-secondary-used-percent", "x-codex-secondary-reset-at"} <= set(headers)
    assert headers["Transfer-Encoding"] == "chunked"

    (received,) = served.fake.received
    assert (received.transport, received.path, received.account) == ("http", PATH, "a")
    assert received.headers["chatgpt-account-id"] == "acct-a"
    assert received.body["extra"] == {"kept": 1}


async def test_fixed_text_full_completed_output_and_plain_string_input() -> None:
    fake = FakeUpstream(ACCOUNTS, text="fixed answer", deltas=5, completed_output=True)
    url = await fake.start()
    try:
        async with aiohttp.ClientSession() as http:
            served = Served(fake, url, http)
            _, _, events = await post(served, {"model": "m", "input": "hi", "stream": True})
            assert types(events).count("response.output_text.delta") == 5
            output = events[-1]["response"]["output"]
            assert [item["type"] for item in output] == ["reasoning", "message"]
            assert output[1]["content"][0]["text"] == "fixed answer"

            fake.text = None
            _, _, events = await post(served, {"model": "m", "input": "plain", "stream": True})
            assert events[-1]["response"]["output"][1]["content"][0]["text"] == "echo: plain"
    finally:
        await fake.close()


async def test_responder_items_follow_the_reasoning_item(served: Served) -> None:
    calls: list[tuple[str, Any]] = []

    def responder(account: str, body: Any) -> list[dict[str, Any]]:
        calls.append((account, body))
        call = {"type": "function_call", "name": "shell", "arguments": '{"cmd":"ls"}'}
        return [call]

    served.fake.responder = responder
    _, _, events = await post(served, request_body("run ls"), account="b")

    assert calls == [("b", request_body("run ls"))]
    done = [event["item"] for event in events if event["type"] == "response.output_item.done"]
    assert [item["type"] for item in done] == ["reasoning", "function_call"]
    call = done[1]
    assert call["id"].startswith("fc_")
    assert call["call_id"].startswith("call_")
    assert (call["arguments"], call["status"]) == ('{"cmd":"ls"}', "completed")
    assert "response.function_call_arguments.done" in types(events)


async def test_generate_false_produces_an_empty_response(served: Served) -> None:
    _, _, events = await post(served, request_body(generate=False))
    assert types(events) == ["response.created", "response.in_progress", "response.completed"]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer nope", "chatgpt-account-id": "acct-a"},
        {"Authorization": "Bearer tok-a"},
        {"Authorization": "Bearer tok-a", "chatgpt-account-id": "acct-b"},
        {"Authorization": "Basic tok-a", "chatgpt-account-id": "acct-a"},
        {"Authorization": "Bearer sk-p", "chatgpt-account-id": "acct-a"},
    ],
)
async def test_bad_credentials_are_refused_and_recorded(
    served: Served, headers: dict[str, str]
) -> None:
    served.fake.script(Fault.status(500))
    async with served.http.post(served.url + PATH, json=request_body(), headers=headers) as reply:
        assert reply.status == 401
        error = (await reply.json())["error"]
    assert error == {
        "message": "Incorrect API key provided.",
        "type": "invalid_request_error",
        "code": "invalid_api_key",
        "param": None,
    }
    (received,) = served.fake.received
    assert received.account is None
    assert received.body == request_body()
    assert served.fake.pending_faults == 1


async def test_platform_key_authenticates_without_account_header(served: Served) -> None:
    status, _, _ = await post(served, request_body(), account="p", path="/v1/responses")
    assert status == 200
    assert [request.path for request in served.fake.requests_for("p")] == ["/v1/responses"]
    assert served.fake.requests_for("a") == []


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "Invalid JSON body."),
        ({"model": "m", "input": "hi"}, "Stream must be set to true"),
        ({"model": "m", "input": "hi", "stream": False}, "Stream must be set to true"),
    ],
)
async def test_http_requires_a_streaming_json_body(served: Served, body: Any, message: str) -> None:
    status, _, reply = await post(served, body)
    assert status == 400
    assert reply["error"]["message"] == message
    assert reply["error"]["type"] == "invalid_request_error"


async def test_http_never_knows_a_previous_response(served: Served) -> None:
    _, _, events = await post(served, request_body())
    response_id = events[-1]["response"]["id"]

    status, _, reply = await post(served, request_body(previous_response_id=response_id))

    assert status == 400
    assert reply == {
        "error": {
            "type": "invalid_request_error",
            "code": "previous_response_not_found",
            "message": f"Previous response with id '{response_id}' not found.",
            "param": "previous_response_id",
        }
    }


async def test_reasoning_is_accepted_only_on_the_account_that_made_it(served: Served) -> None:
    _, _, events = await post(served, request_body("first"), account="a")
    reasoning = events[3]["item"]
    history = [user("first"), reasoning, events[-2]["item"], user("second")]
    body = {"model": "m", "input": history, "stream": True}

    same, _, _ = await post(served, body, account="a")
    other, _, reply = await post(served, body, account="b")
    forged = {**body, "input": [{**reasoning, "encrypted_content": "garbage"}]}
    malformed, _, _ = await post(served, forged, account="a")

    assert same == 200
    assert (other, malformed) == (400, 400)
    assert reply["error"]["code"] == "invalid_encrypted_content"
    assert reasoning["id"] in reply["error"]["message"]


async def test_status_fault_429_usage_limit(served: Served) -> None:
    served.fake.script(Fault.status(429, resets_in=120, retry_after=1.5))
    before = time.time()
    status, headers, reply = await post(served, request_body())
    error = reply["error"]
    assert status == 429
    assert (error["type"], error["code"], error["param"]) == (
        "usage_limit_reached",
        "usage_limit_reached",
        None,
    )
    assert error["resets_in_seconds"] == 120
    assert before + 120 <= error["resets_at"] <= time.time() + 121
    assert headers["Retry-After"] == "1.5"
    assert headers["x-codex-primary-used-percent"] == "100"
    assert int(headers["x-codex-primary-reset-at"]) == error["resets_at"]
    assert (await post(served, request_body()))[0] == 200


@pytest.mark.parametrize(
    ("fault", "status", "error_type", "code"),
    [
        (Fault.status(429, error_code="rate_limit_exceeded"), 429, "rate_limit_exceeded", None),
        (Fault.status(500), 500, "server_error", "server_error"),
        (Fault.status(401), 401, "invalid_request_error", "invalid_api_key"),
        (Fault.status(401, error_code="token_expired"), 401, "invalid_request_error", None),
        (Fault.ws_error(None, "websocket_connection_limit_reached"), 500, None, None),
        (Fault.ws_error(503, "server_is_overloaded"), 503, "server_error", None),
    ],
)
async def test_status_faults_over_http(
    served: Served, fault: Fault, status: int, error_type: str | None, code: str | None
) -> None:
    served.fake.script(fault)
    got_status, _, reply = await post(served, request_body())
    assert got_status == status
    error = reply["error"]
    assert error["code"] == (code or fault.code)
    if error_type is not None:
        assert error["type"] == error_type
    assert error["param"] is None
    assert error["message"]


async def test_faults_wait_for_their_account(served: Served) -> None:
    served.fake.script(Fault.status(500), account="b")
    assert (await post(served, request_body(), account="a"))[0] == 200
    assert (await post(served, request_body(), account="b"))[0] == 500
    assert (await post(served, request_body(), account="b"))[0] == 200


async def test_slow_first_byte_delays_then_answers(served: Served) -> None:
    served.fake.script(Fault.slow_first_byte(0.2))
    loop = asyncio.get_running_loop()
    started = loop.time()
    status, _, events = await post(served, request_body())
    assert loop.time() - started >= 0.2
    assert (status, types(events)) == (200, NORMAL_EVENTS)


async def test_slow_finish_holds_back_only_the_last_event(served: Served) -> None:
    served.fake.script(Fault.slow_finish(0.3))
    loop = asyncio.get_running_loop()
    chunks: list[tuple[float, bytes]] = []
    async with served.http.post(served.url + PATH, json=request_body(), headers=AUTH["a"]) as reply:
        async for chunk in reply.content.iter_any():
            chunks.append((loop.time(), chunk))
    before = b"".join(chunk for at, chunk in chunks if at - chunks[0][0] < 0.2)
    assert types(parse_sse(before.decode())) == NORMAL_EVENTS[:-1]
    assert types(parse_sse(b"".join(chunk for _, chunk in chunks).decode())) == NORMAL_EVENTS


async def test_drop_after_cuts_the_stream_without_terminator(served: Served) -> None:
    served.fake.script(Fault.drop_after(2))
    async with served.http.post(served.url + PATH, json=request_body(), headers=AUTH["a"]) as reply:
        assert reply.status == 200
        received, error = await read_to_end(reply)
    assert isinstance(error, aiohttp.ClientPayloadError)
    assert types(parse_sse(received.decode())) == ["response.created", "response.in_progress"]


async def test_failed_fault_streams_response_failed(served: Served) -> None:
    served.fake.script(Fault.failed("context_length_exceeded"))
    status, _, events = await post(served, request_body())
    assert status == 200
    assert types(events) == ["response.created", "response.failed"]
    assert events[1]["response"]["status"] == "failed"
    assert events[1]["response"]["error"]["code"] == "context_length_exceeded"


async def test_stall_holds_the_response_until_the_client_hangs_up(served: Served) -> None:
    served.fake.script(Fault.stall_after(1))
    async with served.http.post(served.url + PATH, json=request_body(), headers=AUTH["a"]) as reply:
        await reply.content.readuntil(b"\n\n")
        reply.close()
    await served.fake.wait_until(lambda: served.fake.disconnects == 1)


async def test_models_answer_with_an_etag(served: Served) -> None:
    url = served.url + "/backend-api/codex/models?client_version=0.169.0"
    async with served.http.get(url, headers=AUTH["a"]) as reply:
        assert reply.status == 200
        assert await reply.json() == {"models": []}
        etag = reply.headers["ETag"]
    async with served.http.get(url, headers={**AUTH["a"], "If-None-Match": etag}) as reply:
        assert reply.status == 304
    async with served.http.get(served.url + "/v1/models") as reply:
        assert reply.status == 401


# -- WebSocket mode --------------------------------------------------------------------------


async def ws_turn(ws: aiohttp.ClientWebSocketResponse, **fields: Any) -> list[dict[str, Any]]:
    """Send one response.create and read frames up to a terminal event (bounded)."""
    await ws.send_json({"type": "response.create", "model": "gpt-test", **fields})
    frames = []
    for _ in range(100):
        frame = await ws.receive_json(timeout=5)
        frames.append(frame)
        if frame["type"] in ("response.completed", "response.failed", "error"):
            return frames
    raise AssertionError("no terminal event")


async def test_ws_prewarm_then_chained_turns_on_the_same_socket(served: Served) -> None:
    connect = served.http.ws_connect(served.url + PATH, headers=AUTH["a"], compress=15)
    async with connect as ws:
        assert ws.compress == 15
        frames = await ws_turn(ws, input=[], generate=False)
        assert types(frames) == [
            "codex.rate_limits",
            "response.created",
            "response.in_progress",
            "response.completed",
        ]
        rate_limits = frames[0]
        assert rate_limits["plan_type"] == "pro"
        assert rate_limits["rate_limits"]["primary"]["used_percent"] == 12.5
        assert rate_limits["credits"] is None
        prewarm_id = frames[-1]["response"]["id"]

        frames = await ws_turn(ws, input=[user("hi")], previous_response_id=prewarm_id)
        assert types(frames) == ["codex.rate_limits", *NORMAL_EVENTS]
        assert frames[-2]["item"]["content"][0]["text"] == "echo: hi"
        turn_id = frames[-1]["response"]["id"]

        stale = await ws_turn(ws, input=[user("again")], previous_response_id=prewarm_id)
        assert stale == [
            {
                "type": "error",
                "status": 400,
                "error": {
                    "type": "invalid_request_error",
                    "code": "previous_response_not_found",
                    "message": f"Previous response with id '{prewarm_id}' not found.",
                    "param": "previous_response_id",
                },
            }
        ]
        frames = await ws_turn(ws, input=[user("next")], previous_response_id=turn_id)
        assert frames[-1]["type"] == "response.completed"

    assert [r.transport for r in served.fake.received] == ["ws"] * 4
    assert served.fake.received[1].body["previous_response_id"] == prewarm_id
    assert served.fake.received[0].headers["chatgpt-account-id"] == "acct-a"
    assert len(served.fake.handshakes) == 1


async def test_ws_upgrade_carries_rate_limit_headers(served: Served) -> None:
    async with served.http.ws_connect(served.url + "/v1/responses", headers=AUTH["p"]) as ws:
        headers = ws._response.headers
        assert headers["x-codex-primary-used-percent"] == "0"
        assert headers["x-request-id"].startswith("req_")
        await served.fake.wait_until(lambda: served.fake.open_websockets == 1)
    await served.fake.wait_until(lambda: served.fake.open_websockets == 0)


async def test_ws_previous_response_from_another_socket_is_not_found(served: Served) -> None:
    async with served.http.ws_connect(served.url + PATH, headers=AUTH["a"]) as ws:
        response_id = (await ws_turn(ws, input=[user("hi")]))[-1]["response"]["id"]
    async with served.http.ws_connect(served.url + PATH, headers=AUTH["a"]) as ws:
        (error,) = await ws_turn(ws, input=[], previous_response_id=response_id)
        assert (error["status"], error["error"]["code"]) == (400, "previous_response_not_found")
        frames = await ws_turn(ws, input=[user("full history")])
        assert frames[-1]["type"] == "response.completed"


async def test_ws_refuses_bad_credentials_before_the_upgrade(served: Served) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await served.http.ws_connect(served.url + PATH, headers={"Authorization": "Bearer x"})
    assert refused.value.status == 401
    (received,) = served.fake.received
    assert (received.transport, received.account, received.body) == ("ws", None, None)


async def test_ws_handshake_fault_refuses_the_upgrade(served: Served) -> None:
    served.fake.script(Fault.handshake(500))
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await served.http.ws_connect(served.url + PATH, headers=AUTH["a"])
    assert refused.value.status == 500
    async with served.http.ws_connect(served.url + PATH, headers=AUTH["a"]) as ws:
        assert (await ws_turn(ws, input=[]))[-1]["type"] == "response.completed"


async def test_ws_drop_after_zero_closes_before_response_created(served: Served) -> None:
    served.fake.script(Fault.drop_after(0))
    async with served.http.ws_connect(served.url + PATH, headers=AUTH["a"]) as ws:
        await ws.send_json({"type": "response.create", "model": "m", "input": []})
        message = await ws.receive(timeout=5)
        assert message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
    assert served.fake.pending_faults == 0


async def test_ws_slow_finish_holds_back_only_the_last_event(served: Served) -> None:
    served.fake.script(Fault.slow_finish(0.3))
    loop = asyncio.get_running_loop()
    async with served.http.ws_connect(served.url + PATH, headers=AUTH["a"]) as ws:
        await ws.send_json({"type": "response.create", "model": "m", "input": [user("hi")]})
        arrivals = []
        for _ in range(len(NORMAL_EVENTS) + 1):
            frame = await ws.receive_json(timeout=5)
            arrivals.append((loop.time(), frame["type"]))
    assert [kind for _, kind in arrivals] == ["codex.rate_limits", *NORMAL_EVENTS]
    assert arrivals[-1][0] - arrivals[-2][0] >= 0.2


async def test_ws_drop_after_events_closes_without_close_frame(served: Served) -> None:
    served.fake.script(Fault.drop_after(1))
    async with served.http.ws_connect(served.url + PATH, headers=AUTH["a"]) as ws:
        await ws.send_json({"type": "response.create", "model": "m", "input": []})
        assert (await ws.receive_json(timeout=5))["type"] == "codex.rate_limits"
        assert (await ws.receive_json(timeout=5))["type"] == "response.created"
        message = await ws.receive(timeout=5)
        assert message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
        assert ws.close_code != 1000


@pytest.mark.parametrize("status", [None, 429])
async def test_ws_error_fault_sends_an_error_event_and_keeps_the_socket(
    served: Served, status: int | None
) -> None:
    served.fake.script(Fault.ws_error(status, "usage_limit_reached"))
    async with served.http.ws_connect(served.url + PATH, headers=AUTH["a"]) as ws:
        (error,) = await ws_turn(ws, input=[user("hi")])
        assert error["type"] == "error"
        assert error.get("status") == status
        assert error["error"]["code"] == "usage_limit_reached"
        assert error["error"]["type"] == "usage_limit_reached"
        frames = await ws_turn(ws, input=[user("hi")])
        assert frames[-1]["type"] == "response.completed"


async def test_ws_failed_fault_and_cross_account_reasoning(served: Served) -> None:
    _, _, events = await post(served, request_body(), account="b")
    foreign = events[3]["item"]
    served.fake.script(Fault.failed())
    async with served.http.ws_connect(served.url + PATH, headers=AUTH["a"]) as ws:
        frames = await ws_turn(ws, input=[user("hi")])
        assert types(frames) == ["codex.rate_limits", "response.created", "response.failed"]
        (error,) = await ws_turn(ws, input=[foreign, user("hi")])
        assert (error["status"], error["error"]["code"]) == (400, "invalid_encrypted_content")


async def test_ws_non_request_frames_get_an_error_event(served: Served) -> None:
    async with served.http.ws_connect(served.url + PATH, headers=AUTH["a"]) as ws:
        await ws.send_str("{broken")
        error = await ws.receive_json(timeout=5)
        assert (error["type"], error["status"]) == ("error", 400)
        await ws.send_json({"type": "session.update"})
        assert (await ws.receive_json(timeout=5))["status"] == 400
    assert [request.body for request in served.fake.received] == [None, {"type": "session.update"}]


async def test_ws_stall_counts_the_hang_up_and_close_ends_open_sockets(served: Served) -> None:
    served.fake.script(Fault.stall_after(1))
    async with served.http.ws_connect(served.url + PATH, headers=AUTH["a"]) as ws:
        await ws.send_json({"type": "response.create", "model": "m", "input": []})
        assert (await ws.receive_json(timeout=5))["type"] == "codex.rate_limits"
        assert (await ws.receive_json(timeout=5))["type"] == "response.created"
    await served.fake.wait_until(lambda: served.fake.disconnects == 1)

    async with served.http.ws_connect(served.url + PATH, headers=AUTH["a"]) as ws:
        await served.fake.wait_until(lambda: served.fake.open_websockets == 1)
        await served.fake.close()
        message = await ws.receive(timeout=5)
        assert message.type is aiohttp.WSMsgType.CLOSE
        assert message.data == 1001


# -- pure helpers and the standalone entry point ----------------------------------------------


def test_split_text_keeps_every_character() -> None:
    assert split_text("echo: hi", 3) == ["ec", "ho:", " hi"]
    assert split_text("ab", 3) == ["a", "b"]
    assert split_text("", 3) == [""]
    assert split_text("abc", 0) == []


async def test_keep_bounds_what_the_fake_remembers() -> None:
    fake = FakeUpstream(ACCOUNTS, keep=3)
    url = await fake.start()
    try:
        async with aiohttp.ClientSession() as http:
            for number in range(10):
                body = request_body(f"turn {number}")
                async with http.post(url + PATH, json=body, headers=AUTH["a"]) as reply:
                    assert reply.status == 200
    finally:
        await fake.close()
    assert 3 <= len(fake.received) < 6
    assert fake.received[-1].body["input"][0]["content"][0]["text"] == "turn 9"
    with pytest.raises(ValueError, match="keep"):
        FakeUpstream(ACCOUNTS, keep=0)


def test_parse_account_specs() -> None:
    chatgpt = parse_account("work:tok:acct")
    assert (chatgpt.access_token, chatgpt.chatgpt_account_id, chatgpt.api_key) == (
        "tok",
        "acct",
        None,
    )
    assert parse_account("platform:sk-1").api_key == "sk-1"
    assert "tok" not in repr(chatgpt)


async def test_standalone_serves_until_sigterm(unused_tcp_port: int) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "codexlb.testing.fake_upstream",
        "--port",
        str(unused_tcp_port),
        "--account",
        "a:tok-a:acct-a",
        "--account",
        "p:sk-p",
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    try:
        async with asyncio.timeout(20):
            while b"serving" not in await process.stderr.readline():
                assert process.returncode is None
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{unused_tcp_port}{PATH}"
            async with http.post(url, json=request_body(), headers=AUTH["p"]) as reply:
                assert reply.status == 200
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


# --- one write per event (benchmarks shaped like real traffic) -------------------------------


@contextlib.asynccontextmanager
async def raw_exchange(url: str, request: bytes) -> AsyncIterator[asyncio.StreamReader]:
    """A TCP connection to ``url`` that has sent ``request``: its reader."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        yield reader
    finally:
        writer.close()
        await writer.wait_closed()


async def read_chunks(reader: asyncio.StreamReader) -> list[bytes]:
    """The chunks of a chunked HTTP/1.1 body, as the server framed them."""
    head = await reader.readuntil(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    chunks: list[bytes] = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        data = await reader.readexactly(size + 2)
        if size == 0:
            return chunks
        chunks.append(data[:-2])


async def test_event_writes_send_every_sse_event_as_its_own_chunk() -> None:
    fake = FakeUpstream(ACCOUNTS, deltas=20, text="x" * 40, event_writes=True)
    url = await fake.start()
    try:
        body = json.dumps(request_body()).encode()
        request = (
            f"POST {PATH} HTTP/1.1\r\nHost: fake\r\nAuthorization: Bearer tok-a\r\n"
            f"chatgpt-account-id: acct-a\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode() + body
        async with asyncio.timeout(10), raw_exchange(url, request) as reader:
            chunks = await read_chunks(reader)
    finally:
        await fake.close()
    events = [parse_sse(chunk.decode()) for chunk in chunks]
    assert all(len(one) == 1 for one in events)
    kinds = [one[0]["type"] for one in events]
    assert kinds.count("response.output_text.delta") == 20
    assert kinds[0] == "response.created"
    assert kinds[-1] == "response.completed"
    assert len(chunks) == 20 + len(NORMAL_EVENTS) - 3


def ws_frame(text: str) -> bytes:
    """A masked, final text frame (a client's)."""
    payload, mask = text.encode(), b"\x01\x02\x03\x04"
    assert len(payload) < 65536
    head = b"\x81" + (bytes([0x80 | len(payload)]) if len(payload) < 126 else b"\xfe")
    if len(payload) >= 126:
        head += len(payload).to_bytes(2, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """(first header byte, payload) of one unmasked server frame."""
    first, second = await reader.readexactly(2)
    assert not second & 0x80
    size = second & 0x7F
    if size == 126:
        size = int.from_bytes(await reader.readexactly(2), "big")
    elif size == 127:
        size = int.from_bytes(await reader.readexactly(8), "big")
    return first, await reader.readexactly(size)


@pytest.mark.parametrize("compression", [True, False])
async def test_websocket_answers_one_frame_per_event_and_compression_is_settable(
    compression: bool,
) -> None:
    fake = FakeUpstream(ACCOUNTS, deltas=20, text="x" * 40, ws_compression=compression)
    url = await fake.start()
    try:
        handshake = (
            f"GET {PATH} HTTP/1.1\r\nHost: fake\r\nAuthorization: Bearer tok-a\r\n"
            "chatgpt-account-id: acct-a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n"
        ).encode()
        create = json.dumps({"type": "response.create", **request_body()})
        async with asyncio.timeout(10), raw_exchange(url, handshake + ws_frame(create)) as reader:
            head = (await reader.readuntil(b"\r\n\r\n")).decode().lower()
            assert head.startswith("http/1.1 101")
            assert ("permessage-deflate" in head) is compression
            inflate = zlib.decompressobj(-zlib.MAX_WBITS)
            frames, kinds = [], []
            while "response.completed" not in kinds:
                first, payload = await read_frame(reader)
                if first & 0x40:  # RSV1: a deflated message
                    payload = inflate.decompress(payload + b"\x00\x00\xff\xff")
                frames.append(first)
                kinds.append(json.loads(payload)["type"])
    finally:
        await fake.close()
    assert all(first & 0x80 for first in frames)  # FIN: no fragments
    assert all(bool(first & 0x40) is compression for first in frames)
    assert kinds[0] == "codex.rate_limits"
    assert kinds.count("response.output_text.delta") == 20
    assert len(frames) == 1 + 20 + len(NORMAL_EVENTS) - 3


async def test_turn_states_are_issued_on_request_and_what_comes_back_is_logged(
    served: Served,
) -> None:
    status, headers, _ = await post(served, request_body())
    assert status == 200
    assert "x-codex-turn-state" not in headers  # off by default
    served.fake.issue_turn_states = True
    _, headers, _ = await post(served, request_body())
    issued = headers["x-codex-turn-state"]
    assert served.fake.turn_states[issued] == "a"
    ws_url = "ws" + served.url.removeprefix("http") + PATH
    async with served.http.ws_connect(ws_url, headers=AUTH["b"]) as ws:
        frame = {"type": "response.create", **request_body(client_metadata={"k": "v"})}
        frame["client_metadata"]["x-codex-turn-state"] = issued
        await ws.send_json(frame)
        kinds = [(await ws.receive_json(timeout=5))["type"] for _ in range(3)]
    assert kinds == ["codex.rate_limits", "response.metadata", "response.created"]
    await post(served, request_body(), account="b")
    received = served.fake.turn_states_received()
    assert ("b", issued) in received  # a foreign turn state, as the fake saw it
    assert served.fake.turn_states[issued] == "a"


async def test_side_calls_answer_an_image_or_an_echo(served: Served) -> None:
    url = served.url + "/backend-api/codex/images/generations"
    async with served.http.post(url, json={"prompt": "p"}, headers=AUTH["a"]) as response:
        assert response.status == 200
        assert (await response.json())["data"][0]["b64_json"]
        assert response.headers["x-codex-primary-used-percent"] == "12.5"
    url = served.url + "/v1/alpha/search?q=1"
    async with served.http.post(url, json={"q": 1}, headers=AUTH["p"]) as response:
        echo = await response.json()
    assert echo == {
        "object": "side_call",
        "path": "/v1/alpha/search",
        "query": "q=1",
        "account": "p",
        "method": "POST",
        "body": {"q": 1},
    }
    async with served.http.post(url, json={}) as response:
        assert response.status == 401
    assert [r.path for r in served.fake.received][-1] == "/v1/alpha/search"
