"""Prometheus metrics of the server: request counters and latencies here, pool and queue gauges read at scrape."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tangram.engine import Stages

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _StatusCollector(Collector):
    def __init__(self, status: Callable[[], dict]) -> None:
        self.status = status

    def collect(self) -> Iterator[GaugeMetricFamily]:
        st = self.status()
        pool = GaugeMetricFamily("tangram_pool_bytes", "Device pool bytes by state", labels=["worker", "state"])
        kv = GaugeMetricFamily("tangram_kv_bytes", "KV cache bytes in the device pool", labels=["worker"])
        for w in st["workers"]:
            for state, n in w["pool"].items():
                pool.add_metric([w["worker"], state], n)
            kv.add_metric([w["worker"]], w["kv_bytes"])
        queue = GaugeMetricFamily("tangram_queue_length", "Requests waiting for an instance", labels=["deployment"])
        inst = GaugeMetricFamily("tangram_instances", "Running instances", labels=["deployment"])
        inflight = GaugeMetricFamily("tangram_inflight_requests", "Requests in flight", labels=["deployment"])
        loaded = CounterMetricFamily("tangram_bytes_loaded", "Checkpoint bytes loaded by instance starts",
                                     labels=["deployment"])
        reused = CounterMetricFamily("tangram_bytes_reused", "Bytes re-bound from the device pool by instance starts",
                                     labels=["deployment"])
        starts = CounterMetricFamily("tangram_instance_starts", "Instance starts by type", labels=["deployment", "start"])
        for name, d in st["deployments"].items():
            queue.add_metric([name], d["queued"])
            inst.add_metric([name], d["instances"])
            inflight.add_metric([name], d["inflight"])
            loaded.add_metric([name], d["bytes_loaded"])
            reused.add_metric([name], d["bytes_reused"])
            for kind, n in d["starts"].items():
                starts.add_metric([name, kind], n)
        yield from (pool, kv, queue, inst, inflight, loaded, reused, starts)


class Metrics:
    """One registry per server (several servers may live in one process, e.g. in tests)."""

    def __init__(self, status: Callable[[], dict]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tangram_requests", "Requests by endpoint and HTTP status",
                                ["deployment", "endpoint", "status"], registry=r)
        self.latency = Histogram("tangram_request_seconds", "Request latency (whole response)", ["deployment"],
                                 buckets=BUCKETS, registry=r)
        self.ttft = Histogram("tangram_ttft_seconds", "Time to first token by start type", ["deployment", "start"],
                              buckets=BUCKETS, registry=r)
        self.tokens = Counter("tangram_generated_tokens", "Generated tokens", ["deployment"], registry=r)
        r.register(_StatusCollector(status))

    def request(self, deployment: str, endpoint: str, status: int, seconds: float | None = None) -> None:
        """Count a request (and its latency when it completed)."""
        self.requests.labels(deployment, endpoint, str(status)).inc()
        if seconds is not None:
            self.latency.labels(deployment).observe(seconds)

    def first_token(self, deployment: str, stages: Stages) -> None:
        """Record a request's time to first token under its start type."""
        self.ttft.labels(deployment, stages.start).observe(stages.ttft_s)

    def finished(self, deployment: str, tokens: int) -> None:
        """Count generated tokens."""
        self.tokens.labels(deployment).inc(tokens)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
