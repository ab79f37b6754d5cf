"""`tangram bench pool`: retention policies of the device pool replayed on one serverless trace.

Workload: small synthetic checkpoints (random fp16 bytes, a handful of layers
each) written with `tangram.store.save` under `workdir` (cached between runs):
two *families* (a base and three variants that differ from it in 1-2 layers,
the rest byte-identical, so the pool shares those tensors by content) plus
unrelated models of different sizes. A seeded trace of acquire/release events
(Poisson arrivals, Zipf-skewed popularity, exponential hold times, at most a
few instances active at once) is replayed on a fresh `DevicePool` of the same
capacity (about 45% of the sum of the model sizes) for each policy (tangram,
lru, lfu).

Acquires really read their missing tensors from disk through a default
`Loader()`: the acquired model's data files are dropped from the page cache
(untimed) before each acquire, so a miss costs a cold read. The pool's clock is
the trace time (deterministic retention-gain decay); load time is wall time.
Each policy replays the trace `repeats` times; the policies' replays are
interleaved event by event (order rotated per event) so that machine noise
falls on all alike, and the median total load time is reported.

Also checked (and asserted) in every run: acquiring a variant right after its
base loads exactly the variant's differing tensors.
"""

from __future__ import annotations

import heapq
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from tangram.bench.common import (
    Column,
    fmt_bytes,
    fmt_num,
    median,
    print_summary,
    print_table,
    ratio,
    result_doc,
    step_progress,
    write_result,
)
from tangram.bench.pool_workload import Workload, ensure_models, make_workload, unique_entries
from tangram.paths import data_dir
from tangram.pool import DevicePool, PoolFullError
from tangram.store import Checkpoint, Loader
from tangram.store.io import evict_from_page_cache

log = logging.getLogger(__name__)

POLICIES = ("tangram", "lru", "lfu")

# --------------------------------------------------------------------------- checks


def check_sibling_after_base(base: Path, variant: Path, capacity: int | None = None) -> dict[str, Any]:
    """Acquire `base`, release it, acquire `variant` on a fresh pool; assert only the differing bytes load.

    Returns the measured and expected numbers (AssertionError if they differ).
    """
    base_keys = unique_entries(base)
    var_keys = unique_entries(variant)
    differing = sum(n for k, n in var_keys.items() if k not in base_keys)
    shared = sum(n for k, n in var_keys.items() if k in base_keys)
    need = sum(base_keys.values()) + differing
    pool = DevicePool(capacity or 2 * need + (1 << 20), "cpu", policy="tangram", loader=Loader(), clock=lambda: 0.0)
    b = pool.acquire(base, model="base")
    pool.release(b)
    v = pool.acquire(variant, model="variant")
    pool.release(v)
    assert v.bytes_loaded == differing, f"variant after base loaded {v.bytes_loaded} bytes, differing {differing}"
    assert v.bytes_reused == shared, f"variant after base reused {v.bytes_reused} bytes, shared {shared}"
    return {"variant_bytes_loaded": v.bytes_loaded, "differing_bytes": differing, "shared_bytes": shared}


# --------------------------------------------------------------------------- replay


@dataclass
class _Clock:
    now: float = 0.0

    def __call__(self) -> float:
        return self.now


class Replayer:
    """One policy's fresh pool replaying the trace event by event (so several policies can interleave)."""

    def __init__(self, workload: Workload, paths: dict[str, Path], policy: str, *, cold: bool = True) -> None:
        self.workload, self.paths, self.policy, self.cold = workload, paths, policy, cold
        self.clock = _Clock()
        self.pool = DevicePool(workload.capacity, "cpu", policy=policy, loader=Loader(),
                               half_life_s=workload.half_life_s, clock=self.clock)
        self.files = {name: Checkpoint(p).data_files() for name, p in paths.items()}
        self.active: list[tuple[float, int, Any]] = []  # heap of (release time, seq, binding)
        self.load_s = 0.0
        self.loaded = self.reused = self.hits = self.waits = self.acquires = 0

    def _release_first(self) -> None:
        rel_t, _, binding = heapq.heappop(self.active)
        self.clock.now = max(self.clock.now, rel_t)
        self.pool.release(binding)

    def step(self, t: float, model: str, hold: float) -> None:
        """Release what ended by `t`, wait (release the earliest) while `max_active` run, then acquire `model`."""
        while self.active and self.active[0][0] <= t:
            self._release_first()
        while len(self.active) >= self.workload.max_active:
            self._release_first()
            self.waits += 1
        self.clock.now = max(self.clock.now, t)
        if self.cold:
            for f in self.files[model]:
                evict_from_page_cache(f)
        while True:
            t0 = time.perf_counter()
            try:
                binding = self.pool.acquire(self.paths[model], model=model)
            except PoolFullError:
                if not self.active:
                    raise
                self._release_first()  # wait for a release, then retry
                self.waits += 1
                continue
            self.load_s += time.perf_counter() - t0
            break
        self.acquires += 1
        self.loaded += binding.bytes_loaded
        self.reused += binding.bytes_reused
        self.hits += binding.bytes_loaded == 0
        heapq.heappush(self.active, (self.clock.now + hold, self.acquires, binding))

    def finish(self) -> dict[str, Any]:
        """Release everything still active; the totals and the end snapshot."""
        while self.active:
            self._release_first()
        snap = self.pool.snapshot()
        return {
            "policy": self.policy, "acquires": self.acquires, "hits": self.hits, "load_seconds": self.load_s,
            "bytes_loaded": self.loaded, "bytes_reused": self.reused, "waits": self.waits,
            "fragmentation_end": snap["fragmentation"], "retained_end": snap["totals"]["retained"],
            "free_end": snap["totals"]["free"], "largest_free_end": snap["largest_free"],
        }


def replay(workload: Workload, paths: dict[str, Path], policies: tuple[str, ...] = POLICIES, *,
           cold: bool = True, rotate: int = 0) -> dict[str, dict[str, Any]]:
    """Replay the trace once per policy, each on a fresh pool of the same capacity, interleaved event by event.

    Event i is applied to every policy's pool in an order rotated by i (+ `rotate`), so machine noise
    over time falls on every policy alike. Returns policy -> totals.
    """
    players = [Replayer(workload, paths, p, cold=cold) for p in policies]
    for i, (t, model, hold) in enumerate(workload.trace):
        k = (i + rotate) % len(players)
        for player in players[k:] + players[:k]:
            player.step(t, model, hold)
    return {pl.policy: pl.finish() for pl in players}


def summarize(per_rep: dict[str, list[dict[str, Any]]], sibling_checks: list[dict[str, Any]]
              ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One row per policy (counts from the first repeat, median load seconds over repeats) and the summary.

    `per_rep[policy]`: each repeat's `Replayer.finish()` totals (every policy of POLICIES); `sibling_checks`:
    the `check_sibling_after_base` results.
    """
    rows: list[dict[str, Any]] = []
    for policy in POLICIES:
        runs = per_rep[policy]
        row = dict(runs[0])
        row["load_seconds"] = median([r["load_seconds"] for r in runs])
        row["load_seconds_runs"] = [round(r["load_seconds"], 4) for r in runs]
        row["hit_ratio"] = row["hits"] / row["acquires"] if row["acquires"] else None
        row["load_gbps"] = row["bytes_loaded"] / row["load_seconds"] / 1e9 if row["load_seconds"] else None
        row["deterministic"] = all(r["bytes_loaded"] == row["bytes_loaded"] for r in runs)
        rows.append(row)
    by = {r["policy"]: r for r in rows}
    for r in rows:  # paired per repeat (the policies ran interleaved), and the deterministic bytes ratio
        r["lru_over_this_runs"] = [round(a["load_seconds"] / b["load_seconds"], 3)
                                   for a, b in zip(per_rep["lru"], per_rep[r["policy"]]) if b["load_seconds"] > 0]
        r["lru_bytes_over_this"] = ratio(by["lru"]["bytes_loaded"], r["bytes_loaded"])
    family_shared = sum(c["shared_bytes"] for c in sibling_checks)
    summary: dict[str, Any] = {
        "load_seconds": {p: round(by[p]["load_seconds"], 4) for p in POLICIES},
        "bytes_loaded": {p: by[p]["bytes_loaded"] for p in POLICIES},
        "speedup_vs_lru": ratio(by["lru"]["load_seconds"], by["tangram"]["load_seconds"]),
        "family_shared_bytes": family_shared,
        "fragmentation_end": {p: round(by[p]["fragmentation_end"], 4) for p in POLICIES},
    }
    return rows, summary


# --------------------------------------------------------------------------- the benchmark

QUICK = {"scale": 1.0, "events": 200, "repeats": 5}
FULL = {"scale": 4.0, "events": 600, "repeats": 3}

COLUMNS = [
    Column("policy", "policy", justify="left"),
    Column("load_seconds", "load s (median)", fmt_num(3)),
    Column("hits", "hits"),
    Column("hit_ratio", "hit ratio", fmt_num(2)),
    Column("bytes_loaded", "loaded", fmt_bytes),
    Column("bytes_reused", "reused", fmt_bytes),
    Column("load_gbps", "GB/s", fmt_num(2)),
    Column("waits", "waits"),
    Column("fragmentation_end", "frag end", fmt_num(3)),
]


def run_pool_bench(
    *,
    quick: bool,
    json_path: Path | None,
    workdir: Path | None = None,
    console: Console | None = None,
    progress: bool = True,
    seed: int = 0,
    scale: float | None = None,
    events: int | None = None,
    repeats: int | None = None,
) -> dict[str, Any]:
    """Run `bench pool`, print its table and summary, write the JSON when `json_path` is given, return it.

    `scale`, `events` and `repeats` override the mode's defaults (tests use tiny models and a short trace).
    """
    console = console or Console()
    mode = QUICK if quick else FULL
    scale = mode["scale"] if scale is None else scale
    n_events = events or mode["events"]
    n_rep = repeats or mode["repeats"]
    root = Path(workdir) if workdir is not None else data_dir() / "bench" / "pool"
    t_start = time.perf_counter()
    workload = make_workload(scale=scale, n_events=n_events, seed=seed)
    steps = len(workload.models) + len(workload.families()) + n_rep
    per_rep: dict[str, list[dict[str, Any]]] = {p: [] for p in POLICIES}
    with step_progress(console, steps, "bench pool", enabled=progress) as bar:
        bar.describe("checkpoints")
        paths = ensure_models(workload.models, root, step=lambda n: bar.describe(f"writing {n}"))
        bar.advance(len(workload.models))
        biggest = max((f for p in paths.values() for f in Checkpoint(p).data_files()), key=lambda f: f.stat().st_size)
        read_config = Loader().config(biggest)  # measure the read method now, not inside the first acquire
        sibling_checks = []
        for base, variants in workload.families().items():
            bar.describe(f"sibling check {base}")
            for v in variants:
                sibling_checks.append({"base": base, "variant": v, **check_sibling_after_base(paths[base], paths[v])})
            bar.advance()
        for rep in range(n_rep):
            bar.describe(f"repeat {rep + 1}/{n_rep}: {', '.join(POLICIES)} interleaved")
            for policy, totals in replay(workload, paths, POLICIES, rotate=rep).items():
                per_rep[policy].append(totals)
            bar.advance()
    rows, summary = summarize(per_rep, sibling_checks)
    unique: dict[str, int] = {}
    for p in paths.values():
        unique.update(unique_entries(p))
    config: dict[str, Any] = {
        "mode": "quick" if quick else "full", "seed": seed, "scale": scale, "events": n_events, "repeats": n_rep,
        "capacity_bytes": workload.capacity, "models_bytes": sum(m.raw_nbytes for m in workload.models),
        "unique_bytes": sum(unique.values()), "max_active": workload.max_active,
        "half_life_s": workload.half_life_s, "clock": "trace time (simulated) for retention decay; wall time for loads",
        "reads": "cold: the acquired model's data files dropped from the page cache before each acquire (untimed)",
        "read_config": {"method": read_config.method.value, "threads": read_config.threads,
                        "chunk_bytes": read_config.chunk_bytes},
        "trace": "Poisson arrivals (mean gap 1 s), Zipf(1.1) popularity, exponential hold (mean 1.5 s)",
        "load_seconds": "median over repeats of the summed wall time of every acquire",
        "models": [{"name": m.name, "bytes": m.raw_nbytes, "base": m.base, "changed_layers": list(m.changed),
                    "popularity": round(workload.popularity.get(m.name, 0.0), 4)} for m in workload.models],
        "sibling_checks": sibling_checks, "workdir": str(root),
    }
    config["seconds"] = round(time.perf_counter() - t_start, 2)
    result = result_doc("pool", "cpu", config, rows, summary)
    title = (f"bench pool: {len(workload.models)} models ({config['models_bytes'] / 1e6:.0f} MB, "
             f"{config['unique_bytes'] / 1e6:.0f} MB unique), pool {workload.capacity / 1e6:.0f} MB, "
             f"{n_events} events, {config['mode']}, medians of {n_rep}")
    print_table(console, title, COLUMNS, rows)
    print_summary(console, "summary", summary)
    if json_path is not None:
        write_result(result, json_path)
        console.print(f"wrote {json_path}")
    return result
