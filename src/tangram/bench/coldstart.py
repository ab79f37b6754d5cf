"""`tangram bench coldstart`: end-to-end cold-start TTFT through the running server (docs/benchmarks.md).

1. Trace replay: the same seeded bursty trace (coldstart_workload) over a set
   of models with a family sharing tensors, a device pool smaller than the sum
   of the models, replayed through the HTTP API by a separate client process
   against each configuration: `baseline`, `sllm`, `tangram`,
   `tangram-notemplate` (coldstart_replay). Overhead of a request = its TTFT
   minus its model's TTFT on a warm instance, measured in the same run.
2. Migration trace (coldstart_migrate): a popular model's long streams on two
   devices and a short request for another model in every wave, replayed
   under `tangram` and `tangram-migrate` (the controller's migration policy on).
3. Templates: a cold start from disk (fresh pool, page cache dropped) of the
   largest model, with and without its start-up template, interleaved
   repeats; `template_speedup` = TTFT p50 without / with. Beside it, the
   machine's yardstick (overlap_probe): how much running a prefill beside a
   cold load saves at all here (`template_overlap_bound`), and the
   `template_speedup_ceiling` that follows for this model.
Templates are recorded, and the read-speed probe a server runs in the background at its start is run
(`probe_auto.measure_pending`), untimed, before anything is timed.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import torch
from rich.console import Console

from tangram.bench.coldstart_client import one
from tangram.bench.coldstart_migrate import FULL_MIGRATE, MIGRATE_CONFIGS, QUICK_MIGRATE, MigrateTrace, migrate_section
from tangram.bench.coldstart_poolhit import pool_hit_section
from tangram.bench.coldstart_replay import engine_config, run_config
from tangram.bench.coldstart_workload import (
    CONFIGS, FULL, QUICK, Sizes, configurations, make_models, summarize, trace_spec,
)
from tangram.bench.common import (
    Column, fmt_num, print_summary, print_table, resolve_device, result_doc, step_progress, write_result,
)
from tangram.bench.kv_workload import ensure_models, make_trace, trace_stats
from tangram.bench.overlap_probe import probe_overlap
from tangram.control import Deployment, ServeConfig
from tangram.engine import EngineConfig
from tangram.paths import data_dir
from tangram.serve import Server
from tangram.store import Checkpoint, read_index
from tangram.store.io import evict_from_page_cache
from tangram.store.probe_auto import measure_pending
from tangram.worker import local_devices
from tangram.workload import ModelSpec, percentile

log = logging.getLogger(__name__)
TEMPLATE_CONFIGS = ("tangram", "tangram-notemplate")


def server_device(device: str = "auto") -> torch.device:
    """The device the benchmark's servers run on here (the first local device: CUDA when present, else the CPU).

    The server takes no device choice, so `device` (auto, cpu, cuda[:N]) must name that device's type;
    anything else raises ValueError before any work.
    """
    have = torch.device(local_devices()[0])
    if device != "auto":
        want = resolve_device(device)
        if want.type != have.type:
            raise ValueError(f"device {device!r}: the server runs on {have} here (every CUDA device when present, "
                             "else the CPU)")
    return have


def one_cold_start(config: str, ckpt: Path, prompt: list[int], max_tokens: int, capacity: int) -> dict[str, Any]:
    """A fresh server (nothing resident), the checkpoint evicted from the page cache, one streamed request."""
    engine = EngineConfig(templates=config != "tangram-notemplate", overlap="on", max_batch=1)  # the mechanism
    dep = Deployment(name="m", checkpoint=str(ckpt), keep_alive_s=600, engine=engine)
    cfg = ServeConfig(port=0, pool_capacity=capacity, admin_token="bench", deployments=[dep])
    with Server(cfg).running() as srv:
        for f in Checkpoint(ckpt).data_files():
            evict_from_page_cache(f)
        r = asyncio.run(_ask(srv.url, {"model": "m", "prompt": prompt, "max_tokens": max_tokens}))
    if r["error"]:
        raise RuntimeError(f"cold start of {ckpt}: {r['error']}")
    overlap = 0.0
    if r.get("load_interval") and r.get("prefill_interval"):
        (lb, le), (pb, pe) = r["load_interval"], r["prefill_interval"]
        overlap = max(0.0, min(le, pe) - max(lb, pb))
    return {"section": "template", "config": config, "ttft_s": r["ttft_s"], "text": r["text"],
            "load_s": r["load_s"], "init_s": r["init_s"], "prefill_s": r["prefill_s"], "overlap_s": overlap,
            "bytes_loaded": r["bytes_loaded"], "start": r["start"]}


async def _ask(url: str, req: dict) -> dict:
    async with httpx.AsyncClient(timeout=600) as client:
        return await one(client, url, req)


def template_section(ckpt: Path, vocab: int, prompt_tokens: int, repeats: int, bar,
                     device: str = "cpu") -> tuple[list[dict], dict]:
    """Cold starts from disk with and without the template, interleaved; the probe runs on `device` (the server's)."""
    capacity = int(read_index(ckpt).total_bytes * 1.25) + (64 << 20)
    prompt = [3 + (i * 37) % (vocab - 3) for i in range(prompt_tokens)]
    rows = []
    for rep in range(repeats):
        for config in TEMPLATE_CONFIGS if rep % 2 == 0 else TEMPLATE_CONFIGS[::-1]:
            bar.describe(f"template: {config} #{rep + 1}")
            rows.append({"repeat": rep, **one_cold_start(config, ckpt, prompt, 4, capacity)})
            bar.advance()
    p50 = {c: statistics.median(r["ttft_s"] for r in rows if r["config"] == c) for c in TEMPLATE_CONFIGS}
    texts = {r["text"] for r in rows}
    bar.describe("template: overlap probe")
    probe = probe_overlap(ckpt, prompt, repeats=3 * repeats, device=device)
    bar.advance()
    saved = probe["sequential_s"] - probe["both_s"]  # what running them together hides on this machine
    ceiling = p50["tangram-notemplate"] / max(1e-9, p50["tangram-notemplate"] - max(0.0, saved))
    return rows, {"template_cold_ttft_p50": p50, "template_speedup": p50["tangram-notemplate"] / p50["tangram"],
                  "template_token_identical": len(texts) == 1, "template_overlap_probe": probe,
                  "template_overlap_bound": probe["bound"], "template_speedup_ceiling": ceiling}


def record_templates(paths, sizes, bar) -> None:
    """First runs (untimed): every model's start-up template exists before anything is timed."""
    deps = [Deployment(name=n, checkpoint=str(p.ckpt), keep_alive_s=600) for n, p in paths.items()]
    total = sum(read_index(p.ckpt).total_bytes for p in paths.values())
    with Server(ServeConfig(port=0, pool_capacity=int(total * 1.5) + (64 << 20), admin_token="x",
                            deployments=deps)).running() as srv:
        for name in paths:
            body = {"model": name, "prompt": list(range(3, 3 + sizes.prompt_tokens)), "max_tokens": 1}
            httpx.post(srv.url + "/v1/completions", json=body, timeout=600).raise_for_status()
    bar.advance()


def run_coldstart_bench(*, quick: bool, json_path: Path | None, plot_dir: Path | None = None, seed: int = 0,
                        console: Console | None = None, progress: bool = True, configs: tuple[str, ...] = CONFIGS,
                        device: str = "auto", sizes: Sizes | None = None, models: list[ModelSpec] | None = None,
                        template_repeats: int | None = None, template_prompt: int = 128,
                        workdir: Path | None = None, migrate: MigrateTrace | bool = True) -> dict:
    """The whole benchmark; returns (and optionally writes) the result document.

    `sizes`, `models`, `template_repeats` and `template_prompt` override the mode's (tests run a tiny set);
    `workdir` caches the checkpoints (default: the data dir's bench/coldstart); `migrate`: the migration
    trace (True: the mode's; False: none).
    """
    console = console or Console()
    dev = server_device(device)
    started = time.perf_counter()
    sizes = sizes or (QUICK if quick else FULL)
    models = models or make_models(sizes.models)
    paths = ensure_models(models, Path(workdir) if workdir is not None else data_dir() / "bench" / "coldstart")
    trace, popularity = make_trace(models, trace_spec(sizes), seed)
    unique = {}
    for p in paths.values():
        for e in read_index(p.ckpt).tensors.values():
            unique[e.key] = e.nbytes
    sizes_of = {m.name: read_index(paths[m.name].ckpt).total_bytes for m in models}
    kv = engine_config(configurations()["sllm"])
    reserve = max(m.kv_bytes_per_token() for m in models) * kv.reserve_batch() * kv.max_model_len  # what reserve holds
    # smaller than all the models together, but any one model fits with its reserved KV
    capacity = max(int(sum(unique.values()) * sizes.pool_fraction), int(1.1 * (max(sizes_of.values()) + reserve)))
    biggest = max(models, key=lambda m: sizes_of[m.name])
    t_repeats = template_repeats or (3 if quick else 5)
    if migrate is True:
        migrate = QUICK_MIGRATE if quick else FULL_MIGRATE
    per_config: dict[str, dict] = {}
    m_rows: list[dict] = []
    m_summary = m_facts = None
    steps = 3 + len(configs) + 2 * t_repeats + (len(MIGRATE_CONFIGS) if migrate else 0)
    # untimed: the read-speed probe each server would run in the background at its start (else the default)
    probed = [r.config.label for r in measure_pending(p.ckpt for p in paths.values())]
    with step_progress(console, steps, "bench coldstart", progress) as bar:
        bar.describe("recording templates")
        record_templates(paths, sizes, bar)
        for name in configs:
            bar.describe(f"replay: {name}")
            per_config[name] = run_config(configurations()[name], paths, trace, sizes, capacity)
            bar.advance()
        if migrate:
            by_name = {m.name: m for m in models}
            m_rows, m_summary, m_facts = migrate_section(
                configurations(), paths, migrate, sizes_of, {n: m.vocab for n, m in by_name.items()},
                by_name[migrate.long_model].kv_bytes_per_token(), seed, bar)
        t_rows, t_summary = template_section(paths[biggest.name].ckpt, biggest.vocab,
                                             template_prompt, t_repeats, bar, device=str(dev))
        p_rows, p_summary = pool_hit_section(paths[biggest.name].ckpt, biggest.vocab, template_prompt,
                                             2 * t_repeats, bar)
    summary = {**summarize(per_config), **t_summary, **p_summary}
    if m_summary is not None:
        summary["migrate_trace"] = m_summary
    rows = [{"section": "replay", "config": n, **r} for n, run in per_config.items() for r in run["results"]]
    rows += m_rows + t_rows + p_rows
    rows += [{"section": "pool", "config": n, **s} for n, run in per_config.items() for s in run["samples"]]
    config = {"mode": sizes.models, "seed": seed, "configs": {n: vars(configurations()[n]) for n in configs},
              "pool_capacity": capacity, "unique_bytes": sum(unique.values()), "keep_alive_s": sizes.keep_alive_s,
              "trace": trace_stats(trace), "popularity": popularity, "template_model": biggest.name,
              "warm_ttft": {n: run["warm_ttft"] for n, run in per_config.items()},
              "replay_s": {n: run["replay_s"] for n, run in per_config.items()}, "migrate_trace": m_facts,
              "read_probe_before_starts": probed, "seconds": time.perf_counter() - started}
    result = result_doc("coldstart", dev, config, rows, summary)
    _report(console, per_config, t_rows, summary)
    if plot_dir is not None:
        from tangram.bench.coldstart_plots import write_plots

        write_plots(result, plot_dir)
    if json_path:
        write_result(result, json_path)
    return result


def _report(console: Console, per_config: dict, t_rows: list[dict], summary: dict) -> None:
    table = []
    for name, run in per_config.items():
        ok = [r for r in run["results"] if r.get("ttft_s") is not None and not r.get("error")]
        ttft = [r["ttft_s"] for r in ok]
        table.append({"config": name, "requests": len(run["results"]), "failed": len(run["results"]) - len(ok),
                      "p50": percentile(ttft, 50), "p95": percentile(ttft, 95),
                      "o50": summary["overhead_p50"][name], "o95": summary["overhead_p95"][name],
                      "starts": " ".join(f"{k}:{v}" for k, v in summary["starts"][name].items()),
                      "gb": run["bytes_loaded"] / 1e9})
    print_table(console, "trace replay through the server", [
        Column("config", "config", str, "left"), Column("requests", "requests"), Column("failed", "failed"),
        Column("p50", "TTFT p50 s", fmt_num(3)), Column("p95", "p95 s", fmt_num(3)),
        Column("o50", "overhead p50 s", fmt_num(3)), Column("o95", "p95 s", fmt_num(3)),
        Column("starts", "starts", str, "left"), Column("gb", "GB loaded", fmt_num(3))], table)
    m = summary.get("migrate_trace")
    if m:
        print_table(console, "migration trace (two devices; a popular model's long streams, another model's start)", [
            Column("config", "config", str, "left"), Column("p50", "TTFT p50 s", fmt_num(3)),
            Column("p95", "p95 s", fmt_num(3)), Column("short", "others' TTFT p50 s", fmt_num(3)),
            Column("smax", "max s", fmt_num(3)), Column("failed", "failed"), Column("drains", "drains"),
            Column("migrations", "migrations")],
            [{"config": n, "p50": m["ttft_p50"][n], "p95": m["ttft_p95"][n], "short": m["short_ttft_p50"][n],
              "smax": m["short_ttft_max"][n], "failed": m["failed"][n], "drains": m["drains"][n],
              "migrations": m["migrations"][n]} for n in m["ttft_p50"]])
    print_table(console, "cold start from disk, templates on / off", [
        Column("config", "config", str, "left"), Column("repeat", "#"), Column("ttft_s", "TTFT s", fmt_num(3)),
        Column("load_s", "load s", fmt_num(3)), Column("prefill_s", "prefill s", fmt_num(3)),
        Column("overlap_s", "overlap s", fmt_num(3))], t_rows)
    print_summary(console, "summary", {k: v for k, v in summary.items() if k not in ("starts", "migrate_trace")})
