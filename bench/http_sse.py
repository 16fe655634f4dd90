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
import json
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

if __package__ in (None, ""):  # run as ``python bench/http_sse.py``: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    LABELS,
    RESPONSES_PATH,
    RUN_TIMEOUT_SECONDS,
    SIDES,
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
    minus,
    positive,
    progress,
    ratio,
    render_environment,
    render_footer,
    run_report,
    serving,
    split,
)

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


# -- load ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    side: Side
    url: str
    headers: tuple[dict[str, str], ...]
    """Rotated over the requests (one per direct account)."""


def targets(fake_url: str, codexlb_url: str) -> dict[Side, Target]:
    common = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    accounts = tuple({**common, **headers} for headers in account_headers())
    client = {**common, **client_headers()}
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


# -- reports -------------------------------------------------------------------------------


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
        render_environment(report),
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
    out += render_footer(report)
    return "\n".join(out)


# -- main ------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    began = time.perf_counter()
    bench_cpu_before = time.process_time()
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
        settings = {
            "requests": args.requests,
            "concurrency": args.concurrency,
            "rounds": args.rounds,
            "warmup": args.warmup,
        }
        return run_report(closing, settings, {"levels": levels})


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
    return execute(lambda: run(args), render, as_json=args.json)


if __name__ == "__main__":
    raise SystemExit(main())
