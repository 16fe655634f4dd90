"""Real servers on loopback for the tests: codexlb itself, in this process or as a child
process, in front of the fake upstream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import ssl
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from codexlb.app import SERVICES, Services, make_runner
from codexlb.config import Config, parse_config
from codexlb.sse import SSEDecoder
from codexlb.testing.fake_upstream import FakeAccount, FakeUpstream

ACCOUNTS = (
    FakeAccount("a", access_token="tok-a", chatgpt_account_id="acct-a"),
    FakeAccount("b", access_token="tok-b", chatgpt_account_id="acct-b"),
    FakeAccount("c", access_token="tok-c", chatgpt_account_id="acct-c"),
)
CLIENT_KEYS = {"alice": "sk-lb-alice-0123456789", "bob": "sk-lb-bob-0123456789"}
ADMIN_KEY = "sk-lb-admin-0123456789"
CODEX_PATH = "/backend-api/codex/responses"

SECRETS = frozenset(
    {*CLIENT_KEYS.values(), ADMIN_KEY, *(a.access_token for a in ACCOUNTS if a.access_token)}
)
"""Configured secrets the whole test run checks its logs for (see tests/conftest.py)."""
CHILD_LOGS: list[list[str]] = []
"""The log lines of every ``codexlb serve`` child process of this run."""


class Fake(FakeUpstream):
    """The fake upstream, remembering the base URL it serves on."""

    url = ""

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self.url = await super().start(host, port)
        return self.url


@asynccontextmanager
async def running_fake(accounts: Sequence[FakeAccount] = ACCOUNTS) -> AsyncIterator[Fake]:
    """The fake upstream serving ``accounts`` on loopback for the block."""
    fake = Fake(accounts)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


def config_data(
    upstream_url: str,
    database_url: str,
    *,
    accounts: Sequence[FakeAccount] = ACCOUNTS,
    keys: Mapping[str, str] = CLIENT_KEYS,
    **sections: Mapping[str, Any],
) -> dict[str, Any]:
    """A configuration (as TOML data) pointing every account at the fake upstream."""
    data: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0},
        "database": {"url": database_url},
        "upstream": {"base_url": f"{upstream_url}/backend-api/codex"},
        "api_keys": [{"name": name, "key": key} for name, key in keys.items()],
        "accounts": [
            {
                "name": a.name,
                "access_token": a.access_token,
                "chatgpt_account_id": a.chatgpt_account_id,
            }
            for a in accounts
        ],
        "routing": {"error_cooldown_seconds": 0.05, "max_error_cooldown_seconds": 0.2},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return data


@dataclass
class Balancer:
    """A codexlb app serving on loopback inside the test's event loop."""

    url: str
    app: web.Application

    @property
    def services(self) -> Services:
        return self.app[SERVICES]


@asynccontextmanager
async def serve(
    config: Config, *, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[Balancer]:
    """codexlb for ``config`` on loopback (with TLS given ``ssl_context``: ``https://``)."""
    runner = make_runner(config, shutdown_timeout=5)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        host, port = runner.addresses[0][:2]
        scheme = "https" if ssl_context is not None else "http"
        yield Balancer(f"{scheme}://{host}:{port}", runner.app)
    finally:
        await runner.cleanup()


def refusing_snapshots(database: Path, refuse: bool = True) -> None:
    """Make a SQLite database refuse every snapshot from now on, as a full disk would (or,
    with ``refuse`` False, take them again). Blocking: run it off the event loop."""
    with contextlib.closing(sqlite3.connect(database)) as connection:
        if refuse:
            connection.execute(
                "CREATE TRIGGER refuse BEFORE INSERT ON snapshots "
                "BEGIN SELECT RAISE(ABORT, 'disk full, say'); END"
            )
        else:
            connection.execute("DROP TRIGGER refuse")
        connection.commit()


async def refuse_snapshots(database: Path, refuse: bool = True) -> None:
    """`refusing_snapshots`, off the event loop."""
    await asyncio.to_thread(refusing_snapshots, database, refuse)


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:  # noqa: ASYNC109
    """Poll ``check`` until it holds: state in another process (or behind a server) has no
    event to await."""
    async with asyncio.timeout(timeout):
        while not check():  # noqa: ASYNC110 (nothing to await: the state is elsewhere)
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def locked_database(database: Path) -> AsyncIterator[None]:
    """Hold a SQLite database's write lock, as another process's long write would: codexlb's
    snapshot commits wait (on their busy timeout) until the block ends."""
    connection = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
    try:
        await asyncio.to_thread(connection.execute, "BEGIN IMMEDIATE")
        try:
            yield
        finally:
            await asyncio.to_thread(connection.execute, "ROLLBACK")
    finally:
        connection.close()


def make_config(data: Mapping[str, Any], tmp_path: Path) -> Config:
    return parse_config(data, source=tmp_path / "codexlb.toml")


def auth(client: str = "alice") -> dict[str, str]:
    return {"Authorization": f"Bearer {CLIENT_KEYS[client]}"}


def without_ids_and_reasoning(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Output items as another account gets them replayed (SPEC S3.2)."""
    return [
        {k: v for k, v in item.items() if k != "id"}
        for item in items
        if item.get("type") != "reasoning"
    ]


def user_message(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


@dataclass
class StreamResult:
    status: int
    events: list[dict[str, Any]]
    headers: Mapping[str, str]

    @property
    def types(self) -> list[str]:
        return [str(e.get("type")) for e in self.events]

    @property
    def completed(self) -> dict[str, Any]:
        for event in self.events:
            if event.get("type") == "response.completed":
                response: dict[str, Any] = event["response"]
                return response
        raise AssertionError(f"no response.completed in {self.types}")

    @property
    def response_id(self) -> str:
        return str(self.completed["id"])

    @property
    def output_items(self) -> list[dict[str, Any]]:
        return [e["item"] for e in self.events if e.get("type") == "response.output_item.done"]


async def stream_turn(
    session: aiohttp.ClientSession,
    url: str,
    body: Mapping[str, Any],
    *,
    client: str = "alice",
    headers: Mapping[str, str] | None = None,
) -> StreamResult:
    """POST one streaming turn and read its events up to ``response.completed``, as Codex does."""
    payload = {"model": "gpt-5-codex", "stream": True, **body}
    async with session.post(
        url + CODEX_PATH, json=payload, headers={**auth(client), **(headers or {})}
    ) as response:
        if response.status != 200:
            return StreamResult(response.status, [await response.json()], response.headers)
        decoder = SSEDecoder()
        events: list[dict[str, Any]] = []
        async for chunk in response.content.iter_any():
            for _, kind, data in decoder.feed(chunk):
                events.append(json.loads(data))
                if kind in ("response.completed", "response.failed"):
                    return StreamResult(200, events, response.headers)
        return StreamResult(200, events, response.headers)


TERMINAL = frozenset({"response.completed", "response.failed", "response.incomplete", "error"})


def ws_url(base: str) -> str:
    return "ws" + base.removeprefix("http") + CODEX_PATH


async def ws_turn(
    ws: aiohttp.ClientWebSocketResponse, body: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """Send one ``response.create`` and read its events up to the terminal one."""
    await ws.send_str(json.dumps({"type": "response.create", "model": "gpt-5-codex", **body}))
    return await ws_events(ws)


async def ws_events(ws: aiohttp.ClientWebSocketResponse) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for _ in range(10_000):
        message = await ws.receive(timeout=10)
        assert message.type == aiohttp.WSMsgType.TEXT, message
        event: dict[str, Any] = json.loads(message.data)
        events.append(event)
        if event.get("type") in TERMINAL:
            return events
    raise AssertionError("no terminal event")


def completed_id(events: Sequence[Mapping[str, Any]]) -> str:
    assert events[-1]["type"] == "response.completed", events[-1]
    return str(events[-1]["response"]["id"])


def output_items(events: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [e["item"] for e in events if e.get("type") == "response.output_item.done"]


@dataclass
class ChildServer:
    """``codexlb serve`` as a child process; its log lines are kept in ``log``."""

    process: asyncio.subprocess.Process
    url: str
    log: list[str]
    reader: asyncio.Task[None]

    def signal(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    async def wait(self) -> int:
        async with asyncio.timeout(15):
            code = await self.process.wait()
        await self.reader
        return code

    async def stop(self) -> int:
        """SIGTERM, or SIGKILL when it is already beyond that; returns the exit code."""
        if self.process.returncode is None:
            self.signal(signal.SIGTERM)
        try:
            return await self.wait()
        except TimeoutError:
            self.process.kill()
            return await self.wait()


async def start_child(config_file: Path) -> ChildServer:
    """Run ``codexlb serve`` and wait until it logs its address (port 0 = any free port)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "codexlb",
        "serve",
        "--config",
        str(config_file),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stderr is not None
    log: list[str] = []
    CHILD_LOGS.append(log)
    listening: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    reader = asyncio.create_task(_read_log(process.stderr, log, listening))
    try:
        url = await asyncio.wait_for(asyncio.shield(listening), 20)
    except (TimeoutError, EOFError):
        if process.returncode is None:
            process.kill()
        await process.wait()
        await reader
        raise AssertionError("codexlb did not start:\n" + "".join(log)) from None
    return ChildServer(process, url, log, reader)


async def _read_log(
    stream: asyncio.StreamReader, log: list[str], listening: asyncio.Future[str]
) -> None:
    while line := (await stream.readline()).decode():
        log.append(line)
        match = re.search(r"listening on (https?://[\d.]+:\d+)", line)
        if match and not listening.done():
            listening.set_result(match.group(1))
    if not listening.done():
        listening.set_exception(EOFError("codexlb exited"))


@asynccontextmanager
async def running_child(config_file: Path) -> AsyncIterator[ChildServer]:
    """``codexlb serve`` for the block; it must drain and exit 0 on SIGTERM afterwards."""
    server = await start_child(config_file)
    try:
        yield server
    finally:
        assert await server.stop() == 0


def child_config(directory: Path, fake: Fake) -> Path:
    """``directory/codexlb.toml`` for a child server: the fake's accounts, SQLite beside it."""
    return write_toml(
        directory / "codexlb.toml", config_data(fake.url, "sqlite+aiosqlite:///codexlb.db")
    )


def write_toml(path: Path, data: Mapping[str, Any]) -> Path:
    """Write ``data`` as TOML (the subset the configuration uses)."""
    lines: list[str] = []
    for section, values in data.items():
        if isinstance(values, list):
            for entry in values:
                lines.append(f"[[{section}]]")
                lines.extend(f"{k} = {json.dumps(v)}" for k, v in entry.items() if v is not None)
        else:
            lines.append(f"[{section}]")
            lines.extend(f"{k} = {json.dumps(v)}" for k, v in values.items())
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now: for a server that must come back on the same
    address after a restart (write it into ``[server] port``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


async def logged(
    server: ChildServer,
    pattern: str,
    *,
    after: int = 0,
    timeout: float = 10.0,  # noqa: ASYNC109 (a bound by default; tests pass their own)
) -> str:
    """The first of ``server``'s log lines past the first ``after`` that matches the regular
    expression ``pattern``, once one does; AssertionError with the log after ``timeout``."""
    compiled = re.compile(pattern)

    def found() -> str | None:
        return next((line for line in server.log[after:] if compiled.search(line)), None)

    try:
        await eventually(lambda: found() is not None, timeout)
    except TimeoutError:
        tail = "".join(server.log[after:][-40:])
        raise AssertionError(f"no log line matching {pattern!r}:\n{tail}") from None
    line = found()
    assert line is not None
    return line
