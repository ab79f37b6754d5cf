"""`tangram bench sim`: the placement policies at cluster scale, the scheduler's speed, the simulator's error.

1. Cluster replay: one seeded workload (models with families sharing tensors,
   Zipf popularity, gamma arrivals with a high CV, short keep-alive) replayed by
   the simulator (`tangram.sim`) once per scheduler policy (tangram, sllm,
   least-loaded, random) on the same cluster: every policy runs on the same
   retaining device pools (Partitioned-Gain Packing) and node DRAM caches, so
   the comparison isolates placement (ServerlessLLM gets retention for free: a
   stronger baseline than the real system, which retains nothing on devices).
   Tier bandwidths (the calibration) come from a `bench load` result given as
   `calibration` (`--calibration PATH`: Tangram's cold and DRAM GB/s, median
   over its models), from a measurement at start (`--calibration measure`:
   the loader probe), or by default from the built-in `DEFAULT_CALIBRATION`
   (docs/results/load-cpu-full.json's figures, so an installed package needs
   no docs/ directory).
2. Decisions per second at 10,000 devices: a 10,000-device cluster is brought
   to a realistic state by replaying a warm-up trace, then the indexed
   scheduler decides for models drawn by popularity (time per `decide` only).
3. Simulator error: a small real run and the simulator on the same trace
   (`sim_real`); `sim_error` = |sim p50 - real p50| / real p50.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from tangram.bench.common import Column, fmt_bytes, fmt_num, print_summary, print_table, result_doc, step_progress
from tangram.bench.common import write_result
from tangram.bench.sim_real import RealSpec, run_real_comparison
from tangram.paths import data_dir
from tangram.scheduler import POLICIES, Bandwidths, BandwidthEstimator
from tangram.sim import ClusterSpec, ModelMix, TraceShape, make_models, make_trace, simulate
from tangram.sim.workload import trace_facts

log = logging.getLogger(__name__)

# Tangram's cold (disk) and DRAM-hit loader bandwidths, median over the models of docs/results/load-cpu-full.json
# as of 2026-11-23 (`bench load`): the calibration when none is given. Pinned, so `bench sim` numbers move only
# when this is changed on purpose (a newer result is taken with --calibration PATH).
DEFAULT_CALIBRATION = Bandwidths(dram=8628353252.988083, disk=3105514215.584249)
DEFAULT_CALIBRATION_SOURCE = "built in: docs/results/load-cpu-full.json (bench load, 2026-11-23)"
MEASURE = "measure"  # calibration measured at start (loader probe) instead of read from a result


@dataclass(frozen=True)
class SimSizes:
    """Every size of a `bench sim` run (injectable for tests)."""

    models: int = 256
    nodes: int = 64
    devices_per_node: int = 8
    device_bytes: int = 40 * 10**9
    dram_bytes: int = 128 * 10**9
    requests: int = 20_000
    mean_gap_s: float = 0.01
    cv: float = 4.0
    keep_alive_s: float = 5.0
    max_concurrency: int = 8
    decision_nodes: int = 1250  # x devices_per_node = 10,000 devices
    decision_models: int = 1000
    warm_requests: int = 10_000
    decisions: int = 20_000
    real: RealSpec | None = field(default_factory=lambda: RealSpec(requests=40))


QUICK = SimSizes()
FULL = SimSizes(models=1000, nodes=256, requests=100_000, mean_gap_s=0.004, warm_requests=40_000,
                decisions=100_000, real=RealSpec(workers=3, requests=120))


def bandwidths_from_load(path: Path) -> Bandwidths | None:
    """Tangram's cold (disk) and DRAM-hit bandwidth from a `bench load` result (median over its models)."""
    try:
        rows = json.loads(Path(path).read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return None
    pick = {s: sorted(r["gbps"] for r in rows if r.get("method") == "tangram" and r.get("kind") == "loader"
                      and r.get("state") == s and r.get("gbps")) for s in ("cold", "dram")}
    if not pick["cold"] or not pick["dram"]:
        return None
    mid = {s: v[len(v) // 2] * 1e9 for s, v in pick.items()}
    return Bandwidths(dram=mid["dram"], disk=mid["cold"])


def calibration_bandwidths(calibration: Path | str | None) -> tuple[Bandwidths, str]:
    """The tier bandwidths of a run and where they came from: None -> `DEFAULT_CALIBRATION`, "measure" -> the
    loader probe now, else a `bench load` result file (ValueError when it has no Tangram cold and DRAM rows)."""
    if calibration is None:
        return DEFAULT_CALIBRATION, DEFAULT_CALIBRATION_SOURCE
    if str(calibration) == MEASURE:
        est = BandwidthEstimator.at_start()
        return est.bandwidths, f"measured at start ({est.dram.source}, {est.disk.source})"
    bw = bandwidths_from_load(Path(calibration))
    if bw is None:
        raise ValueError(f"calibration {calibration}: not a readable `bench load` result with Tangram loader rows "
                         "in the cold and dram states")
    return bw, f"bench load: {calibration}"


def measure_decisions(sizes: SimSizes, bw: Bandwidths, seed: int) -> list[dict[str, Any]]:
    """Rows: decisions per second of each policy on a 10,000-device cluster after a warm-up replay."""
    mix = ModelMix(n_models=sizes.decision_models)
    models = make_models(mix, seed + 1)
    trace, pop = make_trace(models, TraceShape(sizes.warm_requests, mean_gap_s=0.01, cv=sizes.cv), seed + 1)
    spec = ClusterSpec(sizes.decision_nodes, sizes.devices_per_node, sizes.device_bytes, sizes.dram_bytes, bw)
    t0 = time.perf_counter()
    _, cluster = simulate(spec, models, trace, "tangram", keep_alive_s=30.0, max_concurrency=sizes.max_concurrency,
                          seed=seed)
    warm_s = time.perf_counter() - t0
    sched = cluster.sched
    rng = random.Random(seed)
    names, weights = list(pop), list(pop.values())
    asks = [rng.choices(names, weights)[0] for _ in range(sizes.decisions)]
    nbytes = {m.name: m.nbytes for m in models}
    rows = []
    for policy in POLICIES:
        sched.evaluated = 0
        now, spent, perf = sched.now, 0.0, time.perf_counter
        for name in asks:
            t = perf()
            sched.decide(name, nbytes[name], now, policy)
            spent += perf() - t
        rows.append({"section": "decisions", "policy": policy, "devices": spec.devices, "nodes": spec.nodes,
                     "models": len(models), "decisions": len(asks), "decisions_per_second": len(asks) / spent,
                     "devices_evaluated_mean": sched.evaluated / len(asks),
                     "in_replay_decisions_per_second": cluster.decisions / cluster.decide_s
                     if policy == "tangram" else None, "warm_up_s": round(warm_s, 2)})
    return rows


def run_sim_bench(*, quick: bool, json_path: Path | None, seed: int, console: Console | None = None,
                  sizes: SimSizes | None = None, calibration: Path | str | None = None,
                  workdir: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Run `bench sim`, print its tables and summary, write the JSON when `json_path` is given, return it.

    `sizes` overrides the quick / full sizes (tests); `calibration` is where the tier bandwidths come from
    (`calibration_bandwidths`: a `bench load` result, "measure", or None for the built-in default); `workdir`
    caches the real run's checkpoints (default: bench kv's cache).
    """
    console = console or Console()
    p = sizes or (QUICK if quick else FULL)
    t_start = time.perf_counter()
    bw, bw_source = calibration_bandwidths(calibration)
    mix = ModelMix(n_models=p.models)
    models = make_models(mix, seed)
    shape = TraceShape(p.requests, mean_gap_s=p.mean_gap_s, cv=p.cv)
    trace, _ = make_trace(models, shape, seed)
    spec = ClusterSpec(p.nodes, p.devices_per_node, p.device_bytes, p.dram_bytes, bw)
    rows: list[dict[str, Any]] = []
    phases: dict[str, float] = {}
    real: dict[str, Any] | None = None
    with step_progress(console, len(POLICIES) + 2, "bench sim", enabled=progress) as bar:
        for policy in POLICIES:
            bar.describe(f"cluster replay: {policy} ({spec.devices} devices, {len(trace)} requests)")
            t0 = time.perf_counter()
            result, cluster = simulate(spec, models, trace, policy, keep_alive_s=p.keep_alive_s,
                                       max_concurrency=p.max_concurrency, seed=seed)
            phases[f"replay_{policy}"] = time.perf_counter() - t0
            rows.append({"section": "cluster", "policy": policy, "devices": spec.devices, **result.summary(),
                         "failed_starts": cluster.failed_starts})
            bar.advance()
        bar.describe("decisions per second at 10,000 devices")
        t0 = time.perf_counter()
        rows += measure_decisions(p, bw, seed)
        phases["decisions"] = time.perf_counter() - t0
        bar.advance()
        if p.real is not None:
            bar.describe("small real run vs simulator")
            t0 = time.perf_counter()
            root = Path(workdir) if workdir is not None else data_dir() / "bench" / "kv"
            real = run_real_comparison(p.real, root, seed, step=lambda s: bar.describe(f"real run: {s}"))
            rows += real["rows"]
            phases["real"] = time.perf_counter() - t0
        bar.advance()
    summary = summarize(rows, real)
    config = {"mode": "custom" if sizes else "quick" if quick else "full", "seed": seed,
              "sizes": {k: v for k, v in asdict(replace(p, real=None)).items() if k != "real"},
              "real": asdict(p.real) if p.real else None, "bandwidths": asdict(bw), "bandwidth_source": bw_source,
              "cluster": {"devices": spec.devices, "init_s": spec.init_s, "evict_weight": spec.evict_weight,
                          "pool_policy": spec.pool_policy, "prefill": "0.02 s + 2 x params x tokens / 200 TFLOP/s",
                          "decode_per_token_s": mix.decode_per_token_s},
              "models": {"count": len(models),
                         "unique_bytes": sum({k: s for m in models for k, s in m.tensors.items()}.values()),
                         "families": len({m.family for m in models})},
              "trace": trace_facts(trace), "real_run": {k: v for k, v in (real or {}).items() if k != "rows"},
              "phase_seconds": {k: round(v, 2) for k, v in phases.items()},
              "seconds": round(time.perf_counter() - t_start, 2)}
    doc = result_doc("sim", "cpu", config, rows, summary)
    _print(console, rows, summary, config)
    if json_path is not None:
        write_result(doc, json_path)
        console.print(f"wrote {json_path}")
    return doc


def summarize(rows: list[dict[str, Any]], real: dict[str, Any] | None) -> dict[str, Any]:
    """The summary keys from the cluster and decision rows and the real comparison (None when not run)."""
    cl = {r["policy"]: r for r in rows if r["section"] == "cluster"}
    dec = {r["policy"]: r for r in rows if r["section"] == "decisions"}
    rnd = {k: {p: (round(cl[p][k], 4) if cl[p][k] is not None else None) for p in cl}
           for k in ("ttft_p50", "ttft_p95", "ttft_p99")}
    return {**rnd, "bytes_loaded": {p: cl[p]["bytes_loaded"] for p in cl},
            "decisions_per_second": round(dec["tangram"]["decisions_per_second"]),
            "sim_error": round(real["sim_error"], 4) if real and real["sim_error"] is not None else None}


_C, _N = Column, fmt_num
CLUSTER_COLUMNS = [_C("policy", "policy", justify="left"), _C("ttft_p50", "TTFT p50 s", _N(3)),
                   _C("ttft_p95", "p95 s", _N(3)), _C("ttft_p99", "p99 s", _N(3)), _C("starts", "starts"),
                   _C("pool_hits", "pool hits"), _C("bytes_loaded", "loaded", fmt_bytes),
                   _C("bytes_from_dram", "from DRAM", fmt_bytes), _C("start_waits", "waits")]
DEC_COLUMNS = [_C("policy", "policy", justify="left"), _C("devices", "devices"), _C("decisions", "decisions"),
               _C("decisions_per_second", "decisions/s", _N(0)), _C("devices_evaluated_mean", "evaluated", _N(2))]
REAL_COLUMNS = [_C("run", "run", justify="left"), _C("workers", "devices"), _C("requests", "requests"),
                _C("ttft_p50", "TTFT p50 s", _N(4)), _C("ttft_p95", "p95 s", _N(4)), _C("starts", "starts"),
                _C("pool_hits", "pool hits"), _C("bytes_loaded", "loaded", fmt_bytes)]


def _print(console: Console, rows: list[dict[str, Any]], summary: dict[str, Any], config: dict[str, Any]) -> None:
    by = {s: [r for r in rows if r["section"] == s] for s in ("cluster", "decisions", "sim-vs-real")}
    trace = config["trace"]
    print_table(console, f"bench sim ({config['mode']}): {config['cluster']['devices']} devices, "
                f"{config['models']['count']} models, {trace['requests']} requests (gap CV {trace['gap_cv']})",
                CLUSTER_COLUMNS, by["cluster"])
    print_table(console, "scheduler decisions (time in decide only)", DEC_COLUMNS, by["decisions"])
    if by["sim-vs-real"]:
        print_table(console, "simulator vs a small real run on the same trace", REAL_COLUMNS, by["sim-vs-real"])
    print_summary(console, "summary", summary)
