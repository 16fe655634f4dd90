"""WebSocket mode end to end: client socket → codexlb → fake upstream sockets, on loopback."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from codexlb.testing.fake_upstream import Fault
from tests.harness import (
    CODEX_PATH,
    Balancer,
    Fake,
    auth,
    child_config,
    completed_id,
    config_data,
    make_config,
    output_items,
    refuse_snapshots,
    running_child,
    serve,
    user_message,
    without_ids_and_reasoning,
    ws_events,
    ws_turn,
    ws_url,
)

DEVELOPER = {
    "type": "message",
    "role": "developer",
    "content": [{"type": "input_text", "text": "You are Codex."}],
}
TOOLS = [{"type": "function", "name": "shell", "parameters": {"type": "object"}}]


def shell_call(account: str, body: Any) -> list[dict[str, Any]]:
    """Answer a user message with a tool call, and a tool output with a message."""
    last = body["input"][-1] if body.get("input") else {}
    if last.get("type") == "function_call_output":
        return [
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "done", "annotations": []}],
            }
        ]
    return [
        {
            "type": "function_call",
            "call_id": "call_1",
            "name": "shell",
            "arguments": json.dumps({"command": ["echo", "hello"]}),
        }
    ]


async def test_codex_socket_sequence_reaches_upstream_unchanged_on_one_socket(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    fake.responder = shell_call
    async with http.ws_connect(ws_url(lb.url), headers=auth()) as ws:
        messages: list[dict[str, Any]] = [
            {"input": [DEVELOPER], "tools": TOOLS, "generate": False},
        ]
        prewarm = await ws_turn(ws, messages[0])
        turn = {
            "input": [user_message("run it")],
            "tools": TOOLS,
            "previous_response_id": completed_id(prewarm),
        }
        messages.append(turn)
        first = await ws_turn(ws, turn)
        call = output_items(first)[-1]
        assert call["type"] == "function_call"
        follow_up = {
            "input": [
                {"type": "function_call_output", "call_id": call["call_id"], "output": "hello"}
            ],
            "tools": TOOLS,
            "previous_response_id": completed_id(first),
        }
        messages.append(follow_up)
        final = await ws_turn(ws, follow_up)
        assert output_items(final)[-1]["content"][0]["text"] == "done"

    sent = [r.body for r in fake.received if r.transport == "ws"]
    assert sent == [{"type": "response.create", "model": "gpt-5-codex", **m} for m in messages]
    assert len(fake.handshakes) == 1
    assert len({r.account for r in fake.received}) == 1


async def test_drop_before_created_retries_on_another_account_with_full_input(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    async with http.ws_connect(ws_url(lb.url), headers=auth()) as ws:
        first = await ws_turn(ws, {"input": [user_message("one")]})
        origin = fake.received[-1].account
        fake.script(Fault.drop_after(0), account=origin)

        second = await ws_turn(
            ws, {"input": [user_message("two")], "previous_response_id": completed_id(first)}
        )
        # One clean response: no failure, no duplicate created.
        types = [e["type"] for e in second]
        assert types.count("response.created") == 1
        assert types[-1] == "response.completed"
        retried = fake.received[-1]
        assert retried.account != origin
        assert "previous_response_id" not in retried.body
        assert retried.body["input"] == [
            user_message("one"),
            *without_ids_and_reasoning(output_items(first)),
            user_message("two"),
        ]
        # The next request on the same client socket works, chained live on the new socket.
        third = await ws_turn(
            ws, {"input": [user_message("three")], "previous_response_id": completed_id(second)}
        )
        assert third[-1]["type"] == "response.completed"
        assert fake.received[-1].body["previous_response_id"] == completed_id(second)
        assert fake.received[-1].account == retried.account


async def test_new_socket_continuing_an_older_sockets_response_replays(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    async with http.ws_connect(ws_url(lb.url), headers=auth()) as ws:
        first = await ws_turn(ws, {"input": [user_message("one")]})
    async with http.ws_connect(ws_url(lb.url), headers=auth()) as ws:
        second = await ws_turn(
            ws, {"input": [user_message("two")], "previous_response_id": completed_id(first)}
        )
    assert second[-1]["type"] == "response.completed"
    replayed = fake.received[-1]
    assert replayed.account == fake.received[0].account
    assert "previous_response_id" not in replayed.body
    assert replayed.body["input"] == [
        user_message("one"),
        *output_items(first),
        user_message("two"),
    ]


async def test_conversation_continues_over_websocket_after_restart(
    fake: Fake, tmp_path: Path
) -> None:
    config_file = child_config(tmp_path, fake)
    async with aiohttp.ClientSession() as http:
        async with (
            running_child(config_file) as server,
            http.ws_connect(ws_url(server.url), headers=auth()) as ws,
        ):
            first = await ws_turn(ws, {"input": [user_message("one")]})
        async with (
            running_child(config_file) as server,
            http.ws_connect(ws_url(server.url), headers=auth()) as ws,
        ):
            second = await ws_turn(
                ws, {"input": [user_message("two")], "previous_response_id": completed_id(first)}
            )
    assert second[-1]["type"] == "response.completed"
    assert fake.received[-1].body["input"] == [
        user_message("one"),
        *output_items(first),
        user_message("two"),
    ]


@pytest.mark.parametrize(
    "fault",
    [
        Fault.ws_error(429, "usage_limit_reached"),
        Fault.ws_error(429, "rate_limit_exceeded"),
        Fault.ws_error(500, "server_error"),
        Fault.failed("server_error"),
        Fault.drop_after(2),
    ],
    ids=["usage-limit", "rate-limit", "server-error", "failed", "drop-after-created"],
)
async def test_failure_before_output_fails_over_invisibly(
    fault: Fault, lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    fake.script(fault)
    async with http.ws_connect(ws_url(lb.url), headers=auth()) as ws:
        events = await ws_turn(ws, {"input": [user_message("hi")]})
    types = [e["type"] for e in events]
    assert types[-1] == "response.completed"
    assert "error" not in types
    assert types.count("response.created") == 1
    assert fake.received[0].account != fake.received[-1].account


async def test_upstream_forgetting_a_live_anchor_is_replayed_once(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    async with http.ws_connect(ws_url(lb.url), headers=auth()) as ws:
        first = await ws_turn(ws, {"input": [user_message("one")]})
        fake.script(Fault.ws_error(400, "previous_response_not_found"))
        second = await ws_turn(
            ws, {"input": [user_message("two")], "previous_response_id": completed_id(first)}
        )
    assert second[-1]["type"] == "response.completed"
    forwarded, replayed = fake.received[-2:]
    assert forwarded.body["previous_response_id"] == completed_id(first)
    assert "previous_response_id" not in replayed.body
    assert replayed.body["input"] == [
        user_message("one"),
        *output_items(first),
        user_message("two"),
    ]


async def test_drop_after_output_fails_the_response_and_the_socket_goes_on(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    async with http.ws_connect(ws_url(lb.url), headers=auth()) as ws:
        fake.script(Fault.drop_after(5))
        broken = await ws_turn(ws, {"input": [user_message("one")]})
        assert broken[-1]["type"] == "response.failed"
        assert broken[-1]["response"]["error"]["code"] == "stream_incomplete"
        after = await ws_turn(ws, {"input": [user_message("two")]})
        assert after[-1]["type"] == "response.completed"
    assert len(fake.handshakes) == 2


async def test_a_response_the_database_refuses_fails_and_the_socket_goes_on(
    lb: Balancer, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    async with http.ws_connect(ws_url(lb.url), headers=auth()) as ws:
        await refuse_snapshots(tmp_path / "codexlb.db")
        # After visible output: response.failed, as over HTTP.
        refused = await ws_turn(ws, {"input": [user_message("one")]})
        assert "response.completed" not in [event["type"] for event in refused]
        assert "response.output_text.delta" in [event["type"] for event in refused]
        assert refused[-1]["type"] == "response.failed"
        assert refused[-1]["response"]["error"]["code"] == "server_error"
        # With nothing visible yet (a prewarm makes no output): an error event.
        prewarm = await ws_turn(ws, {"input": [user_message("one")], "generate": False})
        assert [event["type"] for event in prewarm] == ["error"]
        assert prewarm[-1]["status"] == 500
        assert prewarm[-1]["error"]["code"] == "server_error"

        await refuse_snapshots(tmp_path / "codexlb.db", refuse=False)
        after = await ws_turn(ws, {"input": [user_message("two")]})
        assert after[-1]["type"] == "response.completed"


async def test_whole_pool_rate_limited_sends_error_event_with_status(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    for account in ("a", "b", "c"):
        fake.script(Fault.ws_error(429, "usage_limit_reached"), account=account)
    async with http.ws_connect(ws_url(lb.url), headers=auth()) as ws:
        events = await ws_turn(ws, {"input": [user_message("hi")]})
        assert events == [events[-1]]
        assert events[0]["type"] == "error"
        assert events[0]["status"] == 429
        assert events[0]["error"]["code"] == "usage_limit_reached"


@pytest.mark.parametrize(
    ("frame", "param"),
    [
        ("{not json", None),
        ("[1]", None),
        ('{"type": "response.cancel"}', "type"),
        ('{"type": "response.create", "model": "m", "input": 3}', "input"),
    ],
)
async def test_bad_messages_get_an_error_event_and_the_socket_stays_usable(
    frame: str, param: str | None, lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    async with http.ws_connect(ws_url(lb.url), headers=auth()) as ws:
        await ws.send_str(frame)
        [error] = await ws_events(ws)
        assert error["type"] == "error"
        assert error["status"] == 400
        assert error["error"]["param"] == param
        await ws.send_bytes(b"\x00\x01")
        [binary] = await ws_events(ws)
        assert (binary["type"], binary["status"]) == ("error", 400)
        assert (await ws_turn(ws, {"input": "still here"}))[-1]["type"] == "response.completed"
    assert len(fake.received) == 1


async def test_oversize_message_is_an_error_event_not_a_close(
    lb: Balancer, http: aiohttp.ClientSession
) -> None:
    limit = lb.services.config.limits.max_body_bytes
    async with http.ws_connect(ws_url(lb.url), headers=auth(), max_msg_size=0) as ws:
        await ws.send_str('{"type": "response.create", "input": "' + "x" * limit + '"}')
        [error] = await ws_events(ws)
        assert (error["status"], error["error"]["code"]) == (400, "payload_too_large")
        assert (await ws_turn(ws, {"input": "after"}))[-1]["type"] == "response.completed"


async def test_the_size_limit_counts_bytes_not_characters(
    lb: Balancer, http: aiohttp.ClientSession
) -> None:
    limit = lb.services.config.limits.max_body_bytes
    text = "\u20ac" * (limit // 3 + 1)  # fewer characters than the limit, more bytes (3 each)
    async with http.ws_connect(ws_url(lb.url), headers=auth(), max_msg_size=0) as ws:
        await ws.send_str('{"type": "response.create", "input": "' + text + '"}')
        [error] = await ws_events(ws)
        assert (error["status"], error["error"]["code"]) == (400, "payload_too_large")


async def test_handshake_with_a_bad_key_is_refused_before_the_upgrade(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(ws_url(lb.url), headers={"Authorization": "Bearer nope"})
    assert refused.value.status == 401
    assert fake.handshakes == []


async def test_client_that_vanishes_cancels_its_upstream_work(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    fake.script(Fault.stall_after(4))
    ws = await http.ws_connect(ws_url(lb.url), headers=auth())
    await ws.send_str(json.dumps({"type": "response.create", "model": "m", "input": "hi"}))
    for _ in range(3):
        await ws.receive(timeout=5)
    # Drop the TCP connection without a close frame, as Codex does at exit.
    ws._response.connection.transport.abort()  # type: ignore[union-attr]
    await ws.close()
    await fake.wait_until(lambda: fake.open_websockets == 0, timeout=10)
    for account in lb.services.pool.accounts:
        assert account.inflight == 0


async def test_rate_limit_events_feed_the_accounts_usage(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    for name in ("a", "b", "c"):
        fake.set_usage(name, 42.0)
    async with http.ws_connect(ws_url(lb.url), headers=auth()) as ws:
        events = await ws_turn(ws, {"input": "hi"})
    assert events[0]["type"] == "codex.rate_limits"
    served = lb.services.pool.get(str(fake.received[-1].account))
    assert served is not None
    assert served.primary.used_percent == 42.0


async def test_concurrent_sockets_each_get_their_own_answers(
    lb: Balancer, http: aiohttp.ClientSession
) -> None:
    async def conversation(n: int) -> None:
        async with http.ws_connect(ws_url(lb.url), headers=auth()) as ws:
            previous: str | None = None
            for turn in range(3):
                body: dict[str, Any] = {"input": [user_message(f"{n}-{turn}")]}
                if previous:
                    body["previous_response_id"] = previous
                events = await ws_turn(ws, body)
                assert output_items(events)[-1]["content"][0]["text"] == f"echo: {n}-{turn}"
                previous = completed_id(events)

    await asyncio.gather(*(conversation(n) for n in range(20)))


async def test_upstream_handshake_headers_reach_the_client(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    fake.set_usage("a", 12.0)
    fake.set_usage("b", 12.0)
    fake.set_usage("c", 12.0)
    async with http.ws_connect(
        ws_url(lb.url), headers={**auth(), "session-id": "s-1", "openai-beta": "x"}
    ) as ws:
        headers = ws._response.headers
        assert headers["x-codex-primary-used-percent"] == "12"
        assert "x-request-id" in headers
        assert (await ws_turn(ws, {"input": "hi"}))[-1]["type"] == "response.completed"
    [handshake] = fake.handshakes
    assert handshake.headers["session-id"] == "s-1"
    assert handshake.headers["openai-beta"] == "responses_websockets=2026-02-06"
    assert handshake.headers["authorization"].startswith("Bearer tok-")


async def test_connection_limit_reopens_a_socket_on_the_same_account(
    lb: Balancer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    async with http.ws_connect(ws_url(lb.url), headers=auth()) as ws:
        first = await ws_turn(ws, {"input": [user_message("one")]})
        origin = fake.received[-1].account
        fake.script(Fault.ws_error(400, "websocket_connection_limit_reached"), account=origin)
        second = await ws_turn(
            ws, {"input": [user_message("two")], "previous_response_id": completed_id(first)}
        )
    assert second[-1]["type"] == "response.completed"
    reopened = fake.received[-1]
    assert reopened.account == origin
    assert reopened.body["input"] == [
        user_message("one"),
        *output_items(first),
        user_message("two"),
    ]
    assert len(fake.handshakes) == 2
    account = lb.services.pool.get(str(origin))
    assert account is not None
    assert account.error_streak == 0


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One server frame: (first header byte, payload); servers do not mask."""
    first, second = await reader.readexactly(2)
    length = second & 0x7F
    if length == 126:
        length = int.from_bytes(await reader.readexactly(2), "big")
    elif length == 127:
        length = int.from_bytes(await reader.readexactly(8), "big")
    return first, await reader.readexactly(length)


def client_frame(text: str) -> bytes:
    payload = text.encode()
    mask = os.urandom(4)
    header = bytes([0x81]) + (
        bytes([0x80 | len(payload)])
        if len(payload) < 126
        else bytes([0x80 | 126]) + len(payload).to_bytes(2, "big")
    )
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def raw_handshake(lb: Balancer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """A WebSocket handshake offering permessage-deflate, by hand; returns the 101 head."""
    host, port = lb.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        (
            f"GET {CODEX_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
            f"Authorization: {auth()['Authorization']}\r\n\r\n"
        ).encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101")
    return reader, writer, head


async def test_deflate_is_declined_by_default(lb: Balancer) -> None:
    _, writer, head = await raw_handshake(lb)
    writer.close()
    await writer.wait_closed()
    assert b"permessage-deflate" not in head.lower()


async def test_deflate_when_enabled_is_negotiated_but_events_go_out_uncompressed(
    fake: Fake, tmp_path: Path
) -> None:
    data = config_data(
        fake.url,
        f"sqlite+aiosqlite:///{tmp_path / 'codexlb.db'}",
        server={"websocket_compression": True},
    )
    async with serve(make_config(data, tmp_path)) as lb:
        reader, writer, head = await raw_handshake(lb)
        try:
            await _uncompressed_turn(reader, writer, head)
        finally:
            writer.close()
            await writer.wait_closed()


async def _uncompressed_turn(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes
) -> None:
    assert b"permessage-deflate" in head.lower()
    writer.write(client_frame('{"type":"response.create","model":"m","input":"hi"}'))
    types = []
    for _ in range(50):
        first, payload = await read_frame(reader)
        assert first & 0x40 == 0, "RSV1 set: the frame was compressed"
        event = json.loads(payload)
        types.append(event["type"])
        if event["type"] == "response.completed":
            break
    assert types[-1] == "response.completed"


@pytest.mark.parametrize("compression", [False, True], ids=["plain", "deflate"])
async def test_a_large_replay_reaches_the_upstream_intact(
    compression: bool, fake: Fake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    data = config_data(
        fake.url,
        f"sqlite+aiosqlite:///{tmp_path / 'codexlb.db'}",
        upstream={"websocket_compression": compression},
    )
    big = user_message("x" * 200_000)
    async with serve(make_config(data, tmp_path)) as lb:
        async with http.ws_connect(ws_url(lb.url), headers=auth()) as ws:
            first = await ws_turn(ws, {"input": [big]})
        async with http.ws_connect(ws_url(lb.url), headers=auth()) as ws:
            second = await ws_turn(
                ws,
                {"input": [user_message("more")], "previous_response_id": completed_id(first)},
            )
    assert second[-1]["type"] == "response.completed"
    assert fake.received[-1].body["input"] == [big, *output_items(first), user_message("more")]
