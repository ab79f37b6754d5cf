"""The `tangram-vllm` system of bench serve: Tangram's server with its deployment on the vllm backend.

Before the same client runs as the other systems, `start_phase` times the deployment's two kinds of start as a
client sees them: the first request, whose weights are only on disk (a cold start: Tangram's loader into the
pool, a new vLLM shell that loads from it), then, once the instance has scaled to zero (1 s keep-alive), the
next request (a pool hit: weights retained in the pool, the parked shell re-bound). The deployment's keep-alive
is then raised so that the throughput runs never scale it down.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from tangram.bench.common import median, ratio
from tangram.bench.serve_peer import ADMIN_TOKEN, MODEL_NAME
from tangram.store.io import evict_from_page_cache

SCALE_DOWN_TIMEOUT_S = 120.0
QUESTION = [{"role": "user", "content": "Name a colour."}]


def timed_chat(url: str, max_tokens: int = 8) -> dict[str, Any]:
    """One streamed chat: the client's time to first token and the start's stages (Tangram's extension)."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    t0 = time.perf_counter()
    ttft, stages = None, None
    for chunk in client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, max_tokens=max_tokens,
                                                temperature=0, stream=True):
        if ttft is None and any(c.delta is not None and c.delta.content for c in chunk.choices):
            ttft = time.perf_counter() - t0
        ext = (chunk.model_extra or {}).get("tangram") or {}
        stages = ext.get("stages") or stages
    return {"ttft_s": ttft, "stages": stages}


def _running(http: httpx.Client, url: str) -> int:
    """Instances of the model the controller knows plus those a worker still holds (a stop under way)."""
    r = http.get(url + "/admin/status")
    r.raise_for_status()
    st = r.json()
    on_workers = sum(1 for w in st["workers"] for i in w["instances"] if i["deployment"] == MODEL_NAME)
    return st["deployments"][MODEL_NAME]["instances"] + on_workers


def start_phase(url: str, deployment: dict[str, Any]) -> dict[str, Any]:
    """Cold start, scale-to-zero, pool hit (see the module docstring); `deployment`: the spec the server was
    started with (sent back with a long keep-alive at the end)."""
    cold = timed_chat(url)
    with httpx.Client(headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60) as http:
        deadline = time.monotonic() + SCALE_DOWN_TIMEOUT_S
        while _running(http, url) > 0:  # until the worker's stop is over: the shell is parked then
            if time.monotonic() > deadline:
                raise RuntimeError(f"the vllm deployment did not scale to zero in {SCALE_DOWN_TIMEOUT_S:.0f} s")
            time.sleep(0.2)
        hit = timed_chat(url)
        r = http.post(url + "/admin/deployments", json={**deployment, "keep_alive_s": 3600.0})
        r.raise_for_status()
    return {"cold": cold, "pool_hit": hit}


def drop_cached(files: list[Path]) -> None:
    """Take weight files out of the page cache, so that the next load of them reads the disk (a cold start):
    both systems' loads are timed from the same state."""
    for f in files:
        evict_from_page_cache(f)


def _median_of(xs: list) -> float | None:
    return median([x for x in xs if x is not None])


def vllm_backend_summary(tokens_per_s: dict[str, Any], facts: dict[str, dict[str, Any]],
                         starts: dict[str, dict[str, float]], same_dtype_rows: tuple[str, ...]) -> dict[str, Any]:
    """The summary keys of the vllm backend (pure): throughput over plain vLLM at 16 concurrent chats per
    same-dtype row (the headline is the lowest), and its starts as the start phase timed them, beside plain
    vLLM's process start and its default loader's time (from its log)."""
    mine, theirs = tokens_per_s.get("tangram-vllm", {}), tokens_per_s.get("vllm", {})
    by_dtype = {}
    for d in same_dtype_rows:
        a, b = mine.get(d, {}).get("16"), theirs.get(d, {}).get("16")
        by_dtype[d] = ratio(a, b)
    phases = {k.split("/", 1)[1]: v["start_phase"] for k, v in facts.items()
              if k.startswith("tangram-vllm/") and "start_phase" in v}

    def stage(kind: str, key: str) -> list:
        return [(p[kind].get("stages") or {}).get(key) for p in phases.values()]

    hit_bytes = [b for b in stage("pool_hit", "bytes_loaded") if b is not None]
    plain_load = [v.get("load_s") for k, v in facts.items() if k.startswith("vllm/")]
    ours, peer = _median_of(stage("cold", "load_s")), _median_of(plain_load)
    ratios = [r for r in by_dtype.values() if r is not None]
    return {
        "vllm_backend_vs_vllm": min(ratios) if ratios else None,
        "vllm_backend_vs_vllm_by_dtype": by_dtype,
        "vllm_backend_cold_ttft_s": _median_of([p["cold"]["ttft_s"] for p in phases.values()]),
        "vllm_backend_pool_hit_ttft_s": _median_of([p["pool_hit"]["ttft_s"] for p in phases.values()]),
        "vllm_backend_pool_hit_bytes_loaded": max(hit_bytes) if hit_bytes else None,
        "vllm_backend_pool_hit_start": sorted({s for s in stage("pool_hit", "start") if s}),
        "vllm_backend_cold_load_s": ours,
        "vllm_default_load_s": peer,
        "vllm_backend_load_speedup": ratio(peer, ours),
        "vllm_backend_start_phase": phases,
        "tangram_vllm_process_start_s": _median_of(list(starts.get("tangram-vllm", {}).values())),
    }
