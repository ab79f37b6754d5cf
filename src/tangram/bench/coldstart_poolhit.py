"""bench coldstart's pool-hit section: the first request after scale-to-zero against a warm request.

One server, one deployment with a short keep-alive, one request at a time (so
nothing queues): a request starts the instance, a second one measures the warm
TTFT; once the keep-alive has stopped the instance (its weights retained), a
request starts it again from the pool (0 bytes loaded) and a request right
after measures the warm TTFT again. `pool_hit_vs_warm_ttft` is the median over
repeats of pool-hit TTFT / the warm TTFT next to it; the trace replay's own
ratio (`trace_pool_hit_vs_warm_ttft`) also holds the queueing of a burst.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

import httpx

from tangram.bench.coldstart_client import one
from tangram.control import Deployment, ServeConfig
from tangram.serve import Server
from tangram.store import read_index

KEEP_ALIVE_S = 0.3


async def _ask(client: httpx.AsyncClient, url: str, prompt: list[int]) -> dict:
    r = await one(client, url, {"model": "m", "prompt": prompt, "max_tokens": 2})
    if r["error"]:
        raise RuntimeError(f"pool-hit section: {r['error']}")
    return r


async def _replicas(client: httpx.AsyncClient, url: str) -> int:
    resp = await client.get(url + "/admin/deployments", headers={"Authorization": "Bearer bench"})
    resp.raise_for_status()
    return sum(d["instances"] + d["starting"] for d in resp.json()["deployments"] if d["name"] == "m")


async def _measure(url: str, prompt: list[int], repeats: int) -> list[dict]:
    rows: list[dict] = []
    async with httpx.AsyncClient(timeout=600) as client:
        await _ask(client, url, prompt)  # the first start (cold), then the template and caches exist
        for rep in range(repeats):
            deadline = time.perf_counter() + 30
            while await _replicas(client, url) and time.perf_counter() < deadline:
                await asyncio.sleep(0.05)  # the keep-alive stops the instance; its weights stay retained
            hit = await _ask(client, url, prompt)
            warm = await _ask(client, url, prompt)
            rows.append({"section": "pool-hit", "repeat": rep, "start": hit["start"], "ttft_s": hit["ttft_s"],
                         "warm_ttft_s": warm["ttft_s"], "bytes_loaded": hit["bytes_loaded"],
                         "init_s": hit["init_s"], "prefill_s": hit["prefill_s"]})
    return rows


def pool_hit_section(ckpt: Path, vocab: int, prompt_tokens: int, repeats: int, bar) -> tuple[list[dict], dict]:
    """Pool-hit starts of `ckpt` against warm requests of the same run (see the module's docstring)."""
    capacity = int(read_index(ckpt).total_bytes * 2) + (64 << 20)
    prompt = [3 + (i * 37) % (vocab - 3) for i in range(prompt_tokens)]
    dep = Deployment(name="m", checkpoint=str(ckpt), keep_alive_s=KEEP_ALIVE_S)
    bar.describe("pool hit vs warm")
    with Server(ServeConfig(port=0, pool_capacity=capacity, admin_token="bench", deployments=[dep])).running() as srv:
        rows = asyncio.run(_measure(srv.url, prompt, repeats))
    bar.advance()
    hits = [r for r in rows if r["start"] == "pool-hit"]
    ratio = statistics.median(r["ttft_s"] / r["warm_ttft_s"] for r in hits) if hits else None
    return rows, {"pool_hit_vs_warm_ttft": ratio, "pool_hit_starts": len(hits),
                  "pool_hit_ttft_p50": statistics.median(r["ttft_s"] for r in hits) if hits else None,
                  "pool_hit_warm_ttft_p50": statistics.median(r["warm_ttft_s"] for r in hits) if hits else None}
