"""The simulator: workload generator, simulated pools on the real policies, determinism, and a tiny bench run."""

from __future__ import annotations

import io
import json

import pytest
from models import kv_models
from rich.console import Console

from tangram.defaults import RELOAD_BANDWIDTH
from tangram.pool import DevicePool
from tangram.scheduler import POLICIES, Bandwidths
from tangram.sim import ClusterSpec, ModelMix, TraceShape, make_models, make_trace, simulate
from tangram.sim.pool import SimPool, SimPoolFull
from tangram.sim.replay import Started, replay
from tangram.sim.rules import idle_victim
from tangram.sim.workload import Request
from tangram.workload import coefficient_of_variation, percentile


GB = 10**9


def test_models_have_families_sharing_most_tensors() -> None:
    models = make_models(ModelMix(n_models=40, family_fraction=0.6), seed=1)
    assert len(models) == 40 and make_models(ModelMix(n_models=40, family_fraction=0.6), seed=1) == models
    by = {m.name: m for m in models}
    variants = [m for m in models if m.family != m.name]
    assert len(variants) >= 5
    for v in variants:
        base = by[v.family]
        shared = sum(s for k, s in v.tensors.items() if k in base.tensors)
        assert 0.5 * v.nbytes < shared < v.nbytes  # most, not all, of a variant is its base's
    solos = [m for m in models if m.family == m.name]
    assert all(not set(a.tensors) & set(b.tensors) for a, b in zip(solos, solos[1:]))


def test_trace_is_seeded_bursty_and_zipf() -> None:
    models = make_models(ModelMix(n_models=20), seed=0)
    shape = TraceShape(20_000, mean_gap_s=0.1, cv=4.0, zipf_s=1.2)
    a, pop = make_trace(models, shape, seed=2)
    assert make_trace(models, shape, seed=2)[0] == a and make_trace(models, shape, seed=3)[0] != a
    gaps = [y.t - x.t for x, y in zip(a, a[1:])]
    assert 3.0 < coefficient_of_variation(gaps) < 5.0
    assert 0.08 < sum(gaps) / len(gaps) < 0.12
    counts = {m.name: 0 for m in models}
    for r in a:
        counts[r.model] += 1
    ranked = sorted(pop, key=pop.get, reverse=True)
    assert counts[ranked[0]] / len(a) == pytest.approx(pop[ranked[0]], abs=0.02)
    assert counts[ranked[0]] > 5 * counts[ranked[-1]]  # skew: top over bottom ~ 20^1.2
    smooth = make_trace(models, TraceShape(5000, mean_gap_s=0.1, cv=1.0), seed=2)[0]
    assert coefficient_of_variation([y.t - x.t for x, y in zip(smooth, smooth[1:])]) < 1.3


def test_sim_pool_shares_packs_and_never_evicts_active_bytes() -> None:
    pool = SimPool(100)
    base = {"e": 20, "l0": 10, "l1": 10}
    variant = {"e": 20, "l0": 10, "v1": 10}
    loaded, evicted = pool.acquire("base", base, now=0.0)
    assert sorted(loaded) == ["e", "l0", "l1"] and evicted == [] and pool.active == 40
    loaded, _ = pool.acquire("variant", variant, now=1.0)
    assert loaded == ["v1"] and pool.active == 50 and pool.free == 50
    pool.release(base)
    assert pool.active == 40 and pool.retained == 10  # only l1 is unused: e and l0 serve the variant
    pool.release(variant)
    assert pool.retained == 50 and pool.free == 50
    other = {"x": 60}
    loaded, evicted = pool.acquire("other", other, now=2.0)
    assert loaded == ["x"] and evicted  # 60 > 50 free: retained tensors make room, packed in one window
    assert pool.tensors["x"].size == 60 and pool.used == pool.active + pool.retained <= 100
    with pytest.raises(SimPoolFull):
        pool.acquire("big", {"y": 50}, now=3.0)  # only 40 bytes are not active
    assert pool.active == 60


def test_percentile() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 95) == 5.0 and percentile([], 50) is None
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5  # unsorted input is sorted first
    assert percentile([0.0, 10.0], 95) == pytest.approx(9.5) and percentile([2.0, 1.0], 0) == 1.0
    with pytest.raises(ValueError, match="within"):
        percentile([1.0], 101)


def test_zipf_popularity_ranks_distinct_names() -> None:
    import random

    from tangram.workload import zipf_popularity

    pop = zipf_popularity(["a", "b", "c"], 1.0, random.Random(0))
    assert sorted(pop) == ["a", "b", "c"] and sum(pop.values()) == pytest.approx(1.0)
    assert list(pop.values()) == pytest.approx([6 / 11, 3 / 11, 2 / 11])  # 1, 1/2, 1/3 normalised, rank order
    with pytest.raises(ValueError, match="distinct"):
        zipf_popularity(["a", "a"], 1.0, random.Random(0))


def test_idle_victim_is_the_longest_idle() -> None:
    assert idle_victim([5.0, None, 2.0, 2.0]) == 2  # idle longest; a tie goes to the lower index
    assert idle_victim([None, None]) is None and idle_victim([]) is None


def test_simulated_and_real_pools_price_reloads_alike() -> None:
    spec = ClusterSpec(1, 1, 10**9, 0, Bandwidths(8e9, 3e9))  # a measured disk speed is not the reload price
    assert spec.reload_bandwidth == RELOAD_BANDWIDTH == DevicePool(4096, "cpu").config.reload_bandwidth
    assert SimPool(100).reload_bandwidth == RELOAD_BANDWIDTH


class FixedBackend:
    """A backend with fixed costs, to check the replay rules by hand."""

    def __init__(self) -> None:
        self.stops: list[float] = []

    def place(self, model: str, now: float) -> int:
        return 0

    def start(self, model: str, device: int, now: float) -> Started:
        return Started(1.0, bytes_disk=10)

    def prefill(self, inst, request: Request) -> float:
        return 0.1

    def stop(self, inst, now: float) -> None:
        self.stops.append(now)


def test_replay_rules_by_hand() -> None:
    trace = [Request(0.0, "a", 8, 0), Request(0.5, "a", 8, 0), Request(0.6, "b", 8, 0), Request(10.0, "a", 8, 0)]
    backend = FixedBackend()
    res = replay(trace, backend, keep_alive_s=2.0, max_concurrency=4, decode_s={"a": 0.0, "b": 0.0})
    # a starts 0 -> 1, prefill to 1.1; the second waits for it: 1.2; b queues behind a's start on device 0: 1 -> 2.1
    assert res.ttft[:3] == pytest.approx([1.1, 0.7, 1.5])
    assert res.ttft[3] == pytest.approx(1.1)  # a was stopped after 2 s idle: a new start
    assert len(res.starts) == 3 and backend.stops[:2] == pytest.approx([3.2, 4.1])


def small_world(seed: int):
    models = make_models(ModelMix(n_models=24), seed)
    trace, _ = make_trace(models, TraceShape(1500, mean_gap_s=0.05, cv=4.0), seed)
    spec = ClusterSpec(4, 4, 20 * GB, 30 * GB, Bandwidths(8e9, 2e9))
    return models, trace, spec


def test_simulation_is_deterministic_and_tangram_reuses_more() -> None:
    models, trace, spec = small_world(0)
    out = {}
    for policy in POLICIES:
        a, _ = simulate(spec, models, trace, policy, keep_alive_s=2.0, seed=1)
        b, _ = simulate(spec, models, trace, policy, keep_alive_s=2.0, seed=1)
        assert a.ttft == b.ttft and a.summary() == b.summary()
        out[policy] = a.summary()
        assert out[policy]["served"] == len(trace)
    other, _ = simulate(spec, models, make_trace(models, TraceShape(1500, mean_gap_s=0.05), 1)[0], "tangram",
                        keep_alive_s=2.0, seed=1)
    assert other.ttft != out["tangram"]
    assert out["tangram"]["pool_hits"] > out["random"]["pool_hits"]
    assert out["tangram"]["bytes_loaded"] < out["random"]["bytes_loaded"]
    assert out["tangram"]["bytes_loaded"] < out["sllm"]["bytes_loaded"]


def test_simulated_pools_stay_consistent_with_the_scheduler() -> None:
    models, trace, spec = small_world(2)
    _, cluster = simulate(spec, models, trace, "tangram", keep_alive_s=1.0, seed=0)
    by = {m.name: m for m in models}
    for d, pool in enumerate(cluster.pools):
        assert cluster.sched.free[d] == pool.free and cluster.sched.retained[d] == pool.retained
        assert pool.active == 0  # every instance stopped at the end
        for name, nbytes in cluster.sched.dev_res[d].items():
            assert nbytes == sum(s for k, s in by[name].tensors.items() if k in pool.tensors)
    assert cluster.decisions > 0


def cluster_row(policy: str, p50: float | None, bytes_loaded: int) -> dict:
    return {"section": "cluster", "policy": policy, "ttft_p50": p50, "ttft_p95": 0.123456, "ttft_p99": None,
            "bytes_loaded": bytes_loaded}


def test_sim_summary_from_hand_made_rows() -> None:
    from tangram.bench.sim import summarize

    rows = [cluster_row("tangram", 0.033333, 10), cluster_row("sllm", None, 20),
            {"section": "decisions", "policy": "tangram", "decisions_per_second": 1234.6},
            {"section": "decisions", "policy": "sllm", "decisions_per_second": 99.0}]
    s = summarize(rows, {"sim_error": 0.123456})
    assert s == {"ttft_p50": {"tangram": 0.0333, "sllm": None}, "ttft_p95": {"tangram": 0.1235, "sllm": 0.1235},
                 "ttft_p99": {"tangram": None, "sllm": None}, "bytes_loaded": {"tangram": 10, "sllm": 20},
                 "decisions_per_second": 1235, "sim_error": 0.1235}
    assert summarize(rows, None)["sim_error"] is None and summarize(rows, {"sim_error": None})["sim_error"] is None


def test_calibration_default_is_built_in_and_a_given_result_is_read(tmp_path, monkeypatch) -> None:
    from tangram.bench.sim import DEFAULT_CALIBRATION, calibration_bandwidths

    monkeypatch.chdir(tmp_path)  # nothing is read from a docs/ directory, wherever the package lives
    bw, source = calibration_bandwidths(None)
    assert bw == DEFAULT_CALIBRATION and "load-cpu-full.json" in source
    given = tmp_path / "load.json"
    given.write_text(json.dumps({"rows": [
        {"method": "tangram", "kind": "loader", "state": s, "gbps": g} for s, g in (("cold", 1.5), ("dram", 6.0))]}))
    bw, source = calibration_bandwidths(given)
    assert bw == Bandwidths(dram=6e9, disk=1.5e9) and str(given) in source
    (tmp_path / "bad.json").write_text("{}")
    for bad in (tmp_path / "bad.json", tmp_path / "missing.json"):
        with pytest.raises(ValueError, match="not a readable `bench load` result"):
            calibration_bandwidths(bad)


def test_bench_sim_smoke(tmp_path) -> None:
    from tangram.bench.sim import SimSizes, run_sim_bench
    from tangram.bench.sim_real import RealSpec

    sizes = SimSizes(models=16, nodes=2, devices_per_node=4, device_bytes=20 * GB, dram_bytes=30 * GB, requests=300,
                     mean_gap_s=0.05, decision_nodes=25, decision_models=40, warm_requests=300, decisions=300,
                     real=RealSpec(models=tuple(kv_models()), workers=2, requests=8))
    console = Console(file=io.StringIO(), width=120)
    doc = run_sim_bench(quick=True, json_path=tmp_path / "sim.json", seed=0, console=console, sizes=sizes,
                        workdir=tmp_path / "models", progress=False)
    summary = doc["summary"]
    for key in ("ttft_p50", "ttft_p95", "ttft_p99", "bytes_loaded"):
        assert set(summary[key]) == set(POLICIES)
        assert all(isinstance(v, (int, float)) for v in summary[key].values())
    assert isinstance(summary["decisions_per_second"], (int, float)) and summary["decisions_per_second"] > 0
    real = {r["run"]: r for r in doc["rows"] if r["section"] == "sim-vs-real"}
    assert set(real) == {"real", "sim"} and all(r["served"] == 8 for r in real.values())
    p50 = {k: r["ttft_p50"] for k, r in real.items()}
    assert summary["sim_error"] == pytest.approx(abs(p50["sim"] - p50["real"]) / p50["real"], abs=1e-4)
    assert (tmp_path / "sim.json").exists() and "simulator vs a small real run" in console.file.getvalue()


def test_cli_refuses_a_bad_calibration_file(tmp_path) -> None:
    from typer.testing import CliRunner

    from tangram.cli import app

    out = tmp_path / "sim.json"
    result = CliRunner().invoke(app, ["bench", "sim", "--quick", "--calibration", str(tmp_path / "nope.json"),
                                      "--json", str(out)])
    assert result.exit_code != 0 and "not a readable `bench load` result" in result.output
    assert not out.exists()
