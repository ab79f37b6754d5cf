"""bench coldstart's migration trace: its trace, pool size and summary (pure, hand-made inputs), and a small
replay in which the controller's own policy moves streams to make room for a start (issue 18)."""

from __future__ import annotations

import pytest
from rich.console import Console

from tangram.bench.coldstart_migrate import (
    QUICK_MIGRATE, MigrateTrace, migrate_capacity, migrate_deployments, migrate_section, migrate_trace,
    summarize_migrate,
)
from tangram.bench.coldstart_workload import configurations, make_models
from tangram.bench.common import step_progress
from tangram.bench.kv_workload import ModelPaths, ensure_models
from tangram.store import read_index
from tangram.workload import transformer

SPEC = MigrateTrace("big", ("small", "other"), waves=3, wave_gap_s=5.0, long_requests=4, long_tokens=64)


def test_trace_waves_of_long_streams_and_one_short_request_for_the_next_model():
    trace = migrate_trace(SPEC, {"big": 100, "small": 50, "other": 70}, seed=1)
    assert trace == migrate_trace(SPEC, {"big": 100, "small": 50, "other": 70}, seed=1)
    assert [r.t for r in trace] == sorted(r.t for r in trace)
    shorts = [r for r in trace if r.model != "big"]
    assert [(r.t, r.model, r.max_tokens) for r in shorts] == [(1.0, "small", 8), (6.0, "other", 8),
                                                             (11.0, "small", 8)]
    longs = [r for r in trace if r.model == "big"]
    assert len(longs) == 12 and {r.max_tokens for r in longs} == {64} and {len(r.prompt) for r in trace} == {32}
    assert all(3 <= t < 50 for r in shorts if r.model == "small" for t in r.prompt)  # within each model's vocab


def test_capacity_holds_one_model_with_its_streams_kv_never_two():
    sizes = {"big": 100 << 20, "small": 90 << 20, "other": 95 << 20}
    cap = migrate_capacity(sizes, SPEC, kv_bytes_per_token=4096)
    assert cap >= (100 << 20) + 2 * 4 * SPEC.max_model_len * 4096 and cap < (90 + 95) << 20
    with pytest.raises(ValueError, match="would hold two of them"):
        migrate_capacity({"big": 1 << 20, "small": 1 << 20, "other": 1 << 20}, SPEC, kv_bytes_per_token=4096)
    # the quick mode's models (their checkpoints' bytes) pass the check
    quick = {"solo-a": 89853312, "solo-b": 103810560, "fam-base": 89853312}
    solo_a = next(m for m in make_models("quick") if m.name == "solo-a")
    assert migrate_capacity(quick, QUICK_MIGRATE, solo_a.kv_bytes_per_token()) < 2 * 89853312


def test_deployments_let_the_popular_model_take_two_devices():
    paths = {n: ModelPaths(f"/{n}/hf", f"/{n}/ckpt") for n in ("big", "small", "other")}
    deps = {d.name: d for d in migrate_deployments(configurations()["tangram-migrate"], SPEC, paths)}
    assert deps["big"].max_instances == 2 and deps["big"].target_concurrency == 2
    assert deps["big"].keep_alive_s > SPEC.waves * SPEC.wave_gap_s  # it stays up between waves
    assert deps["small"].max_instances == 1 and deps["small"].keep_alive_s < SPEC.wave_gap_s
    assert deps["big"].engine.max_model_len == SPEC.max_model_len


def test_summary_from_hand_made_results():
    def req(model, ttft, text, error=None):
        return {"model": model, "ttft_s": ttft, "text": text, "error": error}

    runs = {"tangram": {"results": [req("big", 0.1, "a"), req("big", 0.2, "b"), req("small", 5.0, "c")],
                        "events": {"drain": 1}},
            "tangram-migrate": {"results": [req("big", 0.1, "a"), req("big", 0.3, "x"), req("small", 1.0, "c")],
                                "events": {"drain": 1, "migrate": 2}}}
    s = summarize_migrate(runs, SPEC)
    assert s["short_ttft_p50"] == {"tangram": 5.0, "tangram-migrate": 1.0}
    assert s["migrations"] == {"tangram": 0, "tangram-migrate": 2} and s["drains"]["tangram"] == 1
    assert s["outputs_identical"] == pytest.approx(2 / 3)  # the second stream's text differs
    assert s["ttft_p95"]["tangram"] == pytest.approx(0.2 + 0.9 * 4.8)
    assert s["ttft_p95_reduction"] == pytest.approx(1 - s["ttft_p95"]["tangram-migrate"] / s["ttft_p95"]["tangram"])
    runs["tangram-migrate"]["results"][0]["error"] = "engine step failed"
    s = summarize_migrate(runs, SPEC)
    assert s["failed"]["tangram-migrate"] == 1 and s["outputs_identical"] == pytest.approx(1 / 3)


def test_a_start_waiting_for_a_busy_device_gets_it_by_migration(tmp_path):
    """Both devices hold the popular model's streams; the short request's start drains one instance, and only
    with migration on do that instance's streams move (every stream's text the same in both runs)."""
    models = [transformer("big", "llama", 64, 128, 2, 4, 2, 24000, 1024, seed=41),
              transformer("small", "qwen2", 64, 128, 2, 4, 2, 24000, 1024, seed=42)]
    paths = ensure_models(models, tmp_path)
    spec = MigrateTrace("big", ("small",), waves=2, wave_gap_s=6.0, long_requests=4, long_tokens=600,
                        short_after_s=0.6, prompt_tokens=16)
    sizes = {n: read_index(p.ckpt).total_bytes for n, p in paths.items()}
    with step_progress(Console(quiet=True), 2, "migrate", False) as bar:
        rows, s, facts = migrate_section(configurations(), paths, spec, sizes, {m.name: m.vocab for m in models},
                                         models[0].kv_bytes_per_token(), seed=0, bar=bar)
    assert s["failed"] == {"tangram": 0, "tangram-migrate": 0}
    assert s["drains"]["tangram"] >= 1 and s["drains"]["tangram-migrate"] >= 1  # the start waited for room
    assert s["migrations"]["tangram"] == 0 and s["migrations"]["tangram-migrate"] >= 1
    assert s["outputs_identical"] == 1.0
    assert len(rows) == 2 * len(migrate_trace(spec, {"big": 24000, "small": 24000}, 0))
    assert facts["pool_capacity"] < sum(sizes.values())
