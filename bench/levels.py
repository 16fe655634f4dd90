"""The direct-versus-through measurement both benchmarks make, whatever the transport.

A benchmark measures concurrency *levels*: at each, a warm-up on both sides, then rounds that
alternate which side goes first, with the samples pooled per side. This module holds all of it
but the transport: each side's `Target`, the pooled `SideResult`, the closed loop of workers
(`closed_loop`), the alternating rounds (`interleave`), the `Run` base class with the tallies
of a run, the whole run from starting the servers to the report (`run_levels`), the per-side
and per-level summaries, a level's lines in the text report (`render_level`), and the options
of the levels (`add_level_arguments`). What a transport calls its unit of work and its first
latency comes in as `Names`.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from bench.common import (
    LABELS,
    RESPONSES_PATH,
    RUN_TIMEOUT_SECONDS,
    SIDES,
    Closing,
    Errors,
    ProcessStats,
    Server,
    Servers,
    Side,
    account_headers,
    cell,
    client_headers,
    concurrency_list,
    cpu_seconds,
    distribution_ms,
    minus,
    positive,
    progress,
    ratio,
    run_report,
    serving,
    split,
)

Outcome = tuple[float, float] | str
"""One request or turn: (first latency, total) in seconds, or what went wrong."""

R = TypeVar("R", bound="SideResult")
B = TypeVar("B", bound="Run")

QUANTILES = ("p50", "p99")
"""The percentiles of the *added* figures and of the tables."""
LABEL_WIDTH = 17
WIDTHS = (10, 10, 11, 11)
"""The latency columns of a table: the first latency, then the total, at each quantile."""
RATE_WIDTH = 10


@dataclass(frozen=True)
class Names:
    """What a benchmark calls its unit of work and its first latency, in the report's keys,
    its tables and its options."""

    unit: str
    """Plural (``requests``): the count keys, ``<unit>_per_second`` and the ``--<unit>``
    option."""
    per_unit: str
    """Singular (``request``): ``codexlb_cpu_ms_per_<per_unit>`` and ``ms/<per_unit>``."""
    first: str
    """The first latency's key (``ttfb``): ``<first>_ms`` and ``added_ms``'s keys."""
    first_column: str
    """The first latency in a table's header (``TTFB``)."""
    rate_column: str
    """The throughput in a table's header (``req/s``)."""


# -- load ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    side: Side
    url: str
    headers: tuple[dict[str, str], ...]
    """Rotated over the requests or sockets (one per direct account)."""

    def headers_for(self, index: int) -> dict[str, str]:
        return self.headers[index % len(self.headers)]


def targets(servers: Servers, common: Mapping[str, str]) -> dict[Side, Target]:
    """The fake upstream with each account's own token, and codexlb with the client key,
    both with the transport's ``common`` headers."""
    accounts = tuple({**common, **headers} for headers in account_headers())
    client = {**common, **client_headers()}
    return {
        "direct": Target("direct", servers.fake.url + RESPONSES_PATH, accounts),
        "through": Target("through", servers.codexlb.url + RESPONSES_PATH, (client,)),
    }


@dataclass
class SideResult:
    """The pooled samples of one side at one concurrency (warm-up excluded)."""

    first: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    wall_seconds: float = 0.0
    codexlb_cpu_seconds: float = 0.0
    count: int = 0
    """Requests or turns sent, failed ones included."""

    def add(self, outcomes: Iterable[Outcome], wall: float, codexlb_cpu: float, count: int) -> None:
        """Pool one batch of ``count`` requests or turns."""
        self.wall_seconds += wall
        self.codexlb_cpu_seconds += codexlb_cpu
        self.count += count
        for outcome in outcomes:
            if not isinstance(outcome, str):
                self.first.append(outcome[0])
                self.total.append(outcome[1])

    def extra_summary(self) -> dict[str, Any]:
        """What a benchmark adds to `side_summary`, before ``codexlb_cpu_seconds``."""
        return {}


async def closed_loop(
    workers: Sequence[Callable[[int], Awaitable[Outcome]]], first_index: int, count: int
) -> tuple[list[Outcome], float]:
    """``count`` requests or turns numbered from ``first_index``, each worker taking the next
    index as it comes free; the outcomes and the wall time."""
    outcomes: list[Outcome] = []
    indexes = iter(range(first_index, first_index + count))

    async def work(send: Callable[[int], Awaitable[Outcome]]) -> None:
        for index in indexes:  # shared by the workers: each index is sent once
            outcomes.append(await send(index))

    start = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for send in workers:
            group.create_task(work(send))
    return outcomes, time.perf_counter() - start


async def interleave(
    batch: Callable[[Side, int, str, R | None], Awaitable[None]],
    new_result: Callable[[], R],
    concurrency: int,
    count: int,
    rounds: int,
    warmup: int,
) -> dict[Side, R]:
    """One level: ``warmup`` on each side (not pooled), then ``count`` per side in ``rounds``
    rounds, alternating which side goes first. ``batch(side, count, phase, result)`` sends
    a batch and pools it into ``result`` unless that is None."""
    results = {side: new_result() for side in SIDES}
    for side in SIDES:
        await batch(side, warmup, "warm-up", None)
    for number, part in enumerate(split(count, rounds)):
        order = SIDES if number % 2 == 0 else SIDES[::-1]
        progress(f"  concurrency {concurrency}: round {number + 1}/{rounds}")
        for side in order:
            await batch(side, part, "measured", results[side])
    return results


@dataclass
class Run(ABC):
    """The running benchmark: its targets and servers, and the tallies of the whole run.

    A benchmark implements `level` (one concurrency, typically with `interleave`) and may add
    to the report with `after_level` and `after_levels`.
    """

    targets: dict[Side, Target]
    codexlb: Server
    fake: Server
    errors: Errors = field(default_factory=Errors, init=False)
    completed_through: int = field(default=0, init=False)
    sent: int = field(default=0, init=False)
    """Requests or turns sent so far: the next one's index."""

    @abstractmethod
    async def level(
        self, concurrency: int, count: int, rounds: int, warmup: int
    ) -> Mapping[Side, SideResult]:
        """Measure one concurrency: ``count`` per side in ``rounds`` rounds after ``warmup``."""

    def after_level(self) -> dict[str, Any]:
        """What to add at the end of a level's summary, read right after the level."""
        return {}

    async def after_levels(self) -> tuple[dict[str, Any], list[str]]:
        """Report sections to add after ``levels`` and failed checks, once the levels ran."""
        return {}, []

    def tally(self, side: Side, phase: str, outcomes: Iterable[Outcome]) -> int:
        """Count the errors and the completed through responses; returns the successes."""
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

    def check_alive(self) -> None:
        self.codexlb.check_alive()
        self.fake.check_alive()


async def run_levels(
    args: argparse.Namespace,
    names: Names,
    start: Callable[[Servers], B],
    settings: Mapping[str, Any],
) -> dict[str, Any]:
    """The whole run: start the servers, build the `Run` with ``start``, measure every level
    of ``args.concurrency``, then `Run.after_levels`, stop the servers and report (the
    benchmark's own ``settings`` after those of the levels)."""
    began = time.perf_counter()
    bench_cpu_before = time.process_time()
    with tempfile.TemporaryDirectory(prefix="codexlb-bench-") as temp:
        async with serving(Path(temp)) as servers:
            fake, codexlb = servers.fake, servers.codexlb
            after_start = ProcessStats.read(codexlb.pid)
            fake_cpu_before = cpu_seconds(fake.pid)
            bench = start(servers)
            levels = []
            async with asyncio.timeout(RUN_TIMEOUT_SECONDS):
                for concurrency in args.concurrency:
                    warmup = max(args.warmup, 2 * concurrency)
                    results = await bench.level(concurrency, args.count, args.rounds, warmup)
                    extra = bench.after_level()
                    levels.append(level_summary(names, concurrency, warmup, results, extra))
                sections, failures = await bench.after_levels()
            at_end = ProcessStats.read(codexlb.pid)
            fake_cpu = cpu_seconds(fake.pid) - fake_cpu_before
            codexlb_exit = await codexlb.stop()
            await fake.stop()
        closing = Closing(
            servers=servers,
            errors=bench.errors,
            completed_through=bench.completed_through,
            after_start=after_start,
            at_end=at_end,
            codexlb_exit=codexlb_exit,
            fake_cpu_seconds=fake_cpu,
            began=began,
            bench_cpu_before=bench_cpu_before,
        )
        all_settings = {
            names.unit: args.count,
            "concurrency": args.concurrency,
            "rounds": args.rounds,
            "warmup": args.warmup,
            **settings,
        }
        return run_report(closing, all_settings, {"levels": levels, **sections}, failures)


# -- reports ---------------------------------------------------------------------------------


def side_summary(names: Names, result: SideResult) -> dict[str, Any]:
    return {
        names.unit: result.count,
        "completed": len(result.total),
        "wall_seconds": round(result.wall_seconds, 3),
        f"{names.unit}_per_second": ratio(len(result.total), result.wall_seconds, 1),
        f"{names.first}_ms": distribution_ms(result.first),
        "total_ms": distribution_ms(result.total),
        **result.extra_summary(),
        "codexlb_cpu_seconds": round(result.codexlb_cpu_seconds, 2),
    }


def level_summary(
    names: Names,
    concurrency: int,
    warmup: int,
    results: Mapping[Side, SideResult],
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    """Both sides, what codexlb adds, and ``extra`` last."""
    direct, through = (
        side_summary(names, results["direct"]),
        side_summary(names, results["through"]),
    )
    lb_cpu, through_result = results["through"].codexlb_cpu_seconds, results["through"]
    rate = f"{names.unit}_per_second"
    return {
        "concurrency": concurrency,
        "warmup_per_side": warmup,
        "direct": direct,
        "through": through,
        "added_ms": {
            f"{metric}_{q}": minus(through[f"{metric}_ms"][q], direct[f"{metric}_ms"][q])
            for metric in (names.first, "total")
            for q in QUANTILES
        },
        "throughput_ratio": ratio(through[rate] or 0.0, direct[rate] or 0.0),
        f"codexlb_cpu_ms_per_{names.per_unit}": ratio(1000 * lb_cpu, through_result.count),
        "codexlb_cpu_share_of_core": ratio(lb_cpu, through_result.wall_seconds),
        **extra,
    }


def table_row(label: str, values: Sequence[float | None], spec: str) -> str:
    cells = "".join(cell(v, w, spec) for v, w in zip(values, WIDTHS, strict=True))
    return f"  {label:<{LABEL_WIDTH}}{cells}"


def render_level(
    names: Names, level: dict[str, Any], *, heading_note: str = "", cpu_note: str = ""
) -> list[str]:
    """A level's lines: its heading (with ``heading_note``), a row per side and the added
    row, then throughput and codexlb's CPU (with ``cpu_note`` at the end)."""
    metrics = (names.first, "total")
    columns = [f"{label} {q}" for label in (names.first_column, "total") for q in QUANTILES]
    header = "".join(f"{n:>{w}}" for n, w in zip(columns, WIDTHS, strict=True))
    out = [
        "",
        f"concurrency {level['concurrency']}{heading_note}",
        "  " + " " * LABEL_WIDTH + header + f"{names.rate_column:>{RATE_WIDTH}}",
    ]
    for side in SIDES:
        latencies = [level[side][f"{metric}_ms"][q] for metric in metrics for q in QUANTILES]
        rate = cell(level[side][f"{names.unit}_per_second"], RATE_WIDTH, ".1f")
        out.append(table_row(LABELS[side], latencies, ".2f") + rate)
    added = [level["added_ms"][f"{metric}_{q}"] for metric in metrics for q in QUANTILES]
    out.append(table_row("added", added, "+.2f"))
    cpu_share = level["codexlb_cpu_share_of_core"]
    out.append(
        f"  throughput through/direct {cell(level['throughput_ratio'], 0)}; codexlb CPU "
        f"{cell(level[f'codexlb_cpu_ms_per_{names.per_unit}'], 0)} ms/{names.per_unit}, "
        f"{cell(None if cpu_share is None else 100 * cpu_share, 0, '.0f')}% of one core "
        f"during through rounds{cpu_note}"
    )
    return out


# -- command line ----------------------------------------------------------------------------


def add_level_arguments(
    parser: argparse.ArgumentParser, names: Names, concurrency_help: str
) -> None:
    """``--<unit>`` (as ``args.count``), ``--concurrency``, ``--rounds`` and ``--warmup``."""
    parser.add_argument(
        f"--{names.unit}",
        dest="count",
        metavar=names.unit.upper(),
        type=positive,
        default=8000,
        help=f"measured {names.unit} per side and level (default 8000)",
    )
    parser.add_argument(
        "--concurrency", type=concurrency_list, default=[1, 16, 64], help=concurrency_help
    )
    parser.add_argument(
        "--rounds", type=positive, default=8, help="alternating rounds per level (default 8)"
    )
    parser.add_argument(
        "--warmup",
        type=positive,
        default=100,
        help=f"warm-up {names.unit} per side and level (at least 2 x concurrency)",
    )
