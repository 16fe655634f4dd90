"""The direct-versus-proxies measurement both benchmarks make, whatever the transport.

A benchmark measures *levels*: for each response shape (``--deltas``: the servers are started
afresh for each), each variant of the transport (WebSocket turns unchained or chained) and each
concurrency, a warm-up on every side, then rounds that rotate which side goes first, with the
samples pooled per side. The sides are *direct* (straight to the fake upstream), *through*
(codexlb), *baseline* (with ``--baseline-tree``: a second codexlb, from another checkout, in
front of the same fake, so that two versions are compared in the same rounds rather than in two
runs minutes and 10-20% of machine drift apart) and *nginx* (a plain proxy hop, where nginx is
installed). This module holds all of it but the transport: each side's `Target`, the pooled
`SideResult`, the closed loop of workers (`closed_loop`), the rotating rounds (`interleave`),
the `Run` base class with the tallies of a run, the whole run from starting the servers to the
report (`run_levels`), the per-side and per-level summaries, a level's lines in the text report
(`render_level`), and the options of the levels (`add_level_arguments`). What a transport calls
its unit of work and its first latency comes in as `Names`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import tempfile
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from bench import nginx
from bench.common import (
    LABELS,
    PROXIES,
    RESPONSES_PATH,
    RUN_TIMEOUT_SECONDS,
    SIDES,
    BalancerClosing,
    Closing,
    Errors,
    ProcessStats,
    Server,
    Servers,
    Shape,
    Side,
    Whole,
    account_headers,
    cell,
    checkout,
    client_headers,
    concurrency_list,
    cpu_seconds,
    deltas_list,
    distribution_ms,
    git_commit,
    minus,
    positive,
    progress,
    ratio,
    run_report,
    serving,
    split,
    start_codexlb,
    tree_prefix,
)

Outcome = tuple[float, float, int] | str
"""One request or turn: (first latency, total) in seconds and the events it carried, or what
went wrong."""

R = TypeVar("R", bound="SideResult")
B = TypeVar("B", bound="Run")

QUANTILES = ("p50", "p99")
"""The percentiles of the *added* figures and of the tables."""
LABEL_WIDTH = 17
WIDTHS = (11, 11, 11, 11, 12, 12)
"""The latency columns of a table: the first latency, the total, and the time from the first
to the end, at each quantile."""
RATE_WIDTH = 10


@dataclass(frozen=True)
class Names:
    """What a benchmark calls its unit of work and its first latency, in the report's keys,
    its tables and its options."""

    unit: str
    """Plural (``requests``): the count keys, ``<unit>_per_second`` and the ``--<unit>``
    option."""
    per_unit: str
    """Singular (``request``): ``proxy_cpu_ms_per_<per_unit>`` and ``ms/<per_unit>``."""
    first: str
    """The first latency's key (``first_output``): ``<first>_ms`` and ``added_ms``'s keys."""
    first_column: str
    """The first latency in a table's header (``first``)."""
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
    """The fake upstream with each account's own token, codexlb and the baseline (if running)
    with the client key, and nginx (if running) with the accounts' tokens as direct, all with
    the transport's ``common`` headers."""
    accounts = tuple({**common, **headers} for headers in account_headers())
    client = {**common, **client_headers()}
    found: dict[Side, Target] = {
        "direct": Target("direct", servers.fake.url + RESPONSES_PATH, accounts),
    }
    for side, balancer in servers.balancers().items():
        found[side] = Target(side, balancer.server.url + RESPONSES_PATH, (client,))
    if servers.nginx is not None:
        found["nginx"] = Target("nginx", servers.nginx.url + RESPONSES_PATH, accounts)
    return found


@dataclass
class SideResult:
    """The pooled samples of one side at one level (warm-up excluded)."""

    first: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    first_to_end: list[float] = field(default_factory=list)
    events: int = 0
    """Events (SSE events or WebSocket frames) of the completed requests or turns."""
    wall_seconds: float = 0.0
    proxy_cpu_seconds: float = 0.0
    """CPU of the side's proxy (codexlb, or nginx's master and worker) during its rounds."""
    count: int = 0
    """Requests or turns sent, failed ones included."""

    def add(self, outcomes: Iterable[Outcome], wall: float, proxy_cpu: float, count: int) -> None:
        """Pool one batch of ``count`` requests or turns."""
        self.wall_seconds += wall
        self.proxy_cpu_seconds += proxy_cpu
        self.count += count
        for outcome in outcomes:
            if not isinstance(outcome, str):
                first, total, events = outcome
                self.first.append(first)
                self.total.append(total)
                self.first_to_end.append(total - first)
                self.events += events

    def extra_summary(self) -> dict[str, Any]:
        """What a benchmark adds to `side_summary`, before the proxy's CPU."""
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


def round_order(sides: Sequence[Side], number: int) -> list[Side]:
    """The sides in round ``number``: rotated one step a round, and reversed every other
    cycle of rotations, so that each side goes first, middle and last alike."""
    shift = number % len(sides)
    order = [*sides[shift:], *sides[:shift]]
    return order[::-1] if (number // len(sides)) % 2 else order


async def interleave(
    batch: Callable[[Side, int, str, R | None], Awaitable[None]],
    new_result: Callable[[], R],
    sides: Sequence[Side],
    concurrency: int,
    count: int,
    rounds: int,
    warmup: int,
) -> dict[Side, R]:
    """One level: ``warmup`` on each side (not pooled), then ``count`` per side in ``rounds``
    rounds, rotating which side goes first (`round_order`). ``batch(side, count, phase,
    result)`` sends a batch and pools it into ``result`` unless that is None."""
    results = {side: new_result() for side in sides}
    for side in sides:
        await batch(side, warmup, "warm-up", None)
    for number, part in enumerate(split(count, rounds)):
        progress(f"  concurrency {concurrency}: round {number + 1}/{rounds}")
        for side in round_order(sides, number):
            await batch(side, part, "measured", results[side])
    return results


@dataclass
class Run(ABC):
    """The running benchmark: its targets and servers, and the tallies of the whole run.

    A benchmark implements `level` (one concurrency, typically with `interleave`), may offer
    variants of its transport (`variants`, `use_variant`) and may add to the report with
    `after_level` and `after_levels`.
    """

    targets: dict[Side, Target]
    servers: Servers
    errors: Errors
    """Shared by the runs of every set of servers."""
    completed: Counter[Side] = field(default_factory=Counter, init=False)
    """Requests or turns completed per side: through a codexlb, each has its snapshot."""
    sent: int = field(default=0, init=False)
    """Requests or turns sent so far: the next one's index."""

    @property
    def codexlb(self) -> Server:
        return self.servers.codexlb

    @property
    def fake(self) -> Server:
        return self.servers.fake

    @property
    def sides(self) -> tuple[Side, ...]:
        """The sides of this run, in `SIDES` order (*nginx* only where it runs)."""
        return tuple(side for side in SIDES if side in self.targets)

    def proxy_cpu(self, side: Side) -> float:
        """CPU seconds so far of the side's proxy: codexlb, the baseline, nginx's master and
        worker, or nothing for *direct*."""
        balancer = self.servers.balancers().get(side)
        if balancer is not None:
            return cpu_seconds(balancer.server.pid)
        if side == "nginx" and self.servers.nginx is not None:
            return nginx.group_cpu_seconds(self.servers.nginx)
        return 0.0

    def variants(self) -> list[dict[str, Any]]:
        """The variants of the transport to measure at each concurrency, as the keys they
        add to a level's summary; one by default."""
        return [{}]

    def use_variant(self, variant: Mapping[str, Any]) -> None:
        """Measure ``variant`` (one of `variants`) from now on; nothing to do by default."""
        del variant

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
        """Count the errors and the completed responses of the side; returns the successes."""
        ok = 0
        for outcome in outcomes:
            if isinstance(outcome, str):
                self.errors.add(side, phase, outcome)
            else:
                ok += 1
        self.completed[side] += ok
        self.check_alive()
        return ok

    def check_alive(self) -> None:
        for balancer in self.servers.balancers().values():
            balancer.server.check_alive()
        self.fake.check_alive()
        if self.servers.nginx is not None:
            self.servers.nginx.check_alive()


async def run_levels(
    args: argparse.Namespace,
    names: Names,
    start: Callable[[Servers, Errors], B],
    settings: Mapping[str, Any],
) -> dict[str, Any]:
    """The whole run: for each of ``args.deltas``, start the servers (the baseline too with
    ``args.baseline_tree``; nginx too, unless ``args.no_nginx`` or it is not installed), build
    the `Run` with ``start``, measure every variant and level of ``args.concurrency``, stop the
    servers; after the last, first `Run.after_levels`. Then the report (the benchmark's own
    ``settings`` after those of the levels)."""
    began = time.perf_counter()
    bench_cpu_before = time.process_time()
    found = nginx.find(args.nginx, disabled=args.no_nginx)
    if found.path is None:
        progress(f"nginx: {found.why_not}; measuring without it")
    compress = bool(getattr(args, "compress", False))
    errors = Errors()
    levels: list[dict[str, Any]] = []
    closings: list[Closing] = []
    sections: dict[str, Any] = {}
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="codexlb-bench-") as temp:
        for number, deltas in enumerate(args.deltas):
            tmp = Path(temp) / f"deltas-{deltas}-{number}"
            tmp.mkdir()
            progress(f"responses of {deltas} deltas")
            shape = Shape(deltas, compress)
            async with (
                serving(tmp, tree_prefix(args.codexlb_tree), shape=shape) as servers,
                contextlib.AsyncExitStack() as stack,
            ):
                if args.baseline_tree is not None:
                    progress("starting the baseline codexlb")
                    baseline = await start_codexlb(
                        "baseline",
                        tmp,
                        servers.fake.url,
                        tree_prefix(args.baseline_tree),
                        compress=compress,
                    )
                    stack.push_async_callback(baseline.server.stop)
                    servers = dataclasses.replace(servers, baseline=baseline)
                if found.path is not None:
                    progress("starting nginx")
                    proxy = await nginx.start(found.path, tmp, servers.fake.url)
                    stack.push_async_callback(proxy.stop)
                    servers = dataclasses.replace(servers, nginx=proxy)
                fake, balancers = servers.fake, servers.balancers()
                after_start = {
                    side: ProcessStats.read(b.server.pid) for side, b in balancers.items()
                }
                fake_cpu_before = cpu_seconds(fake.pid)
                bench = start(servers, errors)
                async with asyncio.timeout(RUN_TIMEOUT_SECONDS):
                    for variant in bench.variants():
                        bench.use_variant(variant)
                        for concurrency in args.concurrency:
                            warmup = max(args.warmup, 2 * concurrency)
                            results = await bench.level(
                                concurrency, args.count, args.rounds, warmup
                            )
                            key = {"deltas": deltas, **variant}
                            extra = bench.after_level()
                            levels.append(
                                level_summary(names, key, concurrency, warmup, results, extra)
                            )
                    if number == len(args.deltas) - 1:
                        sections, failures = await bench.after_levels()
                at_end = {side: ProcessStats.read(b.server.pid) for side, b in balancers.items()}
                nginx_at_end = None
                if servers.nginx is not None:
                    nginx_at_end = nginx.group_stats(servers.nginx)
                fake_cpu = cpu_seconds(fake.pid) - fake_cpu_before
                exits = {side: await b.server.stop() for side, b in balancers.items()}
                nginx_exit = await servers.nginx.stop() if servers.nginx is not None else None
                await fake.stop()
            ends = {
                side: BalancerClosing(
                    b, bench.completed[side], after_start[side], at_end[side], exits[side]
                )
                for side, b in balancers.items()
            }
            closings.append(
                Closing(
                    servers=servers,
                    deltas=deltas,
                    codexlb=ends["through"],
                    fake_cpu_seconds=fake_cpu,
                    nginx_at_end=nginx_at_end,
                    nginx_exit=nginx_exit,
                    baseline=ends.get("baseline"),
                )
            )
        whole = Whole(
            closings=closings,
            errors=errors,
            began=began,
            bench_cpu_before=bench_cpu_before,
            nginx={"path": found.path, "note": found.why_not or None},
        )
        all_settings = {
            names.unit: args.count,
            "deltas": args.deltas,
            "concurrency": args.concurrency,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "codexlb_tree": None if args.codexlb_tree is None else str(args.codexlb_tree),
            "codexlb_commit": git_commit(args.codexlb_tree),
            **baseline_settings(args.baseline_tree),
            **settings,
        }
        return run_report(whole, all_settings, {"levels": levels, **sections}, failures)


def baseline_settings(tree: Path | None) -> dict[str, Any]:
    """The baseline's checkout and its commit, in a run that has a baseline."""
    if tree is None:
        return {}
    return {"baseline_tree": str(tree), "baseline_commit": git_commit(tree)}


# -- reports ---------------------------------------------------------------------------------


def side_summary(names: Names, side: Side, result: SideResult) -> dict[str, Any]:
    """One side's figures; a proxy's side adds its proxy's CPU."""
    completed = len(result.total)
    summary = {
        names.unit: result.count,
        "completed": completed,
        f"events_per_{names.per_unit}": ratio(result.events, completed, 1),
        "wall_seconds": round(result.wall_seconds, 3),
        f"{names.unit}_per_second": ratio(completed, result.wall_seconds, 1),
        f"{names.first}_ms": distribution_ms(result.first),
        "total_ms": distribution_ms(result.total),
        "first_to_end_ms": distribution_ms(result.first_to_end),
        **result.extra_summary(),
    }
    if side in PROXIES:
        cpu = result.proxy_cpu_seconds
        summary["proxy"] = PROXIES[side]
        summary["proxy_cpu_seconds"] = round(cpu, 2)
        summary[f"proxy_cpu_ms_per_{names.per_unit}"] = ratio(1000 * cpu, result.count)
        summary["proxy_cpu_us_per_event"] = ratio(1_000_000 * cpu, result.events, 2)
        summary["proxy_cpu_share_of_core"] = ratio(cpu, result.wall_seconds)
    return summary


def level_summary(
    names: Names,
    key: Mapping[str, Any],
    concurrency: int,
    warmup: int,
    results: Mapping[Side, SideResult],
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    """The level's ``key`` (deltas, variant), every side, what each proxy adds to *direct*
    (``added_ms``, ``throughput_ratio`` in its side), codexlb against the baseline where it ran
    (``codexlb_vs_baseline``), and ``extra`` last."""
    summaries: dict[str, dict[str, Any]] = {
        side: side_summary(names, side, result) for side, result in results.items()
    }
    direct = summaries["direct"]
    rate = f"{names.unit}_per_second"
    metrics = (names.first, "total", "first_to_end")
    for side, summary in summaries.items():
        if side == "direct":
            continue
        summary["throughput_ratio"] = ratio(summary[rate] or 0.0, direct[rate] or 0.0)
        summary["added_ms"] = {
            f"{metric}_{q}": minus(summary[f"{metric}_ms"][q], direct[f"{metric}_ms"][q])
            for metric in metrics
            for q in QUANTILES
        }
    versus = {}
    if "baseline" in results:
        versus["codexlb_vs_baseline"] = versus_baseline(
            names, results["through"], results["baseline"]
        )
    return {
        **key,
        "concurrency": concurrency,
        "warmup_per_side": warmup,
        **summaries,
        **versus,
        **extra,
    }


def versus_baseline(names: Names, through: SideResult, baseline: SideResult) -> dict[str, Any]:
    """codexlb's throughput and CPU per request or turn over the baseline's, both measured in
    the same rounds (1.0: the same; from the pooled figures, not the rounded ones)."""
    return {
        "throughput_ratio": ratio(
            len(through.total) * baseline.wall_seconds, len(baseline.total) * through.wall_seconds
        ),
        f"cpu_per_{names.per_unit}_ratio": ratio(
            through.proxy_cpu_seconds * baseline.count, baseline.proxy_cpu_seconds * through.count
        ),
    }


def table_row(label: str, values: Sequence[float | None], spec: str) -> str:
    cells = "".join(cell(v, w, spec) for v, w in zip(values, WIDTHS, strict=True))
    return f"  {label:<{LABEL_WIDTH}}{cells}"


def render_level(
    names: Names,
    level: dict[str, Any],
    *,
    heading_note: str = "",
    cpu_notes: Mapping[Side, str] | None = None,
) -> list[str]:
    """A level's lines: its heading (with ``heading_note`` on the concurrency), a row per side
    and an added row per proxy, then each proxy's throughput ratio and CPU (with its side's
    ``cpu_notes`` at the end), then codexlb against the baseline where it ran."""
    metrics = (names.first, "total", "first_to_end")
    titles = (names.first_column, "total", "1st-end")
    columns = [f"{title} {q}" for title in titles for q in QUANTILES]
    header = "".join(f"{n:>{w}}" for n, w in zip(columns, WIDTHS, strict=True))
    sides = [side for side in SIDES if side in level]
    variant = "".join(f", {level[k]}" for k in ("chaining",) if k in level)
    events = level["direct"][f"events_per_{names.per_unit}"]
    notes = [heading_note] if heading_note else []
    notes.append(f"{cell(events, 0, '.0f')} events per {names.per_unit}")
    out = [
        "",
        f"deltas {level['deltas']}{variant}, concurrency {level['concurrency']} "
        f"({'; '.join(notes)})",
        "  " + " " * LABEL_WIDTH + header + f"{names.rate_column:>{RATE_WIDTH}}",
    ]
    for side in sides:
        latencies = [level[side][f"{metric}_ms"][q] for metric in metrics for q in QUANTILES]
        rate = cell(level[side][f"{names.unit}_per_second"], RATE_WIDTH, ".1f")
        out.append(table_row(LABELS[side], latencies, ".2f") + rate)
    for side in sides:
        if side in PROXIES:
            added_ms = level[side]["added_ms"]
            added = [added_ms[f"{metric}_{q}"] for metric in metrics for q in QUANTILES]
            out.append(table_row(f"added {PROXIES[side]}", added, "+.2f"))
    for side in sides:
        if side not in PROXIES:
            continue
        summary = level[side]
        share = summary["proxy_cpu_share_of_core"]
        out.append(
            f"  {PROXIES[side]}: throughput {cell(summary['throughput_ratio'], 0)} of direct; "
            f"CPU {cell(summary[f'proxy_cpu_ms_per_{names.per_unit}'], 0, '.3f')} "
            f"ms/{names.per_unit}, {cell(summary['proxy_cpu_us_per_event'], 0, '.1f')} "
            f"us/event, {cell(None if share is None else 100 * share, 0, '.0f')}% of one core"
            + (cpu_notes or {}).get(side, "")
        )
    if "codexlb_vs_baseline" in level:
        versus = level["codexlb_vs_baseline"]
        out.append(
            f"  codexlb vs baseline: throughput {cell(versus['throughput_ratio'], 0)}, "
            f"CPU per {names.per_unit} {cell(versus[f'cpu_per_{names.per_unit}_ratio'], 0)}"
        )
    return out


# -- command line ----------------------------------------------------------------------------


def add_level_arguments(
    parser: argparse.ArgumentParser, names: Names, concurrency_help: str, default_count: int
) -> None:
    """``--<unit>`` (as ``args.count``), ``--deltas``, ``--concurrency``, ``--rounds``,
    ``--warmup``, ``--nginx``, ``--no-nginx``, ``--codexlb-tree`` and ``--baseline-tree``."""
    parser.add_argument(
        f"--{names.unit}",
        dest="count",
        metavar=names.unit.upper(),
        type=positive,
        default=default_count,
        help=f"measured {names.unit} per side and level (default {default_count})",
    )
    parser.add_argument(
        "--deltas",
        type=deltas_list,
        default=[20, 300],
        help="text deltas per response, one run of fresh servers each (default 20,300)",
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
    parser.add_argument(
        "--nginx",
        metavar="PATH",
        default=None,
        help=f"the nginx binary (default: nginx on PATH, else {nginx.FALLBACK_PATH})",
    )
    parser.add_argument("--no-nginx", action="store_true", help="leave out the side through nginx")
    parser.add_argument(
        "--codexlb-tree",
        metavar="DIR",
        type=checkout,
        default=None,
        help="run codexlb from the checkout in DIR (the fake stays this one's): another version",
    )
    parser.add_argument(
        "--baseline-tree",
        metavar="DIR",
        type=checkout,
        default=None,
        help="add a side through a second codexlb, run from the checkout in DIR (its own config "
        "and SQLite, the same fake), in the same rounds: two versions compared in one run",
    )
