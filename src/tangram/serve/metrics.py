"""Prometheus metrics of the server: request counters and latencies here, pool and queue gauges read at scrape.

Label values stay bounded: a `deployment` label is a deployment the server knows (any other model name a
client sends is counted under `__unknown__`), and an `endpoint` label one of a fixed set. Counters never
go backwards: those of a removed (or replaced) deployment keep their last value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tangram.engine import RequestOutput

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
UNKNOWN = "__unknown__"  # the deployment label of a model name the server does not know
MODEL_ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
_ENDPOINTS = {**MODEL_ENDPOINTS, "/v1/models": "models", "/health": "health", "/metrics": "metrics"}


def endpoint_of(path: str) -> str:
    """The bounded `endpoint` label of a request path."""
    if path in _ENDPOINTS:
        return _ENDPOINTS[path]
    return "admin" if path == "/admin" or path.startswith("/admin/") else "other"


class _Banked:
    """Monotonic counters over raw values that may restart at 0 or vanish (a removed or replaced deployment)."""

    def __init__(self) -> None:
        self.base: dict[tuple[str, ...], float] = {}
        self.last: dict[tuple[str, ...], float] = {}

    def value(self, key: tuple[str, ...], raw: float) -> float:
        """The counter's value given the current raw value (a drop means the source restarted)."""
        last = self.last.get(key, 0.0)
        if raw < last:
            self.base[key] = self.base.get(key, 0.0) + last
        self.last[key] = raw
        return self.base.get(key, 0.0) + raw

    def retire(self, deployment: str) -> None:
        """The source of `deployment`'s counters is gone: keep what they reached."""
        for key, last in self.last.items():
            if key[1] == deployment:
                self.base[key] = self.base.get(key, 0.0) + last
                self.last[key] = 0.0

    def kept(self, metric: str, seen: set[tuple[str, ...]]) -> Iterator[tuple[tuple[str, ...], float]]:
        """The counters of `metric` whose source is not in this scrape, at their value."""
        for key in list(self.last):
            if key[0] == metric and key not in seen:
                yield key, self.base.get(key, 0.0) + self.last[key]


_COUNTERS = {"tangram_bytes_loaded": ("Checkpoint bytes loaded by instance starts", ["deployment"]),
             "tangram_bytes_reused": ("Bytes re-bound from the device pool by instance starts", ["deployment"]),
             "tangram_instance_starts": ("Instance starts by type", ["deployment", "start"])}


def _raw_counters(name: str, d: dict) -> Iterator[tuple[tuple[str, ...], float]]:
    yield ("tangram_bytes_loaded", name), d["bytes_loaded"]
    yield ("tangram_bytes_reused", name), d["bytes_reused"]
    for kind, n in d["starts"].items():
        yield ("tangram_instance_starts", name, kind), n


class _StatusCollector(Collector):
    def __init__(self, status: Callable[[], dict]) -> None:
        self.status = status
        self.bank = _Banked()

    def observe(self, name: str, described: dict) -> None:
        for key, raw in _raw_counters(name, described):
            self.bank.value(key, raw)

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
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
        counters = {m: CounterMetricFamily(m, doc, labels=labels) for m, (doc, labels) in _COUNTERS.items()}
        seen: set[tuple[str, ...]] = set()
        for name, d in st["deployments"].items():
            queue.add_metric([name], d["queued"])
            inst.add_metric([name], d["instances"])
            inflight.add_metric([name], d["inflight"])
            for key, raw in _raw_counters(name, d):
                counters[key[0]].add_metric(list(key[1:]), self.bank.value(key, raw))
                seen.add(key)
        for metric, family in counters.items():
            for key, value in self.bank.kept(metric, seen):
                family.add_metric(list(key[1:]), value)
        yield from (pool, kv, queue, inst, inflight, *counters.values())


class Metrics:
    """One registry per server (several servers may live in one process, e.g. in tests)."""

    def __init__(self, status: Callable[[], dict], names: Callable[[], Iterable[str]]) -> None:
        """`status`: the controller's status (read at scrape); `names`: the deployments it knows now."""
        self.names = names
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tangram_requests", "HTTP responses by deployment, endpoint and status",
                                ["deployment", "endpoint", "status"], registry=r)
        self.latency = Histogram("tangram_request_seconds", "Request latency (whole response)", ["deployment"],
                                 buckets=BUCKETS, registry=r)
        self.ttft = Histogram("tangram_ttft_seconds", "Time to first token by start type", ["deployment", "start"],
                              buckets=BUCKETS, registry=r)
        self.queue = Histogram("tangram_queue_seconds", "Time a request waited before its prefill (for an "
                               "instance, then in the engine's queue)", ["deployment"], buckets=BUCKETS, registry=r)
        self.prompt_tokens = Histogram("tangram_prompt_tokens", "Prompt tokens per request", ["deployment"],
                                       buckets=TOKEN_BUCKETS, registry=r)
        self.tpot = Histogram("tangram_time_per_output_token_seconds", "Time per output token after the first",
                              ["deployment"], buckets=TPOT_BUCKETS, registry=r)
        self.tokens = Counter("tangram_generated_tokens", "Generated tokens", ["deployment"], registry=r)
        self._status = _StatusCollector(status)
        r.register(self._status)

    def label(self, model: Any) -> str:
        """The `deployment` label of a requested model name: itself if deployed, else `__unknown__`."""
        return model if isinstance(model, str) and model in set(self.names()) else UNKNOWN

    def response(self, scope: MutableMapping[str, Any], status: int) -> None:
        """Count one HTTP response (the ASGI guard calls this); a handler sets `request.state.deployment`."""
        endpoint = endpoint_of(scope.get("path", ""))
        deployment = (scope.get("state") or {}).get("deployment")
        if deployment is None:
            deployment = UNKNOWN if scope.get("path") in MODEL_ENDPOINTS else ""
        self.requests.labels(deployment, endpoint, str(status)).inc()

    def first_token(self, deployment: str, first: RequestOutput) -> None:
        """Record a request's first output: time to first token by start type, queue time, prompt tokens."""
        self.prompt_tokens.labels(deployment).observe(first.prompt_tokens)
        if first.stages is not None:
            self.ttft.labels(deployment, first.stages.start).observe(first.stages.ttft_s)
            self.queue.labels(deployment).observe(first.stages.queue_s + first.stages.schedule_s)

    def finished(self, deployment: str, seconds: float, tokens: int, decode_s: float, decode_tokens: int) -> None:
        """Record a completed request: latency, generated tokens, and the time per token after the first output."""
        self.latency.labels(deployment).observe(seconds)
        self.tokens.labels(deployment).inc(tokens)
        if decode_tokens > 0:
            self.tpot.labels(deployment).observe(decode_s / decode_tokens)

    def observe(self, name: str, described: dict) -> None:
        """Take a deployment's counters now (before a removal or replacement), so none of their value is lost."""
        self._status.observe(name, described)

    def retire(self, name: str) -> None:
        """A deployment was removed: its counters keep their last value (they never go backwards)."""
        self._status.bank.retire(name)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
