"""`bench load` machinery on a tiny model, one repeat: JSON shape, summary keys, every result checked."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from tangram.bench import common
from tangram.bench import load as bench_load
from tangram.bench.load_methods import Method, Target
from tangram.bench.synthetic import MODELS, SyntheticCheckpoint, ensure_checkpoint


class _BrokenPeer(Method):
    """A peer that writes garbage: the check must catch it and the benchmark must go on."""

    def __init__(self) -> None:
        super().__init__("broken_peer", "safetensors")

    def run(self, ckpt: SyntheticCheckpoint, target: Target) -> None:
        target.buffer.fill_(7)


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, str]:
    tmp = tmp_path_factory.mktemp("bench")
    mp = pytest.MonkeyPatch()
    mp.setenv("TANGRAM_HOME", str(tmp / "home"))
    original = bench_load.loader_methods

    def with_broken(formats: list[str]) -> tuple[list[Method], dict[str, str]]:
        methods, skipped = original(formats)
        return [*methods, _BrokenPeer()], skipped

    mp.setattr(bench_load, "loader_methods", with_broken)
    out = io.StringIO()
    json_path = tmp / "out" / "load.json"
    try:
        doc = bench_load.run_load_bench(
            quick=True, json_path=json_path, device="cpu", workdir=tmp / "work",
            console=Console(file=out, width=120), models=["tiny-qwen2"], repeats=1, progress=False,
        )
    finally:
        mp.undo()
    return doc, json_path, out.getvalue()


def test_json_shape(result: tuple[dict, Path, str]) -> None:
    doc, json_path, _ = result
    assert set(doc) == {"bench", "device", "host", "config", "rows", "summary"}
    assert doc["bench"] == "load" and doc["device"] == "cpu"
    assert doc["host"]["cpu_count"] >= 1 and "torch" in doc["host"]
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(doc, default=str))
    cfg = doc["config"]
    assert cfg["mode"] == "quick" and cfg["repeats"] == 1 and cfg["device"] == "cpu"
    assert cfg["models"][0]["name"] == "tiny-qwen2" and cfg["models"][0]["bytes"] > 0
    assert cfg["threads"] >= 1 and cfg["read_method"] in {"pread", "odirect", "mmap", "auto"}
    for row in doc["rows"]:
        assert {"model", "bytes", "state", "method", "seconds", "gbps", "runs"} <= set(row)


def test_summary_keys(result: tuple[dict, Path, str]) -> None:
    summary = result[0]["summary"]
    assert set(summary) == set(bench_load.SUMMARY_KEYS)
    for key in ("cold_vs_best_peer", "cold_vs_limit", "warm_vs_limit", "dram_speedup", "pool_speedup"):
        assert isinstance(summary[key], float) and summary[key] > 0, key
    for key in ("verify_overhead_cold", "verify_overhead_warm", "rehash_overhead_cold", "rehash_overhead_warm"):
        assert isinstance(summary[key], float) and summary[key] > -1, key


def test_every_method_checked(result: tuple[dict, Path, str]) -> None:
    rows = result[0]["rows"]
    loaders = [r for r in rows if r["kind"] == "loader" and r["method"] != "broken_peer"]
    names = {r["method"] for r in loaders}
    assert {"tangram", "tangram_noverify", "tangram_rehash", "safetensors", "torch_mmap"} <= names
    for r in loaders:
        assert r.get("error") is None, r
        assert r["checked"] is True and len(r["runs"]) == 1, r
    states = {(r["state"], r["method"]) for r in rows}
    assert {("cold", "tangram"), ("warm", "tangram"), ("dram", "tangram"), ("pool", "tangram")} <= states
    assert {("cold", "tangram_noverify"), ("warm", "tangram_noverify"), ("warm", "tangram_rehash")} <= states
    settings = {r["method"]: r["settings"] for r in rows if r["state"] == "cold"}
    assert settings["tangram"]["verify"] is True and settings["tangram_noverify"]["verify"] is False
    assert settings["tangram"]["reverify"] is False and settings["tangram_rehash"]["reverify"] is True
    assert {("cold", "raw_read"), ("warm", "memcpy")} <= states
    warm_loaders = [r for r in loaders if r["state"] == "warm"]
    assert warm_loaders and all(0.0 <= r["resident_min"] <= 1.0 for r in warm_loaders)  # measured before each run
    assert all(len(r["resident"]) == len(r["runs"]) and min(r["resident"]) == r["resident_min"]
               for r in warm_loaders if not r.get("error"))
    pool = [r for r in rows if r["state"] == "pool"]
    assert len(pool) == 1 and pool[0]["checked"] is True  # the re-bound pool tensors were hash-checked


def test_failing_peer_is_recorded(result: tuple[dict, Path, str]) -> None:
    doc, _, text = result
    broken = [r for r in doc["rows"] if r["method"] == "broken_peer"]
    assert broken and all("content check failed" in r["error"] and r["checked"] is False for r in broken)
    assert "tiny-qwen2" in text and "cold_vs_best_peer" in text


def test_checkpoint_cache_is_reused(tmp_path: Path) -> None:
    first = ensure_checkpoint(MODELS["tiny-qwen2"], tmp_path, formats=["tangram", "safetensors"])
    stamp = first.safetensors_path.stat().st_mtime_ns
    again = ensure_checkpoint(MODELS["tiny-qwen2"], tmp_path, formats=["safetensors"])
    assert again.safetensors_path.stat().st_mtime_ns == stamp and again.total_bytes == first.total_bytes
    index = json.loads((first.tangram_dir / "tangram.json").read_text())
    assert index["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}  # the tie is kept


def test_common_helpers(tmp_path: Path) -> None:
    assert common.median([3.0, 1.0, 2.0]) == 2.0 and common.median([]) is None
    assert common.ratio(1.0, 4.0) == 0.25 and common.ratio(None, 1.0) is None and common.ratio(1.0, 0) is None
    assert common.gbps(2_000_000_000, 2.0) == 1.0
    path = common.write_result({"bench": "x", "rows": []}, tmp_path / "a" / "r.json")
    assert json.loads(path.read_text()) == {"bench": "x", "rows": []}
    assert str(common.resolve_device("cpu")) == "cpu"


def test_summary_verify_overhead_and_peers_exclude_tangram_rows():
    def row(state: str, method: str, seconds: float, kind: str = "loader") -> dict:
        return {"model": "m", "state": state, "method": method, "kind": kind, "seconds": seconds,
                "gbps": 1.0 / seconds}

    rows = [row("cold", "tangram", 0.5), row("cold", "tangram_noverify", 0.4), row("cold", "safetensors", 1.0),
            row("warm", "tangram", 0.11), row("warm", "tangram_noverify", 0.1), row("warm", "tangram_rehash", 0.2),
            row("cold", "tangram_rehash", 0.3)]
    s = bench_load.model_summary(rows, "m")
    assert s["cold_vs_best_peer"] == 2.0  # the loaders without / with every check are Tangram, not peers
    assert abs(s["verify_overhead_cold"] - 0.25) < 1e-9 and abs(s["verify_overhead_warm"] - 0.1) < 1e-9
    assert abs(s["rehash_overhead_warm"] - 1.0) < 1e-9 and abs(s["rehash_overhead_cold"] + 0.25) < 1e-9
    assert bench_load.model_summary(rows[:1], "m")["verify_overhead_cold"] is None


def test_memory_budget_is_stated_per_phase(result: tuple[dict, Path, str]) -> None:
    doc, _, console_text = result
    budget = doc["config"]["memory_budget"]["tiny-qwen2"]
    parts = ("target", "dram_tier", "pool", "memcpy_source", "page_cache_file", "peer_host_copy")
    assert all(budget[k] > 0 for k in parts)
    assert budget["raw_read_scratch"] == 0  # plain reads land in the target
    t = budget["target"]
    assert budget["phases"] == {
        "cold": t + budget["peer_host_copy"], "warm": t + budget["page_cache_file"] + budget["peer_host_copy"],
        "dram": t + budget["dram_tier"], "pool": t + budget["pool"], "memcpy": t + budget["memcpy_source"]}
    assert budget["peak"] == max(budget["phases"].values()) < sum(budget[k] for k in parts)
    assert budget["machine"] > budget["peak"]
    assert "memory budget tiny-qwen2: peak" in console_text


def test_phase_buffers_live_only_during_their_phase(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tangram.bench.limits import Memcpy
    from tangram.bench.load_methods import PoolMethod, TangramMethod

    monkeypatch.setenv("TANGRAM_HOME", str(tmp_path / "home"))
    seen: dict[int, Method] = {}
    alive_during: list[tuple[str, str, list[str]]] = []
    real = bench_load._timed

    def timed(series, ckpt, target):  # which phase buffers are allocated while this series runs
        seen[id(series.method)] = series.method
        alive = [m.name + ":" + type(m).__name__ for m in seen.values() if m is not series.method and (
            (isinstance(m, TangramMethod) and m.cache is not None) or (isinstance(m, PoolMethod) and m.pool is not None)
            or (isinstance(m, Memcpy) and m.src is not None))]
        alive_during.append((series.state, series.method.name, alive))
        if isinstance(series.method, TangramMethod) and series.method.cached:
            assert series.method.cache is not None  # its own phase: the DRAM tier is there
        return real(series, ckpt, target)

    monkeypatch.setattr(bench_load, "_timed", timed)
    doc = bench_load.run_load_bench(quick=True, json_path=None, device="cpu", workdir=tmp_path / "work",
                                    console=Console(file=io.StringIO()), models=["tiny-qwen2"], repeats=2,
                                    progress=False)
    assert {(r["state"], r["method"]) for r in doc["rows"] if not r.get("error")} >= {
        ("dram", "tangram"), ("pool", "tangram"), ("warm", "memcpy"), ("cold", "tangram"), ("warm", "tangram")}
    assert len(alive_during) > 10
    assert all(alive == [] for _, _, alive in alive_during), [a for a in alive_during if a[2]]


def test_make_warm_leaves_only_the_methods_files_cached(tmp_path: Path) -> None:
    from tangram.bench.load_state import make_cold, make_warm
    from tangram.store.io import populate_page_cache, resident_fraction

    ckpt = ensure_checkpoint(MODELS["tiny-qwen2"], tmp_path)
    everything = [p for f in ckpt.formats for p in ckpt.files(f)]
    assert len(ckpt.formats) >= 2
    make_cold(everything)
    if max(resident_fraction(p) for p in everything) > 0.5:
        pytest.skip("this filesystem keeps evicted pages (tmpfs?)")
    for p in everything:
        populate_page_cache(p)
    mine = ckpt.files("tangram")
    make_warm(mine, ckpt)
    assert all(resident_fraction(p) == 1.0 for p in mine)
    others = [p for p in everything if p not in mine]
    assert others and all(resident_fraction(p) < 0.5 for p in others)  # the kernel's LRU keeps no stale file


def test_every_timed_warm_run_follows_a_run_of_its_own_method(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tangram.bench.load_methods import SafetensorsMethod

    monkeypatch.setenv("TANGRAM_HOME", str(tmp_path / "home"))
    calls: list[tuple[str, str]] = []  # (what ran, which series was being timed)
    timing: list[str] = [""]

    class Recording(SafetensorsMethod):
        def run(self, ckpt: SyntheticCheckpoint, target: Target) -> None:
            calls.append((self.name, timing[0]))
            super().run(ckpt, target)

    real_timed = bench_load._timed

    def timed(series, ckpt, target):
        timing[0] = f"{series.state}/{series.method.name}"
        real_timed(series, ckpt, target)

    monkeypatch.setattr(bench_load, "loader_methods", lambda formats: ([Recording()], {}))
    monkeypatch.setattr(bench_load, "_timed", timed)
    doc = bench_load.run_load_bench(quick=True, json_path=None, device="cpu", workdir=tmp_path / "work",
                                    console=Console(file=io.StringIO()), models=["tiny-qwen2"], repeats=2,
                                    progress=False)
    warm = [r for r in doc["rows"] if r["state"] == "warm" and r["method"] == "safetensors"]
    assert warm and warm[0]["checked"] and len(warm[0]["runs"]) == 2
    runs_in_warm = [c for c in calls if c == ("safetensors", "warm/safetensors")]
    runs_in_cold = [c for c in calls if c == ("safetensors", "cold/safetensors")]
    assert len(runs_in_warm) == 4 and len(runs_in_cold) == 2  # warm: a lead-in run before each timed one
