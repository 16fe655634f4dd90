"""The lean HTTP/1.1 client against scripted raw servers on loopback."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
from yarl import URL

from codexlb.http1 import ConnectFailed, Http1Client, Http1Error, Http1Response

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Server:
    def __init__(self, url: URL) -> None:
        self.url = url
        self.connections = 0
        self.requests: list[bytes] = []


@asynccontextmanager
async def raw_server(script: Script) -> AsyncIterator[Server]:
    """A TCP server on loopback running ``script`` for every connection."""
    holder: list[Server] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        holder[0].connections += 1
        try:
            await script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    holder.append(Server(URL(f"http://127.0.0.1:{port}/backend-api/codex/responses")))
    try:
        yield holder[0]
    finally:
        server.close()
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + await reader.readexactly(length)


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


async def read_all(client: Http1Client, url: URL, body: bytes = b"{}") -> tuple[int, bytes]:
    response = await client.post(url, {"X-Test": "1"}, body, first_byte_timeout=5)
    try:
        received: list[bytes] = []
        await collect(response, 5, received)
        data = b"".join(received)
    finally:
        response.release()
    return response.status, data


async def collect(response: Http1Response, idle_timeout: float, into: list[bytes]) -> None:
    while (chunk := await response.next_chunk(idle_timeout)) is not None:
        into.append(chunk)


async def answer_nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)


@pytest.fixture
async def client() -> AsyncIterator[Http1Client]:
    http = Http1Client(connect_timeout=2)
    try:
        yield http
    finally:
        await http.close()


async def test_streams_a_chunked_body_and_reuses_the_connection(client: Http1Client) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(3):
            request = await read_request(reader)
            server.requests.append(request)
            writer.write(SSE_HEAD + chunked(b"event: a\n", b"data: 1\n\n"))
            await writer.drain()

    async with raw_server(script) as server:
        for _ in range(3):
            assert await read_all(client, server.url, b'{"x":1}') == (200, b"event: a\ndata: 1\n\n")
        assert server.connections == 1
    first = server.requests[0]
    assert first.startswith(b"POST /backend-api/codex/responses HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"\r\nX-Test: 1\r\nContent-Length: 7\r\n\r\n" in first
    assert first.endswith(b'{"x":1}')


async def test_content_length_body_and_headers(client: Http1Client) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\nX-Codex-Primary-Used-Percent: 100"
            b"\r\nVary: Accept\r\nvary: Origin\r\nContent-Length: 5\r\n\r\nlimit"
        )
        await writer.drain()

    async with raw_server(script) as server:
        response = await client.post(server.url, {}, b"", first_byte_timeout=5)
        assert response.status == 429
        assert response.headers["retry-after"] == "7"
        assert response.headers["x-codex-primary-used-percent"] == "100"
        assert response.headers["vary"] == "Accept, Origin"
        assert "Retry-After" not in response.headers  # names are lower-cased
        assert await response.read(1024, 5) == b"limit"
        response.release()


async def test_headers_split_over_many_reads_arrive_whole(client: Http1Client) -> None:
    head = (
        b"HTTP/1.1 200 OK\r\nX-Codex-Primary-Used-Percent: 42\r\nSet-Cookie: a=1\r\n"
        b"Set-Cookie: b=2\r\nContent-Type: text/event-stream\r\nContent-Length: 9\r\n\r\n"
    )
    pieces = [head[i : i + 7] for i in range(0, len(head), 7)] + [b"data: 1\n\n"]

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        for piece in pieces:  # one read each: the next is only sent after a pause
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.005)

    async with raw_server(script) as server:
        response = await client.post(server.url, {}, b"", first_byte_timeout=5)
        assert response.headers == {
            "x-codex-primary-used-percent": "42",
            "set-cookie": "a=1, b=2",
            "content-type": "text/event-stream",
            "content-length": "9",
        }
        assert await response.read(1024, 5) == b"data: 1\n\n"
        response.release()


async def test_a_pooled_connection_closed_while_idle_is_replaced_once(
    client: Http1Client,
) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(SSE_HEAD + chunked(b"ok"))
        await writer.drain()
        # Close after answering, as a server ending an idle keep-alive connection does.

    async with raw_server(script) as server:
        assert await read_all(client, server.url) == (200, b"ok")
        await asyncio.sleep(0)  # let the close reach the client, or not: both must work
        assert await read_all(client, server.url) == (200, b"ok")
        assert server.connections == 2


async def test_a_stream_cut_mid_body_raises(client: Http1Client) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(SSE_HEAD + b"5\r\nhello\r\n")
        await writer.drain()
        writer.transport.abort()

    async with raw_server(script) as server:
        response = await client.post(server.url, {}, b"", first_byte_timeout=5)
        received: list[bytes] = []
        with pytest.raises(Http1Error, match="closed by upstream"):
            await collect(response, 5, received)
        response.release()
    assert received == [b"hello"]


async def test_silence_mid_body_raises_after_the_idle_timeout(client: Http1Client) -> None:
    release = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(SSE_HEAD + b"2\r\nhi\r\n")
        await writer.drain()
        await release.wait()

    async with raw_server(script) as server:
        response = await client.post(server.url, {}, b"", first_byte_timeout=5)
        with pytest.raises(Http1Error, match="silent"):
            await collect(response, 0.2, [])
        response.release()
        release.set()


async def test_no_headers_in_time_is_a_connect_failure(client: Http1Client) -> None:
    release = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await release.wait()

    async with raw_server(script) as server:
        with pytest.raises(ConnectFailed, match="no response headers"):
            await client.post(server.url, {}, b"", first_byte_timeout=0.2)
        release.set()


async def test_refused_connection_is_a_connect_failure(client: Http1Client) -> None:
    async with raw_server(answer_nothing) as server:
        url = server.url
    with pytest.raises(ConnectFailed, match="cannot connect"):
        await client.post(url, {}, b"", first_byte_timeout=1)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("X-Evil", "a\r\nHost: b"),
        ("X-Evil", "a\nb"),
        ("X-Evil", "a\rb"),
        ("X-Evil", "a\x00b"),
        ("X\nEvil", "a"),
    ],
    ids=["crlf", "lf", "cr", "nul", "in-name"],
)
async def test_a_header_with_a_line_break_is_refused(
    client: Http1Client, name: str, value: str
) -> None:
    async with raw_server(answer_nothing) as server:
        with pytest.raises(ConnectFailed, match=re.escape(f"header {name!r} holds a line break")):
            await client.post(server.url, {"X-Fine": "ok", name: value}, b"", first_byte_timeout=1)
        assert server.connections == 0


async def test_a_response_released_early_does_not_return_its_connection(
    client: Http1Client,
) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(SSE_HEAD + b"3\r\nabc\r\n")  # never finished
            await writer.drain()

    async with raw_server(script) as server:
        for _ in range(2):
            response = await client.post(server.url, {}, b"", first_byte_timeout=5)
            assert await response.next_chunk(5) == b"abc"
            response.release()
        assert server.connections == 2


async def test_a_large_body_read_slowly_arrives_whole(client: Http1Client) -> None:
    block = b"x" * 65536
    count = 64  # 4 MiB: beyond the read-pause threshold

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(SSE_HEAD)
        for _ in range(count):
            writer.write(b"%x\r\n%s\r\n" % (len(block), block))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async with raw_server(script) as server:
        response = await client.post(server.url, {}, b"", first_byte_timeout=5)
        size = 0
        while (chunk := await response.next_chunk(5)) is not None:
            size += len(chunk)
            await asyncio.sleep(0)
        assert response.complete
        response.release()
    assert size == len(block) * count
