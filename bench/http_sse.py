"""HTTP/SSE benchmark: the latency and throughput cost of codexlb in front of an upstream.

Run: ``.venv/bin/python bench/http_sse.py [--requests N] [--concurrency 1,16,64] [--json]``.

Processes
    Three processes on 127.0.0.1, each on its own event loop: the fake upstream
    (``python -m codexlb.testing.fake_upstream``, three ChatGPT accounts), ``codexlb serve`` on a
    temporary config (the same three accounts, client keys on, SQLite in a temporary directory,
    INFO logging to a file as an operator would run it), and this process, which generates the
    load with one ``aiohttp.ClientSession`` per side. Both servers are stopped at the end, also
    on an error, Ctrl-C or SIGTERM.

One request
    ``POST /backend-api/codex/responses`` with a one-message streaming body; the fake answers
    with a 13-event SSE stream (about 5 kB). Clocks start just before the request is sent.
    *TTFB* stops at the first chunk of the response body; *total* stops when the whole
    ``response.completed`` event has arrived. codexlb commits the response's snapshot to SQLite
    before it forwards ``response.completed`` (SPEC S2), so *total* includes that commit. After
    ``response.completed`` the body is read to its end, outside the timing, so that the
    connection is kept alive (Codex itself may hang up instead).

Sides
    *direct*: straight to the fake upstream with an account's own token (rotating over the
    three accounts). *through*: to codexlb with a client key; codexlb picks the account,
    relays the stream and stores the snapshot. The fake does the same work for both sides.

Interleaving
    For each concurrency C, each side gets its own session (one connector, keep-alive,
    ``limit=C``) and C workers (a closed loop: each worker sends its next request when the
    previous one completes). After a warm-up on both sides, ``--rounds`` rounds each run
    ``N / rounds`` requests on one side, then the same number on the other, alternating which
    side goes first. Samples and wall time are pooled per side over the rounds, so drift in
    machine load, CPU frequency or the growing SQLite file hits both sides alike.

The numbers
    *added* is through minus direct at the same percentile (a difference of percentiles, not
    a percentile of differences: requests are not paired). *req/s* is completed requests over
    the side's pooled wall time; the *ratio* through/direct is the share of the direct
    throughput left when codexlb is in the path (1.0: no cost). In a closed loop throughput
    is about C / mean latency, so at C=1 the ratio mirrors latency and at high C it shows
    whose CPU saturates first. *codexlb CPU* is the user+system time (``/proc/PID/stat``) the
    codexlb process spent during the through rounds, per request and as a share of one core:
    near 100% means its single event loop is the bottleneck (the end-of-run split between the
    event-loop thread and the other threads, aiosqlite's, says which). *Peak RSS* is codexlb's
    ``VmHWM`` at the end of the run.

Caveats
    On a 2-core machine the load generator, the fake and codexlb share the cores, and the
    direct side has one process fewer competing for them: absolute numbers belong to this
    machine. Compare runs of the same machine, or the ratios.

Correctness
    Every response must be 200 and end with ``response.completed`` (status ``completed``,
    nothing after it), the SQLite file must hold at least one snapshot per response completed
    through codexlb, and both servers must survive the run. Otherwise the run says so loudly
    and exits 1 (2 if a server does not start, 130 on Ctrl-C, 143 on SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp

Side = Literal["direct", "through"]
SIDES: tuple[Side, Side] = ("direct", "through")
LABELS: dict[Side, str] = {"direct": "direct", "through": "through codexlb"}

HOST = "127.0.0.1"
RESPONSES_PATH = "/backend-api/codex/responses"
ACCOUNTS = (("a", "tok-a", "acct-a"), ("b", "tok-b", "acct-b"), ("c", "tok-c", "acct-c"))
CLIENT_KEY_NAME, CLIENT_KEY = "bench", "sk-lb-bench-0123456789abcdef"
BODY = json.dumps(
    {
        "model": "gpt-5-codex",
        "stream": True,
        "input": [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}
        ],
    }
).encode()
COMPLETED_EVENT = b"event: response.completed\n"

REQUEST_TIMEOUT_SECONDS = 30.0
START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 15.0
RUN_TIMEOUT_SECONDS = 1800.0
LOG_POLL_SECONDS = 0.05
ERROR_EXAMPLES = 5
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

FAKE_READY = re.compile(r"fake upstream serving (http://[\d.]+:\d+)")
CODEXLB_READY = re.compile(r"codexlb listening on (http://[\d.]+:\d+)")


class BenchError(Exception):
    """The benchmark could not run: a server did not start or died during the run."""


# -- servers ---------------------------------------------------------------------------------


@dataclass
class Server:
    """A server child process whose stdout and stderr go to ``log_path``.

    The log goes to a file rather than a pipe so that this process (the load generator) never
    spends time draining codexlb's one line per request during the through rounds.
    """

    name: str
    process: asyncio.subprocess.Process
    log_path: Path
    url: str = ""

    @property
    def pid(self) -> int:
        return self.process.pid

    def check_alive(self) -> None:
        if self.process.returncode is not None:
            raise BenchError(
                f"{self.name} exited with code {self.process.returncode} during the run\n"
                + self.log_tail()
            )

    def log_text(self) -> str:
        """The log so far (small: read whole, a blocking read of a local file)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 20) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return "".join(f"  | {line}\n" for line in tail)

    async def stop(self) -> int:
        """SIGTERM, SIGKILL after STOP_TIMEOUT_SECONDS; the exit code. Idempotent."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()
            try:
                async with asyncio.timeout(STOP_TIMEOUT_SECONDS):
                    return await self.process.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
        return await self.process.wait()


async def start_server(
    name: str, argv: Sequence[str], log_path: Path, ready: re.Pattern[str]
) -> Server:
    """Start ``argv`` and wait until its log matches ``ready`` (group 1: the base URL)."""
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    server = Server(name, process, log_path)
    try:
        for _ in range(int(START_TIMEOUT_SECONDS / LOG_POLL_SECONDS)):
            match = ready.search(server.log_text())
            if match:
                server.url = match.group(1)
                return server
            if process.returncode is not None:
                raise BenchError(f"{name} exited with code {process.returncode} at start-up\n")
            await asyncio.sleep(LOG_POLL_SECONDS)
        raise BenchError(f"{name} did not log its address within {START_TIMEOUT_SECONDS:g} s")
    except BenchError as exc:
        await server.stop()
        raise BenchError(f"{exc}\n{server.log_tail()}") from None
    except BaseException:
        await server.stop()
        raise


def fake_upstream_argv() -> list[str]:
    accounts = [arg for a in ACCOUNTS for arg in ("--account", ":".join(a))]
    module = "codexlb.testing.fake_upstream"
    return [sys.executable, "-m", module, "--host", HOST, "--port", "0", *accounts]


def codexlb_argv(config_path: Path) -> list[str]:
    script = Path(sys.executable).parent / "codexlb"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "codexlb"]
    return [*command, "serve", "--config", str(config_path)]


def write_config(path: Path, upstream_url: str, database_path: Path) -> Path:
    lines = [
        "[server]",
        f'host = "{HOST}"',
        "port = 0",
        "[database]",
        f"url = {json.dumps(f'sqlite+aiosqlite:///{database_path}')}",
        "[upstream]",
        f"base_url = {json.dumps(f'{upstream_url}/backend-api/codex')}",
        "[logging]",
        'level = "INFO"',
        "[[api_keys]]",
        f'name = "{CLIENT_KEY_NAME}"',
        f'key = "{CLIENT_KEY}"',
    ]
    for name, token, account_id in ACCOUNTS:
        lines += [
            "[[accounts]]",
            f'name = "{name}"',
            f'access_token = "{token}"',
            f'chatgpt_account_id = "{account_id}"',
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass(frozen=True)
class ProcessStats:
    """What ``/proc/PID`` says about a live process."""

    cpu_seconds: float
    main_thread_cpu_seconds: float
    """The thread running the event loop; the rest is other threads (aiosqlite's)."""
    rss_mib: float
    peak_rss_mib: float

    @classmethod
    def read(cls, pid: int) -> ProcessStats:
        status = Path(f"/proc/{pid}/status").read_text()
        kib = {
            key: int(value.split()[0])
            for key, _, value in (line.partition(":") for line in status.splitlines())
            if key in ("VmRSS", "VmHWM")
        }
        main_thread = cpu_seconds(f"/proc/{pid}/task/{pid}/stat")
        return cls(cpu_seconds(pid), main_thread, kib["VmRSS"] / 1024, kib["VmHWM"] / 1024)


def cpu_seconds(pid_or_stat: int | str) -> float:
    """User + system CPU time of a process, or of a thread given its ``stat`` file
    (``/proc/PID/stat`` fields 14 and 15)."""
    path = f"/proc/{pid_or_stat}/stat" if isinstance(pid_or_stat, int) else pid_or_stat
    stat = Path(path).read_text()
    fields = stat.rpartition(")")[2].split()  # fields[0] is field 3 ("state")
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


# -- load ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    side: Side
    url: str
    headers: tuple[dict[str, str], ...]
    """Rotated over the requests (one per direct account)."""


def targets(fake_url: str, codexlb_url: str) -> dict[Side, Target]:
    common = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    accounts = tuple(
        {**common, "Authorization": f"Bearer {token}", "chatgpt-account-id": account_id}
        for _, token, account_id in ACCOUNTS
    )
    client = {**common, "Authorization": f"Bearer {CLIENT_KEY}"}
    return {
        "direct": Target("direct", fake_url + RESPONSES_PATH, accounts),
        "through": Target("through", codexlb_url + RESPONSES_PATH, (client,)),
    }


@dataclass
class SideResult:
    """The pooled samples of one side at one concurrency (warm-up excluded)."""

    ttfb: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    wall_seconds: float = 0.0
    codexlb_cpu_seconds: float = 0.0
    requests: int = 0


@dataclass
class Errors:
    """Failed requests of the whole run, by side and kind, with the first example of the
    first few kinds."""

    counts: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def add(self, side: Side, phase: str, message: str) -> None:
        kind = f"{side}: {message.split(':', 1)[0]}"
        if kind not in self.counts and len(self.examples) < ERROR_EXAMPLES:
            self.examples.append(f"{side} ({phase}): {message}")
        self.counts[kind] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())


async def one_request(
    session: aiohttp.ClientSession, target: Target, index: int
) -> tuple[float, float] | str:
    """(TTFB, total) in seconds, or what went wrong."""
    headers = target.headers[index % len(target.headers)]
    start = time.perf_counter()
    try:
        async with session.post(target.url, data=BODY, headers=headers) as response:
            if response.status != 200:
                body = await response.read()
                return f"HTTP {response.status}: {body[:300]!r}"
            ttfb: float | None = None
            total: float | None = None
            buffer = bytearray()
            async for chunk in response.content.iter_any():
                if ttfb is None:
                    ttfb = time.perf_counter() - start
                buffer += chunk
                if total is None:
                    begin = buffer.find(COMPLETED_EVENT)
                    if begin >= 0 and buffer.find(b"\n\n", begin) >= 0:
                        total = time.perf_counter() - start
    except (aiohttp.ClientError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"
    if ttfb is None or total is None:
        last = re.findall(rb"event: (\S+)", buffer)[-1:] or [b"(none)"]
        return f"stream ended without response.completed: last event {last[0].decode()}"
    problem = check_completed(bytes(buffer[buffer.find(COMPLETED_EVENT) :]))
    return problem if problem else (ttfb, total)


def check_completed(tail: bytes) -> str | None:
    """What is wrong with the stream from its ``response.completed`` event on, if anything."""
    event, _, rest = tail.partition(b"\n\n")
    if rest.strip():
        return f"data after response.completed: {rest[:200]!r}"
    data = b"".join(
        line[len(b"data:") :].strip() for line in event.split(b"\n") if line.startswith(b"data:")
    )
    try:
        payload = json.loads(data)
    except ValueError:
        return f"response.completed data is not JSON: {data[:200]!r}"
    response = payload.get("response") if isinstance(payload, dict) else None
    if payload.get("type") != "response.completed" or not isinstance(response, dict):
        return f"malformed response.completed: {data[:200]!r}"
    if response.get("status") != "completed" or not response.get("id"):
        return f"response.completed with status {response.get('status')!r}"
    return None


async def run_batch(
    session: aiohttp.ClientSession,
    target: Target,
    count: int,
    concurrency: int,
    first_index: int,
) -> tuple[list[tuple[float, float] | str], float]:
    """``count`` requests by ``concurrency`` workers; the outcomes and the wall time."""
    outcomes: list[tuple[float, float] | str] = []
    indexes = iter(range(first_index, first_index + count))

    async def worker() -> None:
        for index in indexes:  # shared by the workers: each index is sent once
            outcomes.append(await one_request(session, target, index))

    start = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(min(concurrency, count)):
            group.create_task(worker())
    return outcomes, time.perf_counter() - start


def new_session(concurrency: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency, keepalive_timeout=300),
        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS),
    )


def split(total: int, parts: int) -> Iterator[int]:
    """``total`` as ``parts`` near-equal non-negative integers."""
    for part in range(parts):
        yield total // parts + (1 if part < total % parts else 0)


@dataclass
class Run:
    """The running benchmark: its targets and servers, the tallies of the whole run, and
    `level`, which measures one concurrency."""

    targets: dict[Side, Target]
    codexlb: Server
    fake: Server
    errors: Errors
    completed_through: int = 0
    sent: int = 0

    async def batch(
        self,
        session: aiohttp.ClientSession,
        side: Side,
        count: int,
        concurrency: int,
        phase: str,
        result: SideResult | None,
    ) -> None:
        cpu_before = cpu_seconds(self.codexlb.pid)
        outcomes, wall = await run_batch(session, self.targets[side], count, concurrency, self.sent)
        cpu = cpu_seconds(self.codexlb.pid) - cpu_before
        self.sent += count
        for outcome in outcomes:
            if isinstance(outcome, str):
                self.errors.add(side, phase, outcome)
            elif side == "through":
                self.completed_through += 1
        self.codexlb.check_alive()
        self.fake.check_alive()
        if result is None:
            return
        result.wall_seconds += wall
        result.codexlb_cpu_seconds += cpu
        result.requests += count
        for outcome in outcomes:
            if not isinstance(outcome, str):
                result.ttfb.append(outcome[0])
                result.total.append(outcome[1])

    async def level(
        self, concurrency: int, requests: int, rounds: int, warmup: int
    ) -> dict[Side, SideResult]:
        results: dict[Side, SideResult] = {side: SideResult() for side in SIDES}
        async with new_session(concurrency) as direct, new_session(concurrency) as through:
            sessions = {"direct": direct, "through": through}
            for side in SIDES:
                await self.batch(sessions[side], side, warmup, concurrency, "warm-up", None)
            for number, count in enumerate(split(requests, rounds)):
                order = SIDES if number % 2 == 0 else SIDES[::-1]
                progress(f"  concurrency {concurrency}: round {number + 1}/{rounds}")
                for side in order:
                    await self.batch(
                        sessions[side], side, count, concurrency, "measured", results[side]
                    )
        return results


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- statistics and reports ------------------------------------------------------------------


def percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of sorted, non-empty values, interpolating between
    ranks."""
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution_ms(values: Sequence[float]) -> dict[str, float | None]:
    """Percentiles, max and mean in ms; None without samples (JSON has no NaN)."""
    if not values:
        return dict.fromkeys(("p50", "p90", "p99", "max", "mean"))
    ordered = sorted(values)
    stats = {f"p{q}": percentile(ordered, q) for q in (50, 90, 99)}
    stats["max"] = ordered[-1]
    stats["mean"] = sum(ordered) / len(ordered)
    return {name: round(value * 1000, 3) for name, value in stats.items()}


def ratio(numerator: float, denominator: float, digits: int = 3) -> float | None:
    return round(numerator / denominator, digits) if denominator else None


def minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 3)


def side_summary(result: SideResult) -> dict[str, Any]:
    return {
        "requests": result.requests,
        "completed": len(result.total),
        "wall_seconds": round(result.wall_seconds, 3),
        "requests_per_second": ratio(len(result.total), result.wall_seconds, 1),
        "ttfb_ms": distribution_ms(result.ttfb),
        "total_ms": distribution_ms(result.total),
        "codexlb_cpu_seconds": round(result.codexlb_cpu_seconds, 2),
    }


def level_summary(concurrency: int, warmup: int, results: dict[Side, SideResult]) -> dict[str, Any]:
    direct, through = side_summary(results["direct"]), side_summary(results["through"])
    lb_cpu, through_result = results["through"].codexlb_cpu_seconds, results["through"]
    return {
        "concurrency": concurrency,
        "warmup_per_side": warmup,
        "direct": direct,
        "through": through,
        "added_ms": {
            f"{metric}_{q}": minus(through[f"{metric}_ms"][q], direct[f"{metric}_ms"][q])
            for metric in ("ttfb", "total")
            for q in ("p50", "p99")
        },
        "throughput_ratio": ratio(
            through["requests_per_second"] or 0.0, direct["requests_per_second"] or 0.0
        ),
        "codexlb_cpu_ms_per_request": ratio(1000 * lb_cpu, through_result.requests),
        "codexlb_cpu_share_of_core": ratio(lb_cpu, through_result.wall_seconds),
    }


def count_snapshots(database: Path) -> int | str:
    """Rows in the snapshot table, or why they could not be counted."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
            row = db.execute("SELECT count(*) FROM snapshots").fetchone()
        return int(row[0])
    except sqlite3.Error as exc:
        return f"unavailable ({exc})"


def scan_codexlb_log(path: Path) -> dict[str, Any]:
    """Request lines, hidden failovers (attempts > 1), and warnings or worse."""
    requests = retried = 0
    problems: list[str] = []
    problem_count = 0
    for line in path.read_text(errors="replace").splitlines():
        attempts = re.search(r"\battempts=(\d+)", line)
        if attempts:
            requests += 1
            retried += int(attempts.group(1)) > 1
        if re.search(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback", line):
            problem_count += 1
            if len(problems) < ERROR_EXAMPLES:
                problems.append(line)
    return {
        "request_lines": requests,
        "request_lines_with_attempts_over_1": retried,
        "warnings_or_errors": problem_count,
        "examples": problems,
    }


def git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def cell(value: float | None, width: int, spec: str = ".2f") -> str:
    return ("-" if value is None else format(value, spec)).rjust(width)


COLUMNS = ("TTFB p50", "TTFB p99", "total p50", "total p99")
WIDTHS = (10, 10, 11, 11)


def table_row(label: str, values: Sequence[float | None], spec: str) -> str:
    cells = "".join(cell(v, w, spec) for v, w in zip(values, WIDTHS, strict=True))
    return f"  {label:<17}{cells}"


def render(report: dict[str, Any]) -> str:
    settings = report["settings"]
    out = [
        f"codexlb HTTP/SSE benchmark: {settings['requests']} requests per side per level in "
        f"{settings['rounds']} alternating rounds, warm-up {settings['warmup']} per side",
        f"{report['environment']['cpus']} CPUs, Python {report['environment']['python']}, "
        f"aiohttp {report['environment']['aiohttp']}, commit {report['environment']['commit']}"
        " (working tree may differ)",
        "latencies in ms; added = through minus direct at the same percentile",
    ]
    header = "  " + " " * 17 + "".join(f"{n:>{w}}" for n, w in zip(COLUMNS, WIDTHS, strict=True))
    for level in report["levels"]:
        out += ["", f"concurrency {level['concurrency']}", header + f"{'req/s':>10}"]
        for side in SIDES:
            ttfb, total = level[side]["ttfb_ms"], level[side]["total_ms"]
            latencies = [ttfb["p50"], ttfb["p99"], total["p50"], total["p99"]]
            rps = cell(level[side]["requests_per_second"], 10, ".1f")
            out.append(table_row(LABELS[side], latencies, ".2f") + rps)
        a = level["added_ms"]
        added = [a["ttfb_p50"], a["ttfb_p99"], a["total_p50"], a["total_p99"]]
        out.append(table_row("added", added, "+.2f"))
        cpu_share = level["codexlb_cpu_share_of_core"]
        out.append(
            f"  throughput through/direct {cell(level['throughput_ratio'], 0)}; codexlb CPU "
            f"{cell(level['codexlb_cpu_ms_per_request'], 0)} ms/request, "
            f"{cell(None if cpu_share is None else 100 * cpu_share, 0, '.0f')}% of one core "
            "during through rounds"
        )
    lb = report["codexlb"]
    out += [
        "",
        f"codexlb process: peak RSS (VmHWM) {lb['peak_rss_mib']:.1f} MiB "
        f"({lb['rss_after_start_mib']:.1f} MiB after start-up), "
        f"exit code {lb['exit_code']}",
        f"codexlb CPU: {lb['cpu_seconds']:.1f} s user+system, of which the event-loop thread "
        f"{lb['main_thread_cpu_seconds']:.1f} s and other threads (aiosqlite) "
        f"{lb['cpu_seconds'] - lb['main_thread_cpu_seconds']:.1f} s",
        f"fake upstream: CPU {report['fake_upstream']['cpu_seconds']:.1f} s; load generator: "
        f"CPU {report['load_generator_cpu_seconds']:.1f} s; run {report['wall_seconds']:.1f} s",
        f"snapshots in SQLite: {report['snapshots']['stored']} "
        f"(responses completed through codexlb: {report['snapshots']['expected_at_least']})",
        f"codexlb log: {lb['log']['request_lines']} request lines, "
        f"{lb['log']['request_lines_with_attempts_over_1']} with attempts > 1, "
        f"{lb['log']['warnings_or_errors']} warnings or errors",
    ]
    out += [f"  | {line}" for line in lb["log"]["examples"]]
    if report["ok"]:
        out.append("result: OK, no errors")
    else:
        out += ["", "!" * 72, f"!!! RUN FAILED: {len(report['failures'])} problem(s)"]
        out += [f"!!!   {failure}" for failure in report["failures"]]
        out += [f"!!!   {kind}: {n}" for kind, n in report["errors"]["counts"].items()]
        out += [f"!!!   e.g. {example}" for example in report["errors"]["examples"]]
        out.append("!" * 72)
    return "\n".join(out)


# -- main ------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    began = time.perf_counter()
    bench_cpu_before = time.process_time()
    errors = Errors()
    with tempfile.TemporaryDirectory(prefix="codexlb-bench-") as temp:
        tmp = Path(temp)
        database = tmp / "codexlb.db"
        async with contextlib.AsyncExitStack() as servers:
            progress("starting the fake upstream and codexlb")
            fake = await start_server(
                "fake upstream", fake_upstream_argv(), tmp / "fake.log", FAKE_READY
            )
            servers.push_async_callback(fake.stop)
            config = write_config(tmp / "codexlb.toml", fake.url, database)
            codexlb = await start_server(
                "codexlb", codexlb_argv(config), tmp / "codexlb.log", CODEXLB_READY
            )
            servers.push_async_callback(codexlb.stop)
            after_start = ProcessStats.read(codexlb.pid)
            fake_cpu_before = cpu_seconds(fake.pid)
            bench = Run(
                targets=targets(fake.url, codexlb.url),
                codexlb=codexlb,
                fake=fake,
                errors=errors,
            )
            levels = []
            async with asyncio.timeout(RUN_TIMEOUT_SECONDS):
                for concurrency in args.concurrency:
                    warmup = max(args.warmup, 2 * concurrency)
                    results = await bench.level(concurrency, args.requests, args.rounds, warmup)
                    levels.append(level_summary(concurrency, warmup, results))
            at_end = ProcessStats.read(codexlb.pid)
            fake_cpu = cpu_seconds(fake.pid) - fake_cpu_before
            codexlb_exit = await codexlb.stop()
            await fake.stop()
        snapshots = count_snapshots(database)
        log = scan_codexlb_log(codexlb.log_path)
    failures = []
    if errors.total:
        failures.append(f"{errors.total} request(s) failed")
    if not isinstance(snapshots, int) or snapshots < bench.completed_through:
        failures.append(
            f"snapshots stored: {snapshots}, expected at least {bench.completed_through}"
        )
    if codexlb_exit != 0:
        failures.append(f"codexlb exited with code {codexlb_exit} on SIGTERM")
    return {
        "ok": not failures,
        "failures": failures,
        "settings": {
            "requests": args.requests,
            "concurrency": args.concurrency,
            "rounds": args.rounds,
            "warmup": args.warmup,
        },
        "environment": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "aiohttp": aiohttp.__version__,
            "platform": platform.platform(),
            "commit": git_commit(),
        },
        "levels": levels,
        "codexlb": {
            "peak_rss_mib": round(at_end.peak_rss_mib, 1),
            "rss_after_start_mib": round(after_start.rss_mib, 1),
            "rss_at_end_mib": round(at_end.rss_mib, 1),
            "cpu_seconds": round(at_end.cpu_seconds, 2),
            "main_thread_cpu_seconds": round(at_end.main_thread_cpu_seconds, 2),
            "exit_code": codexlb_exit,
            "log": log,
        },
        "fake_upstream": {"cpu_seconds": round(fake_cpu, 2)},
        "load_generator_cpu_seconds": round(time.process_time() - bench_cpu_before, 2),
        "wall_seconds": round(time.perf_counter() - began, 1),
        "snapshots": {"stored": snapshots, "expected_at_least": bench.completed_through},
        "errors": {
            "total": errors.total,
            "counts": dict(errors.counts),
            "examples": errors.examples,
        },
    }


def concurrency_list(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected e.g. 1,16,64, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("concurrency levels must be positive integers")
    return levels


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench/http_sse.py",
        description="Latency and throughput of codexlb versus the fake upstream, over HTTP/SSE.",
    )
    parser.add_argument(
        "--requests",
        type=positive,
        default=8000,
        help="measured requests per side and level (default 8000)",
    )
    parser.add_argument(
        "--concurrency", type=concurrency_list, default=[1, 16, 64], help="e.g. 1,16,64"
    )
    parser.add_argument(
        "--rounds", type=positive, default=8, help="alternating rounds per level (default 8)"
    )
    parser.add_argument(
        "--warmup",
        type=positive,
        default=100,
        help="warm-up requests per side and level (at least 2 x concurrency)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        report = asyncio.run(run(args))
    except BenchError as exc:
        print(f"benchmark could not run: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        return 130
    except asyncio.CancelledError:
        print("terminated; servers stopped", file=sys.stderr)
        return 143
    print(json.dumps(report, indent=2) if args.json else render(report))
    if not report["ok"]:
        print("BENCHMARK RUN FAILED: see the problems above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
