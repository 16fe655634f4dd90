"""Prometheus metrics (``GET /metrics``), on a registry of the app's own.

Counters and histograms are updated where things happen (one call per request, attempt,
replay, snapshot, socket); the pool's state (in-flight, account state, usage) is read only when
``/metrics`` is scraped, by a collector, so it costs the relay nothing.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable
from typing import get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from codexlb.pool import Account, AccountState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITEM_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)


class Metrics:
    def __init__(self, accounts: Callable[[], Iterable[Account]]) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "codexlb_requests",
            "Client requests (WebSocket: responses) by route, transport and status.",
            ("route", "transport", "status"),
            registry=registry,
        )
        self.attempts = Counter(
            "codexlb_upstream_attempts",
            "Upstream attempts by account and outcome.",
            ("account", "outcome"),
            registry=registry,
        )
        self.failovers = Counter(
            "codexlb_failovers",
            "Requests moved away from an account before anything visible reached the client.",
            ("account", "reason"),
            registry=registry,
        )
        self.replays = Counter(
            "codexlb_replays",
            "Conversations rebuilt from snapshots, by whether the same account receives them.",
            ("kind",),
            registry=registry,
        )
        self.replay_items = Histogram(
            "codexlb_replay_items",
            "Items in a replayed input.",
            buckets=ITEM_BUCKETS,
            registry=registry,
        )
        self.snapshot_write = Histogram(
            "codexlb_snapshot_write_seconds",
            "Time from queuing a snapshot to its commit.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.first_byte = Histogram(
            "codexlb_time_to_first_byte_seconds",
            "Time from a request's arrival to the first byte (event) sent to the client.",
            ("transport",),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.duration = Histogram(
            "codexlb_request_duration_seconds",
            "Time from a request's arrival to its end.",
            ("transport",),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.websockets = Gauge(
            "codexlb_open_websockets",
            "Open WebSockets, by side (client or upstream).",
            ("side",),
            registry=registry,
        )
        registry.register(_PoolCollector(accounts))
        # ``labels()`` validates and takes a lock on every call, while a label set's child
        # never changes: look each one up once (label sets are few: routes, statuses, accounts).
        self._request_count = functools.cache(self.requests.labels)
        self._first_byte = functools.cache(self.first_byte.labels)
        self._duration = functools.cache(self.duration.labels)
        self._attempt_count = functools.cache(self.attempts.labels)
        self._failover_count = functools.cache(self.failovers.labels)
        self._replay_count = functools.cache(self.replays.labels)

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
        self._request_count(route, transport, str(status)).inc()
        if first_byte is not None:
            self._first_byte(transport).observe(first_byte)
        self._duration(transport).observe(duration)

    def attempt(self, account: str, outcome: str) -> None:
        self._attempt_count(account, outcome).inc()
        if outcome != "ok" and outcome != "client_error":
            self._failover_count(account, outcome).inc()

    def replay(self, items: int, *, same_account: bool) -> None:
        self._replay_count("same_account" if same_account else "cross_account").inc()
        self.replay_items.observe(items)


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
            inflight.add_metric((account.name,), account.inflight)
            current = account.state(now)
            for name in get_args(AccountState):
                state.add_metric((account.name, name), 1.0 if name == current else 0.0)
            usage.add_metric((account.name, "primary"), account.primary.used_percent)
            usage.add_metric((account.name, "secondary"), account.secondary.used_percent)
        return [inflight, state, usage]
