"""The real Codex CLI for end-to-end tests: installed from npm once per machine, run offline
against codexlb on loopback (PROTOCOL.md §6).

    install_codex()        the ``codex`` binary, or the reason it is not available (tests skip)
    write_codex_home(...)  a CODEX_HOME whose config.toml points Codex at codexlb
    prepare(...)           that CODEX_HOME and a work directory, under one folder
    run_codex(...)         one ``codex exec --json`` turn as an asyncio subprocess: the test's
                           event loop keeps serving codexlb and the fake upstream meanwhile;
                           ``resume=`` continues a saved session (``codex exec resume``)
    assert_ran_echo_hello  the turn ran the fake model's ``echo hello`` and finished
    response_requests(...) what the fake upstream received, and `summary` of it for messages

Codex runs the model's shell commands in a login shell (``bash -lc``), which reads the user's
profile: every run gets a fresh empty ``HOME`` of its own, so that no profile of the machine's
user slows a command down or changes what it prints (PROTOCOL.md §7).

The install lives in ``<repo>/.codex-npm/`` (ignored by git) and is reused while its
``codex --version`` reports `CODEX_VERSION`; a file lock keeps concurrent test runs from
installing over each other.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from codexlb.testing.events import reasoning_owner
from codexlb.testing.fake_upstream import ReceivedRequest

CODEX_VERSION = "0.169.0"
PACKAGE = f"@openai/codex@{CODEX_VERSION}"
INSTALL_DIR = Path(__file__).resolve().parent.parent / ".codex-npm"
INSTALL_TIMEOUT = 300.0
RUN_TIMEOUT = 120.0
PROMPT = "Run the shell command: echo hello"
FINAL_MESSAGE = "The command printed: hello"
PROFILE_VARIABLES = ("BASH_ENV", "ENV", "ZDOTDIR", "XDG_CONFIG_HOME", "PROMPT_COMMAND")
"""Variables through which a shell would still read the user's own startup files (or run
their commands) with ``HOME`` emptied: left out of Codex's environment."""


def install_codex(
    install_dir: Path = INSTALL_DIR, *, timeout: float = INSTALL_TIMEOUT
) -> Path | str:
    """The path of a ``codex`` binary reporting `CODEX_VERSION`, installing it with npm into
    ``install_dir`` if needed; or why that is impossible (no node/npm, npm failed or took
    longer than ``timeout`` seconds). Blocking: call it outside an event loop."""
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            return f"Codex CLI end-to-end tests need {tool} on PATH to install {PACKAGE}"
    binary = install_dir / "node_modules" / ".bin" / "codex"
    install_dir.mkdir(parents=True, exist_ok=True)
    with _locked(install_dir / ".lock"):
        if _version_of(binary) == CODEX_VERSION:
            return binary
        # The package ships its native binary; it runs no install scripts.
        failed = npm_install(install_dir, PACKAGE, timeout, ignore_scripts=True)
        if failed is not None:
            return failed
        version = _version_of(binary)
        if version != CODEX_VERSION:
            return f"{binary} reports version {version!r} after npm install, not {CODEX_VERSION}"
        return binary


def write_codex_home(
    home: Path, lb_url: str, *, websockets: bool, chatgpt_base_url: str | None = None
) -> Path:
    """Write ``home/config.toml`` sending Codex to codexlb at ``lb_url`` (``http://host:port``)
    over WebSocket or HTTP; its account calls go to ``chatgpt_base_url`` (by default a path
    of ``lb_url`` codexlb does not serve, so that they stay on loopback)."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f"""model_provider = "lb"
chatgpt_base_url = "{chatgpt_base_url or lb_url + "/chatgpt/"}"
check_for_update_on_startup = false

[analytics]
enabled = false

[feedback]
enabled = false

[model_providers.lb]
name = "openai"
base_url = "{lb_url}/backend-api/codex"
wire_api = "responses"
supports_websockets = {"true" if websockets else "false"}
requires_openai_auth = true
"""
    )
    return home


def prepare(root: Path, lb_url: str, *, websockets: bool) -> tuple[Path, Path]:
    """Under ``root``: a CODEX_HOME for codexlb at ``lb_url`` (`write_codex_home`) and an
    empty work directory for Codex to run in."""
    workdir = root / "work"
    workdir.mkdir(parents=True, exist_ok=True)
    return write_codex_home(root / "codex-home", lb_url, websockets=websockets), workdir


@dataclass(frozen=True)
class CodexRun:
    """The outcome of one ``codex exec --json``: exit code, JSONL events, stderr, and the
    empty ``HOME`` it ran with (removed since)."""

    returncode: int
    stdout: str
    stderr: str
    user_home: Path | None = None

    @property
    def events(self) -> list[dict[str, Any]]:
        """The JSON objects of stdout, one a line (other lines are skipped)."""
        parsed: list[dict[str, Any]] = []
        for line in self.stdout.splitlines():
            with contextlib.suppress(ValueError):
                value = json.loads(line)
                if isinstance(value, dict):
                    parsed.append(value)
        return parsed

    def completed_items(self, item_type: str) -> list[dict[str, Any]]:
        """The items of ``item.completed`` events of ``item_type`` (``command_execution``,
        ``agent_message``, ``error``...)."""
        return [
            event["item"]
            for event in self.events
            if event.get("type") == "item.completed"
            and isinstance(event.get("item"), dict)
            and event["item"].get("type") == item_type
        ]

    @property
    def thread_id(self) -> str | None:
        """The session's id, from the ``thread.started`` event: what ``resume`` takes."""
        for event in self.events:
            if event.get("type") == "thread.started" and isinstance(event.get("thread_id"), str):
                return str(event["thread_id"])
        return None

    @property
    def notices(self) -> list[str]:
        """The messages of top-level ``error`` events: Codex's "Reconnecting... n/5" while it
        retries a request itself, or the error that ended the turn."""
        return [str(event.get("message")) for event in self.events if event.get("type") == "error"]

    def describe(self) -> str:
        """Everything about the run, for assertion messages."""
        return f"exit {self.returncode}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


def assert_ran_echo_hello(run: CodexRun, *, retries: bool = False) -> None:
    """Codex exited 0 after running the command once (exit code 0, output ``hello``) and
    receiving the final message quoting it.

    Codex must not have retried a request itself on the way ("Reconnecting... n/5"), unless
    ``retries``: for failures no proxy can hide, once output reached Codex.
    """
    assert run.returncode == 0, run.describe()
    types = [event.get("type") for event in run.events]
    assert "turn.completed" in types, run.describe()
    assert "turn.failed" not in types, run.describe()
    if retries:
        unexpected = [text for text in run.notices if not text.startswith("Reconnecting")]
        assert not unexpected, run.describe()
    else:
        assert "error" not in types, run.describe()  # e.g. "Reconnecting... 2/5"
    assert not run.completed_items("error"), run.describe()
    commands = run.completed_items("command_execution")
    assert len(commands) == 1, run.describe()
    assert "echo hello" in commands[0]["command"], run.describe()
    assert commands[0]["exit_code"] == 0, run.describe()
    assert commands[0]["aggregated_output"].strip() == "hello", run.describe()
    messages = run.completed_items("agent_message")
    assert [message["text"] for message in messages] == [FINAL_MESSAGE], run.describe()


def write_chatgpt_login(home: Path, *, access_token: str, account_id: str) -> Path:
    """``home/auth.json`` as ``codex login`` writes it for a ChatGPT account (PROTOCOL.md §6):
    unsigned JWTs naming the account, valid for an hour. Run Codex with ``api_key=None``
    then, so that it uses this login."""
    claims = {
        "email": "codex-user@example.com",
        "exp": int(time.time()) + 3600,
        "https://api.openai.com/auth": {
            "chatgpt_account_id": account_id,
            "chatgpt_plan_type": "pro",
        },
    }
    id_token = ".".join(
        base64.urlsafe_b64encode(json.dumps(part).encode()).decode().rstrip("=")
        for part in ({"alg": "none", "typ": "JWT"}, claims, {"sig": 0})
    )
    access_claims = {**claims, "sub": "codex-user"}
    access_jwt = ".".join(
        base64.urlsafe_b64encode(json.dumps(part).encode()).decode().rstrip("=")
        for part in ({"alg": "none", "typ": "JWT"}, access_claims, {"token": access_token})
    )
    login = {
        "auth_mode": "chatgpt",
        "OPENAI_API_KEY": None,
        "tokens": {
            "id_token": id_token,
            "access_token": access_jwt,
            "refresh_token": "rt-codex-user",
            "account_id": account_id,
        },
        "last_refresh": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
    }
    home.mkdir(parents=True, exist_ok=True)
    path = home / "auth.json"
    path.write_text(json.dumps(login, indent=2))
    return path


@contextlib.contextmanager
def codex_environment(
    home: Path, api_key: str | None, extra: Mapping[str, str] | None = None
) -> Iterator[tuple[dict[str, str], str]]:
    """Codex's environment for the block, and its fresh empty ``HOME`` (removed afterwards):
    ``CODEX_HOME``, ``CODEX_API_KEY`` (none for ``api_key=None``: the ChatGPT login of
    ``write_chatgpt_login``), and none of the caller's other Codex or OpenAI settings or shell
    profile variables, so that the login shell running the model's commands reads no
    profile."""
    with tempfile.TemporaryDirectory(
        prefix="codex-user-home-", ignore_cleanup_errors=True
    ) as user_home:
        env = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith(("CODEX_", "OPENAI_")) and name not in PROFILE_VARIABLES
        }
        env.update(CODEX_HOME=str(home), NO_COLOR="1", HOME=user_home)
        if api_key is not None:
            env.update(CODEX_API_KEY=api_key)
        env.update(extra or {})
        yield env, user_home


async def run_codex(
    codex: Path,
    *,
    home: Path,
    workdir: Path,
    api_key: str | None,
    prompt: str = PROMPT,
    resume: str | None = None,
    ephemeral: bool = True,
    timeout: float = RUN_TIMEOUT,  # noqa: ASYNC109 (a subprocess bound, passed on)
    env: Mapping[str, str] | None = None,
) -> CodexRun:
    """Run one non-interactive Codex turn in ``workdir`` (which must exist) and wait for it
    to exit.

    ``resume``: the id of a session saved in ``home`` (`CodexRun.thread_id` of a run with
    ``ephemeral`` False) to continue with ``prompt`` (``codex exec resume``). ``ephemeral``:
    the session is not saved (a resumed one always is, to its own record). ``env``: more
    variables for Codex (``CODEX_CA_CERTIFICATE``...).

    Codex authenticates with ``api_key`` (``CODEX_API_KEY``, sent as the bearer token); the
    environment's other Codex and OpenAI settings are left out, and ``HOME`` is a fresh empty
    directory, removed afterwards, so that the login shell running the model's commands finds
    no profile (`PROFILE_VARIABLES` are left out too). Codex runs in its own process group so
    that, past ``timeout`` seconds, it is killed with the commands it started; the run then
    fails with TimeoutError carrying what it printed.
    """
    options = ["--json", "--skip-git-repo-check", "--dangerously-bypass-approvals-and-sandbox"]
    if resume is not None:
        # ``resume`` takes no ``-C``: Codex runs in the working directory it is started in.
        argv = ["exec", "resume", *options, resume, prompt]
    else:
        argv = ["exec", *options, *(["--ephemeral"] if ephemeral else []), "-C", str(workdir)]
        argv.append(prompt)
    with codex_environment(home, api_key, env) as (environment, user_home):
        process = await asyncio.create_subprocess_exec(
            str(codex),
            *argv,
            cwd=workdir,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=environment,
            start_new_session=True,
        )
        communicating = asyncio.ensure_future(process.communicate())
        try:
            stdout, stderr = await asyncio.wait_for(asyncio.shield(communicating), timeout)
        except TimeoutError:
            _kill_group(process)
            stdout, stderr = await communicating
            run = CodexRun(-1, stdout.decode(errors="replace"), stderr.decode(errors="replace"))
            raise TimeoutError(
                f"codex exec did not finish in {timeout:g} s\n{run.describe()}"
            ) from None
        except BaseException:
            _kill_group(process)
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(communicating, 10)
            raise
    returncode = process.returncode
    assert returncode is not None
    return CodexRun(
        returncode,
        stdout.decode(errors="replace"),
        stderr.decode(errors="replace"),
        Path(user_home),
    )


def response_requests(received: list[ReceivedRequest]) -> list[ReceivedRequest]:
    """The response requests among what the fake upstream ``received``: HTTP POSTs with a
    body, and WebSocket ``response.create`` messages."""
    return [
        request
        for request in received
        if isinstance(request.body, dict)
        and (request.transport == "http" or request.body.get("type") == "response.create")
    ]


def generating(requests: list[ReceivedRequest]) -> list[ReceivedRequest]:
    """Without Codex's WebSocket prewarm (``generate: false``), which produces nothing."""
    return [request for request in requests if request.body.get("generate") is not False]


def input_items(request: ReceivedRequest) -> list[dict[str, Any]]:
    items = request.body.get("input")
    assert isinstance(items, list), request.body
    return items


def reasoning_owners(request: ReceivedRequest) -> list[str | None]:
    """Whose reasoning the request's input carries, item by item (the fake upstream marks
    ``encrypted_content`` as ``enc:<account>:<hex>``; None when it is missing or not so)."""
    items = request.body.get("input")
    if not isinstance(items, list):
        return []
    return [
        reasoning_owner(item.get("encrypted_content"))
        for item in items
        if isinstance(item, dict) and item.get("type") == "reasoning"
    ]


def summary(requests: list[ReceivedRequest]) -> list[str]:
    """One line a request, for assertion messages: transport, account, ``generate``,
    ``previous_response_id``, and the input's items: types, messages with their role, reasoning
    with its owner."""
    lines = []
    for r in requests:
        items = r.body.get("input") if isinstance(r.body, dict) else None
        types = [_item_label(item) for item in (items if isinstance(items, list) else [])]
        body = r.body if isinstance(r.body, dict) else {}
        lines.append(
            f"{r.transport} account={r.account} generate={body.get('generate')} "
            f"previous_response_id={body.get('previous_response_id')} input={types}"
        )
    return lines


def _item_label(item: object) -> str:
    """``reasoning[<owner>]``, ``message:<role>``, else the item's type."""
    if not isinstance(item, dict):
        return repr(item)
    kind = str(item.get("type", "message"))
    if kind == "reasoning":
        return f"reasoning[{reasoning_owner(item.get('encrypted_content'))}]"
    if kind == "message":
        return f"message:{item.get('role')}"
    return kind


def _kill_group(process: asyncio.subprocess.Process) -> None:
    """SIGKILL the process group led by ``process`` (ours: started with a new session)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def _version_of(binary: Path) -> str | None:
    """The version ``binary --version`` reports (``codex-cli 0.169.0`` → ``0.169.0``)."""
    if not binary.exists():
        return None
    try:
        finished = subprocess.run(
            [str(binary), "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    words = finished.stdout.split()
    return words[-1] if finished.returncode == 0 and words else None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def npm_install(
    install_dir: Path, package: str, timeout: float, *, ignore_scripts: bool = False
) -> str | None:
    """Install ``package`` into ``install_dir`` with npm; what went wrong, or ``None``.

    npm runs in its own process group, so that a timeout ends npm and whatever it started.
    """
    command = ["npm", "install", "--prefix", str(install_dir), "--no-save", "--no-audit"]
    command += ["--no-fund", "--loglevel=error", package]
    if ignore_scripts:
        command.insert(-1, "--ignore-scripts")
    with subprocess.Popen(
        command,
        cwd=install_dir,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "npm_config_update_notifier": "false"},
        start_new_session=True,
    ) as npm:
        try:
            stdout, stderr = npm.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(npm.pid, signal.SIGKILL)
            npm.communicate()
            return f"npm install {package} took longer than {timeout:g} s"
    if npm.returncode != 0:
        tail = (stderr or stdout).strip()[-2000:]
        return f"npm install {package} failed (exit {npm.returncode}): {tail}"
    return None
