"""Every fenced block of README.md is exercised, so that the operator documentation stays true.

    ```toml     with ``model_providers``: a Codex CLI config; it must point at codexlb's
                ``/backend-api/codex`` and name the provider tests/codex_cli.py gives Codex.
                Anything else: a codexlb config or fragment, valid on its own (``parse_config``).
    ```python   run for real with the OpenAI SDK, against codexlb in front of the fake upstream.
    ```sh       every line a command, exercised as `COMMANDS` says, in a `Workspace`.

A block of another kind, or a command no row of `COMMANDS` matches, fails the test: a new
snippet cannot slip in unchecked.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import inspect
import json
import os
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import sys
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import openai
import pytest
from openai.types.responses import Response

from codexlb.config import ServerConfig, load_config, parse_config
from codexlb.credentials import AUTH_CLAIM, codex_timestamp, load_credentials
from tests import codex_cli, local_tls, test_codex_surface_cli
from tests.harness import (
    ACCOUNTS,
    ADMIN_KEY,
    CLIENT_KEYS,
    CODEX_PATH,
    Balancer,
    ChildServer,
    Fake,
    start_child,
    stream_turn,
    user_message,
    write_toml,
)

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
CI_SCRIPT = REPO / ".ci" / "run"
EXAMPLE = REPO / "config.example.toml"

KINDS = ("sh", "toml", "python")
README_ADDRESS = f"{ServerConfig().host}:{ServerConfig().port}"
"""Where the README's clients find codexlb: the default listen address."""
KEY_VARIABLE = "CODEXLB_KEY"
ADMIN_VARIABLE = "CODEXLB_ADMIN_KEY"
"""The environment variable holding a client key, in the README's commands and snippets."""
COMMAND_TIMEOUT = 60.0
SNIPPET_TIMEOUT = 30.0


# --- The README's fenced blocks ------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    kind: str
    text: str
    line: int
    """The line of the opening fence (1-based)."""
    section: str
    """The ``## `` heading the block sits under."""

    @property
    def id(self) -> str:
        return f"L{self.line}-{re.sub(r'[^a-z]+', '-', self.section.lower()).strip('-')}"

    @property
    def lines(self) -> list[str]:
        return [line for line in self.text.splitlines() if line.strip()]


def fenced_blocks(markdown: str) -> list[Block]:
    blocks: list[Block] = []
    section = ""
    opened: tuple[str, int] | None = None
    body: list[str] = []
    for number, line in enumerate(markdown.splitlines(), start=1):
        if opened is None:
            if line.startswith("## "):
                section = line[3:].strip()
            elif line.startswith("```"):
                opened, body = (line[3:].strip(), number), []
        elif line.strip() == "```":
            blocks.append(Block(opened[0], "\n".join(body) + "\n", opened[1], section))
            opened = None
        else:
            body.append(line)
    assert opened is None, f"README.md:{opened[1]}: fenced block never closed"
    return blocks


BLOCKS = fenced_blocks(README.read_text())


def blocks_of(kind: str) -> list[Any]:
    return [pytest.param(block, id=block.id) for block in BLOCKS if block.kind == kind]


def test_every_block_is_of_a_known_kind() -> None:
    unknown = [f"README.md:{b.line}: ```{b.kind}" for b in BLOCKS if b.kind not in KINDS]
    assert not unknown, f"blocks of no known kind ({', '.join(KINDS)}): {unknown}"
    assert {block.kind for block in BLOCKS} == set(KINDS)


# --- ```toml ---------------------------------------------------------------------------------


@pytest.mark.parametrize("block", blocks_of("toml"))
def test_toml_block(block: Block, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    data = tomllib.loads(block.text)
    assert data, "an empty block"
    if "model_providers" in data:
        check_codex_config(data, tmp_path)
        return
    for name in env_references(data):
        monkeypatch.setenv(name, f"readme-value-of-{name.lower()}")
    parse_config(data, source=tmp_path / "codexlb.toml")


def check_codex_config(data: Mapping[str, Any], tmp_path: Path) -> None:
    """A Codex config: its provider reaches codexlb's Codex path over the Responses API, with
    the fields tests/codex_cli.py gives the real Codex CLI in tests/test_codex_cli.py."""
    provider = data["model_providers"][data["model_provider"]]
    url = urlsplit(provider["base_url"])
    assert url.scheme in ("http", "https")  # https: codexlb with [server] tls_cert
    assert url.netloc == README_ADDRESS
    if "chatgpt_base_url" in data:  # Codex logged in with ChatGPT: its account calls too
        assert data["chatgpt_base_url"] == f"{url.scheme}://{url.netloc}/backend-api/"
    assert url.path + "/responses" == CODEX_PATH
    assert provider["wire_api"] == "responses"
    home = codex_cli.write_codex_home(
        tmp_path / "codex-home",
        f"{url.scheme}://{url.netloc}",
        websockets=provider["supports_websockets"],
    )
    tested = tomllib.loads((home / "config.toml").read_text())
    assert provider == tested["model_providers"][tested["model_provider"]]


def env_references(value: Any) -> set[str]:
    """The ``NAME`` of every ``"env:NAME"`` string in parsed TOML."""
    if isinstance(value, str):
        return {value[4:]} if value.startswith("env:") else set()
    if isinstance(value, Mapping):
        return set().union(*(env_references(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(env_references(v) for v in value))
    return set()


# --- ```python ---------------------------------------------------------------------------


@pytest.mark.parametrize("block", blocks_of("python"))
async def test_python_block(
    block: Block,
    lb: Balancer,
    fake: Fake,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The SDK snippet, run in a thread (the SDK is synchronous) so that this event loop
    keeps serving codexlb and the fake upstream."""
    readme_url = f"http://{README_ADDRESS}"
    assert readme_url in block.text
    assert f'os.environ["{KEY_VARIABLE}"]' in block.text
    monkeypatch.setenv(KEY_VARIABLE, CLIENT_KEYS["alice"])
    code = compile(block.text.replace(readme_url, lb.url), f"README.md:{block.line}", "exec")
    namespace: dict[str, Any] = {"__name__": "readme"}
    try:
        await asyncio.wait_for(asyncio.to_thread(exec, code, namespace), SNIPPET_TIMEOUT)
    finally:
        for value in namespace.values():
            if isinstance(value, openai.OpenAI):
                value.close()

    printed = capsys.readouterr().out.splitlines()
    assert printed
    assert all(line.startswith("echo: ") for line in printed), printed  # the fake's answers
    responses = [value for value in namespace.values() if isinstance(value, Response)]
    assert responses
    for response in responses:
        assert await lb.services.store.get("alice", response.id) is not None
        if response.previous_response_id is not None:
            # A continuation (the snippet's last request) reaches the upstream replayed.
            sent = fake.received[-1].body
            assert "previous_response_id" not in sent
            assert len(sent["input"]) > 1


# --- ```sh: the workspace the commands run in -------------------------------------------------


@dataclass
class Workspace:
    """A directory like an operator's: ``codexlb.toml`` (config.example.toml on a free port,
    its account and a client key served by the fake upstream), a copy of config.example.toml
    on port 0, and a home whose ``.codex/auth.json`` is what ``codex login`` writes (a login
    to another account of the fake). Commands run here as child processes."""

    root: Path
    env: dict[str, str]
    server: ChildServer | None = None
    config_name: str = "codexlb.toml"

    @property
    def home(self) -> Path:
        return Path(self.env["HOME"])

    @property
    def auth_file(self) -> Path:
        return self.home / ".codex" / "auth.json"

    async def running_server(self, config_name: str = "codexlb.toml") -> ChildServer:
        """``codexlb serve --config <config_name>``, started on first use."""
        if self.server is None:
            self.server = await start_child(self.root / config_name)
            self.config_name = config_name
        assert self.config_name == config_name, "one server per workspace"
        return self.server

    def expand(self, word: str) -> str:
        """``~`` and ``$NAME`` as a shell would expand them here."""
        if word == "~" or word.startswith("~/"):
            word = str(self.home) + word[1:]

        def variable(match: re.Match[str]) -> str:
            name = match.group(1) or match.group(2)
            assert name in self.env, f"the README uses ${name}, which this test does not set"
            return self.env[name]

        return re.sub(r"\$\{(\w+)\}|\$(\w+)", variable, word)

    async def run(
        self, argv: list[str], *, stdin: str | None = None, cwd: Path | None = None
    ) -> Finished:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=cwd or self.root,
            env=self.env,
            start_new_session=True,  # no terminal: hash-key's prompt reads stdin
        )
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT):
                stdout, stderr = await process.communicate((stdin or "").encode())
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        assert process.returncode is not None
        return Finished(process.returncode, stdout.decode(), stderr.decode())


@dataclass(frozen=True)
class Finished:
    returncode: int
    stdout: str
    stderr: str

    def ok(self) -> Finished:
        assert self.returncode == 0, f"exit {self.returncode}\n{self.stdout}\n{self.stderr}"
        return self


@pytest.fixture
async def workspace(
    fake: Fake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Workspace]:
    key = CLIENT_KEYS["alice"]
    monkeypatch.setenv(KEY_VARIABLE, key)  # for the server child too, whose config says env:
    root, home = tmp_path / "ops", tmp_path / "home"
    root.mkdir()
    data = tomllib.loads(EXAMPLE.read_text())
    data["server"]["port"] = free_port()
    data["upstream"]["base_url"] = f"{fake.url}/backend-api/codex"
    [account] = data["accounts"]
    account.update(access_token=ACCOUNTS[0].access_token, chatgpt_account_id="acct-a")
    data["api_keys"] = [{"name": "alice", "key": f"env:{KEY_VARIABLE}"}]
    monkeypatch.setenv(ADMIN_VARIABLE, ADMIN_KEY)
    data["admin"] = {"key": f"env:{ADMIN_VARIABLE}"}
    write_toml(root / "codexlb.toml", data)
    example = EXAMPLE.read_text()
    assert "\nport = 2455\n" in example
    (root / EXAMPLE.name).write_text(example.replace("\nport = 2455\n", "\nport = 0\n", 1))
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        KEY_VARIABLE: key,
        ADMIN_VARIABLE: ADMIN_KEY,
        "PYTHONUNBUFFERED": "1",
    }
    ws = Workspace(root, env)
    write_codex_login(ws.auth_file, access_token="tok-b", account_id="acct-b")
    try:
        yield ws
    finally:
        if ws.server is not None:
            assert await ws.server.stop() == 0


def write_codex_login(path: Path, *, access_token: str, account_id: str) -> None:
    """The ``auth.json`` ``codex login`` writes (PROTOCOL.md §6), for one of the fake's
    accounts: its id token is an unsigned JWT naming the e-mail and the account."""
    claims = {
        "email": "laptop-user@example.com",
        "exp": int(time.time()) + 3600,
        AUTH_CLAIM: {"chatgpt_account_id": account_id},
    }
    id_token = (
        ".".join(
            base64.urlsafe_b64encode(json.dumps(part).encode()).decode().rstrip("=")
            for part in ({"alg": "none"}, claims)
        )
        + ".sig"
    )
    login = {
        "auth_mode": "chatgpt",
        "OPENAI_API_KEY": None,
        "tokens": {
            "id_token": id_token,
            "access_token": access_token,
            "refresh_token": "rt-laptop",
            "account_id": account_id,
        },
        "last_refresh": codex_timestamp(datetime.now(UTC)),
    }
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(login, indent=2))


def free_port() -> int:
    """A port free on loopback now (``codexlb status --config`` needs a real port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# --- ```sh: one line, one or more commands ----------------------------------------------------


@dataclass(frozen=True)
class Command:
    line: str
    """The README line it comes from."""
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    """Leading ``NAME=value`` assignments."""
    append_to: str | None = None
    """The file of a trailing ``>> FILE``."""

    @property
    def text(self) -> str:
        """The command with ``.venv/bin/`` dropped from ``codexlb`` and ``python``: the name
        the `COMMANDS` patterns match."""
        program = re.sub(r"^\.venv/bin/(codexlb|python3?)$", r"\1", self.argv[0])
        return " ".join([program, *self.argv[1:]])

    def option(self, name: str) -> str:
        assert name in self.argv[:-1], f"{self.line!r} gives no {name}"
        return self.argv[self.argv.index(name) + 1]

    @property
    def operands(self) -> list[str]:
        """The arguments of a ``codexlb`` command that are neither options nor their values:
        ``["db", "backup", "backup.db"]``."""
        operands: list[str] = []
        words = iter(self.argv[1:])
        for word in words:
            if not word.startswith("-"):
                operands.append(word)
            elif word not in FLAGS:
                next(words, None)  # the option's value
        return operands


FLAGS = frozenset({"--json"})
"""The ``codexlb`` options that take no value."""


def parse_line(line: str) -> Iterator[Command]:
    words = shlex.split(line, comments=True)
    while words:
        part = words[: words.index("&&")] if "&&" in words else words
        words = words[len(part) + 1 :]
        env: dict[str, str] = {}
        while part and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", part[0]):
            name, _, value = part.pop(0).partition("=")
            env[name] = value
        append_to = None
        if len(part) > 2 and part[-2] == ">>":
            append_to, part = part[-1], part[:-2]
        assert part, line
        assert not {">", ">>", "<", "|", ";"} & set(part), f"shell syntax left in {line!r}"
        yield Command(line, part, env, append_to)


@pytest.mark.parametrize("block", blocks_of("sh"))
async def test_sh_block(block: Block, workspace: Workspace) -> None:
    assert block.lines
    for line in block.lines:
        for command in parse_line(line):
            await runner_for(command)(workspace, command)


Runner = Callable[[Workspace, Command], Awaitable[None]]


def runner_for(command: Command) -> Runner:
    for pattern, runner in COMMANDS:
        if re.fullmatch(pattern, command.text):
            return runner
    pytest.fail(f"unchecked README command: {command.line}")


# --- ```sh: how each kind of command is exercised ---------------------------------------------


def ci_commands() -> list[list[str]]:
    """The commands of .ci/run that run Python and the project's tools, in order."""
    lines = [line.strip() for line in CI_SCRIPT.read_text().splitlines()]
    return [shlex.split(line) for line in lines if line.startswith(("python3 ", ".venv/bin/"))]


async def fresh_setup(ws: Workspace, command: Command) -> None:
    """Not run (this test runs in its result): the venv and the editable install of this
    project, as .ci/run makes them."""
    ci = ci_commands()
    if command.argv[:2] == ["python3", "-m"]:
        assert command.argv in ci
        return
    editable = command.option("-e")
    assert editable in (".", ".[dev]")
    ci_installs = [c for c in ci if c[:2] == [".venv/bin/pip", "install"]]
    assert [c[c.index("-e") + 1] for c in ci_installs] == [".[dev]"]


async def suite(ws: Workspace, command: Command) -> None:
    """Not run (this test is part of it): the README's test command is .ci/run's last one."""
    assert command.argv == ci_commands()[-1]


async def serve(ws: Workspace, command: Command) -> None:
    config_name = command.option("--config")
    assert (ws.root / config_name).is_file(), f"the README serves a missing {config_name}"
    server = await ws.running_server(config_name)
    async with aiohttp.ClientSession() as http:
        for path in ("/healthz", "/readyz"):
            async with http.get(server.url + path) as response:
                assert response.status == 200, await response.text()


async def codexlb_command(ws: Workspace, command: Command) -> Finished:
    argv = [sys.executable, "-m", "codexlb", *(ws.expand(w) for w in command.argv[1:])]
    stdin = f"{ws.env[KEY_VARIABLE]}\n" if command.argv[1:] == ["hash-key"] else None
    finished = (await ws.run(argv, stdin=stdin)).ok()
    if command.append_to is not None:
        with (ws.root / command.append_to).open("a") as target:
            target.write(finished.stdout)
    return finished


async def status(ws: Workspace, command: Command) -> None:
    await ws.running_server(command.option("--config"))
    finished = await codexlb_command(ws, command)
    if "--json" in command.argv:
        accounts = json.loads(finished.stdout)["accounts"]
        assert [a["name"] for a in accounts] == ["example"]
        assert accounts[0]["state"] == "ok"
    else:
        header, row, *_ = finished.stdout.splitlines()
        assert header.split()[:3] == ["ACCOUNT", "KIND", "STATE"]
        assert row.split()[:3] == ["example", "chatgpt", "ok"]


async def import_auth(ws: Workspace, command: Command) -> None:
    finished = await codexlb_command(ws, command)
    [entry] = tomllib.loads(finished.stdout)["accounts"]
    assert entry == {"name": command.option("--name"), "auth_file": str(ws.auth_file.resolve())}
    assert command.append_to is not None
    config = load_config(ws.root / command.append_to)
    [imported] = [a for a in config.accounts if a.name == entry["name"]]
    credentials = load_credentials(imported)
    assert (credentials.access_token, credentials.account_id) == ("tok-b", "acct-b")


async def check_config(ws: Workspace, command: Command) -> None:
    finished = await codexlb_command(ws, command)
    config = load_config(ws.root / command.option("--config"))
    for account in config.accounts:
        assert account.name in finished.stdout


async def hash_key(ws: Workspace, command: Command) -> None:
    finished = await codexlb_command(ws, command)
    [key] = command.operands[1:] or [ws.env[KEY_VARIABLE]]
    assert finished.stdout.splitlines()[-1] == hashlib.sha256(key.encode()).hexdigest()


async def db(ws: Workspace, command: Command) -> None:
    """``db backup`` copies the database of a server that is serving, with one response."""
    action, *destination = command.operands[1:]
    if action == "upgrade":
        await codexlb_command(ws, command)
        return
    assert action == "backup"
    server = await ws.running_server(command.option("--config"))
    async with aiohttp.ClientSession() as http:
        turn = await stream_turn(http, server.url, {"input": [user_message("keep me")]})
        assert turn.status == 200
    finished = await codexlb_command(ws, command)
    assert finished.stdout.startswith("backed up to ")
    [backup] = destination
    with sqlite3.connect(ws.root / backup) as copy:
        query = "SELECT count(*) FROM snapshots WHERE response_id = ?"
        [(rows,)] = copy.execute(query, (turn.response_id,)).fetchall()
    assert rows == 1


CURL_ANSWERS: dict[str, Callable[[str], bool]] = {
    "/healthz": lambda body: json.loads(body) == {"status": "ok"},
    "/readyz": lambda body: json.loads(body) == {"status": "ready"},
    "/status": lambda body: [a["name"] for a in json.loads(body)["accounts"]] == ["example"],
    "/metrics": lambda body: "# TYPE codexlb_requests_total counter" in body,
    "/admin/overview": lambda body: (
        [a["name"] for a in json.loads(body)["accounts"]] == ["example"]
    ),
    "/admin/requests": lambda body: isinstance(json.loads(body)["requests"], list),
    "/v1/usage": lambda body: (
        json.loads(body)["key"] == "alice"
        and set(json.loads(body)) == {"object", "key", "limits", "windows", "totals"}
    ),
}


async def curl(ws: Workspace, command: Command) -> None:
    program = shutil.which("curl")
    if program is None:
        pytest.skip(f"curl is not installed: cannot run the README line {command.line!r}")
    server = await ws.running_server()
    [url] = [w for w in command.argv if w.startswith(f"http://{README_ADDRESS}/")]
    path = urlsplit(url).path
    assert path in CURL_ANSWERS, f"no expected answer for {path}"
    argv = [program, "--max-time", "10", *(ws.expand(w) for w in command.argv[1:])]
    argv = [w.replace(f"http://{README_ADDRESS}", server.url) for w in argv]
    finished = (await ws.run(argv)).ok()
    assert CURL_ANSWERS[path](finished.stdout), finished.stdout


async def usage(ws: Workspace, command: Command) -> None:
    """``codexlb usage`` after one turn of the README's key: the key is in the report (its
    usage reaches the database a moment after the response)."""
    server = await ws.running_server(command.option("--config"))
    async with aiohttp.ClientSession() as http:
        turn = await stream_turn(http, server.url, {"input": [user_message("count me")]})
        assert turn.status == 200
    async with asyncio.timeout(10):
        while True:
            finished = await codexlb_command(ws, command)
            if "--json" in command.argv:
                report = json.loads(finished.stdout)
                assert report["by"] == command.argv[command.argv.index("--by") + 1]
                if any(row["requests"] for row in report["rows"]):
                    return
            elif "alice" in finished.stdout.split():
                return
            await asyncio.sleep(0.1)


async def sighup(ws: Workspace, command: Command) -> None:
    server = await ws.running_server()
    server.signal(signal.SIGHUP)
    reloaded = re.compile(r"configuration reloaded from .*\(SIGHUP\)")
    async with asyncio.timeout(10):
        # Polled: the state is in another process, with no event to await.
        while not any(reloaded.search(line) for line in server.log):  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def codex_login(ws: Workspace, command: Command) -> None:
    """Not run (it needs a browser): the workspace holds the ``auth.json`` it writes."""
    assert ws.auth_file.is_file()


async def codex(ws: Workspace, command: Command) -> None:
    """Not run here: tests/test_codex_cli.py runs the real Codex CLI through codexlb, with the
    client key in ``CODEX_API_KEY`` and the provider of the README's Codex config;
    tests/test_codex_surface_cli.py runs it logged in with ChatGPT over TLS, trusting the
    README's local authority in ``CODEX_CA_CERTIFICATE``."""
    if "CODEX_CA_CERTIFICATE" in command.env:
        assert command.env == {"CODEX_CA_CERTIFICATE": "ca.pem"}
        assert "CODEX_CA_CERTIFICATE" in inspect.getsource(test_codex_surface_cli)
    else:
        assert command.env == {"CODEX_API_KEY": f"${KEY_VARIABLE}"}
        assert "CODEX_API_KEY=api_key" in inspect.getsource(codex_cli.codex_environment)
    codex_configs = [b for b in BLOCKS if b.kind == "toml" and "model_providers" in b.text]
    assert codex_configs, "the README runs codex but shows no Codex config"
    for block in codex_configs:
        check_codex_config(tomllib.loads(block.text), ws.root)


async def openssl(ws: Workspace, command: Command) -> None:
    """Run for real: the README's local certificate authority and server certificate, the
    very commands tests/local_tls.py makes the TLS tests' certificates with."""
    if shutil.which("openssl") is None:
        pytest.skip(f"openssl is not installed: cannot run the README line {command.line!r}")
    assert " ".join(command.argv) in local_tls.COMMANDS
    (await ws.run(command.argv)).ok()
    if "-CA" in command.argv:
        (await ws.run(["openssl", "verify", "-CAfile", "ca.pem", "server.pem"])).ok()


async def bench_help(ws: Workspace, command: Command) -> None:
    """Not run (benchmarks take minutes): the script exists, answers ``--help`` and knows
    every option the README gives it."""
    script = REPO / command.argv[1]
    assert script.is_file()
    finished = (await ws.run([sys.executable, str(script), "--help"], cwd=REPO)).ok()
    assert finished.stdout.startswith("usage:")
    for word in command.argv[2:]:
        if word.startswith("--"):
            assert re.search(rf"{re.escape(word)}\b", finished.stdout), word


COMMANDS: tuple[tuple[str, Runner], ...] = (
    (r"python3 -m venv .*", fresh_setup),
    (r"\.venv/bin/pip install .*", fresh_setup),
    (r"\.venv/bin/pytest.*", suite),
    (r"codexlb serve .*", serve),
    (r"codexlb status .*", status),
    (r"codexlb import-auth .*", import_auth),
    (r"codexlb check-config .*", check_config),
    (r"codexlb hash-key( .*)?", hash_key),
    (r"codexlb db .*", db),
    (r"codexlb usage .*", usage),
    (r"curl .*", curl),
    (r"kill -HUP <pid>", sighup),
    (r"codex login", codex_login),
    (r"codex", codex),
    (r"openssl req .*", openssl),
    (r"python bench/\w+\.py( .*)?", bench_help),
)
"""README command (``.venv/bin/`` dropped from codexlb and python) → how it is exercised."""


# --- Quick start ------------------------------------------------------------------------------


def test_quick_start_is_two_commands_a_fresh_setup_and_ci_run() -> None:
    blocks = [b for b in BLOCKS if b.section == "Quick start"]
    assert [b.kind for b in blocks] == ["sh", "sh"]
    assert all(len(b.lines) == 1 for b in blocks)
    run_server, run_tests = (list(parse_line(b.lines[0])) for b in blocks)
    assert run_tests[-1].argv == ci_commands()[-1]
    serve_command = run_server[-1]
    assert serve_command.argv[:2] == [".venv/bin/codexlb", "serve"]
    config = REPO / serve_command.option("--config")
    assert config.is_file()
    load_config(config)
