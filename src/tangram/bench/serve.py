"""`tangram bench serve`: throughput after the start, Tangram's built-in engine against vLLM (docs/benchmarks.md).

Per dtype row (`float32`, `bfloat16`: the same dtype for both systems, and
`default`: each system's own default) each system is started as its own
server process on the SmolLM2-135M demo weights (Tangram's checkpoint; vLLM
loads the Hugging Face directory beside it, the same weights), warmed with one
chat, then a client process (serve_client) plays N concurrent streaming chats
of `max_tokens` tokens each (ignore_eos, temperature 0) for every N, and in the
default row a burst of many short chats. Tangram's and vLLM's servers of a row
are up together and their runs alternate; Tangram on the vllm backend runs
alone (serve_session); per row which goes first alternates. vLLM is optional
(serve_peer). In quick
mode a system's default that is identical to an explicit row here (the same
weights, the same dtype in effect) is measured once, as that row.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from tangram.bench.common import (
    Column, fmt_num, median, print_summary, print_table, ratio, result_doc, step_progress, write_result,
)
from tangram.bench.serve_client import PROMPT
from tangram.bench.serve_peer import KV_CACHE_BYTES, VllmFound, find_vllm_python
from tangram.bench.serve_session import measure_group, row_groups, start_server
from tangram.bench.serve_vllm import vllm_backend_summary
from tangram.store.probe_auto import measure_pending
from tangram.workload import percentile

log = logging.getLogger(__name__)

SYSTEMS = ("tangram", "vllm", "tangram-vllm")  # tangram-vllm: Tangram's server on the vllm backend
DTYPE_ROWS = ("float32", "bfloat16", "default")
SAME_DTYPE_ROWS = ("float32", "bfloat16")  # the rows the throughput ratios compare


@dataclass(frozen=True)
class ServeSizes:
    """The workload: concurrency levels, tokens per request, repeats, the burst, the engine's batch."""

    concurrency: tuple[int, ...] = (1, 16, 32)
    max_tokens: int = 64
    repeats: int = 1
    burst: int = 100  # concurrent short chats in the default row (0: none)
    burst_tokens: int = 8
    warmup_tokens: int = 8
    max_batch: int | None = None  # Tangram's engine batch; None: its default (derived from the KV that fits)
    structured: int = 16  # concurrent chats under `STRUCTURED_SCHEMA` on Tangram, beside the burst (0: none)
    reuse_identical_default: bool = False  # a default identical to an explicit row is measured once, as that row
    vllm_kv_cache_bytes: int = KV_CACHE_BYTES  # the KV cache of plain vLLM and of the vllm backend alike


QUICK = ServeSizes(reuse_identical_default=True)
FULL = ServeSizes(repeats=3, burst=1000)
# A JSON schema that no answer of `max_tokens` tokens completes, so each structured chat streams exactly as many
# tokens as a plain one (`response_format` json_schema; compared with plain chats on the same server)
STRUCTURED_SCHEMA = {"type": "object", "properties": {"lines": {
    "type": "array", "minItems": 40, "items": {"type": "string", "minLength": 40}}},
    "required": ["lines"], "additionalProperties": False}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "lines", "schema": STRUCTURED_SCHEMA}}


@dataclass(frozen=True)
class Weights:
    """One dtype row's weights: Tangram's checkpoint and the Hugging Face directory of the same weights."""

    checkpoint: Path
    hf_dir: Path


def demo_weights(rows: tuple[str, ...] = DTYPE_ROWS) -> dict[str, Weights]:
    """The demo model per dtype row (`default`: the demo in this machine's compute dtype)."""
    from tangram.demo import fetch_demo

    out = {}
    for row in rows:
        ckpt = fetch_demo(dtype=None if row == "default" else getattr(torch, row))
        out[row] = Weights(ckpt, ckpt.parent / f"{ckpt.name}-hf")
    return out


def stored_dtype(checkpoint: Path) -> torch.dtype | None:
    """The dtype a Tangram checkpoint is stored in (None when it is not one: a Hugging Face directory)."""
    from tangram.engine.dtype import compute_dtype
    from tangram.store import read_index
    from tangram.store.errors import CheckpointError

    try:
        return compute_dtype(e.torch_dtype for e in read_index(checkpoint).tensors.values())
    except (CheckpointError, OSError):
        return None


def default_twin(system: str, weights: dict[str, Weights], stored: torch.dtype | None,
                 device: torch.device | str) -> str | None:
    """The explicit dtype row whose configuration `system`'s default is identical to here (the same weights, the
    same dtype in effect, no other flag differs), or None. `stored`: the default weights' dtype.

    Tangram's `auto` is `choose_dtype`'s rule; vLLM's (no --dtype) runs a BF16 model in BF16 and others in FP16,
    which no explicit row is.
    """
    default = weights.get("default")
    if default is None or stored is None:
        return None
    if system == "tangram":
        from tangram.engine.dtype import choose_dtype

        effective: torch.dtype | None = choose_dtype("auto", stored, device)
    else:
        effective = torch.bfloat16 if stored == torch.bfloat16 else None
    for row in SAME_DTYPE_ROWS:
        w = weights.get(row)
        if w is None or effective != getattr(torch, row):
            continue
        mine, theirs = (w.checkpoint, default.checkpoint) if system == "tangram" else (w.hf_dir, default.hf_dir)
        if Path(mine).resolve() == Path(theirs).resolve():
            return row
    return None


def client_runs(sizes: ServeSizes, row: str, burst: bool | None = None,
                system: str = "tangram") -> list[dict[str, Any]]:
    """The client's runs on one dtype row's server: repeat-major over the concurrency levels (on Tangram each
    repeat also plays `sizes.structured` chats under a JSON schema), then the burst (by default in the default
    row only); each run says the dtype row it counts for (the burst and the structured runs: `default`)."""
    default = row == "default" if burst is None else burst
    runs = []
    for rep in range(sizes.repeats):
        runs += [{"kind": "concurrent", "dtype": row, "repeat": rep, "n": n, "max_tokens": sizes.max_tokens}
                 for n in sizes.concurrency]
        if default and sizes.structured and system == "tangram":
            runs.append({"kind": "structured", "dtype": "default", "repeat": rep, "n": sizes.structured,
                         "max_tokens": sizes.max_tokens, "response_format": RESPONSE_FORMAT})
    if sizes.burst and default:
        runs.append({"kind": "burst", "dtype": "default", "repeat": 0, "n": sizes.burst,
                     "max_tokens": sizes.burst_tokens})
    return runs


def run_row(system: str, dtype: str, run: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """One run's row from the client's request records.

    `failed`: an HTTP or stream error; `lost`: no error, but fewer completion tokens than asked (ignore_eos
    means exactly max_tokens) or no usage chunk or no finish reason. Tokens are the usage chunks' counts.
    """
    reqs = result["requests"]
    failed = sum(1 for r in reqs if r["error"])
    lost = sum(1 for r in reqs if not r["error"] and (r["completion_tokens"] is None or r["finish_reason"] is None
                                                       or r["completion_tokens"] < r["max_tokens"]))
    tokens = sum(r["completion_tokens"] or 0 for r in reqs if not r["error"])
    ttfts = [r["ttft_s"] for r in reqs if r["ttft_s"] is not None and not r["error"]]
    wall = result["wall_s"]
    return {"system": system, "dtype": run.get("dtype", dtype), "kind": run["kind"], "repeat": run["repeat"], "n": result["n"],
            "max_tokens": result["max_tokens"], "wall_s": wall, "tokens": tokens,
            "tokens_per_s": tokens / wall if wall > 0 else None, "chunks": sum(r["chunks"] for r in reqs),
            "ttft_p50": percentile(ttfts, 50), "ttft_p99": percentile(ttfts, 99), "failed": failed, "lost": lost,
            "ttfts": [round(t, 5) for t in ttfts],
            "errors": sorted({r["error"] for r in reqs if r["error"]})[:3]}


def summarize(rows: list[dict[str, Any]], starts: dict[str, dict[str, float]], sizes: ServeSizes,
              vllm: VllmFound, twins: dict[str, str | None] | None = None,
              facts: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The headline numbers from per-run rows and process start times (pure; vLLM's are null when absent).

    `twins`: per system, the explicit row its default was measured as (`default_twin`), if any. `facts`: per
    "system/row" what its server said (the vllm backend's start phase, plain vLLM's load time).
    """
    levels = [str(n) for n in sizes.concurrency]
    twins = twins or {}

    def runs(system: str, dtype: str, kind: str, n: str | None = None) -> list[dict[str, Any]]:
        if dtype == "default" and kind == "concurrent" and twins.get(system):
            dtype = twins[system] or dtype
        return [r for r in rows if r["system"] == system and r["dtype"] == dtype and r["kind"] == kind
                and (n is None or str(r["n"]) == n)]

    def nested(fn: Any) -> dict[str, dict[str, dict[str, Any]]]:
        return {s: {d: {n: fn(runs(s, d, "concurrent", n)) for n in levels} for d in DTYPE_ROWS} for s in SYSTEMS}

    def tps(rs: list[dict[str, Any]]) -> float | None:
        return median([r["tokens_per_s"] for r in rs if r["tokens_per_s"] is not None])

    def ttft(q: float) -> Any:
        def pooled(rs: list[dict[str, Any]]) -> float | None:
            return percentile([t for r in rs for t in r["ttfts"]], q)
        out = nested(pooled)
        for s in SYSTEMS:  # the burst, under its own N
            if sizes.burst:
                out[s]["default"][str(sizes.burst)] = pooled(runs(s, "default", "burst"))
        return out

    tokens_per_s = nested(tps)
    burst_wall = {s: median([r["wall_s"] for r in runs(s, "default", "burst")]) for s in ("tangram", "vllm")}
    structured = tps(runs("tangram", "default", "structured"))
    plain = tokens_per_s["tangram"]["default"].get(str(sizes.structured))
    start = {s: median(list(starts.get(s, {}).values())) for s in SYSTEMS}
    return {
        "tokens_per_s": tokens_per_s,
        "throughput_vs_vllm": {d: {n: ratio(tokens_per_s["tangram"][d][n], tokens_per_s["vllm"][d][n])
                                   for n in levels if n != "1"} for d in SAME_DTYPE_ROWS},
        "burst_wall_s": burst_wall,
        "burst_wall_vs_vllm": ratio(burst_wall["tangram"], burst_wall["vllm"]),
        "structured_tokens_per_s": structured,
        "structured_tokens_per_s_vs_plain": ratio(structured, plain),
        "ttft_p50": ttft(50),
        "ttft_p99": ttft(99),
        "failed": sum(r["failed"] for r in rows),
        "lost": sum(r["lost"] for r in rows),
        "failed_by_system": {s: sum(r["failed"] for r in rows if r["system"] == s) for s in SYSTEMS},
        "lost_by_system": {s: sum(r["lost"] for r in rows if r["system"] == s) for s in SYSTEMS},
        "tangram_process_start_s": start["tangram"],
        "vllm_process_start_s": start["vllm"],
        "process_start_s": {s: dict(starts.get(s, {})) for s in SYSTEMS},
        "default_measured_as": {s: twins.get(s) for s in SYSTEMS},
        "vllm_found": vllm.python is not None,
        "vllm_note": vllm.note,
        **vllm_backend_summary(tokens_per_s, facts or {}, starts, SAME_DTYPE_ROWS),
    }


def run_serve_bench(*, quick: bool, json_path: Path | None, vllm_python: str | None = None,
                    console: Console | None = None, progress: bool = True, sizes: ServeSizes | None = None,
                    weights: dict[str, Weights] | None = None, use_vllm: bool = True,
                    workdir: Path | None = None) -> dict[str, Any]:
    """The whole benchmark; returns (and optionally writes) the result document.

    `sizes` and `weights` (dtype row -> weights; default: the demo model in every row) override the mode's
    (tests run a tiny model in fewer rows); `use_vllm=False` leaves vLLM out without looking for it.
    """
    from tangram.paths import data_dir

    console = console or Console()
    started = time.perf_counter()
    sizes = sizes or (QUICK if quick else FULL)
    vllm = find_vllm_python(vllm_python) if use_vllm else VllmFound(None, None, "vLLM was not asked for")
    log.info("%s", vllm.note)
    weights = weights or demo_weights()
    workdir = Path(workdir) if workdir is not None else data_dir() / "bench" / "serve"
    workdir.mkdir(parents=True, exist_ok=True)
    systems = [s for s in SYSTEMS if s == "tangram" or vllm.python is not None]  # both others need vLLM
    device = "cuda" if torch.cuda.is_available() else "cpu"
    twins: dict[str, str | None] = {}
    if sizes.reuse_identical_default and "default" in weights:
        stored = stored_dtype(weights["default"].checkpoint)
        twins = {s: default_twin("vllm" if s == "tangram-vllm" else s, weights, stored, device) for s in systems}
    # The read-speed probe a fresh machine's first server would run in the background, during the first timed
    # rows, runs here instead, untimed (as bench load does).
    probed = [r.config.label for r in measure_pending(w.checkpoint for w in weights.values())]
    groups = row_groups(list(weights), systems, twins)
    rows: list[dict[str, Any]] = []
    starts: dict[str, dict[str, float]] = {}
    facts: dict[str, dict[str, Any]] = {}
    server_errors: list[str] = []
    with step_progress(console, len(groups), "bench serve", progress) as bar:
        for row, group in groups:
            bar.describe(f"{' + '.join(group)} {row}")
            w = weights[row]
            servers, runs = {}, {}
            for system in group:
                burst = (row == "default" or twins.get(system) == row) and system != "tangram-vllm"
                runs[system] = client_runs(sizes, row, burst, system)
                try:
                    servers[system] = start_server(system, row, w.checkpoint, w.hf_dir, sizes.max_batch,
                                                   sizes.vllm_kv_cache_bytes, vllm, workdir)
                except RuntimeError as exc:
                    log.error("%s %s: %s", system, row, exc)
                    facts[f"{system}/{row}"] = {"error": str(exc)[-2000:]}
                    server_errors.append(f"{system}/{row}: {str(exc).splitlines()[0][:300]}")
            for system, session in measure_group(servers, runs, row, workdir, sizes.warmup_tokens).items():
                key = f"{system}/{row}"
                facts[key] = {**session.facts, "weights": str(w.hf_dir if system == "vllm" else w.checkpoint)}
                if session.start_s is not None:
                    starts.setdefault(system, {})[row] = session.start_s
                rows += [run_row(system, row, run, res) for run, res in session.results]
                if session.error:  # a server that does not start, or a client that dies: the rest runs
                    facts[key]["error"] = session.error[-2000:]
                    server_errors.append(f"{key}: {session.error.splitlines()[0][:300]}")
                elif (session.facts.get("warmup") or {}).get("error"):
                    log.warning("%s %s: the warm-up request failed: %s", system, row,
                                session.facts["warmup"]["error"])
            bar.advance()
    summary = {**summarize(rows, starts, sizes, vllm, twins, facts), "server_errors": server_errors}
    config = {"mode": "quick" if quick else "full", "sizes": asdict(sizes), "prompt": PROMPT,
              "systems": systems, "dtype_rows": list(weights), "vllm": asdict(vllm),
              "vllm_kv_cache_bytes": sizes.vllm_kv_cache_bytes, "servers": facts,
              "read_probe_before_servers": probed,
              "seconds": time.perf_counter() - started}
    result = result_doc("serve", device, config, rows, summary)
    _report(console, rows, summary, sizes)
    if json_path:
        write_result(result, json_path)
    return result


def _report(console: Console, rows: list[dict[str, Any]], summary: dict[str, Any], sizes: ServeSizes) -> None:
    table = []
    keys = sorted({(r["system"], r["dtype"], r["kind"], r["n"]) for r in rows},
                  key=lambda k: (DTYPE_ROWS.index(k[1]), k[2], k[3], k[0]))
    for system, dtype, kind, n in keys:
        rs = [r for r in rows if (r["system"], r["dtype"], r["kind"], r["n"]) == (system, dtype, kind, n)]
        ttfts = [t for r in rs for t in r["ttfts"]]
        table.append({"system": system, "dtype": dtype, "n": f"{n}{'' if kind == 'concurrent' else ' ' + kind}",
                      "tokens": rs[0]["max_tokens"], "tps": median([r["tokens_per_s"] for r in rs]),
                      "wall": median([r["wall_s"] for r in rs]), "p50": percentile(ttfts, 50),
                      "p99": percentile(ttfts, 99), "failed": sum(r["failed"] for r in rs),
                      "lost": sum(r["lost"] for r in rs)})
    print_table(console, f"streaming chats through the HTTP API (medians of {sizes.repeats} repeat(s))", [
        Column("system", "system", str, "left"), Column("dtype", "dtype", str, "left"), Column("n", "N"),
        Column("tokens", "tokens/req"), Column("tps", "tokens/s", fmt_num(1)), Column("wall", "wall s", fmt_num(2)),
        Column("p50", "TTFT p50 s", fmt_num(3)), Column("p99", "TTFT p99 s", fmt_num(3)),
        Column("failed", "failed"), Column("lost", "lost")], table)
    keep = ("throughput_vs_vllm", "burst_wall_s", "burst_wall_vs_vllm", "structured_tokens_per_s_vs_plain",
            "vllm_backend_vs_vllm", "vllm_backend_cold_ttft_s", "vllm_backend_pool_hit_ttft_s",
            "vllm_backend_pool_hit_bytes_loaded", "vllm_backend_cold_load_s", "vllm_default_load_s", "failed",
            "lost", "tangram_process_start_s", "vllm_process_start_s", "default_measured_as", "vllm_note",
            "server_errors")
    print_summary(console, "bench serve summary", {k: summary[k] for k in keep})
