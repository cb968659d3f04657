"""Prometheus metrics of the frontend process, rendered for `GET /metrics` (DESIGN.md section 6).

Three sources, one registry per `Frontend` (tests run several in one process):
- HTTP requests by route and status, counted by the HTTP layer (`http_guard.py`);
- latency histograms the frontend observes as outputs arrive (`FrontendMetrics`): time to first
  token, time per output token, end-to-end latency, preprocessing time per job;
- every process's counters and gauges, as `Frontend.stats()` gathers them at scrape time
  (`StatsCollector`): names ending in `_total` are counters, the rest gauges; names not yet
  under `mm_runtime_` get the prefix. Stats that a histogram already covers (its `_sum`,
  `_count` or a `_total` of the same base name) are left out, so each family appears once.
"""

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "mm_runtime_"
# Seconds; spans a tiny CPU model's milliseconds to a large model's long prefills.
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5)


class FrontendMetrics:
    """The registry; histograms updated by the frontend's output loop (a bucket search each)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.stats = StatsCollector()
        self.registry.register(self.stats)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(PREFIX + name, doc, buckets=buckets, registry=self.registry)

        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "Arrival to first token, per request", _LATENCY_BUCKETS
        )
        self.time_per_output_token = histogram(
            "time_per_output_token_seconds",
            "Mean time between output tokens after the first, per request",
            _TOKEN_BUCKETS,
        )
        self.e2e_latency = histogram(
            "e2e_request_latency_seconds", "Arrival to finish, per request", _LATENCY_BUCKETS
        )
        self.http_requests = Counter(
            PREFIX + "http_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.preprocess = histogram(
            "preprocess_seconds", "Preprocessing time per media item (job)", _LATENCY_BUCKETS
        )
        self._histogram_names = {
            PREFIX + n
            for n in (
                "time_to_first_token_seconds",
                "time_per_output_token_seconds",
                "e2e_request_latency_seconds",
                "preprocess_seconds",
            )
        }

    def finished(
        self, arrival_s: float, first_token_s: float, now_s: float, num_tokens: int
    ) -> None:
        self.e2e_latency.observe(now_s - arrival_s)
        if num_tokens > 1:
            self.time_per_output_token.observe((now_s - first_token_s) / (num_tokens - 1))

    def render(self, stats: dict[str, float]) -> bytes:
        """The Prometheus text exposition of the histograms and of `stats` (one scrape)."""
        self.stats.snapshot = {
            name: value
            for name, value in stats.items()
            if _base_name(_prefixed(name)) not in self._histogram_names
        }
        return generate_latest(self.registry)


class StatsCollector(Collector):
    """Yields the last `snapshot` (set just before each scrape) as counters and gauges."""

    def __init__(self) -> None:
        self.snapshot: dict[str, float] = {}

    def collect(self) -> Iterator[Metric]:
        for name, value in sorted(self.snapshot.items()):
            full = _prefixed(name)
            if full.endswith("_total"):
                yield CounterMetricFamily(full.removesuffix("_total"), name, value=value)
            else:
                yield GaugeMetricFamily(full, name, value=value)


def _prefixed(name: str) -> str:
    return name if name.startswith(PREFIX) else PREFIX + name


def _base_name(name: str) -> str:
    for suffix in ("_total", "_sum", "_count"):
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name
