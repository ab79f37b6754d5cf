"""What the controller did, for the dashboard: a bounded event log, the last starts with their stages, and
per deployment its request rate and time to first token by start type.

Everything here is bounded (the last `EVENTS_KEPT` events, `STARTS_KEPT`
starts, `TTFT_KEPT` first-token times per deployment and start type) and is
written and read on the server's event loop; nothing waits.
"""

from __future__ import annotations

import collections
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Literal

from tangram.engine import StartCost, Stages
from tangram.pool import Eviction

EVENTS_KEPT = 200
STARTS_KEPT = 40
TTFT_KEPT = 512
RATE_WINDOW_S = 10.0  # requests/s is counted over the last this many seconds

EventKind = Literal["deploy", "remove", "start", "start-failed", "scale-down", "scale-to-zero", "stop", "drain",
                    "evict", "migrate", "consolidate"]
START_TYPES = ("warm", "pool-hit", "dram", "cold")


@dataclass(frozen=True)
class Event:
    """One thing that happened: `at` is wall-clock seconds (Unix time)."""

    id: str
    at: float
    kind: EventKind
    message: str
    deployment: str | None = None
    worker: str | None = None
    bytes: int = 0


@dataclass
class StartRecord:
    """One instance start: where, its type and bytes, and the stages of the first request that waited for it
    (`ttft_s` None while no request has; a start for `min_instances` may never have one)."""

    id: str  # the instance
    deployment: str
    worker: str
    at: float  # when it was ready (Unix time)
    start: str  # pool-hit, dram or cold
    bytes_loaded: int
    bytes_reused: int
    queue_s: float = 0.0
    schedule_s: float = 0.0
    init_s: float = 0.0
    load_s: float = 0.0
    kv_s: float = 0.0
    prefill_s: float = 0.0
    ttft_s: float | None = None


@dataclass(frozen=True)
class TTFTStats:
    """Time to first token of a deployment's recent requests of one start type."""

    count: int
    p50_s: float
    p95_s: float


@dataclass
class _Traffic:
    arrivals: collections.deque = field(default_factory=collections.deque)  # monotonic times, last window
    ttft: dict[str, collections.deque] = field(
        default_factory=lambda: {t: collections.deque(maxlen=TTFT_KEPT) for t in START_TYPES})


def quantile(sorted_values: list[float], q: float) -> float:
    """The `q` quantile of sorted values (nearest rank)."""
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


def eviction_event(worker: str, e: Eviction, seq: int) -> Event:
    """An eviction of a worker's pool as an event: what was evicted, and for whom."""
    whose = ", ".join(f"{m} ({_mb(n)})" for m, n in sorted(e.victims.items(), key=lambda kv: -kv[1])) or "?"
    whom = e.for_model if e.for_model is not None else "KV cache"
    return Event(f"{worker}/evict/{seq}", e.at, "evict",
                 f"evicted {e.tensors} retained tensor(s), {_mb(e.bytes)}, of {whose} for {whom}",
                 e.for_model, worker, e.bytes)


def _mb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB"


class Activity:
    """The controller's bounded record of events, starts and traffic (event-loop only)."""

    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self._events: collections.deque[Event] = collections.deque(maxlen=EVENTS_KEPT)
        self._starts: collections.OrderedDict[str, StartRecord] = collections.OrderedDict()
        self._traffic: dict[str, _Traffic] = {}
        self._seq = itertools.count()

    def record(self, kind: EventKind, message: str, deployment: str | None = None, worker: str | None = None,
               nbytes: int = 0) -> None:
        """Add an event."""
        self._events.append(Event(f"c{next(self._seq)}", time.time(), kind, message, deployment, worker, nbytes))

    def events(self) -> list[Event]:
        """The kept events, oldest first."""
        return list(self._events)

    # ------------------------------------------------------------------ starts

    def started(self, deployment: str, worker: str, instance: str, cost: StartCost) -> None:
        """An instance is ready: a start event and a timeline entry."""
        rec = StartRecord(instance, deployment, worker, time.time(), cost.start, cost.bytes_loaded,
                          cost.bytes_reused, init_s=cost.init_s, load_s=cost.load_s)
        self._starts[instance] = rec
        while len(self._starts) > STARTS_KEPT:
            self._starts.popitem(last=False)
        self.record("start", f"{cost.start} start of {instance} on {worker}: {_mb(cost.bytes_loaded)} loaded, "
                    f"{_mb(cost.bytes_reused)} reused, load {cost.load_s:.3f} s, init {cost.init_s:.3f} s",
                    deployment, worker, cost.bytes_loaded)

    def settled(self, instance: str, cost: StartCost) -> None:
        """A start's cost once its (background) load is over."""
        rec = self._starts.get(instance)
        if rec is not None:
            rec.start, rec.bytes_loaded, rec.bytes_reused = cost.start, cost.bytes_loaded, cost.bytes_reused
            rec.load_s = cost.load_s

    def starts(self) -> list[StartRecord]:
        """The last starts, oldest first."""
        return list(self._starts.values())

    # ------------------------------------------------------------------ requests

    def arrived(self, deployment: str) -> None:
        """A request for `deployment` arrived."""
        t = self._traffic.setdefault(deployment, _Traffic())
        now = self.clock()
        t.arrivals.append(now)
        self._trim(t, now)

    def first_output(self, deployment: str, instance: str, stages: Stages) -> None:
        """A request's first output: its TTFT by start type; the first request that waited for a start fills
        in that start's stages."""
        t = self._traffic.setdefault(deployment, _Traffic())
        t.ttft.setdefault(stages.start, collections.deque(maxlen=TTFT_KEPT)).append(stages.ttft_s)
        rec = self._starts.get(instance)
        if rec is not None and rec.ttft_s is None and stages.start != "warm":
            rec.queue_s, rec.schedule_s, rec.kv_s = stages.queue_s, stages.schedule_s, stages.kv_s
            rec.init_s, rec.load_s, rec.prefill_s, rec.ttft_s = (stages.init_s, stages.load_s, stages.prefill_s,
                                                                 stages.ttft_s)

    def requests_per_s(self, deployment: str) -> float:
        """Arrivals per second over the last `RATE_WINDOW_S`."""
        t = self._traffic.get(deployment)
        if t is None:
            return 0.0
        self._trim(t, self.clock())
        return len(t.arrivals) / RATE_WINDOW_S

    def ttft(self, deployment: str) -> dict[str, TTFTStats]:
        """p50 and p95 of the recent TTFTs of `deployment`, per start type that has any."""
        t = self._traffic.get(deployment)
        out: dict[str, TTFTStats] = {}
        for kind, values in (t.ttft.items() if t else ()):
            if values:
                v = sorted(values)
                out[kind] = TTFTStats(len(v), quantile(v, 0.5), quantile(v, 0.95))
        return out

    def forget(self, deployment: str) -> None:
        """Drop a removed deployment's traffic (its events and starts stay)."""
        self._traffic.pop(deployment, None)

    @staticmethod
    def _trim(t: _Traffic, now: float) -> None:
        while t.arrivals and t.arrivals[0] < now - RATE_WINDOW_S:
            t.arrivals.popleft()
