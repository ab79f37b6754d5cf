"""bench coldstart: workload and aggregation (pure, hand-made inputs) and a tiny smoke run of the whole thing."""

from __future__ import annotations

import pytest
from models import COLDSTART_SMALL, coldstart_models
from rich.console import Console

from tangram.bench.coldstart import run_coldstart_bench
from tangram.bench.coldstart_workload import (
    CONFIGS, QUICK, configurations, make_models, pool_hit_vs_warm, summarize, trace_spec,
)
from tangram.bench.kv_workload import make_trace
from tangram.bench.overlap_probe import overlap_bound
from tangram.workload import coefficient_of_variation


def test_configurations_are_the_protocols():
    c = configurations()
    assert c["baseline"].loader == "safetensors" and not c["baseline"].retain and c["baseline"].kv_mode == "reserve"
    assert c["baseline"].scheduler == "random"
    assert c["sllm"].host_cache and not c["sllm"].retain and c["sllm"].scheduler == "sllm"
    assert not c["baseline"].share and not c["sllm"].share  # neither shares tensors across models
    assert c["tangram"].retain and c["tangram"].share and c["tangram"].kv_mode == "elastic" and c["tangram"].templates
    assert not c["tangram-notemplate"].templates


def test_trace_is_deterministic_bursty_and_skewed():
    models = make_models("quick")
    a, pop = make_trace(models, trace_spec(QUICK), seed=3)
    b, _ = make_trace(models, trace_spec(QUICK), seed=3)
    assert a == b and a != make_trace(models, trace_spec(QUICK), seed=4)[0]
    gaps = [y.t - x.t for x, y in zip(a, a[1:])]
    assert coefficient_of_variation(gaps) > 1.5
    assert max(pop.values()) > 2 * min(pop.values())
    assert {len(r.prompt) for r in a} == {QUICK.prompt_tokens}
    assert sum(m.base is not None for m in models) == 2  # a family shares tensors


def test_summary_from_hand_made_results():
    def req(model, ttft, start, load=0.0):
        return {"model": model, "ttft_s": ttft, "start": start, "load_s": load}

    runs = {
        "sllm": {"results": [req("a", 1.0, "dram", 0.5), req("a", 0.2, "warm"), req("b", 2.0, "cold", 1.0)],
                 "warm_ttft": {"a": 0.2, "b": 0.3}, "bytes_loaded": 300},
        "tangram": {"results": [req("a", 0.3, "pool-hit", 0.01), req("a", 0.2, "warm"), req("b", 0.5, "pool-hit"),
                                {"model": "b", "ttft_s": None, "error": "503"}],
                    "warm_ttft": {"a": 0.2, "b": 0.3}, "bytes_loaded": 0},
    }
    s = summarize(runs)
    assert s["failed"] == {"sllm": 0, "tangram": 1}
    assert s["overhead_p50"]["sllm"] == 0.8 and abs(s["overhead_p50"]["tangram"] - 0.1) < 1e-9
    assert abs(s["overhead_reduction_vs_sllm"]["p50"] - (1 - 0.1 / 0.8)) < 1e-9
    assert s["starts"]["tangram"] == {"warm": 1, "pool-hit": 2, "dram": 0, "cold": 0}
    assert s["pool_hit_ratio"] == 2 / 4 and abs(s["load_speedup_vs_sllm"] - 1.5 / 0.01) < 1e-6
    assert s["ttft_p50"]["sllm"] == 1.0 and s["ttft_p95"]["sllm"] == pytest.approx(1.9)  # linear interpolation
    assert s["bytes_loaded"] == {"sllm": 300, "tangram": 0}
    # tangram's pool hits: a at 0.3 / 0.2 and b at 0.5 / 0.3; sllm had none
    assert s["trace_pool_hit_vs_warm_ttft"]["tangram"] == pytest.approx((1.5 + 0.5 / 0.3) / 2)
    assert s["trace_pool_hit_vs_warm_ttft"]["sllm"] is None


def test_pool_hit_vs_warm_is_the_median_ratio_over_successful_pool_hits_of_measured_models():
    results = [{"model": "a", "ttft_s": 0.22, "start": "pool-hit"}, {"model": "a", "ttft_s": 0.4, "start": "pool-hit"},
               {"model": "a", "ttft_s": 0.3, "start": "pool-hit"}, {"model": "a", "ttft_s": 9.0, "start": "cold"},
               {"model": "a", "ttft_s": 0.2, "start": "warm"},
               {"model": "a", "ttft_s": 5.0, "start": "pool-hit", "error": "502"},
               {"model": "c", "ttft_s": 7.0, "start": "pool-hit"}]  # c has no warm TTFT: left out
    assert pool_hit_vs_warm(results, {"a": 0.2}) == pytest.approx(1.5)
    assert pool_hit_vs_warm(results[3:5], {"a": 0.2}) is None
    assert pool_hit_vs_warm(results, {"a": 0.2, "c": 0.0}) == pytest.approx(1.5)  # no division by a zero warm


def test_unknown_model_size_is_refused():
    with pytest.raises(ValueError, match="unknown size 'small'"):
        make_models("small")


def test_overlap_bound_is_two_when_nothing_contends_and_one_when_serialised():
    assert overlap_bound(0.1, 0.05) == 2.0  # load and prefill of 0.05 s each, fully hidden
    assert overlap_bound(0.09, 0.09) == 1.0
    assert overlap_bound(0.09, 0.12) < 1.0  # running them together made both slower


def test_small_run_end_to_end(tmp_path, monkeypatch):
    import tangram.bench.coldstart as bench_coldstart

    asked: list[list] = []  # the read-speed probe runs before anything is timed, on every model's checkpoint
    monkeypatch.setattr(bench_coldstart, "measure_pending", lambda paths: asked.append(list(paths)) or [])
    result = run_coldstart_bench(quick=True, json_path=tmp_path / "c.json", plot_dir=tmp_path / "plots",
                                 console=Console(quiet=True), progress=False, sizes=COLDSTART_SMALL,
                                 models=coldstart_models(), template_repeats=1, template_prompt=16,
                                 migrate=False)  # the migration trace has its own test (test_bench_coldstart_migrate)
    s = result["summary"]
    for key in ("ttft_p50", "ttft_p95", "ttft_p99", "overhead_p50", "overhead_p95", "bytes_loaded", "failed",
                "trace_pool_hit_vs_warm_ttft"):
        assert set(s[key]) == set(CONFIGS), key
    hits = [r for r in result["rows"] if r["section"] == "pool-hit"]
    assert len(hits) == 2 and s["pool_hit_starts"] == sum(r["start"] == "pool-hit" for r in hits) >= 1
    assert all(r["bytes_loaded"] == 0 for r in hits if r["start"] == "pool-hit")
    assert s["pool_hit_vs_warm_ttft"] > 0
    assert all(v == 0 for v in s["failed"].values())
    assert set(s["overhead_reduction_vs_sllm"]) == {"p50", "p95"} and "ttft_reduction_vs_sllm" in s
    assert s["template_speedup"] > 0 and s["template_token_identical"] is True
    probe = s["template_overlap_probe"]
    assert set(probe) == {"load_s", "prefill_s", "sequential_s", "both_s", "bound"} and min(probe.values()) > 0
    assert s["template_overlap_bound"] == overlap_bound(probe["sequential_s"], probe["both_s"])
    p50 = s["template_cold_ttft_p50"]["tangram-notemplate"]
    saved = max(0.0, probe["sequential_s"] - probe["both_s"])
    assert s["template_speedup_ceiling"] == pytest.approx(p50 / max(1e-9, p50 - saved))
    assert s["bytes_loaded"]["tangram"] <= s["bytes_loaded"]["sllm"]
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {"ttft_cdf.png", "start_stages.png",
                                                                 "pool_occupancy.png"}
    assert len(asked) == 1 and len(asked[0]) == len(coldstart_models())
    assert result["config"]["read_probe_before_starts"] == []
