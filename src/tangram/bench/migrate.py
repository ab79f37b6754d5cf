"""`tangram bench migrate`: live migration of running streams between two devices, token by token against twins.

Each request (SmolLM2-135M, the demo checkpoint; 64-256 tokens, greedy and
seeded sampling) runs twice on a controller over two devices: once unmoved
(its twin), once migrated to the other device after a third of its tokens
(`Controller.migrator.migrate`, as `tangram migrate` does). Quick mode: two
logical CPU devices in this process; full mode: two loopback Ray nodes, one
worker actor each. The client is the controller's own stream (what the API
streams), timed at each output.

Summary: `tokens_lost`, `tokens_duplicated` (against the twin's ids),
`outputs_identical` (fraction of the migrated streams equal to their twin, ids
and text; a stream that ended before its move is not counted),
`pause_ms_p50` / `_p95` (per migrated stream, the longest gap between two
tokens from the migration call to the first token after the handover),
`normal_gap_ms_p50` / `_p95` (the longest gap over the same token positions of
the twin), `migration_bytes_per_request` (every round pickled, mean); also
`handover_gap_ms_p50` / `_p95`: the gap across the handover itself (the source's
last token to the destination's first). Logical CPU devices share the same
cores: the destination's prefill slows the source's decode during the rounds,
which real separate devices would not.
"""

from __future__ import annotations

import asyncio
import difflib
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console

from tangram.bench.common import Column, fmt_num, print_summary, print_table, ratio, result_doc, write_result
from tangram.control import Controller, Deployment
from tangram.engine import EngineConfig, SamplingParams
from tangram.workload.stats import percentile

log = logging.getLogger(__name__)
PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle. Once upon a time,"
QUICK = {"lengths": (64, 128), "seeds": (1,), "ray": False}
FULL = {"lengths": (64, 128, 192, 256), "seeds": (1, 2), "ray": True}
POOL_BYTES = 1 << 30


def _cases(mode: dict[str, Any]) -> list[tuple[str, int, SamplingParams]]:
    cases = []
    for n in mode["lengths"]:
        cases.append(("greedy", n, SamplingParams(max_tokens=n, ignore_eos=True)))
        cases += [("seeded", n, SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.8, top_p=0.95, seed=s))
                  for s in mode["seeds"]]
    return cases


@contextmanager
def _workers(ray_nodes: bool) -> Iterator[list]:
    """Two devices: logical CPU devices here, or one worker actor on each of two loopback Ray nodes."""
    if not ray_nodes:
        from tangram.worker import Worker

        yield [Worker(0, "cpu", POOL_BYTES), Worker(1, "cpu", POOL_BYTES)]
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray.cluster_utils import Cluster

    from tangram.cluster import RayCluster
    from tangram.control import ServeConfig

    node = dict(num_cpus=1, object_store_memory=128 << 20, node_ip_address="127.0.0.1")
    cluster = Cluster(initialize_head=True, head_node_args=dict(include_dashboard=False, **node))
    cluster.add_node(**node)
    ray.init(address=cluster.address, logging_level="WARNING")
    placed = None
    try:
        placed = RayCluster.connect(ServeConfig(pool_capacity=POOL_BYTES), cluster.address)
        yield placed.workers
    finally:
        if placed is not None:
            placed.close()
        ray.shutdown()
        cluster.shutdown()


async def _stream(ctl: Controller, prompt: str | list[int], params: SamplingParams,
                  move_after: int | None) -> dict[str, Any]:
    """One request through the controller: ids, text and arrival times; with `move_after`, migrated then."""
    ids: list[int] = []
    times: list[float] = []
    text = ""
    move: asyncio.Future | None = None
    began = ended = None
    async for out in ctl.generate("m", prompt, params):
        now = time.perf_counter()
        for tok in out.token_ids:
            ids.append(tok)
            times.append(now)
        text += out.delta
        if move_after is not None and move is None and len(ids) >= move_after:
            status = await ctl.status_now()
            here = next(w["worker"] for w in status["workers"] if any(i["inflight"] for i in w["instances"]))
            to = next(w.name for w in ctl.workers if w.name != here)
            began = time.perf_counter()
            move = asyncio.ensure_future(ctl.migrator.migrate("m", to=to))
        if move is not None and ended is None and move.done():
            ended = time.perf_counter()
    report = await move if move is not None else None
    return {"ids": ids, "times": times, "text": text, "report": report, "began": began,
            "ended": ended or time.perf_counter()}


def _window(run: dict[str, Any]) -> tuple[int, int]:
    """Token positions of a migration: the first after the call, the first after the handover."""
    times, began, ended = run["times"], run["began"], run["ended"]
    first = next((i for i, t in enumerate(times) if t > began), len(times) - 1)
    last = next((i for i, t in enumerate(times) if t >= ended), len(times) - 1)
    return max(1, first), max(first, last)


def _longest_gap_ms(times: list[float], lo: int, hi: int) -> float | None:
    gaps = [times[i] - times[i - 1] for i in range(lo, min(hi, len(times) - 1) + 1) if i >= 1]
    return max(gaps) * 1e3 if gaps else None


def _handover_gap_ms(times: list[float], moves: list[dict[str, Any]]) -> float | None:
    """The gap between the source's last token and the destination's first (the handover itself)."""
    done = [m for m in moves if m["outcome"] == "moved"]
    at = done[0]["tokens_sent"] if done else None
    return (times[at] - times[at - 1]) * 1e3 if at is not None and 0 < at < len(times) else None


def _diff(twin: list[int], got: list[int]) -> tuple[int, int]:
    """Tokens of the twin missing from the migrated stream, and extra ones in it."""
    matched = sum(b.size for b in difflib.SequenceMatcher(a=twin, b=got, autojunk=False).get_matching_blocks())
    return len(twin) - matched, len(got) - matched


async def _measure(workers: list, ckpt: Path, cases: list, prompt: str | list[int]) -> list[dict[str, Any]]:
    ctl = Controller(workers)
    await ctl.deploy(Deployment(name="m", checkpoint=str(ckpt), max_instances=2, keep_alive_s=3600,
                                engine=EngineConfig()))
    rows = []
    try:
        await _stream(ctl, prompt, SamplingParams(max_tokens=8), None)  # warm-up: the first instance starts
        status = await ctl.status_now()
        empty = next(w["worker"] for w in status["workers"] if not w["instances"])
        await ctl.migrator.migrate("m", to=empty)  # nothing runs: this starts the second instance, moves nothing
        warm = SamplingParams(max_tokens=16, ignore_eos=True)  # two at once: one runs on each instance
        await asyncio.gather(_stream(ctl, prompt, warm, None), _stream(ctl, prompt, warm, None))
        for kind, n, params in cases:
            twin = await _stream(ctl, prompt, params, None)
            moved = await _stream(ctl, prompt, params, max(2, n // 3))
            lo, hi = _window(moved)
            lost, dup = _diff(twin["ids"], moved["ids"])
            moves = moved["report"]["moves"]
            rows.append({"sampling": kind, "max_tokens": n, "seed": params.seed,
                         "outcome": ",".join(m["outcome"] for m in moves) or "none",
                         "rounds": sum(m["rounds"] for m in moves), "bytes": sum(m["bytes_sent"] for m in moves),
                         "identical": moved["ids"] == twin["ids"] and moved["text"] == twin["text"],
                         "tokens_lost": lost, "tokens_duplicated": dup,
                         "pause_ms": _longest_gap_ms(moved["times"], lo, hi),
                         "normal_gap_ms": _longest_gap_ms(twin["times"], lo, hi),
                         "handover_gap_ms": _handover_gap_ms(moved["times"], moves),
                         "window": [lo, hi], "move_s": sum(m["seconds"] for m in moves)})
            log.info("bench migrate: %s", rows[-1])
    finally:
        await ctl.shutdown()
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The summary keys of docs/benchmarks.md from the per-request rows."""
    pauses = [r["pause_ms"] for r in rows if r["pause_ms"] is not None]
    normals = [r["normal_gap_ms"] for r in rows if r["normal_gap_ms"] is not None]
    moved = [r for r in rows if r["outcome"] == "moved"]
    handovers = [r["handover_gap_ms"] for r in rows if r["handover_gap_ms"] is not None]
    p95_pause, p95_normal = percentile(pauses, 95), percentile(normals, 95)
    return {
        "tokens_lost": sum(r["tokens_lost"] for r in rows),
        "tokens_duplicated": sum(r["tokens_duplicated"] for r in rows),
        "outputs_identical": sum(r["identical"] for r in moved) / len(moved) if moved else None,
        "pause_ms_p50": percentile(pauses, 50), "pause_ms_p95": p95_pause,
        "normal_gap_ms_p50": percentile(normals, 50), "normal_gap_ms_p95": p95_normal,
        "pause_vs_normal_p95": ratio(p95_pause, p95_normal),
        "handover_gap_ms_p50": percentile(handovers, 50), "handover_gap_ms_p95": percentile(handovers, 95),
        "migration_bytes_per_request": (sum(r["bytes"] for r in moved) / len(moved)) if moved else None,
        "migrated": len(moved), "requests": len(rows),
    }


def run_migrate_bench(*, quick: bool, json_path: Path | None, console: Console | None = None,
                      dtype: str = "float32", checkpoint: Path | None = None, cases: list | None = None,
                      ray_nodes: bool | None = None, prompt: str | list[int] = PROMPT) -> dict[str, Any]:
    """Run `bench migrate`, print its table and summary, write the JSON when `json_path` is given, return it.
    `dtype`: of the demo model (float32: the recomputed KV is bit-exact with the decoded one; in bfloat16 it is
    not, and a sampled token near a tie can flip after a move). `checkpoint`, `cases` and `ray_nodes` override
    the demo model, the mode's requests and devices (tests use a tiny model)."""
    console = console or Console()
    mode = QUICK if quick else FULL
    if checkpoint is None:
        import torch

        from tangram.demo import fetch_demo

        checkpoint = fetch_demo(dtype=getattr(torch, dtype))
    cases = cases if cases is not None else _cases(mode)
    t0 = time.perf_counter()
    ray_nodes = mode["ray"] if ray_nodes is None else ray_nodes
    with _workers(ray_nodes) as workers:
        rows = asyncio.run(_measure(workers, checkpoint, cases, prompt))
    summary = summarize(rows)
    config = {"quick": quick, "devices": "two loopback Ray nodes" if ray_nodes else "two logical CPU devices",
              "checkpoint": str(checkpoint), "dtype": dtype, "cases": len(cases), "wall_s": time.perf_counter() - t0}
    result = result_doc("migrate", "cpu", config, rows, summary)
    print_table(console, "bench migrate", [
        Column("sampling", "sampling", justify="left"), Column("max_tokens", "tokens"), Column("outcome", "outcome"),
        Column("rounds", "rounds"), Column("bytes", "bytes"), Column("identical", "identical"),
        Column("pause_ms", "pause ms", fmt_num(1)), Column("normal_gap_ms", "normal gap ms", fmt_num(1)),
        Column("handover_gap_ms", "handover ms", fmt_num(1))], rows)
    print_summary(console, "bench migrate summary", summary)
    if json_path is not None:
        write_result(result, json_path)
    return result
