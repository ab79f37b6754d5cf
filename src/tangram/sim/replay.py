"""The trace replay shared by the simulator and the small real run: instances, keep-alive, TTFT.

Rules (the same whichever backend supplies the durations):
- a request goes to a live instance of its model with fewer than
  `max_concurrency` requests in flight (the least busy, by
  `control.autoscale.pick_instance`, as the controller picks); otherwise a new
  instance starts on the device the backend places it on, and the request
  waits for it; when it fits nowhere the request waits until an instance stops;
- a device runs one start at a time: a start begins when the device's previous
  start is done (`busy_until`, the queue wait the scheduler sees);
- an instance runs one prefill at a time: first token = max(arrival, ready,
  end of its previous prefill) + prefill seconds; the request then decodes for
  max_tokens x the model's per-token seconds;
- an instance idle for `keep_alive_s` stops (weights stay retained in its pool;
  `control.autoscale.should_scale_down` with no minimum, as the controller).
TTFT = first token - arrival. Time is virtual: events in time order.
Percentiles are `tangram.workload.percentile` (linear interpolation).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import statistics
from dataclasses import dataclass, field
from typing import Protocol

from tangram.control.autoscale import pick_instance, should_scale_down
from tangram.sim.workload import Request
from tangram.workload import percentile

log = logging.getLogger(__name__)


@dataclass
class SimInstance:
    """A running (or starting) instance of a model on a device."""

    model: str
    device: int
    ready_at: float
    prefill_free: float = 0.0
    inflight: int = 0
    idle_since: float | None = None
    alive: bool = True
    handle: object = None  # the backend's own object (a real replica)


@dataclass
class Started:
    """What a start cost: start-up seconds (load + init), bytes loaded by tier, bytes reused."""

    seconds: float
    bytes_disk: int = 0
    bytes_dram: int = 0
    bytes_reused: int = 0
    handle: object = None


class Backend(Protocol):
    """Where instances run: placement, start cost, prefill seconds, stop."""

    def place(self, model: str, now: float) -> int | None:
        """The device to start `model` on at `now` (None: it fits nowhere now)."""

    def start(self, model: str, device: int, now: float) -> Started | None:
        """Start `model` on `device` (None when its pool cannot take it after all)."""

    def prefill(self, inst: SimInstance, request: Request) -> float:
        """Seconds from the prefill's start to the first token."""

    def stop(self, inst: SimInstance, now: float) -> None:
        """Stop `inst`; its weights stay retained."""


@dataclass
class ReplayResult:
    """TTFT of every request (None: never served) and what the starts did."""

    ttft: list[float | None]
    starts: list[Started] = field(default_factory=list)
    waits: int = 0
    end: float = 0.0

    def summary(self) -> dict:
        """Percentiles of TTFT, start counts and bytes by tier."""
        done = [t for t in self.ttft if t is not None]
        return {"requests": len(self.ttft), "served": len(done), "ttft_p50": percentile(done, 50),
                "ttft_p95": percentile(done, 95), "ttft_p99": percentile(done, 99),
                "ttft_mean": statistics.fmean(done) if done else None, "starts": len(self.starts),
                "pool_hits": sum(s.bytes_disk + s.bytes_dram == 0 for s in self.starts),
                "bytes_loaded": sum(s.bytes_disk + s.bytes_dram for s in self.starts),
                "bytes_from_dram": sum(s.bytes_dram for s in self.starts),
                "bytes_reused": sum(s.bytes_reused for s in self.starts), "start_waits": self.waits,
                "trace_seconds": self.end}


def replay(trace: list[Request], backend: Backend, *, keep_alive_s: float, max_concurrency: int,
           decode_s: dict[str, float], progress=None) -> ReplayResult:
    """Replay `trace` over `backend` (see the module docstring); `decode_s[model]`: seconds per output token."""
    events: list[tuple[float, int, int, object]] = []
    seq = itertools.count()
    arrive, done, expire = 0, 1, 2
    for i, r in enumerate(trace):
        heapq.heappush(events, (r.t, next(seq), arrive, i))
    live: dict[str, list[SimInstance]] = {}
    busy_until: dict[int, float] = {}
    pending: dict[str, list[int]] = {}
    result = ReplayResult([None] * len(trace))

    def serve(inst: SimInstance, i: int, now: float) -> None:
        r = trace[i]
        begin = max(now, inst.ready_at, inst.prefill_free)
        first = begin + backend.prefill(inst, r)
        inst.prefill_free = first
        inst.inflight += 1
        inst.idle_since = None
        result.ttft[i] = first - r.t
        heapq.heappush(events, (first + r.max_tokens * decode_s[r.model], next(seq), done, inst))

    def start(model: str, now: float) -> SimInstance | None:
        device = backend.place(model, now)
        if device is None:
            return None
        begin = max(now, busy_until.get(device, now))
        started = backend.start(model, device, begin)
        if started is None:
            return None
        busy_until[device] = begin + started.seconds
        result.starts.append(started)
        inst = SimInstance(model, device, begin + started.seconds, handle=started.handle)
        live.setdefault(model, []).append(inst)
        return inst

    def admit(i: int, now: float) -> bool:
        model = trace[i].model
        ready = sorted(live.get(model, ()), key=lambda x: x.ready_at)  # ties: the one ready first
        k = pick_instance([x.inflight for x in ready], max_concurrency)
        inst = ready[k] if k is not None else start(model, now)
        if inst is None:
            return False
        serve(inst, i, now)
        return True

    while events:
        now, _, kind, obj = heapq.heappop(events)
        result.end = now
        if kind == arrive:
            if progress is not None:
                progress(obj)
            if not admit(obj, now):  # type: ignore[arg-type]
                pending.setdefault(trace[obj].model, []).append(obj)  # type: ignore[index]
                result.waits += 1
        elif kind == done:
            inst = obj  # type: ignore[assignment]
            inst.inflight -= 1
            if inst.inflight == 0:
                inst.idle_since = now
                heapq.heappush(events, (now + keep_alive_s, next(seq), expire, inst))
        else:
            inst = obj  # type: ignore[assignment]
            # the expiry event fires at idle_since + keep_alive_s: allow its rounding
            if inst.alive and inst.inflight == 0 and should_scale_down(
                    inst.idle_since, now, keep_alive_s - 1e-9, len(live[inst.model]), 0):
                inst.alive = False
                live[inst.model].remove(inst)
                backend.stop(inst, now)
                for model in sorted(pending, key=lambda m: pending[m][0]):
                    while pending.get(model) and admit(pending[model][0], now):
                        pending[model].pop(0)
                    if not pending.get(model):
                        pending.pop(model, None)
    for model, insts in live.items():
        for inst in insts:
            backend.stop(inst, result.end)
    if pending:
        log.warning("%d requests never found room", sum(map(len, pending.values())))
    return result
