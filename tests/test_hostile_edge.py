"""Hostile clients at the edge: huge or compressed WebSocket messages, half-sent requests,
connection floods, large bodies, and the database's file modes."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import os
import resource
import stat
import struct
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from codexlb.db import create_engine, upgrade
from tests.harness import (
    CODEX_PATH,
    Balancer,
    Fake,
    auth,
    child_config,
    config_data,
    eventually,
    make_config,
    running_child,
    serve,
    start_child,
    write_toml,
)

MIB = 1024 * 1024
LIMIT = 64 * MIB
HEAD_END = b"\r\n\r\n"


def peak_rss(pid: int) -> int:
    """The largest resident set ``pid`` has had, in bytes (``VmHWM``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@asynccontextmanager
async def raw_connection(
    url: str,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    target = URL(url)
    assert target.host is not None
    assert target.port is not None
    reader, writer = await asyncio.open_connection(target.host, target.port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def closed_by_server(reader: asyncio.StreamReader, timeout: float) -> bytes:  # noqa: ASYNC109
    """Everything the server sends until it closes the connection (within ``timeout``)."""
    data = b""
    async with asyncio.timeout(timeout):
        while chunk := await reader.read(65536):
            data += chunk
    return data


# --- WebSocket messages are bounded while they are read -----------------------------------


async def websocket_handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, *, deflate: bool
) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    extension = "Sec-WebSocket-Extensions: permessage-deflate\r\n" if deflate else ""
    writer.write(
        (
            f"GET {CODEX_PATH} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: {auth()['Authorization']}\r\n{extension}\r\n"
        ).encode()
    )
    head = await reader.readuntil(HEAD_END)
    assert head.startswith(b"HTTP/1.1 101"), head
    return head


def frame_head(length: int, *, compressed: bool = False) -> bytes:
    """A masked, final text frame's head (the mask is zero: the payload goes as it is)."""
    first = 0x80 | 0x01 | (0x40 if compressed else 0)
    return bytes([first, 0x80 | 127]) + struct.pack("!Q", length) + b"\0\0\0\0"


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first, second = await reader.readexactly(2)
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", await reader.readexactly(2))
    elif length == 127:
        (length,) = struct.unpack("!Q", await reader.readexactly(8))
    return first & 0x0F, await reader.readexactly(length)


async def refusal(reader: asyncio.StreamReader) -> tuple[dict[str, Any], int]:
    """The error event and the close code that end an oversize message."""
    async with asyncio.timeout(20):
        opcode, payload = await read_frame(reader)
        assert opcode == 0x1, (opcode, payload)
        event = json.loads(payload)
        opcode, payload = await read_frame(reader)
    assert opcode == 0x8
    (code,) = struct.unpack("!H", payload[:2])
    return event, code


def deflate_bomb(size: int) -> bytes:
    """A permessage-deflate payload that inflates to ``size`` spaces."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = b" " * MIB
    parts = [compressor.compress(block) for _ in range(size // MIB)]
    parts.append(compressor.flush(zlib.Z_SYNC_FLUSH))
    return b"".join(parts).removesuffix(b"\x00\x00\xff\xff")


async def test_a_huge_frame_is_refused_at_its_header(fake: Fake, tmp_path: Path) -> None:
    async with (
        running_child(child_config(tmp_path, fake)) as child,
        raw_connection(child.url) as (reader, writer),
    ):
        await websocket_handshake(reader, writer, URL(child.url).authority, deflate=False)
        writer.write(frame_head(1 << 30) + b"x" * MIB)  # 1 GiB announced, 1 MiB sent
        event, code = await refusal(reader)
    assert (event["type"], event["status"]) == ("error", 400)
    assert event["error"]["code"] == "payload_too_large"
    assert code == 1008  # a policy violation, not 1009 (SPEC S1.4)


async def test_a_deflate_bomb_inflates_no_further_than_the_limit(
    fake: Fake, tmp_path: Path
) -> None:
    data = config_data(fake.url, "sqlite+aiosqlite:///codexlb.db")
    data["server"]["websocket_compression"] = True
    bomb = deflate_bomb(512 * MIB)
    assert len(bomb) < MIB
    async with running_child(write_toml(tmp_path / "codexlb.toml", data)) as child:
        before = peak_rss(child.process.pid)
        async with raw_connection(child.url) as (reader, writer):
            head = await websocket_handshake(reader, writer, URL(child.url).authority, deflate=True)
            assert b"permessage-deflate" in head
            writer.write(frame_head(len(bomb), compressed=True) + bomb)
            event, code = await refusal(reader)
        grown = peak_rss(child.process.pid) - before
    assert (event["status"], event["error"]["code"]) == (400, "payload_too_large")
    assert code == 1008
    assert grown < 3 * LIMIT, f"peak RSS grew by {grown // MIB} MiB"


# --- Deadlines for heads, bodies and idle connections -------------------------------------


@pytest.fixture
async def strict(fake: Fake, tmp_path: Path) -> AsyncIterator[Balancer]:
    """codexlb with short client deadlines."""
    data = config_data(
        fake.url,
        f"sqlite+aiosqlite:///{tmp_path / 'codexlb.db'}",
        timeouts={
            "client_header_seconds": 0.5,
            "client_body_seconds": 0.5,
            "client_keepalive_seconds": 1.0,
        },
    )
    async with serve(make_config(data, tmp_path)) as balancer:
        yield balancer


async def test_a_half_sent_head_is_closed_after_its_deadline(
    strict: Balancer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "codexlb.edge")
    async with raw_connection(strict.url) as (reader, writer):
        writer.write(b"POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
        assert await closed_by_server(reader, 5) == b""
    assert "no complete request head within 0.5 s" in caplog.text


async def test_a_head_trickled_on_a_kept_alive_connection_is_closed_too(
    strict: Balancer,
) -> None:
    async with raw_connection(strict.url) as (reader, writer):
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert (await reader.readuntil(HEAD_END)).startswith(b"HTTP/1.1 200")
        await reader.readexactly(len(b'{"status": "ok"}'))
        writer.write(b"GET /healthz HTTP/1.1\r\n")
        for _ in range(20):  # a byte every 0.1 s: the idle timer never sees silence
            await asyncio.sleep(0.1)
            if reader.at_eof():
                break
            with contextlib.suppress(OSError):
                writer.write(b"X")
        assert await closed_by_server(reader, 5) == b""


async def test_a_half_sent_body_is_answered_408_and_closed(strict: Balancer) -> None:
    async with raw_connection(strict.url) as (reader, writer):
        writer.write(
            (
                f"POST {CODEX_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Content-Type: application/json\r\n"
                f"Authorization: {auth()['Authorization']}\r\nContent-Length: 1000\r\n\r\n"
                '{"model": "m", '
            ).encode()
        )
        answer = await closed_by_server(reader, 5)
    head, _, body = answer.partition(HEAD_END)
    assert head.startswith(b"HTTP/1.1 408"), answer
    assert json.loads(body)["error"]["code"] == "request_timeout"


async def test_an_idle_kept_alive_connection_is_closed(strict: Balancer) -> None:
    async with raw_connection(strict.url) as (reader, writer):
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = await closed_by_server(reader, 5)
    assert answer.startswith(b"HTTP/1.1 200")


# --- A cap on client connections ----------------------------------------------------------


async def test_connections_over_the_cap_are_refused_and_logged(
    fake: Fake, tmp_path: Path, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "codexlb.edge")
    data = config_data(
        fake.url, f"sqlite+aiosqlite:///{tmp_path / 'codexlb.db'}", limits={"max_connections": 3}
    )
    async with serve(make_config(data, tmp_path)) as lb:
        held = [await asyncio.open_connection("127.0.0.1", URL(lb.url).port) for _ in range(3)]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", URL(lb.url).port)
            answer = await closed_by_server(reader, 5)
            writer.close()
            head, _, body = answer.partition(HEAD_END)
            assert head.startswith(b"HTTP/1.1 503")
            assert b"Retry-After: 1" in head
            assert json.loads(body)["error"]["code"] == "server_busy"
            assert "refused a client connection: 3 are open" in caplog.text
            held.pop()[1].close()

            async def served() -> bool:
                try:
                    async with http.get(lb.url + "/healthz") as response:
                        return response.status == 200
                except aiohttp.ClientError:
                    return False

            async with asyncio.timeout(5):
                while not await served():  # noqa: ASYNC110 (the server's count has no event)
                    await asyncio.sleep(0.05)
        finally:
            for _, w in held:
                w.close()


def test_the_cap_is_lowered_to_what_the_open_file_limit_holds(tmp_path: Path) -> None:
    from codexlb.edge import connection_cap

    config = make_config({"limits": {"max_connections": 10_000}}, tmp_path)
    assert connection_cap(config, fd_limit=1024) == (1024 - 64) // 2
    assert connection_cap(config, fd_limit=1 << 20) == 10_000


async def test_serve_raises_the_open_file_limit(fake: Fake, tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))  # the child inherits it
    try:
        child = await start_child(child_config(tmp_path, fake))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        limits = await asyncio.to_thread(Path(f"/proc/{child.process.pid}/limits").read_text)
    finally:
        assert await child.stop() == 0
    [line] = [row for row in limits.splitlines() if row.startswith("Max open files")]
    child_soft, child_hard = line.split()[3:5]
    assert child_soft == child_hard


# --- Large bodies -------------------------------------------------------------------------


def big_body(size: int) -> bytes:
    head = b'{"model": "gpt-5-codex", "stream": true, "input": "'
    return head + b"x" * (size - len(head) - 2) + b'"}'


async def test_a_64_mib_body_costs_little_more_than_itself(
    fake: Fake, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    fake.text = "short answer"  # not an echo: the output would be as large as the input
    body = big_body(LIMIT - 1024)
    async with running_child(child_config(tmp_path, fake)) as child:
        before = peak_rss(child.process.pid)
        async with http.post(
            child.url + CODEX_PATH,
            data=io.BytesIO(body),
            headers={**auth(), "Content-Type": "application/json"},
        ) as response:
            assert response.status == 200
            await response.read()
        grown = peak_rss(child.process.pid) - before
    assert fake.received[-1].body == json.loads(body)
    # The parsed body and its snapshot's serialization (the database's copies included) cost
    # about four times the body at the commit: 258 MiB here, 323 MiB while the client's bytes
    # stayed alive during the relay.
    assert grown < 4.5 * LIMIT, f"peak RSS grew by {grown // MIB} MiB"


async def test_bodies_over_the_budget_in_flight_are_refused_with_503(
    fake: Fake, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    data = config_data(
        fake.url,
        f"sqlite+aiosqlite:///{tmp_path / 'codexlb.db'}",
        limits={"max_body_bytes_in_flight": LIMIT},
    )
    async with serve(make_config(data, tmp_path)) as lb:
        body = big_body(LIMIT - MIB)
        async with raw_connection(lb.url) as (reader, writer):
            # A body announced and half sent holds its bytes in the budget ...
            writer.write(
                (
                    f"POST {CODEX_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    "Content-Type: application/json\r\n"
                    f"Authorization: {auth()['Authorization']}\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n"
                ).encode()
                + body[: len(body) // 2]
            )
            await eventually(lambda: lb.services.bodies.held >= len(body))
            # ... so another large one does not fit ...
            async with http.post(
                lb.url + CODEX_PATH,
                data=io.BytesIO(big_body(2 * MIB)),
                headers={**auth(), "Content-Type": "application/json"},
            ) as response:
                assert response.status == 503
                assert response.headers["Retry-After"] == "1"
                assert (await response.json())["error"]["code"] == "server_busy"
            # ... over WebSocket neither.
            async with http.ws_connect(
                "ws" + lb.url.removeprefix("http") + CODEX_PATH, headers=auth()
            ) as ws:
                await ws.send_str(
                    json.dumps({"type": "response.create", "model": "m", "input": "x" * (2 * MIB)})
                )
                event = json.loads((await ws.receive(timeout=10)).data)
                assert (event["status"], event["error"]["code"]) == (503, "server_busy")
            # Once the first is complete and answered, the budget is free again.
            writer.write(body[len(body) // 2 :])
            head = await reader.readuntil(HEAD_END)
            assert head.startswith(b"HTTP/1.1 200"), head
        await eventually(lambda: lb.services.bodies.held == 0)
        async with http.post(
            lb.url + CODEX_PATH,
            data=io.BytesIO(big_body(2 * MIB)),
            headers={**auth(), "Content-Type": "application/json"},
        ) as response:
            assert response.status == 200


# --- Database files -------------------------------------------------------------------------


async def test_the_database_and_its_side_files_are_private_from_creation(
    tmp_path: Path,
) -> None:
    database = tmp_path / "codexlb.db"
    previous = os.umask(0o022)
    try:
        engine = create_engine(f"sqlite+aiosqlite:///{database}")
        try:
            await upgrade(engine)
            async with engine.connect() as conn:  # WAL and shared memory exist while open
                await conn.exec_driver_sql("SELECT 1")
                files = [database, Path(f"{database}-wal"), Path(f"{database}-shm")]
                modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in files}
        finally:
            await engine.dispose()
    finally:
        os.umask(previous)
    assert modes == {p.name: 0o600 for p in files}


def test_an_existing_world_readable_database_is_tightened_at_start(tmp_path: Path) -> None:
    database = tmp_path / "codexlb.db"
    database.touch(0o644)
    Path(f"{database}-wal").touch(0o644)
    database.chmod(0o644)
    Path(f"{database}-wal").chmod(0o644)
    create_engine(f"sqlite+aiosqlite:///{database}").sync_engine.dispose()
    assert stat.S_IMODE(database.stat().st_mode) == 0o600
    assert stat.S_IMODE(Path(f"{database}-wal").stat().st_mode) == 0o600
