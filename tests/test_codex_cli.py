"""End to end with the real Codex CLI: ``codex exec`` runs one shell command through codexlb.

Codex talks to codexlb (in this process, on loopback) over WebSocket or HTTP; codexlb talks to
the fake upstream, where `codex_responder` plays the model: a call of Codex's shell tool, then
a final message quoting the output. Each test checks what Codex did (exit code, the command it
ran, the final message) and what the upstream received.

Codex runs with an empty ``HOME`` of its own (`codex_cli.run_codex`): the login shell running the
model's command reads no profile. The tests carry the ``codex`` marker (``-m codex``,
``-m "not codex"``).

Codex is installed from npm once per machine (`tests.codex_cli`); without node or npm, or when
the install fails, these tests are skipped with the reason. The install runs in a session
fixture outside the tests' own time limits (``func_only``), bounded by its own timeout.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from codexlb.testing.codex_model import codex_responder
from codexlb.testing.fake_upstream import Fault, ReceivedRequest
from tests import codex_cli
from tests.codex_cli import (
    CodexRun,
    assert_ran_echo_hello,
    generating,
    input_items,
    summary,
)
from tests.harness import CLIENT_KEYS, Balancer, Fake

pytestmark = pytest.mark.codex

E2E_TIMEOUT = 180
TOOL_CALLS = frozenset({"function_call", "custom_tool_call"})
TOOL_OUTPUTS = frozenset({"function_call_output", "custom_tool_call_output"})


class ModelLog:
    """`codex_responder`, remembering the output items it produced."""

    def __init__(self) -> None:
        self.outputs: list[list[dict[str, Any]]] = []

    def __call__(self, account: str, body: Any) -> list[dict[str, Any]]:
        items = codex_responder(account, body)
        self.outputs.append(items)
        return items

    @property
    def calls(self) -> list[dict[str, Any]]:
        return [item for items in self.outputs for item in items if item["type"] in TOOL_CALLS]


@pytest.fixture
def model(fake: Fake) -> ModelLog:
    log = ModelLog()
    fake.responder = log
    return log


async def codex_exec(codex: Path, lb: Balancer, tmp_path: Path, *, websockets: bool) -> CodexRun:
    home, workdir = codex_cli.prepare(tmp_path, lb.url, websockets=websockets)
    return await codex_cli.run_codex(
        codex, home=home, workdir=workdir, api_key=CLIENT_KEYS["alice"]
    )


def response_requests(fake: Fake) -> list[ReceivedRequest]:
    return codex_cli.response_requests(fake.received)


def pair(requests: list[ReceivedRequest]) -> tuple[ReceivedRequest, ReceivedRequest]:
    """The turn and its tool follow-up, which must be all there is."""
    assert len(requests) == 2, summary(requests)
    return requests[0], requests[1]


def asks_for_echo(request: ReceivedRequest) -> bool:
    return any(
        item.get("role") == "user"
        and any(part.get("text") == codex_cli.PROMPT for part in item.get("content", []))
        for item in input_items(request)
    )


def assert_tool_round_trip(
    turn: ReceivedRequest, follow_up: ReceivedRequest, model: ModelLog
) -> None:
    """``turn`` asked for the command, and ``follow_up`` ends with the output of the very call
    the model made."""
    assert asks_for_echo(turn), turn.body
    assert len(model.calls) == 1, model.outputs
    output = input_items(follow_up)[-1]
    assert output["type"] in TOOL_OUTPUTS, follow_up.body
    assert output["call_id"] == model.calls[0]["call_id"]
    assert "hello" in str(output["output"])


def without_continuity(body: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in ("input", "previous_response_id")}


@pytest.mark.timeout(E2E_TIMEOUT, func_only=True)
async def test_codex_exec_over_websocket(
    codex: Path, fake: Fake, lb: Balancer, model: ModelLog, tmp_path: Path
) -> None:
    run = await codex_exec(codex, lb, tmp_path, websockets=True)

    assert_ran_echo_hello(run)
    requests = response_requests(fake)
    assert {request.transport for request in requests} == {"ws"}
    turn, follow_up = pair(generating(requests))
    assert_tool_round_trip(turn, follow_up, model)
    # S3.1: the tool output continues on the same upstream socket, anchored, as a delta.
    assert follow_up.account == turn.account, summary(requests)
    assert follow_up.body.get("previous_response_id"), summary(requests)
    assert len(input_items(follow_up)) == 1, summary(requests)


@pytest.mark.timeout(E2E_TIMEOUT, func_only=True)
async def test_codex_exec_over_http(
    codex: Path, fake: Fake, lb: Balancer, model: ModelLog, tmp_path: Path
) -> None:
    run = await codex_exec(codex, lb, tmp_path, websockets=False)

    assert_ran_echo_hello(run)
    requests = response_requests(fake)
    assert {request.transport for request in requests} == {"http"}
    assert not fake.handshakes
    turn, follow_up = pair(requests)
    assert_tool_round_trip(turn, follow_up, model)
    # Over HTTP Codex resends the whole history, the call included, and never an anchor.
    assert "previous_response_id" not in follow_up.body
    assert model.calls[0]["call_id"] in {item.get("call_id") for item in input_items(follow_up)}


@pytest.mark.timeout(E2E_TIMEOUT, func_only=True)
async def test_codex_exec_over_websocket_survives_an_upstream_drop(
    codex: Path, fake: Fake, lb: Balancer, model: ModelLog, tmp_path: Path
) -> None:
    # The first response.create on a new socket is Codex's prewarm (generate: false); a no-op
    # fault lets it through so that the drop hits the second one, a real turn.
    fake.script(Fault.slow_first_byte(0), Fault.drop_after(0))

    run = await codex_exec(codex, lb, tmp_path, websockets=True)

    assert_ran_echo_hello(run)
    assert fake.pending_faults == 0
    requests = response_requests(fake)
    assert {request.transport for request in requests} == {"ws"}
    assert len(requests) >= 3, summary(requests)
    prewarm, dropped, retry = requests[:3]
    assert prewarm.body.get("generate") is False, summary(requests)
    assert dropped.body.get("generate") is not False, summary(requests)
    # S4: retried once, on another account, on a new upstream socket...
    assert retry.account != dropped.account, summary(requests)
    # ...by codexlb, not by Codex reconnecting: the very same message (Codex's own resend
    # would carry a new client_metadata timestamp), replayed without the anchor the other
    # account's socket cannot know (S3.1), its input ending with the dropped input.
    assert without_continuity(retry.body) == without_continuity(dropped.body)
    assert "previous_response_id" not in retry.body, summary(requests)
    assert input_items(retry)[-len(input_items(dropped)) :] == input_items(dropped)
    turn, follow_up = pair(generating(requests[2:]))
    assert turn is retry
    assert_tool_round_trip(turn, follow_up, model)
    assert follow_up.account == retry.account, summary(requests)


@pytest.mark.timeout(E2E_TIMEOUT, func_only=True)
async def test_codex_runs_the_command_with_an_empty_home(
    codex: Path, fake: Fake, lb: Balancer, model: ModelLog, tmp_path: Path
) -> None:
    # The login shell (bash -lc) sees the fresh HOME of this run, with nothing in it to read.
    home, workdir = codex_cli.prepare(tmp_path, lb.url, websockets=False)
    command = 'echo "home=$HOME"; ls -A "$HOME" | wc -l'
    run = await codex_cli.run_codex(
        codex,
        home=home,
        workdir=workdir,
        api_key=CLIENT_KEYS["alice"],
        prompt=f"Run the shell command: {command}",
    )

    assert run.returncode == 0, run.describe()
    assert run.user_home is not None
    commands = run.completed_items("command_execution")
    assert len(commands) == 1, run.describe()
    assert command in commands[0]["command"], run.describe()
    assert commands[0]["exit_code"] == 0, run.describe()
    assert commands[0]["aggregated_output"].split() == [f"home={run.user_home}", "0"]
    assert not run.user_home.exists()  # removed after the run
