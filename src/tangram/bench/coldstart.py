"""`tangram bench coldstart`: end-to-end cold-start TTFT through the running server (skeleton).

This first version measures what start-up templates buy: the same cold start
from disk (a fresh device pool, the checkpoint's files dropped from the page
cache) is replayed through the real HTTP API for the configurations `tangram`
(templates on: first-use load order, execute-while-load) and
`tangram-notemplate`, interleaved, on the largest model of the run. A
configuration's first request is untimed: it records the template, and warms
the process (model skeleton, tokenizer, kernels) equally for every
configuration. TTFT is taken by the client (request sent -> first token
chunk). The end-to-end benchmark (baseline and sllm configurations, a
multi-model trace, a separate client process, plots) extends this file.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from tangram.bench.common import Column, fmt_num, print_summary, print_table, result_doc, step_progress, write_result
from tangram.bench.kv_workload import KVModel, ensure_models
from tangram.bench.pool_workload import data_files
from tangram.control import Deployment, ServeConfig
from tangram.engine import EngineConfig
from tangram.paths import data_dir
from tangram.serve import Server
from tangram.store import read_index
from tangram.store.io import evict_from_page_cache

log = logging.getLogger(__name__)

CONFIGS = ("tangram", "tangram-notemplate")


def models(quick: bool, small: bool = False) -> list[KVModel]:
    """The cold-start model: quick about 0.7 GB fp32, full about 1.6 GB (small: tests)."""
    if small:
        return [KVModel("cold-small", "qwen2", 64, 128, 2, 4, 2, 512, 512, seed=21)]
    if quick:
        return [KVModel("cold-0.7g", "qwen2", 1024, 2816, 12, 16, 4, 32000, 2048, seed=22)]
    return [KVModel("cold-1.6g", "qwen2", 1536, 4096, 16, 16, 4, 32000, 2048, seed=23)]


def one_cold_start(config: str, ckpt: Path, prompt: list[int], max_tokens: int, capacity: int) -> dict[str, Any]:
    """A fresh server (nothing resident), the checkpoint evicted from the page cache, one streamed request."""
    engine = EngineConfig(templates=config != "tangram-notemplate", max_batch=1)
    dep = Deployment(name="m", checkpoint=str(ckpt), keep_alive_s=600, engine=engine)
    cfg = ServeConfig(port=0, pool_capacity=capacity, admin_token="bench", deployments=[dep])
    with Server(cfg).running() as srv:
        for f in data_files(ckpt):
            evict_from_page_cache(f)
        body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "ignore_eos": True}
        text, ttft, stages = "", None, None
        t0 = time.perf_counter()
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=600) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = httpx.Response(200, content=line[6:]).json()
                if ttft is None and chunk["choices"][0]["text"]:
                    ttft = time.perf_counter() - t0
                text += chunk["choices"][0]["text"]
                stages = (chunk.get("tangram") or {}).get("stages") or stages
    overlap = 0.0
    if stages and stages.get("load_interval") and stages.get("prefill_interval"):
        (lb, le), (pb, pe) = stages["load_interval"], stages["prefill_interval"]
        overlap = max(0.0, min(le, pe) - max(lb, pb))
    return {"config": config, "ttft_s": ttft, "text": text, "load_s": stages["load_s"], "init_s": stages["init_s"],
            "prefill_s": stages["prefill_s"], "server_ttft_s": stages["ttft_s"], "overlap_s": overlap,
            "bytes_loaded": stages["bytes_loaded"], "start": stages["start"]}


def run_coldstart_bench(*, quick: bool, json_path: Path | None, console: Console | None = None,
                        repeats: int | None = None, small: bool = False, progress: bool = True) -> dict:
    """Cold-start TTFT with and without start-up templates; summary `ttft_p50` per config, `template_speedup`."""
    console = console or Console()
    started = time.perf_counter()
    specs = models(quick, small)
    paths = ensure_models(specs, data_dir() / "bench" / "coldstart")
    spec = specs[-1]
    ckpt = paths[spec.name].ckpt
    total = read_index(ckpt).total_bytes
    capacity = int(total * 1.25) + (64 << 20)
    prompt_tokens = 16 if small else 128
    prompt = [3 + (i * 37) % (spec.vocab - 3) for i in range(prompt_tokens)]  # token ids: no tokenizer quirks
    max_tokens = 4
    repeats = repeats or (1 if small else 3 if quick else 7)
    rows: list[dict[str, Any]] = []
    with step_progress(console, repeats * len(CONFIGS) + len(CONFIGS), "bench coldstart", progress) as bar:
        for config in CONFIGS:  # untimed: records the template, warms the process alike for both
            one_cold_start(config, ckpt, prompt, max_tokens, capacity)
            bar.advance()
        for rep in range(repeats):
            order = CONFIGS if rep % 2 == 0 else CONFIGS[::-1]
            for config in order:
                bar.describe(f"{config} #{rep + 1}")
                rows.append({"repeat": rep, **one_cold_start(config, ckpt, prompt, max_tokens, capacity)})
                bar.advance()
    p50 = {c: statistics.median(r["ttft_s"] for r in rows if r["config"] == c) for c in CONFIGS}
    texts = {c: {r["text"] for r in rows if r["config"] == c} for c in CONFIGS}
    identical = len(texts["tangram"] | texts["tangram-notemplate"]) == 1
    summary = {"ttft_p50": p50, "template_speedup": p50["tangram-notemplate"] / p50["tangram"],
               "token_identical": identical,
               "overlap_p50": statistics.median(r["overlap_s"] for r in rows if r["config"] == "tangram")}
    config = {"mode": "small" if small else "quick" if quick else "full", "model": spec.name, "bytes": total,
              "prompt_tokens": prompt_tokens, "max_tokens": max_tokens, "repeats": repeats,
              "pool_capacity": capacity, "seconds": time.perf_counter() - started}
    result = result_doc("coldstart", "cpu", config, rows, summary)
    print_table(console, f"cold start from disk: {spec.name} ({total / 1e9:.2f} GB), {prompt_tokens}-token prompt",
                [Column("config", "config", str, "left"), Column("repeat", "#"),
                 Column("ttft_s", "TTFT s", fmt_num(3)), Column("load_s", "load s", fmt_num(3)),
                 Column("init_s", "init s", fmt_num(3)), Column("prefill_s", "prefill s", fmt_num(3)),
                 Column("overlap_s", "overlap s", fmt_num(3))], rows)
    print_summary(console, "summary", summary)
    if json_path:
        write_result(result, json_path)
    return result
