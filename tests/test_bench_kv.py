"""`bench kv` machinery: a deterministic bursty trace, shared family checkpoints, its summary from hand-made rows,
and one tiny end-to-end run."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
from models import KV_SMALL, kv_models
from rich.console import Console

from tangram.bench import kv as bench_kv
from tangram.bench import kv_workload as workload
from tangram.store import read_index
from tangram.workload import TraceShape, coefficient_of_variation, gamma_gaps

PER_MODE = ("retained_bytes_mean", "cold_load_seconds", "tokens_per_second", "max_concurrent_sequences",
            "bytes_loaded", "ttft_p50", "failed")


def test_trace_is_deterministic_under_a_seed_and_bursty() -> None:
    models = kv_models()
    spec = TraceShape(300, mean_gap_s=1.0, cv=3.0, prompt_tokens=(4, 12), max_tokens=(2, 6))
    a, pop_a = workload.make_trace(models, spec, seed=3)
    b, pop_b = workload.make_trace(models, spec, seed=3)
    c, _ = workload.make_trace(models, spec, seed=4)
    assert a == b and pop_a == pop_b
    assert a != c
    times = [r.t for r in a]
    assert times == sorted(times) and len(a) == 300
    gaps = [y - x for x, y in zip([0.0, *times[:-1]], times)]
    assert coefficient_of_variation(gaps) > 1.5  # bursty: Poisson arrivals would give about 1
    vocab = {m.name: m.vocab for m in models}
    assert all(4 <= len(r.prompt) <= 12 and 2 <= r.max_tokens <= 6 for r in a)
    assert all(3 <= t < vocab[r.model] for r in a for t in r.prompt)
    counts = {m: sum(r.model == m for r in a) for m in vocab}
    top = max(pop_a, key=pop_a.get)
    assert counts[top] == max(counts.values()) and counts[top] > len(a) / len(models)  # Zipf skew


def test_gamma_gaps_have_the_asked_mean_and_cv() -> None:
    gaps = gamma_gaps(random.Random(0), 20_000, mean=0.5, cv=3.0)
    mean = sum(gaps) / len(gaps)
    assert 0.4 < mean < 0.6
    assert 2.4 < coefficient_of_variation(gaps) < 3.6


@pytest.fixture(scope="module")
def small_models(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("kv-models")
    models = kv_models()
    return models, workload.ensure_models(models, root), root


def name_keys(ckpt: Path) -> dict[str, str]:
    """Tensor name -> content identity, aliases (equal tensors stored once) resolved."""
    index = read_index(ckpt)
    keys = {n: e.key for n, e in index.tensors.items()}
    keys.update({alias: keys[target] for alias, target in index.aliases.items()})
    return keys


def test_family_variant_shares_all_but_its_changed_layers(small_models) -> None:
    models, paths, _ = small_models
    by_name = {m.name: m for m in models}
    variant = next(m for m in models if m.base is not None)
    base_keys, var_keys = name_keys(paths[variant.base].ckpt), name_keys(paths[variant.name].ckpt)
    assert set(base_keys) == set(var_keys)
    for name, key in var_keys.items():
        changed = any(name.startswith(f"model.layers.{i}.") for i in variant.changed)
        assert (key != base_keys[name]) == changed, name
    solo = next(m for m in models if m.base is None and m.name != variant.base)
    big = {e.key for e in read_index(paths[solo.name].ckpt).tensors.values() if e.nbytes > 4096}
    assert not big & set(base_keys.values())  # unrelated weights (tiny all-ones norms may coincide)
    for m in models:  # every checkpoint has what an Instance needs
        assert (paths[m.name].ckpt / "config.json").is_file()
        assert (paths[m.name].ckpt / "tokenizer.json").is_file()
    assert by_name[variant.base].base is None


def test_cached_models_are_reused(small_models) -> None:
    models, _, root = small_models
    written: list[str] = []
    workload.ensure_models(models, root, step=written.append)
    assert written == []


def test_setup_capacity_leaves_no_room_for_all_weights_beside_a_reservation(small_models) -> None:
    models, paths, _ = small_models
    setup = workload.make_setup(models, paths, max_batch=4, block_tokens=16)
    biggest = max(setup.reserve_bytes.values())
    assert setup.unique_bytes < setup.capacity < setup.unique_bytes + biggest
    for m in models:  # but any one reserve-mode instance fits on its own
        assert sum(setup.keys[m.name].values()) + setup.reserve_bytes[m.name] <= setup.capacity


def replay_row(mode: str, **over) -> dict:
    row = {"section": "replay", "mode": mode, "requests": 4, "failed": 0, "load_seconds": 0.5, "bytes_loaded": 1000,
           "retained_mean": 300, "kv_mean": 20, "active_mean": 50, "ttft_p50": 0.25, "ttft_p95": 0.75,
           "trace_seconds": 9.0}
    return {**row, **over}


def test_summary_from_hand_made_rows() -> None:
    runs = {"elastic": [replay_row("elastic"), replay_row("elastic", load_seconds=0.7, ttft_p50=0.35, failed=1)],
            "reserve": [replay_row("reserve", retained_mean=100, kv_mean=900, bytes_loaded=3000, ttft_p50=0.5)]}
    rows = bench_kv.replay_rows(runs)
    by = {r["mode"]: r for r in rows}
    assert by["elastic"]["load_seconds"] == pytest.approx(0.6) and by["elastic"]["load_seconds_runs"] == [0.5, 0.7]
    assert by["elastic"]["failed"] == 1 and by["elastic"]["ttft_p50"] == pytest.approx(0.3)
    assert by["reserve"]["retained_mean"] == 100 and isinstance(by["reserve"]["retained_mean"], int)
    rows += [{"section": "throughput", "engine": "elastic", "tokens_per_second": 90.123},
             {"section": "throughput", "engine": "reserve", "tokens_per_second": 100.0},
             {"section": "concurrency", "mode": "elastic", "peak_running": 12},
             {"section": "concurrency", "mode": "reserve", "peak_running": 3}]
    summary = bench_kv.summarize(rows, {"elastic_over_reserve": 0.9, "elastic_over_transformers": 1.75})
    assert set(summary) == {*PER_MODE, "elastic_decode_overhead", "engine_vs_transformers"}
    for key in PER_MODE:
        assert set(summary[key]) == set(bench_kv.MODES), key
    assert summary["retained_bytes_mean"] == {"elastic": 300, "reserve": 100}
    assert summary["cold_load_seconds"] == {"elastic": 0.6, "reserve": 0.5}
    assert summary["tokens_per_second"] == {"elastic": 90.12, "reserve": 100.0}
    assert summary["max_concurrent_sequences"] == {"elastic": 12, "reserve": 3}
    assert summary["bytes_loaded"] == {"elastic": 1000, "reserve": 3000}
    assert summary["ttft_p50"] == {"elastic": 0.3, "reserve": 0.5} and summary["failed"] == {"elastic": 1, "reserve": 0}
    assert summary["elastic_decode_overhead"] == 0.1 and summary["engine_vs_transformers"] == 1.75


def test_unknown_parameters_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown bench kv parameters.*requets"):
        bench_kv.run_kv_bench(quick=True, json_path=None, params={"requets": 3}, workdir=tmp_path, progress=False)
    assert not any(tmp_path.iterdir())  # refused before any work


def test_small_run(tmp_path: Path) -> None:
    out = io.StringIO()
    json_path = tmp_path / "kv.json"
    result = bench_kv.run_kv_bench(quick=True, json_path=json_path, seed=0, console=Console(file=out, width=160),
                                   params=KV_SMALL, models=kv_models(), workdir=tmp_path / "work", progress=False)
    doc = json.loads(json_path.read_text())
    assert set(doc) == {"bench", "device", "host", "config", "rows", "summary"}
    assert doc["bench"] == "kv" and doc["device"] == "cpu"
    summary = doc["summary"]
    assert set(summary) == {*PER_MODE, "elastic_decode_overhead", "engine_vs_transformers"}
    assert summary["failed"] == {"elastic": 0, "reserve": 0}
    assert summary["retained_bytes_mean"]["elastic"] >= summary["retained_bytes_mean"]["reserve"]
    assert summary["bytes_loaded"]["elastic"] <= summary["bytes_loaded"]["reserve"]
    assert summary["max_concurrent_sequences"]["elastic"] > summary["max_concurrent_sequences"]["reserve"] >= 1
    assert all(v > 0 for v in summary["tokens_per_second"].values())
    assert all(v > 0 for v in summary["cold_load_seconds"].values())
    assert summary["engine_vs_transformers"] > 0
    rows = doc["rows"]
    replay = {r["mode"]: r for r in rows if r["section"] == "replay"}
    n = doc["config"]["trace"]["requests"]
    for r in replay.values():
        assert r["requests"] == n and r["failed"] == 0
        assert r["starts"] >= 1 and r["starts_cold"] >= 1
        assert r["starts_cold"] + r["starts_dram"] + r["starts_pool_hit"] == r["starts"]
        assert r["ttft_p50"] is not None and r["ttft_p50"] > 0
    assert replay["reserve"]["kv_mean"] > replay["elastic"]["kv_mean"]
    assert {r["engine"] for r in rows if r["section"] == "throughput"} == {"elastic", "reserve", "transformers"}
    conc = {r["mode"]: r for r in rows if r["section"] == "concurrency"}
    assert all(c["peak_running"] == c["bound"] for c in conc.values())
    tp = doc["config"]["throughput"]
    assert tp["outputs_equal_elastic_reserve"] and tp["outputs_match_transformers"]
    assert result["summary"] == summary
    assert "bench kv" in out.getvalue()
