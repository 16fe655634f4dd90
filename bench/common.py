"""What the benchmarks share: the two servers, ``/proc`` readings, statistics, the common
parts of a report, and the command-line plumbing.

Each benchmark (``http_sse.py``, ``ws.py``) starts the fake upstream and ``codexlb serve`` with
`serving` (the fake streaming a `Shape` of response), nginx where it is installed
(``nginx.py``) and, with ``--baseline-tree``, a second codexlb from another checkout
(`start_codexlb`), drives a *direct* side, a *through* side (codexlb), a *baseline* side and an
*nginx* side with its own transport (the shape of that measurement is in ``levels.py``), and
reports through `run_report` / `render_footer`, so that the numbers of all benchmarks mean the
same thing and a run fails the same way: exit 1 when a check fails, 2 when a server does not
start, 130 on Ctrl-C, 143 on SIGTERM.

Both ``python bench/<name>.py`` and ``python -m bench.<name>`` work: a script run directly
puts the repository root on ``sys.path`` before importing this module.
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
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp

Side = Literal["direct", "through", "baseline", "nginx"]
SIDES: tuple[Side, ...] = ("direct", "through", "baseline", "nginx")
"""Every side a run may have; *baseline* only with ``--baseline-tree``, *nginx* only where nginx
is installed."""
PROXIES: dict[Side, str] = {"through": "codexlb", "baseline": "baseline", "nginx": "nginx"}
"""The proxy in the path of each side but *direct*."""
LABELS: dict[Side, str] = {
    "direct": "direct",
    "through": "through codexlb",
    "baseline": "through baseline",
    "nginx": "through nginx",
}

HOST = "127.0.0.1"
RESPONSES_PATH = "/backend-api/codex/responses"
ACCOUNTS = (("a", "tok-a", "acct-a"), ("b", "tok-b", "acct-b"), ("c", "tok-c", "acct-c"))
CLIENT_KEY_NAME, CLIENT_KEY = "bench", "sk-lb-bench-0123456789abcdef"

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
    name: str,
    argv: Sequence[str],
    log_path: Path,
    ready: re.Pattern[str],
    start_timeout: float = START_TIMEOUT_SECONDS,
) -> Server:
    """Start ``argv`` and wait until its log matches ``ready`` (group 1: the base URL).

    The child inherits this process's resource limits, the open-file limit included.
    """
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
        for _ in range(int(start_timeout / LOG_POLL_SECONDS)):
            match = ready.search(server.log_text())
            if match:
                server.url = match.group(1)
                return server
            if process.returncode is not None:
                raise BenchError(f"{name} exited with code {process.returncode} at start-up\n")
            await asyncio.sleep(LOG_POLL_SECONDS)
        raise BenchError(f"{name} did not log its address within {start_timeout:g} s")
    except BenchError as exc:
        await server.stop()
        raise BenchError(f"{exc}\n{server.log_tail()}") from None
    except BaseException:
        await server.stop()
        raise


@dataclass(frozen=True)
class Shape:
    """What the fake upstream streams, shaped like the real upstream: every event written on
    its own (one HTTP chunk or WebSocket frame each), ``deltas`` text deltas per response;
    ``compress`` turns permessage-deflate on for both WebSocket legs of every side."""

    deltas: int
    compress: bool = False

    @property
    def text_length(self) -> int:
        """The answer's length: about four characters a delta, as a model's tokens."""
        return CHARACTERS_PER_DELTA * self.deltas


CHARACTERS_PER_DELTA = 4


def fake_upstream_argv(shape: Shape | None = None) -> list[str]:
    """The fake's command line; without ``shape``, its default short answer in one write."""
    accounts = [arg for a in ACCOUNTS for arg in ("--account", ":".join(a))]
    module = "codexlb.testing.fake_upstream"
    argv = [sys.executable, "-m", module, "--host", HOST, "--port", "0", *accounts]
    if shape is not None:
        argv += ["--event-writes", "--deltas", str(shape.deltas)]
        argv += ["--text-length", str(shape.text_length)]
        argv += ["--ws-compression", "on" if shape.compress else "off"]
    return argv


def codexlb_argv(config_path: Path) -> list[str]:
    script = Path(sys.executable).parent / "codexlb"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "codexlb"]
    return [*command, "serve", "--config", str(config_path)]


def tree_prefix(tree: Path | None) -> tuple[str, ...]:
    """What to put before `codexlb_argv` to run the codexlb of the checkout in ``tree`` (None:
    this one's): its package first on the import path."""
    return () if tree is None else ("env", f"PYTHONPATH={tree}")


def write_config(
    path: Path, upstream_url: str, database_path: Path, *, compress: bool = False
) -> Path:
    """codexlb's configuration; ``compress`` sets ``websocket_compression`` on both legs."""
    compression = f"websocket_compression = {str(compress).lower()}"
    lines = [
        "[server]",
        f'host = "{HOST}"',
        "port = 0",
        compression,
        "[database]",
        f"url = {json.dumps(f'sqlite+aiosqlite:///{database_path}')}",
        "[upstream]",
        f"base_url = {json.dumps(f'{upstream_url}/backend-api/codex')}",
        compression,
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
class Balancer:
    """A running codexlb and its SQLite file."""

    server: Server
    database: Path


@dataclass(frozen=True)
class Servers:
    fake: Server
    codexlb: Server
    database: Path
    nginx: Server | None = None
    baseline: Balancer | None = None
    """The second codexlb (``--baseline-tree``), in front of the same fake."""

    def balancers(self) -> dict[Side, Balancer]:
        """The codexlb of each side that has one: *through*, and *baseline* where it runs."""
        found: dict[Side, Balancer] = {"through": Balancer(self.codexlb, self.database)}
        if self.baseline is not None:
            found["baseline"] = self.baseline
        return found


async def start_codexlb(
    name: str,
    tmp: Path,
    upstream_url: str,
    under: Sequence[str] = (),
    start_timeout: float = START_TIMEOUT_SECONDS,
    *,
    compress: bool = False,
) -> Balancer:
    """codexlb in front of ``upstream_url``, its config, SQLite file and log ``tmp/<name>.*``
    (so that two of them share nothing but the upstream); ``under`` prefixes its command
    line (a profiler, another checkout's import path)."""
    database = tmp / f"{name}.db"
    config = write_config(tmp / f"{name}.toml", upstream_url, database, compress=compress)
    server = await start_server(
        name, [*under, *codexlb_argv(config)], tmp / f"{name}.log", CODEXLB_READY, start_timeout
    )
    return Balancer(server, database)


@contextlib.asynccontextmanager
async def serving(
    tmp: Path,
    codexlb_under: Sequence[str] = (),
    start_timeout: float = START_TIMEOUT_SECONDS,
    *,
    shape: Shape | None = None,
) -> AsyncIterator[Servers]:
    """The fake upstream (streaming ``shape``) and codexlb (SQLite and logs in ``tmp``),
    stopped on the way out whatever happens; a server may also be stopped earlier
    (`Server.stop` is idempotent). ``codexlb_under`` prefixes codexlb's command line (a
    profiler, say)."""
    async with contextlib.AsyncExitStack() as servers:
        progress("starting the fake upstream and codexlb")
        fake = await start_server(
            "fake upstream", fake_upstream_argv(shape), tmp / "fake.log", FAKE_READY
        )
        servers.push_async_callback(fake.stop)
        compress = shape is not None and shape.compress
        codexlb = await start_codexlb(
            "codexlb", tmp, fake.url, codexlb_under, start_timeout, compress=compress
        )
        servers.push_async_callback(codexlb.server.stop)
        yield Servers(fake, codexlb.server, codexlb.database)


def account_headers() -> tuple[dict[str, str], ...]:
    """One set of direct-to-upstream credentials per account."""
    return tuple(
        {"Authorization": f"Bearer {token}", "chatgpt-account-id": account_id}
        for _, token, account_id in ACCOUNTS
    )


def client_headers() -> dict[str, str]:
    """codexlb's client key."""
    return {"Authorization": f"Bearer {CLIENT_KEY}"}


# -- /proc -----------------------------------------------------------------------------------


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
        kib = memory_kib(pid)
        main_thread = cpu_seconds(f"/proc/{pid}/task/{pid}/stat")
        return cls(cpu_seconds(pid), main_thread, kib["VmRSS"] / 1024, kib["VmHWM"] / 1024)


def memory_kib(pid: int | Literal["self"]) -> dict[str, int]:
    """``VmRSS`` (resident now) and ``VmHWM`` (peak resident) in KiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return {
        key: int(value.split()[0])
        for key, _, value in (line.partition(":") for line in status.splitlines())
        if key in ("VmRSS", "VmHWM")
    }


def cpu_seconds(pid_or_stat: int | str) -> float:
    """User + system CPU time of a process, or of a thread given its ``stat`` file
    (``/proc/PID/stat`` fields 14 and 15)."""
    path = f"/proc/{pid_or_stat}/stat" if isinstance(pid_or_stat, int) else pid_or_stat
    stat = Path(path).read_text()
    fields = stat.rpartition(")")[2].split()  # fields[0] is field 3 ("state")
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU time all CPUs spent busy since boot (``/proc/stat``: user, nice, system, irq,
    softirq and steal; guest time is already part of user)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def open_sockets(pid: int | Literal["self"]) -> int:
    """File descriptors of a process that are sockets (``/proc/PID/fd`` links)."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # closed while listing
            count += os.readlink(fd).startswith("socket:")
    return count


# -- tallies ---------------------------------------------------------------------------------


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


def split(total: int, parts: int) -> Iterator[int]:
    """``total`` as ``parts`` near-equal non-negative integers."""
    for part in range(parts):
        yield total // parts + (1 if part < total % parts else 0)


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- statistics ------------------------------------------------------------------------------


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


# -- the common parts of a report ------------------------------------------------------------


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


def git_commit(root: Path | None = None) -> str | None:
    """The short commit of ``root`` (by default this checkout)."""
    root = root or Path(__file__).resolve().parent.parent
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


def environment() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "platform": platform.platform(),
        "commit": git_commit(),
    }


@dataclass(frozen=True)
class BalancerClosing:
    """What one codexlb left behind once it stopped."""

    balancer: Balancer
    completed: int
    """Responses or turns completed through it: each must have its snapshot."""
    after_start: ProcessStats
    at_end: ProcessStats
    exit_code: int


@dataclass
class Closing:
    """What one set of servers (one `Shape`) left behind once they stopped, for the common
    part of the report."""

    servers: Servers
    deltas: int
    codexlb: BalancerClosing
    fake_cpu_seconds: float
    nginx_at_end: ProcessStats | None
    nginx_exit: int | None
    baseline: BalancerClosing | None = None


@dataclass
class Whole:
    """What the whole run knows at its end, over every set of servers it started."""

    closings: list[Closing]
    errors: Errors
    began: float
    """``time.perf_counter()`` at the start of the run."""
    bench_cpu_before: float
    """``time.process_time()`` at the start of the run."""
    nginx: dict[str, Any]
    """``path`` of the nginx measured, or None and ``note``: why not."""


def run_report(
    whole: Whole,
    settings: dict[str, Any],
    results: dict[str, Any],
    failures: Sequence[str] = (),
) -> dict[str, Any]:
    """The whole report: ``ok`` and ``failures`` (the common checks, then the benchmark's
    own ``failures``), ``settings``, ``environment``, the benchmark's ``results`` sections,
    then ``nginx`` (found or not), ``servers`` (one entry per set of servers, i.e. per
    ``deltas``: codexlb's, the baseline's and nginx's memory, CPU and exit, the fake's CPU, the
    snapshots), ``codexlb_peak_rss_mib`` (the highest; ``baseline_peak_rss_mib`` too where the
    baseline ran), ``load_generator_cpu_seconds``, ``wall_seconds`` and ``errors``."""
    errors = whole.errors
    problems = []
    if errors.total:
        problems.append(f"{errors.total} request(s) failed")
    servers = []
    for closing in whole.closings:
        section = server_section(closing)
        problems += balancer_problems(closing.deltas, closing.codexlb, section["snapshots"])
        if closing.baseline is not None:
            snapshots = section["baseline"]["snapshots"]
            problems += balancer_problems(closing.deltas, closing.baseline, snapshots)
        servers.append(section)
    problems += failures
    baseline_peaks = [
        section["baseline"]["peak_rss_mib"] for section in servers if "baseline" in section
    ]
    return {
        "ok": not problems,
        "failures": problems,
        "settings": settings,
        "environment": environment(),
        **results,
        "nginx": whole.nginx,
        "servers": servers,
        "codexlb_peak_rss_mib": max(
            (section["codexlb"]["peak_rss_mib"] for section in servers), default=None
        ),
        **({"baseline_peak_rss_mib": max(baseline_peaks)} if baseline_peaks else {}),
        "load_generator_cpu_seconds": round(time.process_time() - whole.bench_cpu_before, 2),
        "wall_seconds": round(time.perf_counter() - whole.began, 1),
        "errors": {
            "total": errors.total,
            "counts": dict(errors.counts),
            "examples": errors.examples,
        },
    }


def balancer_problems(
    deltas: int, closing: BalancerClosing, snapshots: Mapping[str, Any]
) -> list[str]:
    """A codexlb's failed checks: fewer snapshots than responses completed through it, an
    exit code other than 0 on SIGTERM; the baseline's messages name it."""
    name = closing.balancer.server.name
    whose = "" if name == "codexlb" else f"{name} "
    problems = []
    stored, expected = snapshots["stored"], snapshots["expected_at_least"]
    if not isinstance(stored, int) or stored < expected:
        problems.append(
            f"deltas {deltas}: {whose}snapshots stored: {stored}, expected at least {expected}"
        )
    if closing.exit_code != 0:
        problems.append(f"deltas {deltas}: {name} exited with code {closing.exit_code} on SIGTERM")
    return problems


def server_section(closing: Closing) -> dict[str, Any]:
    """One set of servers: codexlb, the baseline where it ran (with its own snapshots), nginx,
    the fake's CPU and codexlb's snapshots."""
    nginx_at_end = closing.nginx_at_end
    nginx = None
    if nginx_at_end is not None and closing.servers.nginx is not None:
        nginx = {
            "peak_rss_mib": round(nginx_at_end.peak_rss_mib, 1),
            "rss_at_end_mib": round(nginx_at_end.rss_mib, 1),
            "cpu_seconds": round(nginx_at_end.cpu_seconds, 2),
            "exit_code": closing.nginx_exit,
            "log": scan_nginx_log(closing.servers.nginx.log_path),
        }
    section: dict[str, Any] = {
        "deltas": closing.deltas,
        "codexlb": balancer_section(closing.codexlb),
    }
    if closing.baseline is not None:
        section["baseline"] = {
            **balancer_section(closing.baseline),
            "snapshots": snapshots_section(closing.baseline),
        }
    return {
        **section,
        "nginx": nginx,
        "fake_upstream": {"cpu_seconds": round(closing.fake_cpu_seconds, 2)},
        "snapshots": snapshots_section(closing.codexlb),
    }


def balancer_section(closing: BalancerClosing) -> dict[str, Any]:
    """A codexlb's memory, CPU, exit code and log."""
    at_end = closing.at_end
    return {
        "peak_rss_mib": round(at_end.peak_rss_mib, 1),
        "rss_after_start_mib": round(closing.after_start.rss_mib, 1),
        "rss_at_end_mib": round(at_end.rss_mib, 1),
        "cpu_seconds": round(at_end.cpu_seconds, 2),
        "main_thread_cpu_seconds": round(at_end.main_thread_cpu_seconds, 2),
        "exit_code": closing.exit_code,
        "log": scan_codexlb_log(closing.balancer.server.log_path),
    }


def snapshots_section(closing: BalancerClosing) -> dict[str, int | str]:
    """The snapshots in a codexlb's SQLite file, and how many there must be at least."""
    return {
        "stored": count_snapshots(closing.balancer.database),
        "expected_at_least": closing.completed,
    }


def scan_nginx_log(path: Path) -> dict[str, Any]:
    """nginx's error log: lines at ``warn`` or worse, with the first few."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return {"warnings_or_errors": len(lines), "examples": lines[:ERROR_EXAMPLES]}


def cell(value: float | None, width: int, spec: str = ".2f") -> str:
    return ("-" if value is None else format(value, spec)).rjust(width)


def render_environment(report: dict[str, Any]) -> str:
    env, settings = report["environment"], report["settings"]
    nginx = report["nginx"]
    where = f"nginx {nginx['path']}" if nginx["path"] else f"no nginx: {nginx['note']}"
    baseline = ""
    if "baseline_tree" in settings:
        baseline = f"; baseline {settings['baseline_commit']} from {settings['baseline_tree']}"
    return (
        f"{env['cpus']} CPUs, Python {env['python']}, aiohttp {env['aiohttp']}, "
        f"commit {env['commit']} (working tree may differ){baseline}; {where}"
    )


def render_footer(report: dict[str, Any]) -> list[str]:
    """The lines of the `run_report` sections, ending with the verdict."""
    out = []
    for section in report["servers"]:
        lb, baseline = section["codexlb"], section.get("baseline")
        out += ["", f"servers of deltas {section['deltas']}:", render_balancer("codexlb", lb)]
        if baseline is not None:
            out.append(render_balancer("baseline", baseline))
        nginx = section["nginx"]
        if nginx is not None:
            out.append(
                f"  nginx (master + worker): peak RSS {nginx['peak_rss_mib']:.1f} MiB, "
                f"CPU {nginx['cpu_seconds']:.1f} s, exit code {nginx['exit_code']}, "
                f"{nginx['log']['warnings_or_errors']} log lines at warn or worse"
            )
            out += [f"    | {line}" for line in nginx["log"]["examples"]]
        out.append(
            f"  fake upstream: CPU {section['fake_upstream']['cpu_seconds']:.1f} s; "
            f"snapshots in SQLite: {section['snapshots']['stored']} "
            f"(responses completed through codexlb: {section['snapshots']['expected_at_least']})"
        )
        out += render_balancer_log("codexlb", lb["log"])
        if baseline is not None:
            snapshots = baseline["snapshots"]
            out.append(
                f"  baseline: snapshots in its SQLite: {snapshots['stored']} "
                f"(responses completed through it: {snapshots['expected_at_least']})"
            )
            out += render_balancer_log("baseline", baseline["log"])
    baseline_peak = ""
    if "baseline_peak_rss_mib" in report:
        baseline_peak = f" (baseline {report['baseline_peak_rss_mib']:.1f} MiB)"
    out += [
        "",
        f"codexlb peak RSS, highest of the runs: {cell(report['codexlb_peak_rss_mib'], 0, '.1f')}"
        f" MiB{baseline_peak}; load generator: CPU {report['load_generator_cpu_seconds']:.1f} s; "
        f"run {report['wall_seconds']:.1f} s",
    ]
    if report["ok"]:
        out.append("result: OK, no errors")
    else:
        out += ["", "!" * 72, f"!!! RUN FAILED: {len(report['failures'])} problem(s)"]
        out += [f"!!!   {failure}" for failure in report["failures"]]
        out += [f"!!!   {kind}: {n}" for kind, n in report["errors"]["counts"].items()]
        out += [f"!!!   e.g. {example}" for example in report["errors"]["examples"]]
        out.append("!" * 72)
    return out


def render_balancer(name: str, lb: dict[str, Any]) -> str:
    """A codexlb's memory, exit code and CPU (`balancer_section`) on one line."""
    return (
        f"  {name}: peak RSS (VmHWM) {lb['peak_rss_mib']:.1f} MiB "
        f"({lb['rss_after_start_mib']:.1f} MiB after start-up), exit code {lb['exit_code']}; "
        f"CPU {lb['cpu_seconds']:.1f} s user+system, of which the event-loop thread "
        f"{lb['main_thread_cpu_seconds']:.1f} s and other threads (aiosqlite) "
        f"{lb['cpu_seconds'] - lb['main_thread_cpu_seconds']:.1f} s"
    )


def render_balancer_log(name: str, log: dict[str, Any]) -> list[str]:
    """What `scan_codexlb_log` found in a codexlb's log, with its examples."""
    return [
        f"  {name} log: {log['request_lines']} request lines, "
        f"{log['request_lines_with_attempts_over_1']} with attempts > 1, "
        f"{log['warnings_or_errors']} warnings or errors",
        *(f"    | {line}" for line in log["examples"]),
    ]


# -- command line ----------------------------------------------------------------------------


def positive_list(text: str, example: str) -> list[int]:
    """A comma-separated list of positive integers, e.g. ``example``."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected e.g. {example}, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, e.g. {example}")
    return values


def concurrency_list(text: str) -> list[int]:
    return positive_list(text, "1,16,64")


def deltas_list(text: str) -> list[int]:
    return positive_list(text, "20,300")


def checkout(text: str) -> Path:
    """A directory with a codexlb package in it: anything else on ``PYTHONPATH`` would be
    passed over silently, and this checkout's codexlb measured in its place."""
    path = Path(text)
    if not (path / "codexlb" / "__init__.py").is_file():
        raise argparse.ArgumentTypeError(
            f"no codexlb checkout in {text!r} (no codexlb/__init__.py)"
        )
    return path


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def execute(
    run: Callable[[], Awaitable[dict[str, Any]]],
    render: Callable[[dict[str, Any]], str],
    *,
    as_json: bool,
) -> int:
    """Run a benchmark to its report and print it; the exit code (see the module docstring).

    SIGTERM cancels the run, so that the servers are stopped on the way out.
    """

    async def main() -> dict[str, Any]:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await run()

    try:
        report = asyncio.run(main())
    except BenchError as exc:
        print(f"benchmark could not run: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        return 130
    except asyncio.CancelledError:
        print("terminated; servers stopped", file=sys.stderr)
        return 143
    print(json.dumps(report, indent=2) if as_json else render(report))
    if not report["ok"]:
        print("BENCHMARK RUN FAILED: see the problems above", file=sys.stderr)
        return 1
    return 0
