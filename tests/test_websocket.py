"""The upstream WebSocket client against a real aiohttp server over loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from codexlb.frames import TEXT
from codexlb.http1 import ConnectFailed
from codexlb.websocket import HandshakeRefused, SocketClosed, UpstreamSocket, connect

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Serve = Callable[[Handler], Awaitable[URL]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> URL:
        app = web.Application()
        app.router.add_get("/ws", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return URL(f"http://127.0.0.1:{port}/ws")

    yield start
    for runner in runners:
        await runner.cleanup()


async def open_socket(url: URL, *, deflate: bool = False) -> UpstreamSocket:
    return await connect(
        url, {"X-Test": "1"}, connect_seconds=5, max_message_bytes=1 << 20, offer_deflate=deflate
    )


async def until_closed(socket: UpstreamSocket) -> list[bytes]:
    """The payloads of every message until the socket ends (bounded)."""
    received: list[bytes] = []
    for _ in range(10_000):
        try:
            received += [payload for _, _, payload in await socket.receive(5)]
        except SocketClosed:
            return received
    raise AssertionError("the socket did not end")


async def test_messages_both_ways_and_the_handshake_headers(serve: Serve) -> None:
    seen: list[str] = []

    async def echo(request: web.Request) -> web.WebSocketResponse:
        seen.append(request.headers["X-Test"])
        ws = web.WebSocketResponse()
        ws.headers["x-codex-turn-state"] = "ts-1"
        await ws.prepare(request)
        async for message in ws:
            for n in range(3):
                await ws.send_str(f'{{"type":"e{n}","echo":{message.data}}}')
        return ws

    socket = await open_socket(await serve(echo))
    assert socket.headers["x-codex-turn-state"] == "ts-1"
    assert seen == ["1"]
    await socket.send_text(b'"h\xc3\xa9"')
    received: list[bytes] = []
    while len(received) < 3:
        received += [payload for opcode, _, payload in await socket.receive(5) if opcode == TEXT]
    assert received == [f'{{"type":"e{n}","echo":"hé"}}'.encode() for n in range(3)]
    await socket.close(2)
    assert socket.closed


async def test_a_refused_handshake_carries_status_and_headers(serve: Serve) -> None:
    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"error": {}}, status=429, headers={"Retry-After": "7"})

    with pytest.raises(HandshakeRefused) as refused:
        await open_socket(await serve(refuse))
    assert refused.value.status == 429
    assert refused.value.headers["retry-after"] == "7"


async def test_an_answer_that_is_no_upgrade_fails_the_connect(serve: Serve) -> None:
    async def fake_upgrade(request: web.Request) -> web.Response:
        return web.Response(
            status=101,
            headers={"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Accept": "x"},
        )

    with pytest.raises(ConnectFailed, match="Sec-WebSocket-Accept"):
        await open_socket(await serve(fake_upgrade))


async def test_pings_are_answered_and_a_close_ends_the_socket(serve: Serve) -> None:
    pongs: list[bytes] = []

    async def pinger(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)
        await ws.ping(b"are you there")
        answer = await ws.receive(timeout=5)
        if answer.type == aiohttp.WSMsgType.PONG:
            pongs.append(answer.data)
        await ws.send_str('{"type":"last"}')
        await ws.close(code=1001, message=b"bye")
        return ws

    socket = await open_socket(await serve(pinger))
    received = await until_closed(socket)
    assert pongs == [b"are you there"]
    assert received == [b'{"type":"last"}']


async def test_silence_is_a_timeout(serve: Serve) -> None:
    async def silent(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.receive()
        return ws

    socket = await open_socket(await serve(silent))
    with pytest.raises(TimeoutError):
        await socket.receive(0.05)
    await socket.close(1)


async def test_deflate_both_ways(serve: Serve) -> None:
    got: list[str] = []

    async def deflating(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=True)
        await ws.prepare(request)
        got.append((await ws.receive()).data)
        for n in range(3):
            await ws.send_str('{"type":"delta","n":' + str(n) + ',"pad":"' + "z" * 500 + '"}')
        return ws

    socket = await open_socket(await serve(deflating), deflate=True)
    assert socket.deflate
    history = b'"' + b"history " * 20_000 + b'"'  # sent compressed: above the threshold
    await socket.send_text(history)
    received: list[bytes] = []
    while len(received) < 3:
        received += [payload for _, _, payload in await socket.receive(5)]
    assert all(p.startswith(b'{"type":"delta","n":%d' % n) for n, p in enumerate(received))
    assert all(len(payload) > 500 for payload in received)
    assert got == [history.decode()]
    await socket.close(1)


async def test_a_stream_larger_than_the_buffer_arrives_whole(serve: Serve) -> None:
    async def flood(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        for n in range(4000):
            await ws.send_str(f'{{"type":"d","n":{n},"pad":"{"y" * 1000}"}}')
        await ws.close()
        return ws

    socket = await open_socket(await serve(flood))
    await asyncio.sleep(0.2)  # let the server outrun the reader: reading pauses
    numbers = [int(p.split(b'"n":')[1].split(b",")[0]) for p in await until_closed(socket)]
    assert numbers == list(range(4000))
