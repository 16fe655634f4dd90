"""End to end with the real Codex CLI: one conversation, resumed turn after turn, survives what
happens between its turns.

Each case is one Codex session through ``codexlb serve`` (a child process on a fixed loopback
port, so that it can restart where Codex's config points) in front of the fake upstream, whose
`codex_responder` makes every turn a call of Codex's shell tool (``echo hello``) and a final
message. Turn 1 is ``codex exec`` (saved, not ephemeral); turns 2 and 3 are ``codex exec resume
<session id>``, with one failure injected before turn 2:

    rate_limited         the conversation's account answers 429 (``usage_limit_reached``):
                         over WebSocket to Codex's prewarm, the first request on its socket
    rate_limited_turn    (WebSocket) the same, to the turn after the prewarm: an anchored
                         request moves to another account
    sigterm, sigkill     codexlb restarts, stopped by that signal
    drop_before_created  the upstream drops the connection before ``response.created``
    drop_after_output    the upstream drops it after the first output item
    disabled             the conversation's account is disabled in the TOML (SIGHUP)
    none                 nothing: resuming alone

over WebSocket (Codex's default) and over HTTP. Every turn must run the command and finish
(exit 0); Codex may retry by itself only after ``drop_after_output``, whose output already
reached it. Whatever happens, the upstream must never receive reasoning another account
minted: the fake marks ``encrypted_content`` ``enc:<account>:<hex>``, and an account cannot
read another's. After a restart the conversation goes back to its account and keeps its
reasoning.

The account a freshly started codexlb would pick first for a new conversation (``a``, first in
the file, all else equal) is disabled until a restart: the conversation starts on another one,
so that a restarted codexlb that forgot it would not find its way back by chance.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from codexlb.testing.codex_model import codex_responder
from codexlb.testing.fake_upstream import Fault, ReceivedRequest
from tests import codex_cli
from tests.codex_cli import (
    CodexRun,
    assert_ran_echo_hello,
    generating,
    reasoning_owners,
    response_requests,
    summary,
)
from tests.harness import (
    CLIENT_KEYS,
    ChildServer,
    Fake,
    config_data,
    free_port,
    logged,
    start_child,
    write_toml,
)

pytestmark = pytest.mark.codex

CASE_TIMEOUT = 150
TURN_TIMEOUT = 30.0
"""Seconds for one Codex turn; an undisturbed one takes about one. Bounded well below the
suite's patience: a Codex that waits for an event that never comes (idle timeout 300 s) fails
the case instead."""
FIRST_CHOICE = "a"
"""The account a fresh codexlb picks first; disabled until a restart (see the module)."""
TURNS_AFTER_FAULT = 2

FAULTS = (
    "rate_limited",
    "sigterm",
    "sigkill",
    "drop_before_created",
    "drop_after_output",
    "disabled",
    "none",
)
CASES = [
    *(pytest.param(True, fault, id=f"ws-{fault}") for fault in FAULTS),
    pytest.param(True, "rate_limited_turn", id="ws-rate_limited_turn"),
    *(pytest.param(False, fault, id=f"http-{fault}") for fault in FAULTS),
]
OUTPUT_EVENTS = 4
"""``response.created``, ``in_progress``, then the reasoning item ``added`` and ``done``: the
drop comes after output reached Codex, before the tool call."""


@dataclass
class Turn:
    """One ``codex exec`` of the conversation and what the upstream received meanwhile."""

    run: CodexRun
    requests: list[ReceivedRequest]
    seconds: float


@dataclass
class Conversation:
    """One saved Codex session through a ``codexlb serve`` child on a fixed port."""

    codex: Path
    fake: Fake
    root: Path
    websockets: bool
    port: int = field(default_factory=free_port)
    server: ChildServer | None = None
    thread_id: str | None = None
    turns: list[Turn] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """What the test did between turns, in order, for failure messages."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config_file(self) -> Path:
        return self.root / "codexlb.toml"

    def write_config(self, *, disabled: Collection[str]) -> None:
        data = config_data(self.fake.url, f"sqlite+aiosqlite:///{self.root / 'codexlb.db'}")
        data["server"]["port"] = self.port
        for account in data["accounts"]:
            account["enabled"] = account["name"] not in disabled
        write_toml(self.config_file, data)

    @property
    def running(self) -> ChildServer:
        assert self.server is not None, "codexlb is not running"
        return self.server

    async def start(self) -> None:
        self.server = await start_child(self.config_file)
        assert self.server.url == self.url, self.server.log

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        server, self.server = self.running, None
        if sig == signal.SIGTERM:
            return await server.stop()
        server.signal(sig)
        return await server.wait()

    async def turn(self, *, retries: bool = False) -> Turn:
        """Run the next turn (the first ``codex exec``, then ``resume``) and check that Codex
        ran ``echo hello`` and finished; the failure message shows what the upstream got."""
        home, workdir = self.root / "codex-home", self.root / "work"
        if not self.turns:
            home, workdir = codex_cli.prepare(self.root, self.url, websockets=self.websockets)
        start, began = len(self.fake.received), time.monotonic()
        try:
            run = await codex_cli.run_codex(
                self.codex,
                home=home,
                workdir=workdir,
                api_key=CLIENT_KEYS["alice"],
                resume=self.thread_id,
                ephemeral=False,
                timeout=TURN_TIMEOUT,
            )
        except TimeoutError as exc:
            raise AssertionError(f"turn {len(self.turns) + 1}: {exc}\n{self.report()}") from None
        turn = Turn(run, self.fake.received[start:], time.monotonic() - began)
        self.turns.append(turn)
        try:
            assert_ran_echo_hello(run, retries=retries)
        except AssertionError as exc:
            raise AssertionError(f"turn {len(self.turns)}: {exc}\n{self.report()}") from None
        if self.thread_id is None:
            self.thread_id = run.thread_id
            assert self.thread_id, run.describe()
        else:
            assert run.thread_id == self.thread_id, run.describe()
        return turn

    def note(self, text: str) -> None:
        self.notes.append(f"after turn {len(self.turns)}: {text}")

    def report(self) -> str:
        """The upstream's response requests turn by turn, foreign reasoning marked, what the
        test did between turns, and the end of codexlb's log."""
        lines = ["--- what the test did", *self.notes, "--- upstream response requests"]
        counted = 0
        for number, turn in enumerate(self.turns, 1):
            notices = f", Codex said {turn.run.notices}" if turn.run.notices else ""
            lines.append(
                f"turn {number} ({turn.seconds:.1f} s, exit {turn.run.returncode}{notices}):"
            )
            lines += [f"  {line}" for line in marked(response_requests(turn.requests))]
            counted += len(turn.requests)
        rest = self.fake.received[counted:]
        if rest:
            lines.append("since:")
            lines += [f"  {line}" for line in marked(response_requests(rest))]
        if self.server is not None:
            lines += ["--- codexlb log (end)", *(line.rstrip() for line in self.server.log[-25:])]
        return "\n".join(lines)


def marked(requests: list[ReceivedRequest]) -> list[str]:
    """`summary` lines, those carrying another account's reasoning marked."""
    return [
        line + ("   <-- FOREIGN REASONING" if carries_foreign_reasoning(request) else "")
        for line, request in zip(summary(requests), requests, strict=True)
    ]


def carries_foreign_reasoning(request: ReceivedRequest) -> bool:
    """Whether the request went to an account with reasoning that account did not mint."""
    return request.account is not None and any(
        owner != request.account for owner in reasoning_owners(request)
    )


@asynccontextmanager
async def conversation(
    codex: Path, fake: Fake, root: Path, *, websockets: bool
) -> AsyncIterator[Conversation]:
    """A `Conversation` whose codexlb runs for the block; it must drain and exit 0 on SIGTERM
    afterwards."""
    talk = Conversation(codex, fake, root, websockets)
    talk.write_config(disabled={FIRST_CHOICE})
    await talk.start()
    try:
        yield talk
    except BaseException:
        if talk.server is not None:
            await talk.stop()
        raise
    server = talk.running
    assert await talk.stop() == 0, "".join(server.log)


def served_by(turn: Turn, talk: Conversation) -> str:
    """The one account that generated the turn's responses."""
    accounts = {request.account for request in generating(response_requests(turn.requests))}
    assert len(accounts) == 1, talk.report()
    (account,) = accounts
    assert account is not None, talk.report()
    return account


async def inject(fault: str, talk: Conversation, account: str) -> None:
    """Make ``fault`` happen to the conversation on ``account``, before its next turn."""
    fake = talk.fake
    # Over WebSocket the first response.create on Codex's new socket is its prewarm
    # (generate: false); a no-op fault lets it through so that the fault hits the turn itself.
    prewarm = [Fault.slow_first_byte(0)] if talk.websockets else []
    if fault == "rate_limited":
        fake.script(Fault.status(429), account=account)
        talk.note(f"{account} answers its next request with 429 usage_limit_reached")
    elif fault == "rate_limited_turn":
        fake.script(*prewarm, Fault.status(429), account=account)
        talk.note(f"{account} answers the turn after the prewarm with 429 usage_limit_reached")
    elif fault == "drop_before_created":
        fake.script(*prewarm, Fault.drop_after(0), account=account)
        talk.note(f"{account} drops the connection before response.created")
    elif fault == "drop_after_output":
        fake.script(*prewarm, Fault.drop_after(OUTPUT_EVENTS), account=account)
        talk.note(f"{account} drops the connection after {OUTPUT_EVENTS} events")
    elif fault in ("sigterm", "sigkill"):
        sig = signal.SIGTERM if fault == "sigterm" else signal.SIGKILL
        code = await talk.stop(sig)
        assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL), code
        # Every account may serve from now on: FIRST_CHOICE too, which a codexlb that forgot
        # the conversation would pick.
        talk.write_config(disabled=())
        await talk.start()
        talk.note(f"codexlb restarted after {sig.name} on the same port, all accounts enabled")
    elif fault == "disabled":
        server = talk.running
        seen = len(server.log)
        talk.write_config(disabled={FIRST_CHOICE, account})
        server.signal(signal.SIGHUP)
        await logged(
            server,
            rf"configuration reloaded from .*changed [\w, -]*\b{re.escape(account)}\b",
            after=seen,
        )
        talk.note(f"{account} disabled in the TOML, SIGHUP, codexlb reloaded")
    else:
        assert fault == "none", fault


@pytest.mark.timeout(CASE_TIMEOUT, func_only=True)
@pytest.mark.parametrize(("websockets", "fault"), CASES)
async def test_resumed_conversation_survives(
    fault: str, websockets: bool, codex: Path, fake: Fake, tmp_path: Path
) -> None:
    fake.responder = codex_responder
    async with conversation(codex, fake, tmp_path, websockets=websockets) as talk:
        first = await talk.turn()
        account = served_by(first, talk)
        assert account != FIRST_CHOICE, talk.report()

        await inject(fault, talk, account)
        after = [
            await talk.turn(retries=fault == "drop_after_output") for _ in range(TURNS_AFTER_FAULT)
        ]

        problems = expectations(fault, talk, account, after)
        assert not problems, "\n".join([*problems, talk.report()])


def expectations(fault: str, talk: Conversation, account: str, after: list[Turn]) -> list[str]:
    """What went wrong in a conversation whose turns all finished: one line per broken
    expectation. ``account`` served turn 1; ``after`` are the turns after the fault."""
    fake, problems = talk.fake, []
    everything = response_requests(fake.received)
    transports = {request.transport for request in everything}
    if transports != {"ws" if talk.websockets else "http"}:
        problems.append(f"the upstream was reached over {sorted(transports)}")
    if fake.pending_faults:
        problems.append(f"the fault never happened: {fake.pending_faults} left unused")
    foreign = sum(map(carries_foreign_reasoning, everything))
    if foreign:
        problems.append(
            f"the upstream received reasoning minted by another account in {foreign} request(s)"
        )
    later = [request for turn in after for request in response_requests(turn.requests)]
    if fault in ("sigterm", "sigkill"):
        # Back to the account the conversation was on, with that account's reasoning.
        resumed = generating(later)
        accounts = sorted({str(request.account) for request in resumed})
        if accounts != [account]:
            problems.append(f"after the restart the conversation went to {accounts}, not {account}")
        if resumed and account not in reasoning_owners(resumed[0]):
            problems.append(
                f"the first request after the restart carries none of {account}'s reasoning"
            )
    if fault == "disabled" and account in {request.account for request in later}:
        problems.append(f"{account} got requests after it was disabled")
    if fault.startswith("rate_limited"):
        # The request that met the 429 (after the prewarm it let through, for
        # rate_limited_turn), then nothing more while the account is limited.
        expected = 2 if fault == "rate_limited_turn" else 1
        hits = [request.account for request in later].count(account)
        if hits != expected:
            problems.append(f"{account} got {hits} requests after the fault, not {expected}")
    return problems
