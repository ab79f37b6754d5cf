"""`tangram bench kv`: ElasticKV against reserve-at-start KV on one device pool serving several models.

Workload (`kv_workload`): small Qwen2 / Llama models with random fp32 weights (a
base and two variants sharing all but one or two layers byte for byte, and two
unrelated models), and a seeded bursty trace (gamma inter-arrivals, CV 3;
Zipf(1.1) model choice). The pool holds every model's weights plus half of one
reserve-mode KV reservation: the weights do not fit beside a reservation.

Replay (one thread, per mode `elastic` / `reserve`, same capacity, fresh pool):
an instance per model starts on its first waiting request, serves with
continuous batching (every live instance steps once per loop turn) and closes
(scale to zero, weights retained in the pool) once idle for `keep_alive_s`.
A start that does not fit (its missing weights, plus in reserve mode its KV
reservation, exceed free + retained bytes) first closes idle instances, least
recently busy first, and otherwise waits for busy ones to finish. The model's
data files are dropped from the page cache before each start (untimed).

Clock: trace time is a virtual clock that advances by the real wall time of
engine work (starts, steps, closes) and jumps over idle gaps to the next
arrival or keep-alive expiry; bookkeeping (pool snapshots, page-cache drops)
is excluded. TTFT = trace time of the first token minus arrival. The time
average of retained bytes is over [0, last request finished].

Also measured (`kv_measure`): throughput at equal batch (elastic vs reserve
engine vs transformers `generate`, interleaved repeats, median), and how many
sequences of a fixed length run at once on the same capacity in each mode.
Everything runs with one torch thread by default (`threads`): on a shared
2-core machine two threads spin at barriers whenever another process runs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from tangram.bench.common import median, result_doc, step_progress, write_result
from tangram.bench.kv_measure import (
    MODES, measure_concurrency, measure_throughput, print_report, torch_threads, warm_up,
)
from tangram.bench.kv_workload import (
    ModelPaths, Setup, TraceClock, TraceRequest, ensure_models, make_models, make_setup, make_trace,
    trace_stats,
)
from tangram.control.autoscale import should_scale_down
from tangram.engine import EngineConfig, Instance, RequestOutput, SamplingParams
from tangram.engine.errors import RequestError
from tangram.paths import data_dir
from tangram.pool import DevicePool, PoolFullError
from tangram.sim.rules import idle_victim
from tangram.store.io import evict_from_page_cache
from tangram.workload import ModelSpec, TraceShape, percentile

log = logging.getLogger(__name__)

BLOCK_TOKENS = 16


@dataclass
class _Rec:
    arrival: float
    first: float | None = None
    done: bool = False
    reason: str | None = None
    warm: bool = False


@dataclass
class _Live:
    inst: Instance
    last_busy: float


@dataclass
class Replay:
    """One mode's fresh pool replaying the trace (see the module docstring for the rules)."""

    mode: str
    setup: Setup
    paths: dict[str, ModelPaths]
    keep_alive_s: float
    max_batch: int
    clock: TraceClock = field(default_factory=TraceClock)

    def __post_init__(self) -> None:
        self.pool = DevicePool(self.setup.capacity, "cpu", clock=self.clock.now)
        self.cfg = EngineConfig(kv_mode=self.mode, block_tokens=BLOCK_TOKENS, max_batch=self.max_batch)
        self.live: dict[str, _Live] = {}
        self.pending: dict[str, list[int]] = {}
        self.recs: list[_Rec] = []
        self.version = 0  # bumped on every close and finished request: a failed start retries after one
        self.failed_at: dict[str, int] = {}
        self.waiting: set[str] = set()
        self.outstanding = 0
        self.costs: list[Any] = []
        self.c = dict(start_waits=0, pressure_closes=0, start_retries=0, failed_start_s=0.0, preemptions=0,
                      kv_waits=0, generated_tokens=0, kv_peak_bytes=0, max_live=0)
        self.area = {"retained": 0.0, "active": 0.0, "kv": 0.0}
        self._last = (0.0, {"retained": 0, "active": 0, "kv": 0})

    # ------------------------------------------------------------------ pool state

    def _sample(self) -> None:
        with self.clock.paused():
            snap = self.pool.snapshot()
            now = self.clock.now()
        t0, prev = self._last
        for k in self.area:
            self.area[k] += prev[k] * (now - t0)
        self._last = (now, {"retained": snap["totals"]["retained"], "active": snap["totals"]["active"],
                            "kv": snap["kv_bytes"]})

    def _fits(self, name: str) -> bool:
        """Whether `name` can start now: its missing weights (+ reservation) within free + retained bytes."""
        with self.clock.paused():
            snap = self.pool.snapshot()
        state = {t["key"]: t["state"] for t in snap["tensors"]}
        keys = self.setup.keys[name]
        missing = sum(b for k, b in keys.items() if k not in state)
        own_retained = sum(b for k, b in keys.items() if state.get(k) == "retained")
        avail = snap["totals"]["free"] + snap["totals"]["retained"] - own_retained
        need = missing + (self.setup.reserve_bytes[name] if self.mode == "reserve" else 0)
        return need <= avail

    # ------------------------------------------------------------------ instances

    def _idle_since(self, lv: _Live) -> float | None:
        return None if lv.inst.engine.has_work() else lv.last_busy

    def _close_idle_for_room(self) -> bool:
        """Close the instance idle longest (`idle_victim`, the controller's make-room rule); False if none is."""
        names = list(self.live)
        k = idle_victim([self._idle_since(self.live[n]) for n in names])
        if k is None:
            return False
        self._close(names[k])
        self.c["pressure_closes"] += 1
        return True

    def _close(self, name: str) -> None:
        lv = self.live.pop(name)
        tot = lv.inst.engine.totals
        self.c["preemptions"] += tot.preemptions
        self.c["kv_waits"] += tot.kv_waits
        self.c["generated_tokens"] += tot.generated_tokens
        self.c["kv_peak_bytes"] = max(self.c["kv_peak_bytes"], lv.inst.kv.peak * lv.inst.kv.spec.block_bytes)
        lv.inst.close()
        self.version += 1

    def _try_start(self, name: str) -> bool:
        if self.failed_at.get(name) == self.version:
            return False
        while not self._fits(name):
            if not self._close_idle_for_room():
                if name not in self.waiting:
                    self.waiting.add(name)
                    self.c["start_waits"] += 1
                return False
        with self.clock.paused():
            for f in self.setup.files[name]:
                evict_from_page_cache(f)
        t0 = time.perf_counter()
        try:
            inst = Instance(self.paths[name].ckpt, self.pool, self.cfg, name=name)
        except PoolFullError:  # fragmentation: the totals fit, a placement did not; retry after a release
            self.c["failed_start_s"] += time.perf_counter() - t0
            self.c["start_retries"] += 1
            self.failed_at[name] = self.version
            return False
        self.waiting.discard(name)
        self.live[name] = _Live(inst, self.clock.now())
        self.c["max_live"] = max(self.c["max_live"], len(self.live))
        self.costs.append(inst.cost)
        return True

    def _submit(self, trace: list[TraceRequest], i: int, warm: bool) -> None:
        r, rec = trace[i], self.recs[i]
        rec.warm = warm
        try:
            self.live[r.model].inst.engine.add_request(
                list(r.prompt), SamplingParams(max_tokens=r.max_tokens, ignore_eos=True),
                sink=lambda out, rec=rec: self._on_output(rec, out))
        except RequestError as exc:
            log.warning("request %d refused: %s", i, exc)
            rec.done, rec.reason = True, "refused"
            self.outstanding -= 1

    def _on_output(self, rec: _Rec, out: RequestOutput) -> None:
        if rec.first is None and (out.token_ids or out.finished):
            rec.first = self.clock.now()
        if out.finished:
            rec.done, rec.reason = True, out.finish_reason
            self.outstanding -= 1
            self.version += 1

    # ------------------------------------------------------------------ the loop

    def run(self, trace: list[TraceRequest]) -> dict[str, Any]:
        """Replay `trace`; return this mode's totals (the pool is left empty of instances)."""
        clk, n, i = self.clock, len(trace), 0
        self.recs = [_Rec(r.t) for r in trace]
        self.outstanding = n
        stuck = 0
        clk.resume()
        while i < n or self.outstanding > 0:
            while i < n and trace[i].t <= clk.now():
                if trace[i].model in self.live:
                    self._submit(trace, i, warm=True)
                else:
                    self.pending.setdefault(trace[i].model, []).append(i)
                i += 1
            changed = False
            for name, lv in list(self.live.items()):  # one instance per model: scale to zero when idle
                if should_scale_down(self._idle_since(lv), clk.now(), self.keep_alive_s, 1, 0):
                    self._close(name)
                    changed = True
            for name in sorted(self.pending, key=lambda m: self.pending[m][0]):
                if self._try_start(name):
                    changed = True
                    for j in self.pending.pop(name):
                        self._submit(trace, j, warm=False)
            progressed = False
            for lv in list(self.live.values()):
                if lv.inst.engine.has_work():
                    progressed = lv.inst.engine.step() or progressed
                    lv.last_busy = clk.now()
            if changed or (progressed and self.mode == "elastic"):
                self._sample()
            if progressed or changed:
                stuck = 0
                continue
            if any(lv.inst.engine.has_work() for lv in self.live.values()):
                if self._close_idle_for_room():  # stalled on KV held by idle instances' weights: scale one down
                    continue
                stuck += 1  # every instance with work waits for KV that only it could free: cannot happen
                if stuck > 100:
                    raise RuntimeError(f"{self.mode} replay made no progress (pool {self.setup.capacity} B)")
                continue
            events = ([trace[i].t] if i < n else []) + [lv.last_busy + self.keep_alive_s for lv in self.live.values()]
            if not events:
                raise RuntimeError(f"{self.mode}: requests wait for models that never fit the pool: "
                                   f"{sorted(self.pending)}")
            clk.skip_to(min(events))
        self._sample()
        clk.pause()
        end = clk.now()
        for name in list(self.live):
            self._close(name)
        return self._totals(end)

    def _totals(self, end: float) -> dict[str, Any]:
        recs = self.recs
        ttft = [r.first - r.arrival for r in recs if r.first is not None]
        costs = self.costs
        starts = {k: sum(c.start == k for c in costs) for k in ("cold", "dram", "pool-hit")}
        return {
            "section": "replay", "mode": self.mode, "requests": len(recs),
            "failed": sum(r.reason not in ("length", "stop") for r in recs),
            "starts": len(costs), "starts_cold": starts["cold"], "starts_dram": starts["dram"],
            "starts_pool_hit": starts["pool-hit"],
            "starts_partial": sum(c.bytes_loaded > 0 and c.bytes_reused > 0 for c in costs),
            "warm_requests": sum(r.warm for r in recs),
            "load_seconds": sum(c.load_s for c in costs), "init_seconds": sum(c.init_s for c in costs),
            "bytes_loaded": sum(c.bytes_loaded for c in costs), "bytes_reused": sum(c.bytes_reused for c in costs),
            **{f"{k}_mean": round(self.area[k] / end) if end > 0 else 0 for k in ("retained", "active", "kv")},
            "trace_seconds": end, "ttft_p50": percentile(ttft, 50), "ttft_p95": percentile(ttft, 95), **self.c,
        }


# --------------------------------------------------------------------------- the benchmark

QUICK = dict(size="quick", requests=32, mean_gap_s=1.5, cv=3.0, prompt_tokens=(8, 64), max_tokens=(4, 24),
             keep_alive_s=0.5, max_batch=8, replays=1, tp_batch=8, tp_prompt=32, tp_tokens=24, tp_repeats=5,
             conc_prompt=120, conc_tokens=8)
FULL = {**QUICK, "size": "full", "requests": 120, "max_tokens": (8, 64), "replays": 3, "tp_tokens": 64,
        "tp_repeats": 9}


def replay_rows(runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per mode: counts from the first replay, medians over replays of the timed and byte figures."""
    rows = []
    for mode in MODES:
        row = dict(runs[mode][0])
        for k in ("load_seconds", "bytes_loaded", "retained_mean", "kv_mean", "active_mean", "ttft_p50", "ttft_p95",
                  "trace_seconds"):
            vals = [r[k] for r in runs[mode] if r[k] is not None]
            mid = median(vals)
            row[k] = round(mid) if isinstance(vals[0], int) and mid is not None else mid
            row[f"{k}_runs"] = [round(v, 4) for v in vals]
        row["failed"] = max(r["failed"] for r in runs[mode])
        rows.append(row)
    return rows


def summarize(rows: list[dict[str, Any]], tp_info: dict[str, Any]) -> dict[str, Any]:
    """The summary keys (docs/benchmarks.md) from the replay, throughput and concurrency rows and the
    throughput facts (`elastic_over_reserve`, `elastic_over_transformers`)."""
    rep = {r["mode"]: r for r in rows if r["section"] == "replay"}
    tps = {r["engine"]: r["tokens_per_second"] for r in rows if r["section"] == "throughput"}
    conc = {r["mode"]: r["peak_running"] for r in rows if r["section"] == "concurrency"}
    return {
        "retained_bytes_mean": {m: round(rep[m]["retained_mean"]) for m in MODES},
        "cold_load_seconds": {m: round(rep[m]["load_seconds"], 4) for m in MODES},
        "tokens_per_second": {m: round(tps[m], 2) for m in MODES},
        "elastic_decode_overhead": round(1 - tp_info["elastic_over_reserve"], 3),
        "max_concurrent_sequences": {m: conc[m] for m in MODES},
        "engine_vs_transformers": round(tp_info["elastic_over_transformers"], 3),
        "bytes_loaded": {m: rep[m]["bytes_loaded"] for m in MODES},
        "ttft_p50": {m: round(rep[m]["ttft_p50"], 4) for m in MODES},
        "failed": {m: rep[m]["failed"] for m in MODES},
    }


def run_kv_bench(*, quick: bool, json_path: Path | None, seed: int = 0, console: Console | None = None,
                 workdir: Path | None = None, progress: bool = True, threads: int | None = 1,
                 params: dict[str, Any] | None = None, models: list[ModelSpec] | None = None) -> dict[str, Any]:
    """Run `bench kv`, print its tables and summary, write the JSON when `json_path` is given, return it.

    `params` overrides the mode's sizes (keys of QUICK) and `models` its model set (tests run tiny ones);
    `workdir` is where checkpoints are cached;
    `threads` is torch's intra-op thread count for the run (restored after; None leaves it).
    """
    with torch_threads(threads):
        return _run(quick, json_path, seed, console or Console(), workdir, progress, params, models)


def _run(quick: bool, json_path: Path | None, seed: int, console: Console, workdir: Path | None,
         progress: bool, params: dict[str, Any] | None, given: list[ModelSpec] | None) -> dict[str, Any]:
    base_mode = QUICK if quick else FULL
    unknown = set(params or {}) - set(base_mode)
    if unknown:
        raise ValueError(f"unknown bench kv parameters {sorted(unknown)}; known: {sorted(base_mode)}")
    p = {**base_mode, **(params or {})}
    root = Path(workdir) if workdir is not None else data_dir() / "bench" / "kv"
    t_start = time.perf_counter()
    models = list(given) if given else make_models(p["size"])
    spec = TraceShape(p["requests"], p["mean_gap_s"], p["cv"], 1.1, p["prompt_tokens"], p["max_tokens"])
    trace, popularity = make_trace(models, spec, seed)
    base, bt = models[0], BLOCK_TOKENS
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    steps = len(models) + 1 + p["tp_repeats"] + 2 + 2 * p["replays"]
    with step_progress(console, steps, "bench kv", enabled=progress) as bar:
        t0 = time.perf_counter()
        paths = ensure_models(models, root, step=lambda n: bar.describe(f"writing {n}"))
        bar.advance(len(models))
        setup = make_setup(models, paths, max_batch=p["max_batch"], block_tokens=bt)
        bar.describe("warm-up")
        warm_up(models, paths, setup, bt)
        bar.advance()
        t1 = time.perf_counter()
        tp_rows, tp_info = measure_throughput(base, paths[base.name], setup, batch=p["tp_batch"], prompt=p["tp_prompt"],
                                              new_tokens=p["tp_tokens"], repeats=p["tp_repeats"], seed=seed,
                                              block_tokens=bt, bar=bar)
        t2 = time.perf_counter()
        conc_rows = measure_concurrency(base, paths[base.name], setup, prompt=p["conc_prompt"],
                                        new_tokens=p["conc_tokens"], block_tokens=bt, bar=bar)
        t3 = time.perf_counter()
        for rep in range(p["replays"]):
            for mode in MODES if rep % 2 == 0 else MODES[::-1]:
                bar.describe(f"replay {rep + 1}/{p['replays']}: {mode}")
                runs[mode].append(Replay(mode, setup, paths, p["keep_alive_s"], p["max_batch"]).run(trace))
                bar.advance()
        phases = {"models_and_warm_up": t1 - t0, "throughput": t2 - t1, "concurrency": t3 - t2,
                  "replays": time.perf_counter() - t3}
    rows = replay_rows(runs) + tp_rows + conc_rows
    summary = summarize(rows, tp_info)
    config: dict[str, Any] = {
        "mode": "custom" if params or given else "quick" if quick else "full", "seed": seed, **p, "block_tokens": bt,
        "capacity_bytes": setup.capacity, "unique_weight_bytes": setup.unique_bytes,
        "reserve_bytes": setup.reserve_bytes,
        "capacity_rule": "unique weight bytes + half of the largest reserve-mode KV reservation",
        "clock": "trace time = wall time of engine work (starts, steps, closes) + skipped idle gaps",
        "start_rule": "a start that does not fit closes idle instances (least recently busy first), else waits",
        "trace": trace_stats(trace), "popularity": {k: round(v, 4) for k, v in popularity.items()},
        "models": [{"name": m.name, "arch": m.architecture, "bytes": sum(setup.keys[m.name].values()), "base": m.base,
                    "changed_layers": list(m.changed), "kv_bytes_per_token": m.kv_bytes_per_token(),
                    "context": m.context} for m in models],
        "throughput": tp_info, "workdir": str(root),
        "phase_seconds": {k: round(v, 2) for k, v in phases.items()},
        "seconds": round(time.perf_counter() - t_start, 2),
    }
    result = result_doc("kv", "cpu", config, rows, summary)
    head = (f"bench kv: {len(models)} models ({setup.unique_bytes / 1e6:.1f} MB unique), pool "
            f"{setup.capacity / 1e6:.1f} MB, {len(trace)} requests, {config['mode']}")
    print_report(console, head, rows, summary)
    if json_path is not None:
        write_result(result, json_path)
        console.print(f"wrote {json_path}")
    return result
