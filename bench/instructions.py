"""Instructions codexlb executes per relayed HTTP/SSE request, counted by callgrind.

Run: ``.venv/bin/python bench/instructions.py [--requests N] [--concurrency C]``.

Time on a shared 2-core machine moves by 10-20% from run to run; an instruction count does
not (two runs agree within about 0.5%), so this is the measure to compare two versions of the
relay by. It is not time: system calls, cache misses and the other processes are left out.

Method: the fake upstream runs as in ``bench/http_sse.py``; codexlb runs under
``valgrind --tool=callgrind`` with instrumentation off. After a warm-up of ``4 x C`` requests
(connections open, caches filled) instrumentation is switched on (``callgrind_control -i on``),
``N`` requests run through codexlb at concurrency ``C`` as in the HTTP benchmark, and the
counters are dumped (``callgrind_control -d``). All of codexlb's threads are counted, the
snapshot writer's included. Under valgrind codexlb runs some 30 times slower, so it is the
bottleneck and batches of snapshot commits are larger than in a plain run.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import shutil
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as ``python bench/instructions.py``: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESPONSES_PATH, BenchError, client_headers, serving
from bench.http_sse import HEADERS, new_session, one_request
from bench.levels import Target, closed_loop

START_TIMEOUT_SECONDS = 300.0
"""codexlb starts slowly under valgrind."""


async def control(*argv: str) -> None:
    process = await asyncio.create_subprocess_exec(
        "callgrind_control",
        *argv,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await process.communicate()
    if process.returncode != 0:
        raise BenchError(f"callgrind_control {' '.join(argv)} failed: {stderr.decode()}")


def dumped_instructions(out: Path) -> int:
    """The ``totals:`` of the first dump (``<out>.1``), written by ``callgrind_control -d``."""
    for line in out.with_name(out.name + ".1").read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise BenchError(f"no totals in {out}.1")


async def count(requests: int, concurrency: int) -> tuple[int, int]:
    """Instructions over ``requests`` measured requests, and how many of them failed."""
    with tempfile.TemporaryDirectory(prefix="codexlb-instructions-") as temp:
        out = Path(temp) / "callgrind.out"
        valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no"]
        valgrind.append(f"--callgrind-out-file={out}")
        async with serving(Path(temp), valgrind, START_TIMEOUT_SECONDS) as servers:
            pid = str(servers.codexlb.pid)
            headers = {**HEADERS, **client_headers()}
            target = Target("through", servers.codexlb.url + RESPONSES_PATH, (headers,))
            async with new_session(concurrency) as session:
                send = functools.partial(one_request, session, target)
                warmup = 4 * concurrency
                await closed_loop([send] * concurrency, 0, warmup)
                await control("-i", "on", pid)
                outcomes, _ = await closed_loop([send] * concurrency, warmup, requests)
                await control("-d", pid)
            failed = sum(isinstance(outcome, str) for outcome in outcomes)
            return dumped_instructions(out), failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="measured (default 2000)")
    parser.add_argument("--concurrency", type=int, default=64, help="default 64")
    args = parser.parse_args()
    missing = [tool for tool in ("valgrind", "callgrind_control") if shutil.which(tool) is None]
    if missing:
        print(f"needs {' and '.join(missing)} (Debian: apt install valgrind)", file=sys.stderr)
        return 2
    try:
        instructions, failed = asyncio.run(count(args.requests, args.concurrency))
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if failed:
        print(f"error: {failed} of {args.requests} requests failed", file=sys.stderr)
        return 1
    print(
        f"codexlb, HTTP/SSE at concurrency {args.concurrency}: "
        f"{instructions / args.requests:,.0f} instructions per request "
        f"({args.requests} requests, callgrind)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
