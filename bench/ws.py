"""WebSocket-mode benchmark: the cost of codexlb in front of an upstream, per turn and per
idle socket.

Run: ``.venv/bin/python bench/ws.py [--turns N] [--concurrency 1,16,64] [--idle N] [--json]``.

Processes
    As in ``http_sse.py`` (`bench.common.serving`): the fake upstream, ``codexlb serve`` and
    this process, the load generator, on 127.0.0.1. This process first raises its soft
    open-file limit to the hard limit; both servers inherit it (``--idle 2000`` needs about
    4,000 descriptors in codexlb).

One turn
    ``GET /backend-api/codex/responses`` upgraded once per socket, with permessage-deflate
    offered as Codex does (``--no-compress`` to leave it out); each turn is one
    ``response.create`` text frame and the answer one JSON event a frame: ``codex.rate_limits``,
    ``response.created``, ``response.in_progress``, ... ``response.completed`` (14 frames, about
    3 kB). As Codex does, a turn continues the previous response of its socket with
    ``previous_response_id`` and a one-message delta ``input``; every ``--chain`` turns a socket
    starts a fresh conversation (full input, no anchor). Through codexlb the anchor is the live
    one of the socket's upstream socket, so it is forwarded as it is, and codexlb commits every
    response's snapshot before it forwards ``response.completed``. Sockets are opened before
    any timing (handshakes are not part of a turn). The clock starts just before the frame is
    sent. *First* stops at the first event that is output, that is neither
    ``codex.rate_limits``, ``response.created`` nor ``response.in_progress`` (codexlb holds
    those two back until output comes); *total* stops at ``response.completed``.

Sides and interleaving
    *direct*: sockets straight to the fake upstream, each authenticated as one of its three
    accounts in turn. *through*: sockets to codexlb with a client key; codexlb opens one
    upstream socket per client socket. For each concurrency C each side opens C sockets, each
    driven by its own worker doing sequential turns (a closed loop); after a warm-up on both
    sides, ``--rounds`` rounds each run ``turns / rounds`` turns on one side, then on the
    other, alternating which side goes first, and samples and wall time are pooled per side.
    The numbers (*added*, *turns/s*, the through/direct *ratio*, codexlb CPU per turn and as
    a share of one core) mean what they mean in ``http_sse.py``. The CPU line also gives the
    fake's, this process's and everything else's share during each side's rounds (*other*:
    the machine's busy time minus the three processes', that is other processes, whose load
    makes the run noisy, and kernel work charged to no process): whether the machine's cores,
    rather than codexlb's one event loop, set the pace. codexlb's RSS is read at the end of
    each level, and its peak (``VmHWM``) before the idle phase.

Idle sockets (``--idle N``)
    After the levels, with their sockets closed and a pause: codexlb's ``VmRSS``, then N client
    sockets to codexlb (64 handshakes and first turns at a time, so each has its upstream
    socket open and a response behind it), then a pause with every socket idle, then
    ``VmRSS`` again: (after - before) / N is codexlb's memory per socket pair (the client's
    socket and the upstream one). Freed memory that codexlb's allocator kept from the levels
    may be reused, so this is a lower bound rather than an overestimate. The socket
    descriptors of codexlb and of the fake upstream (``/proc/PID/fd``), and this process's
    own RSS per client socket, are read at the same moments. Then every socket takes one more
    turn, chained to its first (64 at a time): all N must succeed. codexlb pings an idle
    client every 30 s and drops it without a pong, which this process only sends when it
    reads, so the phase warns when a socket sat idle longer than that.

Caveats
    As in ``http_sse.py``: the three processes share the machine's cores, and the direct side
    has one process fewer competing for them. With permessage-deflate each socket end keeps a
    zlib compressor whose touched memory grows with the traffic it has carried (about 100 KiB
    after a turn, up to about 250 KiB), so memory per idle socket after one or two short turns
    is a floor for long, busy Codex sessions.

Correctness
    Every turn must begin with ``codex.rate_limits`` or ``response.created`` (nothing left
    over from the previous turn) and end with ``response.completed`` (status ``completed``,
    with an id) before a 30 s timeout, without ``error``, ``response.failed`` or
    ``response.incomplete``; a socket that failed a turn is closed and reopened for its next
    turn. The SQLite file must hold a snapshot per turn completed through codexlb, the idle
    phase must succeed on every socket, and both servers must survive the run. Otherwise the
    run says so loudly and exits 1 (2 if a server does not start or the open-file limit is too
    low, 130 on Ctrl-C, 143 on SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import resource
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

if __package__ in (None, ""):  # run as ``python bench/ws.py``: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    LABELS,
    RESPONSES_PATH,
    RUN_TIMEOUT_SECONDS,
    SIDES,
    BenchError,
    Closing,
    Errors,
    ProcessStats,
    Server,
    Side,
    account_headers,
    cell,
    client_headers,
    concurrency_list,
    cpu_seconds,
    distribution_ms,
    execute,
    machine_busy_seconds,
    memory_kib,
    minus,
    open_sockets,
    positive,
    progress,
    ratio,
    render_environment,
    render_footer,
    run_report,
    serving,
    split,
)

T = TypeVar("T")

MODEL = "gpt-5-codex"
WEBSOCKET_BETA = {"OpenAI-Beta": "responses_websockets=2026-02-06"}
NOT_OUTPUT = frozenset({"codex.rate_limits", "response.created", "response.in_progress"})
TURN_OPENERS = frozenset({"codex.rate_limits", "response.created"})
FAILURES = frozenset({"error", "response.failed", "response.incomplete"})

TURN_TIMEOUT_SECONDS = 30.0
CONNECT_TIMEOUT_SECONDS = 30.0
CLOSE_TIMEOUT_SECONDS = 5.0
IN_FLIGHT = 64
"""Handshakes, idle-phase turns and closes in flight at a time."""
IDLE_PAUSE_SECONDS = 2.0
CODEXLB_CLIENT_PING_SECONDS = 30.0
"""codexlb's heartbeat on client sockets (``ws_proxy.CLIENT_HEARTBEAT_SECONDS``)."""
FD_MARGIN = 256


# -- one socket ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    side: Side
    url: str
    headers: tuple[dict[str, str], ...]
    """Rotated over the sockets (one per direct account)."""

    def channels(
        self, session: aiohttp.ClientSession, count: int, *, chain: int, compress: bool
    ) -> list[Channel]:
        return [
            Channel(session, self.url, self.headers[n % len(self.headers)], chain, compress)
            for n in range(count)
        ]


def targets(fake_url: str, codexlb_url: str) -> dict[Side, Target]:
    accounts = tuple({**WEBSOCKET_BETA, **headers} for headers in account_headers())
    client = {**WEBSOCKET_BETA, **client_headers()}
    return {
        "direct": Target("direct", fake_url + RESPONSES_PATH, accounts),
        "through": Target("through", codexlb_url + RESPONSES_PATH, (client,)),
    }


class Channel:
    """One client socket and the conversation it carries; `turn` is never run concurrently
    on one channel (one response at a time per socket, as the protocol wants)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        headers: dict[str, str],
        chain: int,
        compress: bool,
    ) -> None:
        self.session = session
        self.url = url
        self.headers = headers
        self.chain = chain
        self.compress = compress
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.previous_response_id: str | None = None
        self.chained = 0
        self.last_completed = 0.0
        """``time.perf_counter()`` when the last turn completed."""
        self.longest_gap = 0.0
        """The longest time the socket sat idle between a completed turn and the next."""

    async def open(self) -> str | None:
        """Connect (idempotent); what went wrong, if anything."""
        if self.ws is not None:
            return None
        self.previous_response_id, self.chained = None, 0
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
                self.ws = await self.session.ws_connect(
                    self.url,
                    headers=self.headers,
                    compress=15 if self.compress else 0,
                    timeout=aiohttp.ClientWSTimeout(ws_close=CLOSE_TIMEOUT_SECONDS),
                )
        except TimeoutError:
            return "handshake timed out"
        except (aiohttp.ClientError, OSError) as exc:
            return f"handshake failed: {type(exc).__name__}: {exc}"
        return None

    async def close(self) -> None:
        ws, self.ws = self.ws, None
        if ws is not None:
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                await ws.close()

    async def turn(self, index: int) -> tuple[float, float] | str:
        """(first output, total) in seconds, or what went wrong; the socket is opened first
        if needed, outside the timing, and closed after a failure."""
        problem = await self.open()
        if problem is not None:
            return problem
        assert self.ws is not None
        if self.chained >= self.chain:
            self.previous_response_id, self.chained = None, 0
        if self.last_completed:
            self.longest_gap = max(self.longest_gap, time.perf_counter() - self.last_completed)
        outcome = await send_turn(self.ws, create_message(index, self.previous_response_id))
        if isinstance(outcome, str):
            await self.close()
            return outcome
        first, total, self.previous_response_id = outcome
        self.last_completed = time.perf_counter()
        self.chained += 1
        return first, total


def create_message(index: int, previous_response_id: str | None) -> str:
    """A ``response.create``: a fresh conversation, or a one-message delta on its anchor."""
    body: dict[str, Any] = {"type": "response.create", "model": MODEL, "store": False}
    if previous_response_id is not None:
        body["previous_response_id"] = previous_response_id
    text = f"turn {index}"
    body["input"] = [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    ]
    return json.dumps(body)


async def send_turn(
    ws: aiohttp.ClientWebSocketResponse, message: str
) -> tuple[float, float, str] | str:
    """Send one turn and read its events: (first output, total, response id), or what went
    wrong."""
    first: float | None = None
    frames = 0
    start = time.perf_counter()
    try:
        async with asyncio.timeout(TURN_TIMEOUT_SECONDS):
            await ws.send_str(message)
            while True:
                received = await ws.receive()
                if received.type is not aiohttp.WSMsgType.TEXT:
                    return f"socket {received.type.name} after {frames} frames of the turn"
                text: str = received.data
                kind = event_type(text)
                if frames == 0 and kind not in TURN_OPENERS:
                    return f"turn began with {kind}: {text[:200]}"
                frames += 1
                if first is None and kind not in NOT_OUTPUT:
                    first = time.perf_counter() - start
                if kind == "response.completed":
                    total = time.perf_counter() - start
                    break
                if kind in FAILURES:
                    return f"{kind}: {text[:300]}"
    except TimeoutError:
        return f"timeout: no response.completed within {TURN_TIMEOUT_SECONDS:g} s"
    except (aiohttp.ClientError, ConnectionError) as exc:
        return f"{type(exc).__name__}: {exc}"
    assert first is not None
    response_id = completed_id(text)
    if response_id is None:
        return f"malformed or unsuccessful response.completed: {text[:300]}"
    return first, total, response_id


def event_type(text: str) -> str | None:
    """The ``type`` of an event frame, read from its head when it comes first (the fake and
    codexlb's relay write it first), else by parsing the frame."""
    if text.startswith('{"type":"'):
        end = text.find('"', 9)
        if end > 0:
            return text[9:end]
    try:
        payload = json.loads(text)
    except ValueError:
        return None
    kind = payload.get("type") if isinstance(payload, dict) else None
    return kind if isinstance(kind, str) else None


def completed_id(text: str) -> str | None:
    """The response id of a successful ``response.completed`` frame, else None."""
    try:
        payload = json.loads(text)
    except ValueError:
        return None
    response = payload.get("response") if isinstance(payload, dict) else None
    if not isinstance(response, dict) or response.get("status") != "completed":
        return None
    response_id = response.get("id")
    return response_id if isinstance(response_id, str) and response_id else None


async def bounded(items: Iterable[T], action: Callable[[T], Awaitable[Any]], limit: int) -> None:
    """``action`` on every item, at most ``limit`` at a time."""
    pending = iter(items)

    async def worker() -> None:
        for item in pending:  # shared by the workers: each item is taken once
            await action(item)

    async with asyncio.TaskGroup() as group:
        for _ in range(limit):
            group.create_task(worker())


def new_session() -> aiohttp.ClientSession:
    # No connection limit: each WebSocket holds its connection for its whole life.
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))


# -- load ------------------------------------------------------------------------------------


@dataclass
class SideResult:
    """The pooled samples of one side at one concurrency (warm-up excluded)."""

    first: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    wall_seconds: float = 0.0
    codexlb_cpu_seconds: float = 0.0
    fake_cpu_seconds: float = 0.0
    load_generator_cpu_seconds: float = 0.0
    other_cpu_seconds: float = 0.0
    """The machine's busy time minus the three processes': other processes, and kernel work
    not charged to a process (loopback softirqs)."""
    turns: int = 0


@dataclass
class Run:
    """The running benchmark: its targets and servers, the tallies of the whole run, `level`
    (one concurrency) and `idle` (the idle-socket phase)."""

    targets: dict[Side, Target]
    codexlb: Server
    fake: Server
    errors: Errors
    chain: int
    compress: bool
    completed_through: int = 0
    sent: int = 0

    async def level(
        self, concurrency: int, turns: int, rounds: int, warmup: int
    ) -> dict[Side, SideResult]:
        results: dict[Side, SideResult] = {side: SideResult() for side in SIDES}
        async with new_session() as direct, new_session() as through:
            sessions = {"direct": direct, "through": through}
            channels = {
                side: self.targets[side].channels(
                    sessions[side], concurrency, chain=self.chain, compress=self.compress
                )
                for side in SIDES
            }
            try:
                for side in SIDES:
                    await self.open_all(side, channels[side], "handshake")
                for side in SIDES:
                    await self.batch(channels[side], side, warmup, "warm-up", None)
                for number, count in enumerate(split(turns, rounds)):
                    order = SIDES if number % 2 == 0 else SIDES[::-1]
                    progress(f"  concurrency {concurrency}: round {number + 1}/{rounds}")
                    for side in order:
                        await self.batch(channels[side], side, count, "measured", results[side])
            finally:
                for side in SIDES:
                    await asyncio.gather(*(channel.close() for channel in channels[side]))
        return results

    async def open_all(self, side: Side, channels: Sequence[Channel], phase: str) -> None:
        async def open_one(channel: Channel) -> None:
            problem = await channel.open()
            if problem is not None:
                self.errors.add(side, phase, problem)

        await bounded(channels, open_one, IN_FLIGHT)
        self.check_alive()

    async def batch(
        self,
        channels: Sequence[Channel],
        side: Side,
        count: int,
        phase: str,
        result: SideResult | None,
    ) -> None:
        """``count`` turns, each channel's worker taking the next index as it comes free."""
        outcomes: list[tuple[float, float] | str] = []
        indexes = iter(range(self.sent, self.sent + count))

        async def worker(channel: Channel) -> None:
            for index in indexes:  # shared by the workers: each index is sent once
                outcomes.append(await channel.turn(index))

        cpu_before = self.cpu_now()
        start = time.perf_counter()
        async with asyncio.TaskGroup() as group:
            for channel in channels[:count]:
                group.create_task(worker(channel))
        wall = time.perf_counter() - start
        used = [b - a for a, b in zip(cpu_before, self.cpu_now(), strict=True)]
        lb_cpu, fake_cpu, own_cpu, machine = used
        self.sent += count
        self.tally(side, phase, outcomes)
        if result is None:
            return
        result.wall_seconds += wall
        result.codexlb_cpu_seconds += lb_cpu
        result.fake_cpu_seconds += fake_cpu
        result.load_generator_cpu_seconds += own_cpu
        result.other_cpu_seconds += max(0.0, machine - lb_cpu - fake_cpu - own_cpu)
        result.turns += count
        for outcome in outcomes:
            if not isinstance(outcome, str):
                result.first.append(outcome[0])
                result.total.append(outcome[1])

    def tally(self, side: Side, phase: str, outcomes: Sequence[tuple[float, float] | str]) -> int:
        """Count the errors and the completed through turns; returns the successes."""
        ok = 0
        for outcome in outcomes:
            if isinstance(outcome, str):
                self.errors.add(side, phase, outcome)
            else:
                ok += 1
        if side == "through":
            self.completed_through += ok
        self.check_alive()
        return ok

    def cpu_now(self) -> tuple[float, float, float, float]:
        """CPU seconds so far of codexlb, the fake upstream, this process and the machine."""
        return (
            cpu_seconds(self.codexlb.pid),
            cpu_seconds(self.fake.pid),
            time.process_time(),
            machine_busy_seconds(),
        )

    def check_alive(self) -> None:
        self.codexlb.check_alive()
        self.fake.check_alive()

    async def idle(self, count: int) -> dict[str, Any]:
        """The idle-socket phase (see the module docstring)."""
        lb, fake = self.codexlb.pid, self.fake.pid
        await asyncio.sleep(IDLE_PAUSE_SECONDS)
        before = IdleSample.read(lb, fake)
        async with new_session() as session:
            channels = self.targets["through"].channels(
                session, count, chain=count + 2, compress=self.compress
            )
            try:
                progress(f"  idle: opening {count} sockets, one turn each")
                opened = await self.idle_turns(channels, "idle: first turn")
                await asyncio.sleep(IDLE_PAUSE_SECONDS)
                after = IdleSample.read(lb, fake)
                progress(f"  idle: one more turn on each of the {count} sockets")
                again = await self.idle_turns(channels, "idle: second turn")
                after_again = IdleSample.read(lb, fake)
            finally:
                progress(f"  idle: closing {count} sockets")
                await bounded(channels, Channel.close, IN_FLIGHT)
        longest_idle = max(channel.longest_gap for channel in channels)
        return {
            "sockets": count,
            "batch": IN_FLIGHT,
            "first_turns": opened,
            "second_turns": again,
            "longest_idle_seconds": round(longest_idle, 1),
            "before": before.summary(),
            "idle": after.summary(),
            "after_second_turns": after_again.summary(),
            "codexlb_kib_per_socket_pair": round((after.lb_rss_kib - before.lb_rss_kib) / count, 1),
            "load_generator_kib_per_client_socket": round(
                (after.own_rss_kib - before.own_rss_kib) / count, 1
            ),
        }

    async def idle_turns(self, channels: Sequence[Channel], phase: str) -> dict[str, Any]:
        """One turn on every channel (opening it first if needed), IN_FLIGHT at a time."""
        outcomes: list[tuple[float, float] | str] = []
        numbers = itertools.count(self.sent)

        async def one(channel: Channel) -> None:
            outcomes.append(await channel.turn(next(numbers)))

        cpu_before = cpu_seconds(self.codexlb.pid)
        start = time.perf_counter()
        await bounded(channels, one, IN_FLIGHT)
        wall = time.perf_counter() - start
        cpu = cpu_seconds(self.codexlb.pid) - cpu_before
        self.sent += len(channels)
        ok = self.tally("through", phase, outcomes)
        return {
            "succeeded": ok,
            "wall_seconds": round(wall, 2),
            "codexlb_cpu_ms_per_socket": ratio(1000 * cpu, len(channels)),
            "total_ms": distribution_ms([o[1] for o in outcomes if not isinstance(o, str)]),
        }


@dataclass(frozen=True)
class IdleSample:
    lb_rss_kib: int
    lb_sockets: int
    fake_sockets: int
    own_rss_kib: int

    @classmethod
    def read(cls, codexlb_pid: int, fake_pid: int) -> IdleSample:
        return cls(
            memory_kib(codexlb_pid)["VmRSS"],
            open_sockets(codexlb_pid),
            open_sockets(fake_pid),
            memory_kib("self")["VmRSS"],
        )

    def summary(self) -> dict[str, Any]:
        return {
            "codexlb_rss_mib": round(self.lb_rss_kib / 1024, 1),
            "codexlb_socket_fds": self.lb_sockets,
            "fake_upstream_socket_fds": self.fake_sockets,
            "load_generator_rss_mib": round(self.own_rss_kib / 1024, 1),
        }


def raise_fd_limit(needed: int) -> int:
    """Raise the soft open-file limit to the hard one (inherited by the servers); refuses
    to run when even that is below ``needed``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise BenchError(f"the open-file hard limit is {hard}, the run needs about {needed}")
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# -- reports ---------------------------------------------------------------------------------


def side_summary(result: SideResult) -> dict[str, Any]:
    return {
        "turns": result.turns,
        "completed": len(result.total),
        "wall_seconds": round(result.wall_seconds, 3),
        "turns_per_second": ratio(len(result.total), result.wall_seconds, 1),
        "first_output_ms": distribution_ms(result.first),
        "total_ms": distribution_ms(result.total),
        "cpu_share_of_core": {
            "codexlb": ratio(result.codexlb_cpu_seconds, result.wall_seconds),
            "fake_upstream": ratio(result.fake_cpu_seconds, result.wall_seconds),
            "load_generator": ratio(result.load_generator_cpu_seconds, result.wall_seconds),
            "other": ratio(result.other_cpu_seconds, result.wall_seconds),
        },
        "codexlb_cpu_seconds": round(result.codexlb_cpu_seconds, 2),
    }


def level_summary(
    concurrency: int, warmup: int, results: dict[Side, SideResult], rss_mib: float
) -> dict[str, Any]:
    direct, through = side_summary(results["direct"]), side_summary(results["through"])
    lb_cpu, through_result = results["through"].codexlb_cpu_seconds, results["through"]
    return {
        "concurrency": concurrency,
        "warmup_per_side": warmup,
        "direct": direct,
        "through": through,
        "added_ms": {
            f"{metric}_{q}": minus(through[f"{metric}_ms"][q], direct[f"{metric}_ms"][q])
            for metric in ("first_output", "total")
            for q in ("p50", "p99")
        },
        "throughput_ratio": ratio(
            through["turns_per_second"] or 0.0, direct["turns_per_second"] or 0.0
        ),
        "codexlb_cpu_ms_per_turn": ratio(1000 * lb_cpu, through_result.turns),
        "codexlb_cpu_share_of_core": ratio(lb_cpu, through_result.wall_seconds),
        "codexlb_rss_mib_at_end": round(rss_mib, 1),
    }


COLUMNS = ("first p50", "first p99", "total p50", "total p99")
WIDTHS = (10, 10, 11, 11)


def table_row(label: str, values: Sequence[float | None], spec: str) -> str:
    cells = "".join(cell(v, w, spec) for v, w in zip(values, WIDTHS, strict=True))
    return f"  {label:<17}{cells}"


def render(report: dict[str, Any]) -> str:
    settings = report["settings"]
    compress = "offered" if settings["compress"] else "not offered"
    out = [
        f"codexlb WebSocket benchmark: {settings['turns']} turns per side per level in "
        f"{settings['rounds']} alternating rounds, warm-up {settings['warmup']} per side; "
        f"chains of {settings['chain']} turns; permessage-deflate {compress} by the client",
        render_environment(report),
        "latencies in ms from sending response.create; first = first output event (not "
        "codex.rate_limits, response.created or response.in_progress); added = through minus "
        "direct at the same percentile",
    ]
    header = "  " + " " * 17 + "".join(f"{n:>{w}}" for n, w in zip(COLUMNS, WIDTHS, strict=True))
    for level in report["levels"]:
        out += ["", f"concurrency {level['concurrency']} (sockets per side)"]
        out.append(header + f"{'turns/s':>10}")
        for side in SIDES:
            first, total = level[side]["first_output_ms"], level[side]["total_ms"]
            latencies = [first["p50"], first["p99"], total["p50"], total["p99"]]
            rate = cell(level[side]["turns_per_second"], 10, ".1f")
            out.append(table_row(LABELS[side], latencies, ".2f") + rate)
        a = level["added_ms"]
        added = [a["first_output_p50"], a["first_output_p99"], a["total_p50"], a["total_p99"]]
        out.append(table_row("added", added, "+.2f"))
        cpu_share = level["codexlb_cpu_share_of_core"]
        out.append(
            f"  throughput through/direct {cell(level['throughput_ratio'], 0)}; codexlb CPU "
            f"{cell(level['codexlb_cpu_ms_per_turn'], 0)} ms/turn, "
            f"{cell(None if cpu_share is None else 100 * cpu_share, 0, '.0f')}% of one core "
            f"during through rounds; RSS {level['codexlb_rss_mib_at_end']:.1f} MiB after the level"
        )
        shares = "; ".join(cpu_shares(side, level[side]) for side in SIDES)
        out.append(f"  CPU, % of one core: {shares}")
    out += [
        "",
        f"codexlb peak RSS (VmHWM) after the levels: {report['peak_rss_mib_after_levels']:.1f} MiB",
    ]
    if report["idle"] is not None:
        out += render_idle(report["idle"])
    out += render_footer(report)
    return "\n".join(out)


def cpu_shares(side: Side, summary: dict[str, Any]) -> str:
    """Who used the cores during one side's rounds (with N CPUs, N x 100% is all of them)."""
    shares = summary["cpu_share_of_core"]
    names = {
        "codexlb": "codexlb",
        "fake_upstream": "fake",
        "load_generator": "load generator",
        "other": "other",
    }
    parts = [
        f"{label} {cell(None if shares[key] is None else 100 * shares[key], 0, '.0f')}"
        for key, label in names.items()
    ]
    return f"{side} rounds " + ", ".join(parts)


def render_idle(idle: dict[str, Any]) -> list[str]:
    n, before, after = idle["sockets"], idle["before"], idle["idle"]
    first, second, again = idle["first_turns"], idle["second_turns"], idle["after_second_turns"]
    lines = [
        "",
        f"idle sockets: {n} client sockets to codexlb, each with its upstream socket",
        f"  open + first turn ({idle['batch']} at a time): {first['succeeded']}/{n} ok in "
        f"{first['wall_seconds']:.1f} s, codexlb CPU {cell(first['codexlb_cpu_ms_per_socket'], 0)}"
        " ms per socket",
        f"  codexlb RSS {before['codexlb_rss_mib']:.1f} -> {after['codexlb_rss_mib']:.1f} MiB "
        f"after a {IDLE_PAUSE_SECONDS:g} s pause: {idle['codexlb_kib_per_socket_pair']:.1f} KiB "
        "per socket pair (client + upstream)",
        f"  socket fds: codexlb {before['codexlb_socket_fds']} -> {after['codexlb_socket_fds']}, "
        f"fake upstream {before['fake_upstream_socket_fds']} -> "
        f"{after['fake_upstream_socket_fds']}",
        f"  load generator RSS {before['load_generator_rss_mib']:.1f} -> "
        f"{after['load_generator_rss_mib']:.1f} MiB: "
        f"{idle['load_generator_kib_per_client_socket']:.1f} KiB per client socket",
        f"  second turn on every socket, chained to its first, after up to "
        f"{idle['longest_idle_seconds']:.1f} s idle ({idle['batch']} at a time): "
        f"{second['succeeded']}/{n} ok in {second['wall_seconds']:.1f} s "
        f"(total p50 {cell(second['total_ms']['p50'], 0)} ms, "
        f"p99 {cell(second['total_ms']['p99'], 0)} ms); codexlb RSS then "
        f"{again['codexlb_rss_mib']:.1f} MiB",
    ]
    if idle["longest_idle_seconds"] > CODEXLB_CLIENT_PING_SECONDS:
        lines.append(
            f"  warning: a socket sat idle {idle['longest_idle_seconds']:.0f} s, past codexlb's "
            f"{CODEXLB_CLIENT_PING_SECONDS:g} s ping: its pong came late or not at all"
        )
    return lines


# -- main ------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    began = time.perf_counter()
    bench_cpu_before = time.process_time()
    raise_fd_limit(2 * args.idle + 2 * max(args.concurrency) + FD_MARGIN)
    errors = Errors()
    with tempfile.TemporaryDirectory(prefix="codexlb-bench-") as temp:
        async with serving(Path(temp)) as servers:
            fake, codexlb = servers.fake, servers.codexlb
            after_start = ProcessStats.read(codexlb.pid)
            fake_cpu_before = cpu_seconds(fake.pid)
            bench = Run(
                targets=targets(fake.url, codexlb.url),
                codexlb=codexlb,
                fake=fake,
                errors=errors,
                chain=args.chain,
                compress=args.compress,
            )
            levels = []
            idle = None
            async with asyncio.timeout(RUN_TIMEOUT_SECONDS):
                for concurrency in args.concurrency:
                    warmup = max(args.warmup, 2 * concurrency)
                    results = await bench.level(concurrency, args.turns, args.rounds, warmup)
                    rss = ProcessStats.read(codexlb.pid).rss_mib
                    levels.append(level_summary(concurrency, warmup, results, rss))
                peak_after_levels = ProcessStats.read(codexlb.pid).peak_rss_mib
                if args.idle:
                    idle = await bench.idle(args.idle)
            at_end = ProcessStats.read(codexlb.pid)
            fake_cpu = cpu_seconds(fake.pid) - fake_cpu_before
            codexlb_exit = await codexlb.stop()
            await fake.stop()
        closing = Closing(
            servers=servers,
            errors=errors,
            completed_through=bench.completed_through,
            after_start=after_start,
            at_end=at_end,
            codexlb_exit=codexlb_exit,
            fake_cpu_seconds=fake_cpu,
            began=began,
            bench_cpu_before=bench_cpu_before,
        )
        failures = []
        if idle is not None:
            for phase in ("first_turns", "second_turns"):
                if idle[phase]["succeeded"] != args.idle:
                    ok = idle[phase]["succeeded"]
                    failures.append(f"idle sockets: {ok}/{args.idle} {phase.replace('_', ' ')}")
        settings = {
            "turns": args.turns,
            "concurrency": args.concurrency,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "chain": args.chain,
            "idle": args.idle,
            "compress": args.compress,
        }
        sections = {
            "levels": levels,
            "peak_rss_mib_after_levels": round(peak_after_levels, 1),
            "idle": idle,
        }
        return run_report(closing, settings, sections, failures)


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench/ws.py",
        description="Latency, throughput and idle-socket memory of codexlb versus the fake "
        "upstream, in Responses WebSocket mode.",
    )
    parser.add_argument(
        "--turns",
        type=positive,
        default=8000,
        help="measured turns per side and level (default 8000)",
    )
    parser.add_argument(
        "--concurrency",
        type=concurrency_list,
        default=[1, 16, 64],
        help="sockets per side, e.g. 1,16,64",
    )
    parser.add_argument(
        "--rounds", type=positive, default=8, help="alternating rounds per level (default 8)"
    )
    parser.add_argument(
        "--warmup",
        type=positive,
        default=100,
        help="warm-up turns per side and level (at least 2 x concurrency)",
    )
    parser.add_argument(
        "--chain",
        type=positive,
        default=20,
        help="turns per conversation before a fresh one (default 20)",
    )
    parser.add_argument(
        "--idle",
        type=non_negative,
        default=2000,
        help="idle sockets to hold open through codexlb (default 2000; 0 skips the phase)",
    )
    parser.add_argument(
        "--compress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="offer permessage-deflate from the client sockets, as Codex does",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    return execute(lambda: run(args), render, as_json=args.json)


if __name__ == "__main__":
    raise SystemExit(main())
