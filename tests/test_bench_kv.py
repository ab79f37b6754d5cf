"""`bench kv` machinery: a deterministic bursty trace, shared family checkpoints, and a tiny end-to-end run."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from tangram.bench import kv as bench_kv
from tangram.bench import kv_workload as workload
from tangram.store import read_index

PER_MODE = ("retained_bytes_mean", "cold_load_seconds", "tokens_per_second", "max_concurrent_sequences",
            "bytes_loaded", "ttft_p50", "failed")


def test_trace_is_deterministic_under_a_seed_and_bursty() -> None:
    models = workload.make_models("small")
    spec = workload.TraceSpec(300, mean_gap_s=1.0, cv=3.0, prompt_tokens=(4, 12), max_tokens=(2, 6))
    a, pop_a = workload.make_trace(models, spec, seed=3)
    b, pop_b = workload.make_trace(models, spec, seed=3)
    c, _ = workload.make_trace(models, spec, seed=4)
    assert a == b and pop_a == pop_b
    assert a != c
    times = [r.t for r in a]
    assert times == sorted(times) and len(a) == 300
    gaps = [y - x for x, y in zip([0.0, *times[:-1]], times)]
    assert workload.coefficient_of_variation(gaps) > 1.5  # bursty: Poisson arrivals would give about 1
    vocab = {m.name: m.vocab for m in models}
    assert all(4 <= len(r.prompt) <= 12 and 2 <= r.max_tokens <= 6 for r in a)
    assert all(3 <= t < vocab[r.model] for r in a for t in r.prompt)
    counts = {m: sum(r.model == m for r in a) for m in vocab}
    top = max(pop_a, key=pop_a.get)
    assert counts[top] == max(counts.values()) and counts[top] > len(a) / len(models)  # Zipf skew


def test_gamma_gaps_have_the_asked_mean_and_cv() -> None:
    import random

    gaps = workload.gamma_gaps(random.Random(0), 20_000, mean=0.5, cv=3.0)
    mean = sum(gaps) / len(gaps)
    assert 0.4 < mean < 0.6
    assert 2.4 < workload.coefficient_of_variation(gaps) < 3.6


@pytest.fixture(scope="module")
def small_models(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("kv-models")
    models = workload.make_models("small")
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


def test_small_run_json_shape(tmp_path: Path) -> None:
    out = io.StringIO()
    json_path = tmp_path / "kv.json"
    result = bench_kv.run_kv_bench(quick=True, json_path=json_path, seed=0, console=Console(file=out, width=160),
                                   small=True, workdir=tmp_path / "work", progress=False)
    doc = json.loads(json_path.read_text())
    assert set(doc) == {"bench", "device", "host", "config", "rows", "summary"}
    assert doc["bench"] == "kv" and doc["device"] == "cpu"
    summary = doc["summary"]
    assert set(summary) == {*PER_MODE, "elastic_decode_overhead", "engine_vs_transformers"}
    for key in PER_MODE:
        assert set(summary[key]) == set(bench_kv.MODES), key
        assert all(isinstance(v, (int, float)) for v in summary[key].values()), key
    assert summary["failed"] == {"elastic": 0, "reserve": 0}
    assert summary["retained_bytes_mean"]["elastic"] >= summary["retained_bytes_mean"]["reserve"]
    assert summary["bytes_loaded"]["elastic"] <= summary["bytes_loaded"]["reserve"]
    assert summary["max_concurrent_sequences"]["elastic"] > summary["max_concurrent_sequences"]["reserve"] >= 1
    assert all(v > 0 for v in summary["tokens_per_second"].values())
    assert all(v > 0 for v in summary["cold_load_seconds"].values())
    assert isinstance(summary["elastic_decode_overhead"], float)
    assert isinstance(summary["engine_vs_transformers"], float) and summary["engine_vs_transformers"] > 0
    rows = doc["rows"]
    replay = {r["mode"]: r for r in rows if r["section"] == "replay"}
    assert set(replay) == set(bench_kv.MODES)
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
