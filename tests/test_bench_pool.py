"""`bench pool` machinery on tiny models and a short trace: determinism, sibling exactness, the summary from
hand-made totals, and one tiny end-to-end run."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from tangram.bench import pool as bench_pool
from tangram.bench import pool_workload as workload
from tangram.pool import DevicePool
from tangram.store import Loader

TINY_SCALE = 1 / 64  # models of about 0.1-0.5 MB


def test_workload_is_deterministic_under_a_seed() -> None:
    a = workload.make_workload(scale=TINY_SCALE, n_events=50, seed=3)
    b = workload.make_workload(scale=TINY_SCALE, n_events=50, seed=3)
    c = workload.make_workload(scale=TINY_SCALE, n_events=50, seed=4)
    assert a.trace == b.trace and a.models == b.models and a.capacity == b.capacity
    assert a.trace != c.trace
    times = [t for t, _, _ in a.trace]
    assert times == sorted(times) and len(a.trace) == 50
    fams = a.families()
    assert len(fams) == 2 and all(len(v) == 3 for v in fams.values())
    assert a.capacity < sum(m.raw_nbytes for m in a.models) // 2


def test_model_contents_are_deterministic_and_variants_share_with_base() -> None:
    models = workload.make_models(TINY_SCALE, seed=0)
    by_name = {m.name: m for m in models}
    s1 = workload.model_state(by_name["fam-a-v1"], by_name)
    s2 = workload.model_state(by_name["fam-a-v1"], by_name)
    base = workload.model_state(by_name["fam-a-base"], by_name)
    assert all(torch.equal(s1[k].view(torch.uint8), s2[k].view(torch.uint8)) for k in s1)
    changed = by_name["fam-a-v1"].changed
    for name, t in s1.items():
        same = torch.equal(t.view(torch.uint8), base[name].view(torch.uint8))
        in_changed = any(name.startswith(f"model.layers.{i}.") for i in changed)
        assert same != in_changed, name


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], list]:
    root = tmp_path_factory.mktemp("pool-ckpts")
    models = workload.make_models(TINY_SCALE, seed=0)
    return workload.ensure_models(models, root), models


def test_sibling_after_base_reads_exactly_the_differing_bytes(tiny_paths) -> None:
    paths, models = tiny_paths
    for m in models:
        if m.base is None:
            continue
        base_keys = workload.unique_entries(paths[m.base])
        var_keys = workload.unique_entries(paths[m.name])
        differing = {k: n for k, n in var_keys.items() if k not in base_keys}
        assert len(differing) == 2 * len(m.changed)  # attn + mlp of each changed layer
        pool = DevicePool(4 << 20, "cpu", loader=Loader(), clock=lambda: 0.0)
        b = pool.acquire(paths[m.base], model=m.base)
        pool.release(b)
        v = pool.acquire(paths[m.name], model=m.name)
        assert v.bytes_loaded == sum(differing.values())
        assert v.bytes_reused == sum(n for k, n in var_keys.items() if k in base_keys)
        pool.release(v)
        out = bench_pool.check_sibling_after_base(paths[m.base], paths[m.name])
        assert out["variant_bytes_loaded"] == out["differing_bytes"] == sum(differing.values())


def test_cached_checkpoints_are_reused(tiny_paths) -> None:
    paths, models = tiny_paths
    root = next(iter(paths.values())).parent
    written: list[str] = []
    workload.ensure_models(models, root, step=written.append)
    assert written == []


def totals(policy: str, load_s: float, loaded: int, **over) -> dict:
    t = {"policy": policy, "acquires": 10, "hits": 4, "load_seconds": load_s, "bytes_loaded": loaded,
         "bytes_reused": 500, "waits": 1, "fragmentation_end": 0.25, "retained_end": 0, "free_end": 0,
         "largest_free_end": 0}
    return {**t, **over}


def test_summary_from_hand_made_totals() -> None:
    per_rep = {"tangram": [totals("tangram", 1.0, 100), totals("tangram", 3.0, 100)],
               "lru": [totals("lru", 4.0, 400), totals("lru", 6.0, 400, hits=9)],
               "lfu": [totals("lfu", 2.0, 200), totals("lfu", 2.0, 250)]}
    checks = [{"shared_bytes": 70}, {"shared_bytes": 30}]
    rows, summary = bench_pool.summarize(per_rep, checks)
    assert set(summary) == {"load_seconds", "bytes_loaded", "speedup_vs_lru", "family_shared_bytes",
                            "fragmentation_end"}
    assert summary["load_seconds"] == {"tangram": 2.0, "lru": 5.0, "lfu": 2.0}  # medians over repeats
    assert summary["bytes_loaded"] == {"tangram": 100, "lru": 400, "lfu": 200}  # the first repeat's
    assert summary["speedup_vs_lru"] == 2.5 and summary["family_shared_bytes"] == 100
    assert summary["fragmentation_end"] == {p: 0.25 for p in bench_pool.POLICIES}
    by = {r["policy"]: r for r in rows}
    assert [r["policy"] for r in rows] == list(bench_pool.POLICIES)
    assert by["lru"]["hits"] == 4 and by["tangram"]["hit_ratio"] == 0.4
    assert by["tangram"]["load_gbps"] == pytest.approx(100 / 2.0 / 1e9)
    assert by["tangram"]["deterministic"] and not by["lfu"]["deterministic"]
    assert by["tangram"]["lru_over_this_runs"] == [4.0, 2.0] and by["tangram"]["lru_bytes_over_this"] == 4.0


def test_tiny_run(tmp_path: Path) -> None:
    out = io.StringIO()
    console = Console(file=out, width=140)
    json_path = tmp_path / "pool.json"
    result = bench_pool.run_pool_bench(quick=True, json_path=json_path, workdir=tmp_path / "work", console=console,
                                       progress=False, scale=TINY_SCALE, events=30, repeats=1)
    doc = json.loads(json_path.read_text())
    assert set(doc) == {"bench", "device", "host", "config", "rows", "summary"}
    assert doc["bench"] == "pool" and doc["device"] == "cpu"
    summary = doc["summary"]
    assert all(summary["bytes_loaded"][p] > 0 for p in bench_pool.POLICIES)
    assert all(summary["load_seconds"][p] > 0 for p in bench_pool.POLICIES)
    assert all(0.0 <= summary["fragmentation_end"][p] <= 1.0 for p in bench_pool.POLICIES)
    assert summary["family_shared_bytes"] > 0
    assert isinstance(summary["speedup_vs_lru"], float)
    rows = {r["policy"]: r for r in doc["rows"]}
    assert set(rows) == set(bench_pool.POLICIES)
    for r in rows.values():
        assert r["acquires"] == 30 and 0 <= r["hits"] <= 30
        assert r["bytes_loaded"] + r["bytes_reused"] > 0
    checks = doc["config"]["sibling_checks"]
    assert len(checks) == 6 and all(c["variant_bytes_loaded"] == c["differing_bytes"] for c in checks)
    assert result["summary"] == summary
    assert "bench pool" in out.getvalue()
