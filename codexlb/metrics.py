"""Prometheus metrics (``GET /metrics``), on a registry of the app's own.

Counts and timings are kept in plain dictionaries, updated where things happen (a request, an
attempt, a replay, a snapshot) by the event loop's thread only, and turned into metric
families when ``/metrics`` is scraped: an update costs a dictionary increment and a bisection,
not the locks and per-bucket loops of prometheus_client's own metric objects, which showed up
at several percent of the relay's CPU. The pool's state (in-flight, account state, usage) is
also read at scrape time. prometheus_client renders the text format.
"""

from __future__ import annotations

import bisect
import collections
import time
from collections.abc import Callable, Iterable, Sequence
from typing import get_args

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from codexlb.activity import Activity
from codexlb.pool import Account, AccountState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITEM_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)

Labels = tuple[str, ...]


class Counts:
    """A counter per label values."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = tuple(labels)
        self.values: collections.Counter[Labels] = collections.Counter()

    def inc(self, *labels: str) -> None:
        self.values[labels] += 1

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, value in sorted(self.values.items()):
            family.add_metric(labels, value)
        return family


class Distribution:
    """A histogram per label values."""

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets: Sequence[float],
        labels: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = tuple(labels)
        self.bounds = tuple(float(bound) for bound in buckets)
        self.counts: dict[Labels, list[int]] = {}
        """Per label values: how many observations fell in each bucket (not cumulative); the
        last one is ``+Inf``."""
        self.sums: collections.defaultdict[Labels, float] = collections.defaultdict(float)

    def observe(self, value: float, *labels: str) -> None:
        counts = self.counts.get(labels)
        if counts is None:
            counts = self.counts[labels] = [0] * (len(self.bounds) + 1)
        counts[bisect.bisect_left(self.bounds, value)] += 1  # buckets are "less or equal"
        self.sums[labels] += value

    def family(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, counts in sorted(self.counts.items()):
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for bound, count in zip((*self.bounds, float("inf")), counts, strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            family.add_metric(labels, buckets, self.sums[labels])
        return family


class Metrics:
    def __init__(self, accounts: Callable[[], Iterable[Account]]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counts(
            "codexlb_requests",
            "Client requests (WebSocket: responses) by route, transport and status.",
            ("route", "transport", "status"),
        )
        self.attempts = Counts(
            "codexlb_upstream_attempts",
            "Upstream attempts by account and outcome.",
            ("account", "outcome"),
        )
        self.failovers = Counts(
            "codexlb_failovers",
            "Requests moved away from an account before anything visible reached the client.",
            ("account", "reason"),
        )
        self.replays = Counts(
            "codexlb_replays",
            "Conversations rebuilt from snapshots, by whether the same account receives them.",
            ("kind",),
        )
        self.replay_items = Distribution(
            "codexlb_replay_items", "Items in a replayed input.", ITEM_BUCKETS
        )
        self.snapshot_write = Distribution(
            "codexlb_snapshot_write_seconds",
            "Time from queuing a snapshot to its commit.",
            LATENCY_BUCKETS,
        )
        self.first_byte = Distribution(
            "codexlb_time_to_first_byte_seconds",
            "Time from a request's arrival to the first byte (event) sent to the client.",
            LATENCY_BUCKETS,
            ("transport",),
        )
        self.duration = Distribution(
            "codexlb_request_duration_seconds",
            "Time from a request's arrival to its end.",
            LATENCY_BUCKETS,
            ("transport",),
        )
        self.websockets = Gauge(
            "codexlb_open_websockets",
            "Open WebSockets, by side (client or upstream).",
            ("side",),
            registry=self.registry,
        )
        tallies = (
            self.requests,
            self.attempts,
            self.failovers,
            self.replays,
            self.replay_items,
            self.snapshot_write,
            self.first_byte,
            self.duration,
        )
        self.registry.register(_TallyCollector(tallies))
        self.registry.register(_PoolCollector(accounts))
        self.activity = Activity()
        """The recent past as the dashboard shows it, fed from the same events."""

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def request(
        self,
        route: str,
        transport: str,
        status: int,
        first_byte: float | None,
        duration: float,
    ) -> None:
        self.requests.inc(route, transport, str(status))
        if first_byte is not None:
            self.first_byte.observe(first_byte, transport)
        self.duration.observe(duration, transport)

    def attempt(self, account: str, outcome: str) -> None:
        self.attempts.inc(account, outcome)
        self.activity.attempt(account, outcome)
        if outcome != "ok" and outcome != "client_error":
            self.failovers.inc(account, outcome)

    def replay(self, items: int, *, same_account: bool) -> None:
        self.replays.inc("same_account" if same_account else "cross_account")
        self.replay_items.observe(items)


class _TallyCollector(Collector):
    def __init__(self, tallies: Iterable[Counts | Distribution]) -> None:
        self._tallies = tuple(tallies)

    def collect(self) -> Iterable[Metric]:
        return [tally.family() for tally in self._tallies]


class _PoolCollector(Collector):
    """The pool's state, read at scrape time."""

    def __init__(self, accounts: Callable[[], Iterable[Account]]) -> None:
        self._accounts = accounts

    def collect(self) -> Iterable[Metric]:
        now = time.time()
        inflight = GaugeMetricFamily(
            "codexlb_account_inflight", "Requests in flight per account.", labels=("account",)
        )
        state = GaugeMetricFamily(
            "codexlb_account_state",
            "1 for the account's current state, 0 for the others.",
            labels=("account", "state"),
        )
        usage = GaugeMetricFamily(
            "codexlb_account_used_percent",
            "Usage the upstream last reported, per window.",
            labels=("account", "window"),
        )
        for account in self._accounts():
            inflight.add_metric((account.name,), account.leased)
            current = account.state(now)
            for name in get_args(AccountState):
                state.add_metric((account.name, name), 1.0 if name == current else 0.0)
            usage.add_metric((account.name, "primary"), account.primary.used_percent)
            usage.add_metric((account.name, "secondary"), account.secondary.used_percent)
        return [inflight, state, usage]
