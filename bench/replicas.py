"""What sharing a pool between replicas costs, in instructions per relayed HTTP/SSE request.

Run: ``.venv/bin/python bench/replicas.py [--requests N] [--concurrency C]`` (needs valgrind
and a PostgreSQL server; ``--postgres`` gives its URL, default the local test server).

Three set-ups relay the same requests (``bench/http_sse.py``'s request, the fake upstream of
``bench/instructions.py``), each codexlb under ``valgrind --tool=callgrind``:

- ``sqlite x1``: one process on SQLite, nothing shared (the baseline);
- ``postgresql x1``: one process on PostgreSQL: what it shares, it shares with nobody, but it
  pays for the heartbeat, the listening connection and writing what it learns; once at
  concurrency C and once at C / 2, the load each of two replicas carries (snapshot commits
  batch less at lower concurrency, which is no cost of sharing);
- ``postgresql x2``: two processes on one PostgreSQL database, the requests alternating
  between them, as behind a load balancer with no stickiness; the instructions of both are
  added up.

With ``--requests-per-minute`` the client key gets that limit (high enough never to refuse),
so every request also takes the shared counter: one round trip to PostgreSQL per request.

Instruction counts are load-independent (the machine is shared); they leave out the database
server's own work and time spent waiting on it, so the latency a counter round trip adds is
measured on the side, as the median of ``--round-trips`` sequential ``take`` calls in this
process (a small wall-clock figure: read it as an order of magnitude).

``--wall`` runs the same set-ups without valgrind and measures time instead: throughput and
the total time per request (p50, p99) over ``N`` requests at concurrency C, every set-up in
turn for ``--rounds`` rounds (so that drift in machine load hits all alike), each against
``sqlite x1``. Read it on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

if __package__ in (None, ""):  # run as ``python bench/replicas.py``: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg

from bench.common import (
    CLIENT_KEY,
    CODEXLB_READY,
    FAKE_READY,
    RESPONSES_PATH,
    BenchError,
    Server,
    client_headers,
    codexlb_argv,
    fake_upstream_argv,
    start_server,
    write_config,
)
from bench.http_sse import HEADERS, new_session, one_request
from bench.instructions import START_TIMEOUT_SECONDS, control, dumped_instructions
from bench.levels import Outcome, Target, closed_loop

DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
SETUPS = (("sqlite", 1, 1), ("postgresql", 1, 1), ("postgresql", 1, 2), ("postgresql", 2, 1))
"""(backend, replicas, divisor): each runs at concurrency C / divisor, so that ``postgresql
x1`` at C / 2 carries what each of the two replicas carries at C."""


async def count(
    tmp: Path,
    backend: str,
    replicas: int,
    *,
    requests: int,
    concurrency: int,
    database_url: str,
    requests_per_minute: int | None,
    wall: bool = False,
) -> tuple[int, int] | tuple[list[Outcome], float]:
    """Instructions of all replicas over ``requests`` measured requests, and the failures; with
    ``wall``, no valgrind: the outcomes and the wall time of the measured requests."""
    outs = [tmp / f"callgrind-{i}.out" for i in range(replicas)]
    async with contextlib.AsyncExitStack() as stack:
        fake = await start_server(
            "fake upstream", fake_upstream_argv(), tmp / "fake.log", FAKE_READY
        )
        stack.push_async_callback(fake.stop)
        config = write_config(tmp / "codexlb.toml", fake.url, tmp / "codexlb.db")
        text = config.read_text()
        if backend == "postgresql":
            sqlite_line = next(line for line in text.splitlines() if line.startswith("url = "))
            asyncpg_url = database_url.replace("postgresql://", "postgresql+asyncpg://", 1)
            text = text.replace(sqlite_line, f'url = "{asyncpg_url}"')
        if requests_per_minute is not None:
            key_line = f'key = "{CLIENT_KEY}"'
            text = text.replace(
                key_line, f"{key_line}\nrequests_per_minute = {requests_per_minute}"
            )
        config.write_text(text)
        servers: list[Server] = []
        for i, out in enumerate(outs):
            valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no"]
            valgrind.append(f"--callgrind-out-file={out}")
            if wall:
                valgrind = []
            server = await start_server(
                f"codexlb {i + 1}",
                [*valgrind, *codexlb_argv(config)],
                tmp / f"codexlb-{i}.log",
                CODEXLB_READY,
                START_TIMEOUT_SECONDS,
            )
            stack.push_async_callback(server.stop)
            servers.append(server)
        headers = {**HEADERS, **client_headers()}
        targets = [Target("through", s.url + RESPONSES_PATH, (headers,)) for s in servers]
        async with new_session(concurrency) as session:
            workers = [
                functools.partial(one_request, session, targets[i % replicas])
                for i in range(concurrency)
            ]
            warmup = 4 * concurrency
            await closed_loop(workers, 0, warmup)
            if wall:
                return await closed_loop(workers, warmup, requests)
            for server in servers:
                await control("-i", "on", str(server.pid))
            outcomes, _ = await closed_loop(workers, warmup, requests)
            for server in servers:
                await control("-d", str(server.pid))
        failed = sum(isinstance(outcome, str) for outcome in outcomes)
        return sum(dumped_instructions(out) for out in outs), failed


async def round_trip_ms(database_url: str, samples: int) -> float:
    """The median wall time of one shared-counter ``take``, in milliseconds."""
    from codexlb.config import parse_config
    from codexlb.db import create_engine, upgrade
    from codexlb.pool import Pool
    from codexlb.shared import PostgresState

    asyncpg_url = database_url.replace("postgresql://", "postgresql+asyncpg://", 1)
    config = parse_config({"database": {"url": asyncpg_url}}, source=Path("bench.toml"))
    engine = create_engine(asyncpg_url)
    try:
        await upgrade(engine)
        state = PostgresState(engine, Pool(config), config.database)
        times: list[float] = []
        for _ in range(samples):
            start = time.perf_counter()
            await state.take("bench", limit=10**9, window=60)
            times.append(time.perf_counter() - start)
        await state.close()
        return statistics.median(times) * 1000
    finally:
        await engine.dispose()


@contextlib.asynccontextmanager
async def fresh_database(admin_url: str) -> AsyncIterator[str]:
    name = f"codexlb_bench_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(admin_url, timeout=5)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"{admin_url.rpartition('/')[0]}/{name}"
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def count_setup(
    args: argparse.Namespace, backend: str, replicas: int, concurrency: int, *, wall: bool = False
) -> tuple[int, int] | tuple[list[Outcome], float]:
    """``count`` for one set-up, in a temporary directory of its own on a fresh database."""
    with tempfile.TemporaryDirectory(prefix="codexlb-replicas-") as temp:
        async with fresh_database(args.postgres) as database_url:
            return await count(
                Path(temp),
                backend,
                replicas,
                requests=args.requests,
                concurrency=concurrency,
                database_url=database_url,
                requests_per_minute=args.requests_per_minute,
                wall=wall,
            )


async def run_wall(args: argparse.Namespace) -> int:
    """``--wall``: throughput and total time per set-up, the set-ups in turn each round."""
    samples: dict[str, tuple[list[float], float, int]] = {}
    for _ in range(args.rounds):
        for backend, replicas, divisor in SETUPS:
            if divisor != 1:
                continue  # same load per replica: a question for instructions, not time
            measured = await count_setup(args, backend, replicas, args.concurrency, wall=True)
            outcomes, seconds = cast(tuple[list[Outcome], float], measured)
            failed = [o for o in outcomes if isinstance(o, str)]
            if failed:
                print(f"error: {len(failed)} requests failed: {failed[0]}", file=sys.stderr)
                return 1
            label = f"{backend} x{replicas}"
            totals, wall, count_ = samples.get(label, ([], 0.0, 0))
            totals += [o[1] for o in outcomes if not isinstance(o, str)]
            samples[label] = (totals, wall + seconds, count_ + len(outcomes))
    baseline = None
    for label, (totals, wall, n) in samples.items():
        totals.sort()
        rate = n / wall
        p50 = totals[len(totals) // 2] * 1000
        p99 = totals[min(len(totals) - 1, int(len(totals) * 0.99))] * 1000
        baseline = baseline or (rate, p50)
        print(
            f"{label} at concurrency {args.concurrency}: {rate:,.0f} requests/s "
            f"({rate / baseline[0]:.3f} of sqlite x1), total p50 {p50:.2f} ms "
            f"({p50 - baseline[1]:+.2f}), p99 {p99:.2f} ms",
            flush=True,
        )
    return 0


async def run(args: argparse.Namespace) -> int:
    if args.wall:
        return await run_wall(args)
    results: list[tuple[str, float]] = []
    for backend, replicas, divisor in SETUPS:
        concurrency = max(args.concurrency // divisor, 1)
        counted = await count_setup(args, backend, replicas, concurrency)
        instructions, failed = cast(tuple[int, int], counted)
        if failed:
            print(f"error: {failed} of {args.requests} requests failed", file=sys.stderr)
            return 1
        label = f"{backend} x{replicas} at concurrency {concurrency}"
        results.append((label, instructions / args.requests))
        print(f"{label}: {instructions / args.requests:,.0f} instructions per request", flush=True)
    for label, per_request in results[1:]:
        print(f"{label} / {results[0][0]}: {per_request / results[0][1]:.3f}")
    async with fresh_database(args.postgres) as database_url:
        median = await round_trip_ms(database_url, args.round_trips)
    print(f"shared counter take: {median:.2f} ms median over {args.round_trips} (wall clock)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="measured (default 2000)")
    parser.add_argument("--concurrency", type=int, default=64, help="default 64")
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES, help="an admin URL (asyncpg)")
    parser.add_argument("--requests-per-minute", type=int, default=None)
    parser.add_argument("--round-trips", type=int, default=200)
    parser.add_argument("--wall", action="store_true", help="measure time, not instructions")
    parser.add_argument("--rounds", type=int, default=3, help="with --wall (default 3)")
    args = parser.parse_args()
    missing = [tool for tool in ("valgrind", "callgrind_control") if shutil.which(tool) is None]
    if missing and not args.wall:
        print(f"needs {' and '.join(missing)} (Debian: apt install valgrind)", file=sys.stderr)
        return 2
    try:
        return asyncio.run(run(args))
    except (BenchError, OSError, asyncpg.PostgresError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
