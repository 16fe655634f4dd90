"""WebSocket-mode benchmark: the cost of codexlb in front of an upstream, per turn, per
relayed event and per idle socket, beside nginx as a plain proxy hop.

Run: ``.venv/bin/python bench/ws.py [--turns N] [--deltas 20,300] [--concurrency 1,16,64]
[--chaining unchained,chained] [--compress] [--idle N] [--no-nginx | --nginx PATH]
[--codexlb-tree DIR] [--baseline-tree DIR] [--json]``.

Processes
    As in ``http_sse.py`` (`bench.common.serving`, ``nginx.py``): per response shape
    (``--deltas``) a fresh fake upstream, ``codexlb serve``, nginx where it is installed, the
    baseline codexlb with ``--baseline-tree``, and this process, the load generator, on
    127.0.0.1. This process first raises its soft open-file limit to the hard limit; the
    servers inherit it (``--idle 2000`` needs about 4,000 descriptors in codexlb).

One turn
    ``GET /backend-api/codex/responses`` upgraded once per socket. permessage-deflate is off
    on both legs of every side: not offered by this process, not accepted by the fake, and
    codexlb's ``[server]`` and ``[upstream] websocket_compression`` off; ``--compress`` turns
    it on everywhere (offered as Codex does, accepted by the fake and by codexlb, and offered
    by codexlb upstream), and a socket that did not negotiate what was asked counts as a
    failure. Each turn is one ``response.create`` text frame and the answer one JSON event a
    frame, each written on its own: ``codex.rate_limits``, ``response.created``,
    ``response.in_progress``, ... ``--deltas`` text deltas ... ``response.completed`` (11 +
    deltas frames). Turns are *unchained* (each a new conversation on the same socket, full
    input, no anchor) or *chained* (as Codex does: a turn continues the previous response of
    its socket with ``previous_response_id`` and a one-message delta ``input``; every
    ``--chain`` turns a socket starts a fresh conversation); ``--chaining`` picks one or both.
    Through codexlb the anchor is the live one of the socket's upstream socket, so it is
    forwarded as it is, and codexlb commits every response's snapshot before it forwards
    ``response.completed``. Sockets are opened before any timing (handshakes are not part of
    a turn). The clock starts just before the frame is sent. *first* stops at the first event
    that is output, that is neither ``codex.rate_limits``, ``response.created`` nor
    ``response.in_progress`` (codexlb holds those two back until output comes); *total* stops
    at ``response.completed``; *1st-end* is the one to the other.

Sides and interleaving
    *direct*: sockets straight to the fake upstream, each authenticated as one of its three
    accounts in turn. *through*: sockets to codexlb with a client key; codexlb opens one
    upstream socket per client socket. *baseline* (``--baseline-tree``): the same through the
    second codexlb, another version measured in the same rounds (as in ``http_sse.py``).
    *nginx*: sockets to nginx with the accounts' tokens, each upgraded end to end to the fake.
    For each shape, chaining and concurrency C each side opens C sockets, each driven by its own
    worker doing sequential turns (a closed loop); after a warm-up on every side, ``--rounds``
    rounds each run ``turns / rounds`` turns on one side, then on the next, rotating which side
    goes first, and samples and wall time are pooled per side. The numbers (*added*, *turns/s*,
    a proxy's *throughput* over direct, its CPU per turn, per relayed event and as a share of
    one core, *codexlb vs baseline*) mean what they mean in ``http_sse.py``. The CPU line also
    gives every process's share during each side's rounds and everything else's (*other*: the
    machine's busy time minus the processes', that is other processes, whose load makes the run
    noisy, and kernel work charged to no process, loopback included): whether the machine's
    cores, rather than a proxy's one event loop, set the pace. codexlb's RSS (and the
    baseline's) is read at the end of each level, and its peak (``VmHWM``) before the idle
    phase.

Idle sockets (``--idle N``)
    After the levels of the last shape, with their sockets closed and a pause: codexlb's
    ``VmRSS``, then N client sockets to codexlb (64 handshakes and first turns at a time, so
    each has its upstream socket open and a response behind it), then a pause with every
    socket idle, then ``VmRSS`` again: (after - before) / N is codexlb's memory per socket
    pair, its client socket and its upstream socket both (both live in codexlb's process; the
    socket descriptors of codexlb, two per pair, show that each kept its upstream socket, and
    the phase warns otherwise). Freed memory that codexlb's allocator kept from the levels may
    be reused, so this is a lower bound rather than an overestimate. The kernel's TCP buffer
    memory (``/proc/net/sockstat``: the whole machine, every socket of every process, so only
    a hint on a shared machine), the
    descriptors of the fake upstream (``/proc/PID/fd``), and this process's own RSS per client
    socket are read at the same moments. Then every socket takes one more turn, chained to its
    first (64 at a time): all N must succeed. codexlb pings an idle client every 30 s and drops
    it without a pong, which this process only sends when it reads, so the phase warns when a
    socket sat idle longer than that.

Caveats
    As in ``http_sse.py``: the processes share the machine's cores, the direct side has one
    process fewer competing for them, and a proxy that writes frames which arrive together in
    one write saves the load generator work. With ``--compress`` each socket end keeps a zlib
    compressor whose touched memory grows with the traffic it has carried (about 100 KiB after
    a turn, up to about 250 KiB), so memory per idle socket after one or two short turns is a
    floor for long, busy Codex sessions.

Correctness
    Every turn must begin with ``codex.rate_limits`` or ``response.created`` (nothing left over
    from the previous turn) and end with ``response.completed`` (status ``completed``, with an
    id) before a 30 s timeout, without ``error``, ``response.failed`` or
    ``response.incomplete``; a socket that failed a turn is closed and reopened for its next
    turn. The SQLite file of codexlb, and the baseline's, must hold a snapshot per turn
    completed through it, the idle phase must succeed on every socket, and every server must
    survive the run. Otherwise the run says so loudly and exits 1 (2 if a server does not start
    or the open-file limit is too low, 130 on Ctrl-C, 143 on SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import json
import os
import resource
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

if __package__ in (None, ""):  # run as ``python bench/ws.py``: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    PROXIES,
    SIDES,
    BenchError,
    Errors,
    ProcessStats,
    Servers,
    Side,
    cell,
    cpu_seconds,
    distribution_ms,
    execute,
    machine_busy_seconds,
    memory_kib,
    open_sockets,
    positive,
    progress,
    ratio,
    render_environment,
    render_footer,
)
from bench.levels import (
    Names,
    Outcome,
    Run,
    SideResult,
    add_level_arguments,
    closed_loop,
    interleave,
    render_level,
    run_levels,
    targets,
)

T = TypeVar("T")

NAMES = Names(
    unit="turns", per_unit="turn", first="first_output", first_column="first", rate_column="turns/s"
)
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
CHAININGS = ("unchained", "chained")
SOCKETS_PER_PAIR = 2
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
CPU_SHARES = ("codexlb", "baseline", "nginx", "fake_upstream", "load_generator", "other")
"""Who used the machine's CPU during a side's rounds, in the report's keys (*baseline* only in a
run that has one)."""


# -- one socket ------------------------------------------------------------------------------


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
        if bool(self.ws.compress) != self.compress:
            await self.close()
            wanted = "on" if self.compress else "off"
            return f"permessage-deflate not as asked: {wanted} wanted, the server said otherwise"
        return None

    async def close(self) -> None:
        ws, self.ws = self.ws, None
        if ws is not None:
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                await ws.close()

    async def turn(self, index: int) -> Outcome:
        """(first output, total) in seconds and the frames of the turn, or what went wrong;
        the socket is opened first if needed, outside the timing, and closed after a
        failure."""
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
        first, total, frames, self.previous_response_id = outcome
        self.last_completed = time.perf_counter()
        self.chained += 1
        return first, total, frames


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
) -> tuple[float, float, int, str] | str:
    """Send one turn and read its events: (first output, total, frames, response id), or
    what went wrong."""
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
    return first, total, frames, response_id


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
class SideCpuResult(SideResult):
    """A `SideResult` that also shares out the machine's CPU time during the side's rounds."""

    cpu_seconds: dict[str, float] = field(default_factory=dict)
    """By process (`CPU_SHARES`) during the side's rounds; *other* is the machine's busy time
    minus the processes': other processes, and kernel work not charged to a process (loopback
    softirqs)."""

    def add_cpu(self, used: Mapping[str, float], machine: float) -> None:
        """Pool the CPU seconds a batch took from each process and the machine."""
        for name, seconds in used.items():
            self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + seconds
        other = max(0.0, machine - sum(used.values()))
        self.cpu_seconds["other"] = self.cpu_seconds.get("other", 0.0) + other

    def extra_summary(self) -> dict[str, Any]:
        return {
            "cpu_share_of_core": {
                name: ratio(self.cpu_seconds.get(name, 0.0), self.wall_seconds)
                for name in CPU_SHARES
                if name != "baseline" or name in self.cpu_seconds
            }
        }


@dataclass
class WsRun(Run):
    """`Run` over WebSockets: ``concurrency`` sockets per side and level, turns unchained or
    chained (`variants`), then the idle-socket phase (`idle`) after the levels."""

    chainings: Sequence[str]
    chain: int
    compress: bool
    idle_sockets: int
    turns_per_conversation: int = field(default=1, init=False)

    def variants(self) -> list[dict[str, Any]]:
        return [{"chaining": chaining} for chaining in self.chainings]

    def use_variant(self, variant: Mapping[str, Any]) -> None:
        self.turns_per_conversation = self.chain if variant["chaining"] == "chained" else 1

    async def level(
        self, concurrency: int, count: int, rounds: int, warmup: int
    ) -> dict[Side, SideCpuResult]:
        async with contextlib.AsyncExitStack() as stack:
            sessions = {side: await stack.enter_async_context(new_session()) for side in self.sides}
            channels = {
                side: self.channels(side, sessions[side], concurrency, self.turns_per_conversation)
                for side in self.sides
            }
            try:
                for side in self.sides:
                    await self.open_all(side, channels[side], "handshake")
                batch = functools.partial(self.batch, channels)
                return await interleave(
                    batch, SideCpuResult, self.sides, concurrency, count, rounds, warmup
                )
            finally:
                for side in self.sides:
                    await asyncio.gather(*(channel.close() for channel in channels[side]))

    def after_level(self) -> dict[str, Any]:
        """codexlb's RSS, and the baseline's where it runs."""
        return {
            f"{PROXIES[side]}_rss_mib_at_end": round(ProcessStats.read(b.server.pid).rss_mib, 1)
            for side, b in self.servers.balancers().items()
        }

    async def after_levels(self) -> tuple[dict[str, Any], list[str]]:
        """codexlb's peak RSS after the levels, then the idle-socket phase (unless
        ``idle_sockets`` is 0), which must succeed on every socket."""
        peak_after_levels = ProcessStats.read(self.codexlb.pid).peak_rss_mib
        idle = await self.idle(self.idle_sockets) if self.idle_sockets else None
        failures = []
        if idle is not None:
            for phase in ("first_turns", "second_turns"):
                if idle[phase]["succeeded"] != self.idle_sockets:
                    ok = idle[phase]["succeeded"]
                    failures.append(
                        f"idle sockets: {ok}/{self.idle_sockets} {phase.replace('_', ' ')}"
                    )
        sections = {"peak_rss_mib_after_levels": round(peak_after_levels, 1), "idle": idle}
        return sections, failures

    def channels(
        self, side: Side, session: aiohttp.ClientSession, count: int, chain: int
    ) -> list[Channel]:
        target = self.targets[side]
        return [
            Channel(session, target.url, target.headers_for(n), chain, self.compress)
            for n in range(count)
        ]

    async def open_all(self, side: Side, channels: Sequence[Channel], phase: str) -> None:
        async def open_one(channel: Channel) -> None:
            problem = await channel.open()
            if problem is not None:
                self.errors.add(side, phase, problem)

        await bounded(channels, open_one, IN_FLIGHT)
        self.check_alive()

    async def batch(
        self,
        channels: Mapping[Side, Sequence[Channel]],
        side: Side,
        count: int,
        phase: str,
        result: SideCpuResult | None,
    ) -> None:
        """``count`` turns, each channel's worker taking the next index as it comes free."""
        turns = [channel.turn for channel in channels[side][:count]]
        cpu_before, machine_before = self.cpu_now(), machine_busy_seconds()
        outcomes, wall = await closed_loop(turns, self.sent, count)
        cpu_after, machine = self.cpu_now(), machine_busy_seconds() - machine_before
        used = {name: cpu_after[name] - cpu_before[name] for name in cpu_before}
        self.sent += count
        self.tally(side, phase, outcomes)
        if result is None:
            return
        proxy_cpu = used[PROXIES[side]] if side in PROXIES else 0.0
        result.add(outcomes, wall, proxy_cpu, count)
        result.add_cpu(used, machine)

    def cpu_now(self) -> dict[str, float]:
        """CPU seconds so far of codexlb, the baseline and nginx (those that run), the fake
        upstream and this process."""
        now = {PROXIES[side]: self.proxy_cpu(side) for side in self.sides if side in PROXIES}
        now["fake_upstream"] = cpu_seconds(self.fake.pid)
        now["load_generator"] = time.process_time()
        return now

    async def idle(self, count: int) -> dict[str, Any]:
        """The idle-socket phase (see the module docstring)."""
        lb, fake = self.codexlb.pid, self.fake.pid
        await asyncio.sleep(IDLE_PAUSE_SECONDS)
        before = IdleSample.read(lb, fake)
        async with new_session() as session:
            channels = self.channels("through", session, count, count + 2)
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
            "codexlb_socket_fds_per_pair": round((after.lb_sockets - before.lb_sockets) / count, 2),
            "load_generator_kib_per_client_socket": round(
                (after.own_rss_kib - before.own_rss_kib) / count, 1
            ),
        }

    async def idle_turns(self, channels: Sequence[Channel], phase: str) -> dict[str, Any]:
        """One turn on every channel (opening it first if needed), IN_FLIGHT at a time."""
        outcomes: list[Outcome] = []
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
    tcp_kib: int
    """The kernel's memory for TCP buffers, all sockets of the machine (``/proc/net/sockstat``)."""

    @classmethod
    def read(cls, codexlb_pid: int, fake_pid: int) -> IdleSample:
        return cls(
            memory_kib(codexlb_pid)["VmRSS"],
            open_sockets(codexlb_pid),
            open_sockets(fake_pid),
            memory_kib("self")["VmRSS"],
            kernel_tcp_kib(),
        )

    def summary(self) -> dict[str, Any]:
        return {
            "codexlb_rss_mib": round(self.lb_rss_kib / 1024, 1),
            "codexlb_socket_fds": self.lb_sockets,
            "fake_upstream_socket_fds": self.fake_sockets,
            "load_generator_rss_mib": round(self.own_rss_kib / 1024, 1),
            "kernel_tcp_kib": self.tcp_kib,
        }


def kernel_tcp_kib() -> int:
    """``mem`` of the ``TCP:`` line of ``/proc/net/sockstat`` (pages) in KiB."""
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        fields = line.split()
        if fields[:1] == ["TCP:"] and "mem" in fields:
            return int(fields[fields.index("mem") + 1]) * PAGE_KIB
    return 0


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


def render(report: dict[str, Any]) -> str:
    settings = report["settings"]
    compress = "on" if settings["compress"] else "off"
    out = [
        f"codexlb WebSocket benchmark: {settings['turns']} turns per side per level in "
        f"{settings['rounds']} rotating rounds, warm-up {settings['warmup']} per side; "
        f"chained turns in conversations of {settings['chain']}; permessage-deflate {compress} "
        "on both legs of every side; every event its own frame",
        render_environment(report),
        "latencies in ms from sending response.create; first = first output event (not "
        "codex.rate_limits, response.created or response.in_progress); 1st-end = from it to "
        "response.completed; added = through a proxy minus direct at the same percentile",
    ]
    for level in report["levels"]:
        sides = [side for side in SIDES if side in level]
        rss: dict[Side, str] = {
            side: f"; RSS {level[f'{PROXIES[side]}_rss_mib_at_end']:.1f} MiB after the level"
            for side in sides
            if side in ("through", "baseline")
        }
        out += render_level(NAMES, level, heading_note="sockets per side", cpu_notes=rss)
        with_nginx = "nginx" in level
        shares = "; ".join(cpu_shares(s, level[s], with_nginx=with_nginx) for s in sides)
        out.append(f"  CPU, % of one core: {shares}")
    out += [
        "",
        f"codexlb peak RSS (VmHWM) after the levels: {report['peak_rss_mib_after_levels']:.1f} MiB",
    ]
    if report["idle"] is not None:
        out += render_idle(report["idle"])
    out += render_footer(report)
    return "\n".join(out)


def cpu_shares(side: Side, summary: dict[str, Any], *, with_nginx: bool) -> str:
    """Who used the cores during one side's rounds (with N CPUs, N x 100% is all of them)."""
    shares = summary["cpu_share_of_core"]
    names = {
        "codexlb": "codexlb",
        "baseline": "baseline",
        "nginx": "nginx",
        "fake_upstream": "fake",
        "load_generator": "load generator",
        "other": "other",
    }
    parts = [
        f"{label} {cell(None if shares[key] is None else 100 * shares[key], 0, '.0f')}"
        for key, label in names.items()
        if key in shares and (key != "nginx" or with_nginx)
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
        f"  socket fds: codexlb {before['codexlb_socket_fds']} -> {after['codexlb_socket_fds']} "
        f"({idle['codexlb_socket_fds_per_pair']:.2f} per pair: client + upstream = 2), "
        f"fake upstream {before['fake_upstream_socket_fds']} -> "
        f"{after['fake_upstream_socket_fds']}; kernel TCP buffers {before['kernel_tcp_kib']} -> "
        f"{after['kernel_tcp_kib']} KiB (the whole machine, other processes' sockets included)",
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
    if idle["codexlb_socket_fds_per_pair"] < SOCKETS_PER_PAIR:
        lines.append(
            "  warning: codexlb holds fewer than 2 sockets per idle client: not every client "
            "socket kept its upstream socket, so the memory per pair leaves some out"
        )
    if idle["longest_idle_seconds"] > CODEXLB_CLIENT_PING_SECONDS:
        lines.append(
            f"  warning: a socket sat idle {idle['longest_idle_seconds']:.0f} s, past codexlb's "
            f"{CODEXLB_CLIENT_PING_SECONDS:g} s ping: its pong came late or not at all"
        )
    return lines


# -- main ------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    raise_fd_limit(2 * args.idle + 4 * max(args.concurrency) + FD_MARGIN)

    def start(servers: Servers, errors: Errors) -> WsRun:
        return WsRun(
            targets(servers, WEBSOCKET_BETA),
            servers,
            errors,
            chainings=args.chaining,
            chain=args.chain,
            compress=args.compress,
            idle_sockets=args.idle,
        )

    settings = {
        "chaining": args.chaining,
        "chain": args.chain,
        "idle": args.idle,
        "compress": args.compress,
    }
    return await run_levels(args, NAMES, start, settings)


def chaining_list(text: str) -> list[str]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values or any(value not in CHAININGS for value in values):
        raise argparse.ArgumentTypeError(
            f"expected {' or '.join(CHAININGS)} (or both, comma-separated), got {text!r}"
        )
    return values


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
    add_level_arguments(
        parser, NAMES, concurrency_help="sockets per side, e.g. 1,16,64", default_count=2000
    )
    parser.add_argument(
        "--chaining",
        type=chaining_list,
        default=list(CHAININGS),
        help="unchained (a new conversation every turn), chained (previous_response_id on "
        "the same socket, as Codex does) or both (default unchained,chained)",
    )
    parser.add_argument(
        "--chain",
        type=positive,
        default=20,
        help="chained turns per conversation before a fresh one (default 20)",
    )
    parser.add_argument(
        "--idle",
        type=non_negative,
        default=2000,
        help="idle sockets to hold open through codexlb (default 2000; 0 skips the phase)",
    )
    parser.add_argument(
        "--compress",
        action="store_true",
        help="permessage-deflate on both legs of every side: offered by the client sockets "
        "(as Codex does), accepted by the fake upstream, and codexlb's [server] and "
        "[upstream] websocket_compression on (default: off everywhere)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    return execute(lambda: run(args), render, as_json=args.json)


if __name__ == "__main__":
    raise SystemExit(main())
