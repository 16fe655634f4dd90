"""End to end with the real Codex CLI kept running: ``codex app-server`` holds its WebSocket to
codexlb open between turns, codexlb is stopped with SIGTERM while that socket is idle, and the
conversation carries on once codexlb is back.

codexlb closes an idle client socket at once with 1001 (going away) when it shuts down, so an
open Codex must not hold the shutdown up; Codex must then reconnect by itself for its next
turn. The app-server speaks JSON-RPC over stdio, one JSON object a line, without a ``jsonrpc``
member (Codex 0.169.0; methods and params checked against ``codex app-server
generate-json-schema``): the client sends ``initialize`` then the ``initialized`` notification,
``account/login/start`` with the client key (the app-server does not read ``CODEX_API_KEY``,
which only ``codex exec`` honours), ``thread/start`` and ``turn/start``, and reads
``item/completed`` and ``turn/completed`` notifications. codexlb is a child process on a
fixed loopback port, in front of the fake upstream whose `codex_responder` makes every turn one
shell call (``echo hello``) and a final message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from codexlb.testing.codex_model import codex_responder
from tests import codex_cli
from tests.codex_cli import FINAL_MESSAGE, PROMPT, response_requests, summary
from tests.harness import (
    CLIENT_KEYS,
    ChildServer,
    Fake,
    config_data,
    free_port,
    start_child,
    write_toml,
)

pytestmark = pytest.mark.codex

log = logging.getLogger(__name__)

CASE_TIMEOUT = 120
REQUEST_TIMEOUT = 30.0
"""Seconds for an answer to one JSON-RPC request (starting a thread reads the config, etc.)."""
TURN_TIMEOUT = 30.0
"""Seconds for one turn to complete; an undisturbed one takes about one."""
SHUTDOWN_BOUND = 5.0
"""Seconds from SIGTERM to codexlb's exit with Codex's idle WebSocket open."""
EXIT_TIMEOUT = 10.0
"""Seconds for the app-server to exit once its stdin closes, before it is killed."""
LINE_LIMIT = 1 << 24
"""The longest JSON-RPC line read from the app-server (a thread's answer can be long)."""


class JsonRpcError(Exception):
    """The app-server answered a request with an error."""


@dataclass
class AppServer:
    """A running ``codex app-server``: requests, and the notifications it sent so far."""

    process: asyncio.subprocess.Process
    notifications: list[dict[str, Any]] = field(default_factory=list)
    server_requests: list[dict[str, Any]] = field(default_factory=list)
    """Requests the app-server made of the client (approvals...): answered with an error."""
    stderr: list[str] = field(default_factory=list)
    _pending: dict[int, asyncio.Future[Any]] = field(default_factory=dict)
    _next_id: int = 0
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)
    _readers: list[asyncio.Task[None]] = field(default_factory=list)

    def start_reading(self) -> None:
        assert self.process.stdout is not None
        assert self.process.stderr is not None
        self._readers = [
            asyncio.create_task(self._read_stdout(self.process.stdout)),
            asyncio.create_task(self._read_stderr(self.process.stderr)),
        ]

    async def _send(self, message: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(message).encode() + b"\n")
        await self.process.stdin.drain()

    async def request(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        timeout: float = REQUEST_TIMEOUT,  # noqa: ASYNC109 (a bound by default)
    ) -> Any:
        """Send a request and return its ``result``; JsonRpcError for an ``error``."""
        self._next_id += 1
        request_id = self._next_id
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = answer
        message: dict[str, Any] = {"id": request_id, "method": method}
        if params is not None:
            message["params"] = params
        await self._send(message)
        try:
            async with asyncio.timeout(timeout):
                return await answer
        except TimeoutError:
            raise AssertionError(
                f"no answer to {method} in {timeout:g} s\n{self.describe()}"
            ) from None
        finally:
            self._pending.pop(request_id, None)

    async def notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        message: dict[str, Any] = {"method": method}
        if params is not None:
            message["params"] = params
        await self._send(message)

    async def notification(
        self,
        matches: Callable[[dict[str, Any]], bool],
        *,
        after: int = 0,
        timeout: float = TURN_TIMEOUT,  # noqa: ASYNC109 (a bound by default)
        what: str = "notification",
    ) -> dict[str, Any]:
        """The first notification past the first ``after`` that ``matches``, once one came."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    for note in self.notifications[after:]:
                        if matches(note):
                            return note
                    if self.process.returncode is not None:
                        raise AssertionError(f"the app-server exited\n{self.describe()}")
                    self._arrived.clear()
                    await self._arrived.wait()
        except TimeoutError:
            raise AssertionError(f"no {what} in {timeout:g} s\n{self.describe()}") from None

    async def _read_stdout(self, stream: asyncio.StreamReader) -> None:
        try:
            while line := await stream.readline():
                try:
                    message = json.loads(line)
                except ValueError:
                    self.stderr.append(f"(stdout, not JSON) {line.decode(errors='replace')}")
                    continue
                if not isinstance(message, dict):
                    continue
                if "method" in message and "id" in message:
                    self.server_requests.append(message)
                    refusal = {"code": -32601, "message": "not handled by this test"}
                    with contextlib.suppress(ConnectionError):
                        await self._send({"id": message["id"], "error": refusal})
                elif "method" in message:
                    self.notifications.append(message)
                else:
                    answer = self._pending.get(message.get("id", -1))
                    if answer is not None and not answer.done():
                        if "error" in message:
                            answer.set_exception(JsonRpcError(json.dumps(message["error"])))
                        else:
                            answer.set_result(message.get("result"))
                self._arrived.set()
        finally:
            for answer in self._pending.values():
                if not answer.done():
                    answer.set_exception(
                        AssertionError(f"the app-server closed its stdout\n{self.describe()}")
                    )
            self._arrived.set()

    async def _read_stderr(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.stderr.append(line.decode(errors="replace"))

    def methods(self, after: int = 0) -> list[str]:
        return [str(note.get("method")) for note in self.notifications[after:]]

    def describe(self) -> str:
        """What the app-server sent, for assertion messages: the methods of its
        notifications, its errors and requests in full, and the end of its stderr."""
        errors = [
            json.dumps(note)
            for note in self.notifications
            if note.get("method") in ("error", "warning", "configWarning")
        ]
        return "\n".join(
            [
                f"--- app-server (exit {self.process.returncode}) notifications:",
                " ".join(self.methods()),
                "--- its errors and warnings:",
                *errors,
                "--- its requests to the client:",
                *map(json.dumps, self.server_requests),
                "--- its stderr (end):",
                *(line.rstrip() for line in self.stderr[-30:]),
            ]
        )

    async def close(self) -> None:
        """Close its stdin and wait for it to exit; past `EXIT_TIMEOUT`, kill its group."""
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            async with asyncio.timeout(EXIT_TIMEOUT):
                await self.process.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            await self.process.wait()
        # Its pipes may be held by a command it started: kill the group, then stop reading.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)


@asynccontextmanager
async def app_server(codex: Path, *, home: Path, api_key: str | None) -> AsyncIterator[AppServer]:
    """``codex app-server`` on stdio, initialized, for the block.

    Its environment is that of `codex_cli.run_codex`: ``CODEX_HOME``, ``CODEX_API_KEY``, no
    other Codex or OpenAI settings, and a fresh empty ``HOME`` (removed afterwards) so that the
    login shell running the model's commands reads no profile. It logs in with ``api_key``
    (saved in ``CODEX_HOME``), which Codex then sends as the bearer token; without one it uses
    the ChatGPT login ``home`` holds. In its own process group, killed at the end with whatever
    it started.
    """
    with codex_cli.codex_environment(home, api_key) as (env, user_home):
        process = await asyncio.create_subprocess_exec(
            str(codex),
            "app-server",
            cwd=user_home,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            start_new_session=True,
            limit=LINE_LIMIT,
        )
        server = AppServer(process)
        server.start_reading()
        try:
            await server.request(
                "initialize",
                {"clientInfo": {"name": "codexlb-tests", "version": "0"}},
            )
            await server.notify("initialized")
            if api_key is not None:
                # The app-server does not read CODEX_API_KEY (only ``codex exec`` does):
                # without this login it sends no Authorization header at all.
                answer = await server.request(
                    "account/login/start", {"type": "apiKey", "apiKey": api_key}
                )
                assert answer == {"type": "apiKey"}, answer
            yield server
        finally:
            await server.close()


@dataclass
class TurnResult:
    """One turn's ``turn/completed`` notification and the items completed on the way."""

    turn: dict[str, Any]
    items: list[dict[str, Any]]
    errors: list[dict[str, Any]]
    """Its ``error`` notifications (a retry Codex announces has ``willRetry``)."""
    seconds: float

    def of_type(self, item_type: str) -> list[dict[str, Any]]:
        return [item for item in self.items if item.get("type") == item_type]


async def run_turn(server: AppServer, thread_id: str, prompt: str = PROMPT) -> TurnResult:
    """Start a turn on the thread and wait for its ``turn/completed``."""
    seen, began = len(server.notifications), time.monotonic()
    started = await server.request(
        "turn/start", {"threadId": thread_id, "input": [{"type": "text", "text": prompt}]}
    )
    turn_id = started["turn"]["id"]
    done = await server.notification(
        lambda note: (
            note.get("method") == "turn/completed" and note["params"]["turn"]["id"] == turn_id
        ),
        after=seen,
        what=f"turn/completed for turn {turn_id}",
    )
    items = [
        note["params"]["item"]
        for note in server.notifications[seen:]
        if note.get("method") == "item/completed" and note["params"].get("turnId") == turn_id
    ]
    errors = [
        note["params"]
        for note in server.notifications[seen:]
        if note.get("method") == "error" and note["params"].get("turnId") == turn_id
    ]
    return TurnResult(done["params"]["turn"], items, errors, time.monotonic() - began)


def assert_ran_echo_hello(result: TurnResult, server: AppServer) -> None:
    """The turn completed after running ``echo hello`` once (exit 0, output ``hello``), with
    the final message quoting it, and without a retry on the way."""
    context = f"turn: {json.dumps(result.turn)}\n{server.describe()}"
    assert result.turn["status"] == "completed", context
    assert result.errors == [], context
    commands = result.of_type("commandExecution")
    assert len(commands) == 1, context
    assert "echo hello" in commands[0]["command"], context
    assert commands[0]["status"] == "completed", context
    assert commands[0]["exitCode"] == 0, context
    assert (commands[0]["aggregatedOutput"] or "").strip() == "hello", context
    assert [item["text"] for item in result.of_type("agentMessage")] == [FINAL_MESSAGE], context
    assert server.server_requests == [], context


async def open_client_websockets(url: str) -> float:
    """codexlb's ``codexlb_open_websockets{side="client"}`` gauge, from ``/metrics`` (0 while
    no client socket has opened yet: the gauge appears with the first one)."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
        http.get(f"{url}/metrics") as response,
    ):
        text = await response.text()
    match = re.search(r'^codexlb_open_websockets\{side="client"\} (\S+)$', text, re.MULTILINE)
    if match is None:
        assert "codexlb_open_websockets" in text, text
        return 0.0
    return float(match.group(1))


@pytest.mark.timeout(CASE_TIMEOUT, func_only=True)
async def test_sigterm_with_codex_idle_on_its_websocket(
    codex: Path, fake: Fake, tmp_path: Path
) -> None:
    fake.responder = codex_responder
    port = free_port()
    data = config_data(fake.url, f"sqlite+aiosqlite:///{tmp_path / 'codexlb.db'}")
    data["server"]["port"] = port
    config_file = write_toml(tmp_path / "codexlb.toml", data)
    url = f"http://127.0.0.1:{port}"
    home, workdir = codex_cli.prepare(tmp_path, url, websockets=True)
    servers: list[ChildServer] = []

    async def start() -> ChildServer:
        server = await start_child(config_file)
        servers.append(server)
        assert server.url == url, server.log
        return server

    first = await start()
    try:
        async with app_server(codex, home=home, api_key=CLIENT_KEYS["alice"]) as codex_app:
            started = await codex_app.request(
                "thread/start",
                {"cwd": str(workdir), "approvalPolicy": "never", "sandbox": "danger-full-access"},
            )
            thread_id = started["thread"]["id"]

            # 1. One turn through codexlb, over WebSocket.
            turn1 = await run_turn(codex_app, thread_id)
            assert_ran_echo_hello(turn1, codex_app)
            before = response_requests(fake.received)
            assert {request.transport for request in before} == {"ws"}, summary(before)

            # 2. Codex keeps its socket open, idle: SIGTERM must not wait for it.
            assert await open_client_websockets(url) == 1, "".join(first.log)
            seen = len(codex_app.notifications)
            shutdown_seconds = await sigterm_and_wait(first)
            stopped = [line for line in first.log if "codexlb stopped" in line]
            assert stopped, "".join(first.log)
            assert codex_app.process.returncode is None, codex_app.describe()

            # 3. Back on the same port: the next turn of the same thread goes through, Codex
            # reconnecting by itself, without an error or a retry.
            second = await start()
            received = len(fake.received)
            idle_before = await open_client_websockets(url)
            gap = codex_app.methods(seen)  # while codexlb was down, and since it is back
            turn2 = await run_turn(codex_app, thread_id)
            assert_ran_echo_hello(turn2, codex_app)
            assert await open_client_websockets(url) == 1, "".join(second.log)
            assert "error" not in codex_app.methods(seen), codex_app.describe()
            after = response_requests(fake.received[received:])
            assert {request.transport for request in after} == {"ws"}, summary(after)
            asked = [
                request
                for request in after
                if request.body.get("generate") is not False
                and PROMPT in json.dumps(request.body.get("input"))
            ]
            assert asked, summary(after)
            log.info(
                "codexlb exited %.2f s after SIGTERM (%s); turn 1 took %.2f s, turn 2 %.2f s "
                "after the restart (%g client WebSockets open before it); between the turns "
                "the app-server sent %s; the upstream got for turn 2: %s",
                shutdown_seconds,
                stopped[-1].strip(),
                turn1.seconds,
                turn2.seconds,
                idle_before,
                gap,
                summary(after),
            )
        # Codex is gone: codexlb drains and exits as usual.
        assert await second.stop() == 0, "".join(second.log)
    finally:
        for server in servers:
            if server.process.returncode is None:
                await server.stop()


async def sigterm_and_wait(server: ChildServer) -> float:
    """SIGTERM ``server`` and wait up to `SHUTDOWN_BOUND` seconds for it to exit 0; returns
    the seconds from the signal to its exit."""
    signalled = time.monotonic()
    server.signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(SHUTDOWN_BOUND):
            code = await server.process.wait()
    except TimeoutError:
        raise AssertionError(
            f"codexlb still running {SHUTDOWN_BOUND:g} s after SIGTERM with Codex's idle "
            f"WebSocket open:\n{''.join(server.log)}"
        ) from None
    seconds = time.monotonic() - signalled
    await server.wait()  # its log, to the end
    assert code == 0, "".join(server.log)
    return seconds
