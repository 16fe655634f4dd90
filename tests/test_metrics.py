"""codexlb's own counters and histograms render as prometheus_client's would."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from codexlb.metrics import LATENCY_BUCKETS, Counts, Distribution

VALUES = (0.0, 0.0005, 0.001, 0.0010001, 0.004, 0.005, 0.7, 60.0, 61.0, 1e9)


class _One(Collector):
    def __init__(self, tally: Counts | Distribution) -> None:
        self.tally = tally

    def collect(self) -> Iterable[Metric]:
        return [self.tally.family()]


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.name.endswith("_created")
    }


def test_a_distribution_has_the_buckets_counts_and_sum_of_a_prometheus_histogram() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    distribution = Distribution("t_seconds", "doc", LATENCY_BUCKETS, ("transport",))
    ours.register(_One(distribution))
    histogram = Histogram(
        "t_seconds", "doc", ("transport",), buckets=LATENCY_BUCKETS, registry=theirs
    )
    for value in VALUES:
        distribution.observe(value, "http")
        histogram.labels("http").observe(value)
    distribution.observe(0.002, "ws")
    histogram.labels("ws").observe(0.002)

    assert samples(ours) == samples(theirs)
    assert samples(ours)[("t_seconds_bucket", (("le", "0.001"), ("transport", "http")))] == 3


def test_counts_have_the_samples_of_a_prometheus_counter() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    counts = Counts("t_requests", "doc", ("route", "status"))
    ours.register(_One(counts))
    counter = Counter("t_requests", "doc", ("route", "status"), registry=theirs)
    for route, status in [("a", "200"), ("a", "200"), ("b", "429"), ("a", "500")]:
        counts.inc(route, status)
        counter.labels(route, status).inc()

    assert samples(ours) == samples(theirs)
    assert samples(ours)[("t_requests_total", (("route", "a"), ("status", "200")))] == 2
