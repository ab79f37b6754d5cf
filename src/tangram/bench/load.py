"""`tangram bench load`: checkpoint bytes into device memory, Tangram against its peers and the limits.

Protocol (see docs/benchmarks.md, "bench load"): synthetic checkpoints with real model
shapes; every loader fills the same pre-touched device buffer and is checked
against the index hashes outside the timed region; states `cold` (the method's
files evicted with POSIX_FADV_DONTNEED before each run), `warm` (files read
through the page cache just before each run, the checkpoint's other files evicted first so that
the kernel's LRU cannot drop the fresh pages, then one untimed lead-in run of the method itself,
so that no timed warm run follows another method's), `dram` (Tangram's host cache holds
the checkpoint); limits `raw_read` (best plain cold read of the same bytes) and
`memcpy` (plain host copy of the same bytes), plus `h2d_pinned` on CUDA.
Repeats are repeat-major, the method order shuffled each repeat (seeded), so drift
on a shared machine hits every method alike and no method always runs right after
the same one; numbers are medians. Warm rows record the smallest page-cache
residency of the method's files seen just before a timed run (`resident_min`). Tangram's loader
checks every tensor it reads against its hash, except bytes this process
verified before in a file unchanged since (store/verified.py: the row `tangram`,
as a long-lived server loads); the row `tangram_rehash` hashes every read (a
process's first load of a file), `tangram_noverify` none, all in the same run.
`verify_overhead_*` / `rehash_overhead_*` (cold, warm) are the time of `tangram` /
`tangram_rehash` over the time of `tangram_noverify`, minus 1.
"""

from __future__ import annotations

import gc
import logging
import random
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from tangram.bench.common import (
    Column, StepProgress, fmt_num, gbps, median, package_versions, print_summary, print_table, ratio,
    resolve_device, result_doc, step_progress, write_result,
)
from tangram.bench.limits import H2DPinned, Limit, Memcpy, RawRead, raw_read_variants
from tangram.bench.load_state import make_cold, make_warm, memory_budget
from tangram.bench.load_methods import Method, PoolMethod, TangramMethod, Target, loader_methods
from tangram.bench.synthetic import MODELS, SyntheticCheckpoint, ensure_checkpoint
from tangram.paths import data_dir
from tangram.store import Checkpoint
from tangram.store.io import odirect_supported, resident_fraction

log = logging.getLogger(__name__)

FULL_MODELS = ("qwen2-0.5b", "qwen2-1.5b", "qwen2.5-3b")
QUICK_MODELS = ("qwen2-0.5b-2l",)
FULL_REPEATS = 5
QUICK_REPEATS = 3
SUMMARY_KEYS = ("cold_vs_best_peer", "cold_vs_limit", "warm_vs_limit", "pool_speedup", "dram_speedup",
                "verify_overhead_cold", "verify_overhead_warm", "rehash_overhead_cold", "rehash_overhead_warm")
PEER_PACKAGES = ("safetensors", "fastsafetensors", "runai-model-streamer", "tensorizer", "transformers")


class _Series:
    """The timed runs of one (model, state, method)."""

    def __init__(self, model: str, state: str, method: Method, nbytes: int) -> None:
        self.model, self.state, self.method, self.nbytes = model, state, method, nbytes
        self.runs: list[float] = []
        self.resident: list[float] = []  # warm: the files' page-cache residency before each run
        self.error: str | None = None
        self.checked: bool | None = True if method.kind == "loader" else None

    def row(self) -> dict[str, Any]:
        sec = median(self.runs)
        row: dict[str, Any] = {
            "model": self.model, "bytes": self.nbytes, "state": self.state, "method": self.method.name,
            "kind": self.method.kind, "seconds": sec, "gbps": gbps(self.nbytes, sec),
            "runs": [round(r, 6) for r in self.runs], "checked": self.checked if not self.error else False,
            "settings": dict(self.method.settings),
        }
        if self.resident:
            row["resident_min"] = round(min(self.resident), 4)
            row["resident"] = [round(r, 4) for r in self.resident]
        if self.error:
            row["error"] = self.error
        return row


def _timed(series: _Series, ckpt: SyntheticCheckpoint, target: Target) -> None:
    """One measured run of `series`: prepare the state, time the load, check the bytes."""
    if series.error:
        return
    m = series.method
    try:
        if m.kind == "loader":
            target.clear()
        if series.state == "cold":
            make_cold(m.files(ckpt))
        elif series.state == "warm" and m.kind == "loader":
            make_warm(m.files(ckpt), ckpt)
            # An untimed lead-in run of the method itself: right after tensorizer or fastsafetensors, any
            # warm load ran 25-45% slower (a 2 s pause did not help, a run of itself did: docs/store.md).
            m.run(ckpt, target)
            m.finish()
            target.clear()
            series.resident.append(min((resident_fraction(p) for p in m.files(ckpt)), default=1.0))
        gc.collect()
        gc.disable()
        try:
            target.sync()
            t0 = time.perf_counter()
            m.run(ckpt, target)
            target.sync()
            elapsed = time.perf_counter() - t0
        finally:
            gc.enable()
        if m.kind == "loader":
            bad = m.result(target).mismatches()
            if bad:
                raise RuntimeError(f"content check failed: {len(bad)} tensors differ from the index (first {bad[0]!r})")
        m.finish()
        series.runs.append(elapsed)
    except Exception as exc:  # noqa: BLE001 - a failing peer is recorded, the benchmark goes on
        series.error = f"{type(exc).__name__}: {exc}"
        log.warning("%s %s %s failed: %s", series.model, series.state, m.name, series.error)
        log.debug("%s", traceback.format_exc())


def _bench_model(
    ckpt: SyntheticCheckpoint, device: torch.device, repeats: int, bar: StepProgress, config: dict[str, Any]
) -> list[dict[str, Any]]:
    """All states and methods of one model; returns its rows."""
    index = Checkpoint(ckpt.tangram_dir).index
    target = Target.create(index, device)
    methods, skipped = loader_methods(ckpt.formats)
    config["skipped"] = skipped
    nbytes = index.total_bytes
    data_files = [p for p in ckpt.files("tangram") if p.suffix == ".bin"]
    raws = raw_read_variants(bool(data_files) and odirect_supported(data_files[0]))
    limits_warm: list[Method] = [Memcpy()] + ([H2DPinned()] if device.type == "cuda" else [])
    dram = TangramMethod(cache=True)

    cold = [_Series(ckpt.name, "cold", m, nbytes) for m in methods]
    warm = [_Series(ckpt.name, "warm", m, nbytes) for m in methods]
    dram_s = _Series(ckpt.name, "dram", dram, nbytes)
    pool_s = _Series(ckpt.name, "pool", PoolMethod(), nbytes)
    raw_s = [_Series(ckpt.name, "cold", r, sum(p.stat().st_size for p in data_files)) for r in raws]
    warm_limits = [_Series(ckpt.name, "warm", m, nbytes) for m in limits_warm]
    everything = cold + warm + [dram_s, pool_s] + raw_s + warm_limits
    # Buffers of their own (DRAM tier, pool arena, memcpy source) exist only during their phase of each
    # repeat, so they never take the page cache a warm run needs; raw reads land in the target.
    scoped = [dram_s, pool_s, *warm_limits]
    prepared = cold + raw_s + scoped
    bar.add_total(len(prepared) + repeats * len(everything))

    # Untimed: a first run of every loader (imports, library start-up, the store's read-method probe) and checks.
    for s in prepared:
        bar.describe(f"{ckpt.name}: prepare {s.method.name}")
        _prepare(s, ckpt, target, warm)
        if s in scoped:
            s.method.release()
        bar.advance()
    gc.collect()
    config.setdefault("memory_budget", {})[ckpt.name] = memory_budget(ckpt, target, raws, nbytes)

    # Everything alive now (torch, the peers' modules) moves out of the collector's sight, so the
    # gc.collect() before each timed run costs microseconds instead of ~0.15 s.
    gc.collect()
    gc.freeze()
    try:
        for rep in range(repeats):
            for phase in (cold + raw_s, warm, [dram_s], [pool_s], warm_limits):
                own = [s for s in phase if s in scoped and not s.error]
                for s in own:
                    bar.describe(f"{ckpt.name}: {s.state} {s.method.name}: set up ({rep + 1}/{repeats})")
                    _prepare(s, ckpt, target, [])
                order = list(phase)
                random.Random(f"{ckpt.name}/{rep}/{len(phase)}").shuffle(order)  # no fixed predecessor
                for s in order:
                    bar.describe(f"{ckpt.name}: {s.state} {s.method.name} ({rep + 1}/{repeats})")
                    _timed(s, ckpt, target)
                    bar.advance()
                for s in own:
                    s.method.release()
                if own:
                    gc.collect()  # a dropped pool is freed only by the collector (reference cycles)
    finally:
        gc.unfreeze()
        for r in raws:
            r.close()
    config.setdefault("tangram", {}).update(methods[0].settings if methods and methods[0].name == "tangram" else {})
    config["methods"] = {m.name: m.settings for m in methods}
    rows = [s.row() for s in everything]
    best = _best_raw(raw_s)
    if best is not None:
        row = best.row()
        row.update(method="raw_read", variant=best.method.name)
        rows.append(row)
    return rows


def _prepare(s: _Series, ckpt: SyntheticCheckpoint, target: Target, warm: list[_Series]) -> None:
    """Untimed set-up of one series (a cold loader also makes a checked first run); a failure is recorded
    on it and on the warm series of the same method."""
    try:
        if isinstance(s.method, RawRead):
            s.method.prepare(ckpt, target, target.buffer)  # plain reads land in the target (cleared before loads)
        elif isinstance(s.method, Limit):
            s.method.prepare(ckpt, target, None)
        else:
            s.method.prepare(ckpt, target)
            if s.state == "cold":
                target.clear()
                s.method.run(ckpt, target)
                if target.mismatches():
                    raise RuntimeError("content check failed on the warm-up run")
    except Exception as exc:  # noqa: BLE001
        s.error = f"{type(exc).__name__}: {exc}"
        log.warning("%s: %s failed to start: %s", ckpt.name, s.method.name, s.error)
        for w in warm:
            if w.method is s.method:
                w.error = s.error


def _best_raw(raw_s: list[_Series]) -> _Series | None:
    ok = [s for s in raw_s if s.runs and not s.error]
    return min(ok, key=lambda s: median(s.runs) or float("inf")) if ok else None


def _find(rows: list[dict[str, Any]], model: str, state: str, method: str) -> dict[str, Any] | None:
    for r in rows:
        if r["model"] == model and r["state"] == state and r["method"] == method and not r.get("error"):
            return r
    return None


def model_summary(rows: list[dict[str, Any]], model: str) -> dict[str, Any]:
    """The headline ratios of one model (None where an input is missing)."""
    t_cold = _find(rows, model, "cold", "tangram")
    t_warm = _find(rows, model, "warm", "tangram")
    t_dram = _find(rows, model, "dram", "tangram")
    t_pool = _find(rows, model, "pool", "tangram")
    raw = _find(rows, model, "cold", "raw_read")
    mem = _find(rows, model, "warm", "memcpy")
    peers = [r for r in rows if r["model"] == model and r["state"] == "cold" and r["kind"] == "loader"
             and not r["method"].startswith("tangram") and not r.get("error") and r["gbps"]]
    best_peer = max(peers, key=lambda r: r["gbps"]) if peers else None
    g = lambda r: r["gbps"] if r else None  # noqa: E731
    return {
        "cold_vs_best_peer": ratio(g(t_cold), g(best_peer)),
        "cold_vs_limit": ratio(g(t_cold), g(raw)),
        "warm_vs_limit": ratio(g(t_warm), g(mem)),
        "pool_speedup": ratio(t_cold["seconds"] if t_cold else None, t_pool["seconds"] if t_pool else None),
        "dram_speedup": ratio(t_cold["seconds"] if t_cold else None, t_dram["seconds"] if t_dram else None),
        "verify_overhead_cold": _overhead(rows, model, "cold"),
        "verify_overhead_warm": _overhead(rows, model, "warm"),
        "rehash_overhead_cold": _overhead(rows, model, "cold", "tangram_rehash"),
        "rehash_overhead_warm": _overhead(rows, model, "warm", "tangram_rehash"),
    }


def _overhead(rows: list[dict[str, Any]], model: str, state: str, method: str = "tangram") -> float | None:
    """Time of Tangram's loader as `method` checks hashes over its time without the check, minus 1 (same run,
    medians)."""
    on, off = _find(rows, model, state, method), _find(rows, model, state, "tangram_noverify")
    r = ratio(on["seconds"] if on else None, off["seconds"] if off else None)
    return None if r is None else r - 1.0


COLUMNS = [
    Column("state", "state", justify="left"), Column("method", "method", justify="left"),
    Column("seconds", "median s", fmt_num(3)), Column("gbps", "GB/s", fmt_num(2)), Column("n", "runs"),
    Column("check", "check", justify="left"),
]


def _display_rows(rows: list[dict[str, Any]], model: str) -> list[dict[str, Any]]:
    """One model's rows for the console: raw-read variants folded into the best one, fastest first per state."""
    out = []
    for r in rows:
        if r["model"] != model or (r["method"].startswith("raw_read[") and r.get("error") is None):
            continue
        check = "error: " + r["error"][:40] if r.get("error") else ("ok" if r["checked"] else "limit")
        variant = r.get("variant", "")
        method = r["method"] + (f" {variant[len('raw_read'):]}" if variant else "")
        out.append({**r, "n": len(r["runs"]), "check": check, "method": method})
    order = {"cold": 0, "warm": 1, "dram": 2, "pool": 3}
    return sorted(out, key=lambda r: (order.get(r["state"], 9), r["kind"] != "loader", -(r["gbps"] or 0)))


def run_load_bench(
    *,
    quick: bool,
    json_path: Path | None,
    device: str = "auto",
    workdir: Path | None = None,
    console: Console | None = None,
    models: Sequence[str] | None = None,
    repeats: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run `bench load`, print its table and summary, write the JSON when `json_path` is given, return it.

    `models` and `repeats` override the mode's defaults (tests use a tiny model and one repeat).
    Synthetic checkpoints are generated once under `workdir` (default `<data dir>/bench`).
    """
    console = console or Console()
    dev = resolve_device(device)
    names = list(models or (QUICK_MODELS if quick else FULL_MODELS))
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise ValueError(f"unknown benchmark models {unknown}; known: {sorted(MODELS)}")
    n_rep = repeats or (QUICK_REPEATS if quick else FULL_REPEATS)
    root = Path(workdir) if workdir is not None else data_dir() / "bench"
    t_start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    config: dict[str, Any] = {
        "mode": "quick" if quick else "full", "device": str(dev), "repeats": n_rep, "models": [],
        "states": ["cold", "warm", "dram", "pool"],
        "pool": "re-acquire of a released model from Tangram's device pool (tensors retained: a re-bind)",
        "order": "repeat-major; methods shuffled each repeat (seeded); medians",
        "cold": "posix_fadvise(DONTNEED) of the method's files before each run",
        "warm": "the method's files read through the page cache before each run, the other formats' evicted first, "
                "then one untimed lead-in run of the method itself",
        "check": "xxh3-128 of every tensor in the device buffer against the index, after every run (untimed)",
        "versions": package_versions(PEER_PACKAGES), "workdir": str(root),
    }
    with step_progress(console, 0, "bench load", enabled=progress) as bar:
        for name in names:
            bar.describe(f"{name}: synthetic checkpoint")
            t0 = time.perf_counter()
            ckpt = ensure_checkpoint(MODELS[name], root, step=lambda label, n=name: bar.describe(f"{n}: writing {label}"))
            model_cfg: dict[str, Any] = {
                "name": name, "bytes": ckpt.total_bytes, "tensors": ckpt.tensors, "formats": ckpt.formats,
                "files_bytes": {f: sum(p.stat().st_size for p in ckpt.files(f)) for f in ckpt.formats},
                "prepare_seconds": round(time.perf_counter() - t0, 2),
            }
            config["models"].append(model_cfg)
            rows += _bench_model(ckpt, dev, n_rep, bar, config)
    tangram_cfg = config.pop("tangram", {})
    config["threads"] = tangram_cfg.get("threads")
    config["read_method"] = tangram_cfg.get("method")
    config["chunk_bytes"] = tangram_cfg.get("chunk_bytes")
    headline = names[0]
    summary: dict[str, Any] = model_summary(rows, headline)
    if len(names) > 1:
        summary["by_model"] = {n: model_summary(rows, n) for n in names}
    config["headline_model"] = headline
    config["seconds"] = round(time.perf_counter() - t_start, 2)
    result = result_doc("load", dev, config, rows, summary)
    for m in config["models"]:
        title = f"bench load: {m['name']} ({m['bytes'] / 1e9:.2f} GB), {dev}, {config['mode']}, medians of {n_rep}"
        print_table(console, title, COLUMNS, _display_rows(rows, m["name"]))
    for name, b in config.get("memory_budget", {}).items():
        over = " (over the machine's memory: warm runs may read from disk)" if b["machine"] and b["peak"] > b["machine"] else ""
        per = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in b["phases"].items())
        console.print(f"memory budget {name}: peak {b['peak'] / 1e9:.1f} GB of {b['machine'] / 1e9:.1f} GB "
                      f"(per phase: {per}; buffers of a phase are freed after it){over}")
    print_summary(console, f"summary ({headline})", summary)
    if json_path is not None:
        write_result(result, json_path)
        console.print(f"wrote {json_path}")
    return result
