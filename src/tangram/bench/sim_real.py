"""`bench sim`'s small real run: the simulator against real instances on the same trace.

Models: `bench kv`'s real-architecture checkpoints (a family sharing tensors and
unrelated models; its builder and checkpoint cache). Devices: 2-3 logical CPU
devices, each a real `Worker` with its own pool. Both sides replay the same
trace through the same event loop (`tangram.sim.replay`): placement, keep-alive
and queueing rules are identical; only where the durations come from differs.

- real: placement by `scheduler.adapter.choose_worker` over the workers; a start
  is `Worker.start` (its files dropped from the page cache first, untimed) and
  costs its measured load + init; a prefill is a real request (max_tokens 1)
  through the instance's engine thread, timed to its first token;
- simulated: `SimCluster` with one node of as many devices, pool capacity and
  tensor identities equal to the real ones, and durations from a calibration
  run beforehand on separate workers: disk bandwidth (`BandwidthEstimator`
  refined from the cold loads' LoadStats), start overhead (median pool-hit
  load seconds), init seconds (median of restarts, plus the extra seconds of
  the first prefill after a start over the fitted prefill) and per-model prefill
  seconds = a + b x tokens (least squares over a few prompt lengths).
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tangram.bench.kv_measure import torch_threads
from tangram.bench.kv_workload import ModelPaths, aligned, ensure_models, make_models, make_trace
from tangram.engine import EngineConfig, SamplingParams
from tangram.pool import PoolFullError
from tangram.scheduler import Bandwidths, BandwidthEstimator
from tangram.scheduler.adapter import choose_worker
from tangram.sim import ClusterSpec, SimCluster, SimModel
from tangram.sim.replay import Request, SimInstance, Started, replay
from tangram.store import Checkpoint, read_index
from tangram.store.io import evict_from_page_cache
from tangram.worker import Worker
from tangram.workload import ModelSpec, TraceShape

log = logging.getLogger(__name__)

# templates (execute-while-load) off: the simulator models a start as load + init, then the prefill
ENGINE = EngineConfig(block_tokens=16, max_batch=4,
                      **({"templates": False} if "templates" in EngineConfig.model_fields else {}))
CAL_TOKENS = (8, 32, 64)


@dataclass(frozen=True)
class RealSpec:
    """Sizes of the real run."""

    size: str = "quick"  # bench kv model set ("quick": 3-14 MB models)
    models: tuple[ModelSpec, ...] = ()  # instead of the `size` set when given (tests run tiny ones)
    workers: int = 2
    requests: int = 24
    mean_gap_s: float = 1.0
    cv: float = 3.0
    keep_alive_s: float = 1.5
    max_concurrency: int = 4
    capacity_fraction: float = 0.45  # each pool holds this share of all models' unique bytes (at least one model)


def _first_token_s(replica, prompt: list[int]) -> float:
    """Seconds from submitting a request to its first token, on the replica's engine thread."""
    got = threading.Event()
    t0 = time.perf_counter()
    replica.submit(prompt, SamplingParams(max_tokens=1, ignore_eos=True),
                   lambda out: got.set() if (out.token_ids or out.finished) else None, arrival=t0)
    if not got.wait(120):
        raise RuntimeError("no first token within 120 s")
    return time.perf_counter() - t0


class RealBackend:
    """`replay`'s backend over real workers (see the module docstring)."""

    def __init__(self, workers: list[Worker], paths: dict[str, ModelPaths], prompts: dict[float, list[int]],
                 bandwidths: BandwidthEstimator) -> None:
        self.workers, self.paths, self.prompts, self.bw = workers, paths, prompts, bandwidths
        self.index = {name: read_index(p.ckpt) for name, p in paths.items()}
        self.costs: list[Any] = []

    def place(self, model: str, now: float) -> int | None:
        """The adapter's choice over the workers (tangram policy)."""
        return choose_worker(self.workers, self.index[model], "tangram", bandwidths=self.bw)

    def start(self, model: str, device: int, now: float) -> Started | None:
        """A real start; its load refines the bandwidth estimate, as the controller would."""
        for f in Checkpoint(self.paths[model].ckpt).data_files():
            evict_from_page_cache(f)
        try:
            replica = self.workers[device].start(model, self.paths[model].ckpt, ENGINE, time.perf_counter())
        except PoolFullError:
            return None
        cost = replica.cost
        self.costs.append(cost)
        load = replica.backend.load_stats()
        if load is not None:
            self.bw.observe(load)
        dram = load.bytes_from_cache if load else 0
        return Started(cost.load_s + cost.init_s, cost.bytes_loaded - dram, dram, cost.bytes_reused, replica)

    def prefill(self, inst: SimInstance, request: Request) -> float:
        """A real request's time to first token on the instance."""
        return _first_token_s(inst.handle, self.prompts[request.t])

    def stop(self, inst: SimInstance, now: float) -> None:
        """Stop the replica (weights stay retained)."""
        self.workers[inst.device].stop(inst.handle)  # type: ignore[arg-type]


def _fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares a + b x over (x, y) points, b >= 0."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    b = max(0.0, sum((x - mx) * (y - my) for x, y in points) / var) if var > 0 else 0.0
    return max(0.0, my - b * mx), b


def calibrate(models: list[ModelSpec], paths: dict[str, ModelPaths], capacity: int) -> dict[str, Any]:
    """Durations of this machine, measured on a separate worker: bandwidths, overhead, init, prefill fits."""
    bw = BandwidthEstimator(alpha=0.5, min_bytes=1)
    worker = Worker(99, "cpu", capacity)
    overheads, inits, fits = [], [], {}
    for m in models:
        for f in Checkpoint(paths[m.name].ckpt).data_files():
            evict_from_page_cache(f)
        for rep in range(2):  # the first start builds the skeleton (untimed warm-up) and loads cold
            for f in Checkpoint(paths[m.name].ckpt).data_files():
                evict_from_page_cache(f)
            replica = worker.start(m.name, paths[m.name].ckpt, ENGINE, time.perf_counter())
            cost, load = replica.cost, replica.backend.load_stats()
            if rep == 0 and load is not None:
                bw.observe(load)
            if rep == 1:
                overheads.append(cost.load_s)
                first = (CAL_TOKENS[1], _first_token_s(replica, [3 + i % (m.vocab - 3) for i in range(CAL_TOKENS[1])]))
                points = []
                for tokens in CAL_TOKENS:
                    for _ in range(2):
                        points.append((tokens, _first_token_s(replica, [3 + i % (m.vocab - 3) for i in range(tokens)])))
                fits[m.name] = a, b = _fit(points)
                inits.append(cost.init_s + max(0.0, first[1] - (a + b * first[0])))  # first forward after a bind
            worker.stop(replica)  # weights stay retained: the second start is a pool hit
    return {"bandwidths": bw, "start_overhead_s": statistics.median(overheads), "init_s": statistics.median(inits),
            "prefill": fits}


def sim_models(models: list[ModelSpec], paths: dict[str, ModelPaths], prefill: dict[str, tuple[float, float]]
               ) -> list[SimModel]:
    """The real models as the simulator sees them: tensor identities and pool bytes, fitted prefill, no decode."""
    out = []
    for m in models:
        index = read_index(paths[m.name].ckpt)
        tensors = {e.key: aligned(e.nbytes) for e in index.tensors.values()}
        a, b = prefill[m.name]
        out.append(SimModel(m.name, tensors, m.base or m.name, a, b, 0.0))
    return out


def run_real_comparison(spec: RealSpec, root: Path, seed: int, step=None) -> dict[str, Any]:
    """Replay one trace on real workers and in the simulator; p50 TTFT of both and the relative error."""
    with torch_threads(1):
        models = list(spec.models) or make_models(spec.size)
        paths = ensure_models(models, root, step=step)
        smodels = sim_models(models, paths, {m.name: (0.0, 0.0) for m in models})
        unique: dict[str, int] = {}
        for sm in smodels:
            unique.update(sm.tensors)
        biggest = max(sm.nbytes for sm in smodels)
        capacity = aligned(max(int(spec.capacity_fraction * sum(unique.values())), biggest) + (4 << 20))
        kv_trace, _ = make_trace(models, TraceShape(spec.requests, spec.mean_gap_s, spec.cv, 1.1, (8, 64), (1, 1)),
                                 seed)
        trace = [Request(r.t, r.model, len(r.prompt), 1) for r in kv_trace]
        prompts = {r.t: list(r.prompt) for r in kv_trace}
        if step:
            step("calibrating")
        cal = calibrate(models, paths, capacity)
        smodels = sim_models(models, paths, cal["prefill"])
        if step:
            step("real replay")
        workers = [Worker(i, "cpu", capacity) for i in range(spec.workers)]
        backend = RealBackend(workers, paths, prompts, cal["bandwidths"])
        bw_used = cal["bandwidths"].bandwidths
        t0 = time.perf_counter()
        real = replay(trace, backend, keep_alive_s=spec.keep_alive_s, max_concurrency=spec.max_concurrency,
                      decode_s={m.name: 0.0 for m in models})
        real_wall = time.perf_counter() - t0
        cluster = ClusterSpec(1, spec.workers, capacity, 0, Bandwidths(bw_used.dram, bw_used.disk),
                              init_s=cal["init_s"], start_overhead_s=cal["start_overhead_s"])
        sim = replay(trace, SimCluster(cluster, smodels, "tangram", seed=seed), keep_alive_s=spec.keep_alive_s,
                     max_concurrency=spec.max_concurrency, decode_s={m.name: 0.0 for m in models})
    rs, ss = real.summary(), sim.summary()
    error = abs(ss["ttft_p50"] - rs["ttft_p50"]) / rs["ttft_p50"] if rs["ttft_p50"] else None
    calibration = {"disk_bytes_per_s": bw_used.disk, "dram_bytes_per_s": bw_used.dram,
                   "bandwidth_sources": cal["bandwidths"].describe(), "start_overhead_s": cal["start_overhead_s"],
                   "init_s": cal["init_s"], "prefill_fit_s": {k: {"a": round(a, 5), "b_per_token": round(b, 7)}
                                                              for k, (a, b) in cal["prefill"].items()}}
    rows = [{"section": "sim-vs-real", "run": name, "workers": spec.workers, **{k: s[k] for k in (
        "requests", "served", "ttft_p50", "ttft_p95", "starts", "pool_hits", "bytes_loaded", "bytes_reused")}}
        for name, s in (("real", rs), ("sim", ss))]
    return {"rows": rows, "sim_error": error, "calibration": calibration, "real_wall_s": real_wall,
            "capacity_bytes": capacity, "models": [m.name for m in models], "trace_requests": len(trace)}
