"""HTTP/SSE benchmark: the latency, throughput and CPU cost of codexlb in front of an upstream,
beside nginx as a plain proxy hop.

Run: ``.venv/bin/python bench/http_sse.py [--requests N] [--deltas 20,300]
[--concurrency 1,16,64] [--no-nginx | --nginx PATH] [--codexlb-tree DIR] [--baseline-tree DIR]
[--json]``.

Processes
    Per response shape (``--deltas``), freshly started: the fake upstream (``python -m
    codexlb.testing.fake_upstream``, three ChatGPT accounts), ``codexlb serve`` on a temporary
    config (the same three accounts, client keys on, SQLite in a temporary directory, INFO
    logging to a file as an operator would run it), nginx where it is installed (``nginx.py``:
    one worker, ``proxy_pass`` to the fake, no buffering; ``apt-get install nginx-light``),
    with ``--baseline-tree DIR`` a second ``codexlb serve`` run from the checkout in DIR (its
    package first on ``PYTHONPATH``, as ``--codexlb-tree`` runs the first one) with its own
    config, SQLite file and log, in front of the same fake, and this process, which generates
    the load with one ``aiohttp.ClientSession`` per side. All are stopped at the end, also on
    an error, Ctrl-C or SIGTERM. Without nginx the run says so and measures the other sides.

One request
    ``POST /backend-api/codex/responses`` with a one-message streaming body. The fake answers
    as the real upstream streams: every SSE event its own HTTP chunk, written on its own, with
    ``--deltas`` text deltas (about four characters each) in the message, so 10 + deltas
    events. Clocks start just before the request is sent. *first* stops when the first output
    event (neither ``response.created`` nor ``response.in_progress``, which codexlb may hold
    back) has arrived; *total* when the whole ``response.completed`` event has; *1st-end* is
    the one to the other. codexlb commits the response's snapshot to SQLite before it forwards
    ``response.completed`` (SPEC S2), so *total* includes that commit. After
    ``response.completed`` the body is read to its end, outside the timing, so that the
    connection is kept alive (Codex itself may hang up instead).

Sides
    *direct*: straight to the fake upstream with an account's own token (rotating over the
    three accounts). *through*: to codexlb with a client key; codexlb picks the account,
    relays the stream and stores the snapshot. *baseline* (with ``--baseline-tree``): the same
    through the second codexlb, so that two versions of codexlb are measured in the same rounds
    rather than in two runs, which on a busy machine differ by 10-20% in CPU per request.
    *nginx*: to nginx with the accounts' own tokens, which passes every request on to the fake
    as it is. The fake does the same work for all.

Interleaving
    For each response shape and concurrency C, each side gets its own session (one connector,
    keep-alive, ``limit=C``) and C workers (a closed loop: each worker sends its next request
    when the previous one completes). After a warm-up on every side, ``--rounds`` rounds each
    run ``N / rounds`` requests on one side, then on the next, rotating which side goes first
    (`levels.round_order`). Samples and wall time are pooled per side over the rounds, so drift
    in machine load, CPU frequency or the growing SQLite file hits every side alike.

The numbers
    *added* is a proxy's side minus direct at the same percentile (a difference of
    percentiles, not a percentile of differences: requests are not paired). *req/s* is
    completed requests over the side's pooled wall time; a proxy's *throughput* is its side's
    share of the direct throughput (1.0: no cost). In a closed loop throughput is about C /
    mean latency, so at C=1 the ratio mirrors latency and at high C it shows whose CPU
    saturates first. A proxy's *CPU* is the user+system time (``/proc/PID/stat``; nginx's
    master and worker together) it spent during its side's rounds, per request, per relayed
    event and as a share of one core: near 100% means its single event loop is the bottleneck.
    *Peak RSS* is ``VmHWM`` at the end of each set of servers (nginx: master plus worker).
    With a baseline, each level ends with *codexlb vs baseline*: codexlb's req/s and CPU per
    request over the baseline's (below 1.0 in CPU: codexlb is the cheaper).

Caveats
    On a 2-core machine the load generator, the fake and the proxy share the cores, and the
    direct side has one process fewer competing for them: absolute numbers belong to this
    machine. Compare runs of the same machine, or the ratios. A proxy that merges events
    which arrive together into fewer, larger writes saves the load generator work, so its
    side can be faster than direct.

Correctness
    Every response must be 200 and end with ``response.completed`` (status ``completed``,
    nothing after it), the SQLite file of codexlb and that of the baseline must each hold at
    least one snapshot per response completed through it, and every server must survive the
    run. Otherwise the run says so loudly and exits 1 (2 if a server does not start, 130 on
    Ctrl-C, 143 on SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp

if __package__ in (None, ""):  # run as ``python bench/http_sse.py``: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Errors, Servers, Side, execute, render_environment, render_footer
from bench.levels import (
    Names,
    Outcome,
    Run,
    SideResult,
    Target,
    add_level_arguments,
    closed_loop,
    interleave,
    render_level,
    run_levels,
    targets,
)

NAMES = Names(
    unit="requests",
    per_unit="request",
    first="first_output",
    first_column="first",
    rate_column="req/s",
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
HEADERS = {"Content-Type": "application/json", "Accept": "text/event-stream"}
COMPLETED_EVENT = b"event: response.completed\n"
EVENT_LINE = b"event: "
NOT_OUTPUT = frozenset({b"response.created", b"response.in_progress"})
"""Events before any output, which codexlb may hold back until output comes."""

REQUEST_TIMEOUT_SECONDS = 30.0


# -- load ------------------------------------------------------------------------------------


async def one_request(session: aiohttp.ClientSession, target: Target, index: int) -> Outcome:
    """(first output event, total) in seconds and the events received, or what went
    wrong."""
    headers = target.headers_for(index)
    start = time.perf_counter()
    try:
        async with session.post(target.url, data=BODY, headers=headers) as response:
            if response.status != 200:
                body = await response.read()
                return f"HTTP {response.status}: {body[:300]!r}"
            first: float | None = None
            total: float | None = None
            buffer = bytearray()
            searched = scanned = 0  # events are looked for only in what is new
            async for chunk in response.content.iter_any():
                buffer += chunk
                if first is None:
                    seen, scanned = output_seen(buffer, scanned)
                    if seen:
                        first = time.perf_counter() - start
                if total is None:
                    begin = buffer.find(COMPLETED_EVENT, searched)
                    if begin < 0:
                        searched = max(0, len(buffer) - len(COMPLETED_EVENT))
                    elif buffer.find(b"\n\n", begin) >= 0:
                        total = time.perf_counter() - start
    except (aiohttp.ClientError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"
    if first is None or total is None:
        last = re.findall(rb"event: (\S+)", buffer)[-1:] or [b"(none)"]
        return f"stream ended without response.completed: last event {last[0].decode()}"
    problem = check_completed(bytes(buffer[buffer.find(COMPLETED_EVENT) :]))
    return problem if problem else (first, total, buffer.count(b"\n\n"))


def output_seen(buffer: bytearray, start: int) -> tuple[bool, int]:
    """Whether ``buffer[start:]`` holds the ``event:`` line of an output event (one not in
    `NOT_OUTPUT`), and where to look next time."""
    while True:
        begin = buffer.find(EVENT_LINE, start)
        if begin < 0:
            return False, max(start, len(buffer) - len(EVENT_LINE))
        end = buffer.find(b"\n", begin)
        if end < 0:
            return False, begin
        if bytes(buffer[begin + len(EVENT_LINE) : end]) not in NOT_OUTPUT:
            return True, end
        start = end


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


def new_session(concurrency: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency, keepalive_timeout=300),
        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS),
    )


class HttpRun(Run):
    """`Run` over HTTP/SSE: one session per side and level, ``concurrency`` workers a batch."""

    async def level(
        self, concurrency: int, count: int, rounds: int, warmup: int
    ) -> dict[Side, SideResult]:
        async with contextlib.AsyncExitStack() as stack:
            sessions: dict[Side, aiohttp.ClientSession] = {
                side: await stack.enter_async_context(new_session(concurrency))
                for side in self.sides
            }
            batch = functools.partial(self.batch, sessions, concurrency)
            return await interleave(
                batch, SideResult, self.sides, concurrency, count, rounds, warmup
            )

    async def batch(
        self,
        sessions: Mapping[Side, aiohttp.ClientSession],
        concurrency: int,
        side: Side,
        count: int,
        phase: str,
        result: SideResult | None,
    ) -> None:
        send = functools.partial(one_request, sessions[side], self.targets[side])
        cpu_before = self.proxy_cpu(side)
        outcomes, wall = await closed_loop([send] * min(concurrency, count), self.sent, count)
        cpu = self.proxy_cpu(side) - cpu_before
        self.sent += count
        self.tally(side, phase, outcomes)
        if result is not None:
            result.add(outcomes, wall, cpu, count)


# -- reports -------------------------------------------------------------------------------


def render(report: dict[str, Any]) -> str:
    settings = report["settings"]
    out = [
        f"codexlb HTTP/SSE benchmark: {settings['requests']} requests per side per level in "
        f"{settings['rounds']} rotating rounds, warm-up {settings['warmup']} per side; "
        "every event written as its own chunk by the fake upstream",
        render_environment(report),
        "latencies in ms from sending the request: first = first output event (not "
        "response.created or response.in_progress), total = response.completed, 1st-end = "
        "from the one to the other; added = through a proxy minus direct at the same "
        "percentile",
    ]
    for level in report["levels"]:
        out += render_level(NAMES, level)
    out += render_footer(report)
    return "\n".join(out)


# -- main ------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    def start(servers: Servers, errors: Errors) -> HttpRun:
        return HttpRun(targets(servers, HEADERS), servers, errors)

    return await run_levels(args, NAMES, start, {})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench/http_sse.py",
        description="Latency and throughput of codexlb versus the fake upstream, over HTTP/SSE.",
    )
    add_level_arguments(parser, NAMES, concurrency_help="e.g. 1,16,64", default_count=4000)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    return execute(lambda: run(args), render, as_json=args.json)


if __name__ == "__main__":
    raise SystemExit(main())
