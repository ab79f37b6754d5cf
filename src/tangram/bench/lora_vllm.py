"""`bench lora`'s vLLM rows: adapter loads on Tangram's vllm backend (bytes from the pool) against plain vLLM's
own (`add_lora` reading the PEFT files), when a vLLM interpreter is found.

Both systems end in the same state: the adapter in vLLM's LoRA cache of an engine built with `enable_lora`, in
the same dtype (bfloat16, vLLM's own choice on a CPU). Tangram: `VllmAdapters.acquire` on a running backend (a
cold read of the converted adapter, page cache dropped, into the pool, then the shell's bind and vLLM's
`add_lora`), then released and, once the shell has dropped it, acquired again from the pool (`pool`). Plain
vLLM: `add_lora` with `adapter_model.safetensors` dropped from the page cache (`cold`) and in it (`warm`), run by
`tangram.bench.lora_vllm_peer` in the vLLM interpreter. The first adapter's greedy continuation is checked equal
between the two.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import tangram
from tangram.bench.common import ratio
from tangram.engine.backend import start_backend
from tangram.engine.instance import VLLM_LORA_RANKS, EngineConfig
from tangram.engine.request import OutputQueue
from tangram.engine.sampling import SamplingParams
from tangram.heap import freeze_startup_heap, thaw_heap
from tangram.pool import DevicePool, PoolConfig
from tangram.store import Checkpoint
from tangram.store.io import evict_from_page_cache
from tangram.vllm.python import vllm_python

DTYPE = "bfloat16"
PROMPT = [5, 17, 33, 2, 90, 41, 7, 300, 12, 64]
MAX_TOKENS = 8
MAX_MODEL_LEN = 256  # both engines (the test base has no longer context)
SETTLE_S = 30.0


def _peer(python: str, base_hf: Path, adapters: list[Path], rank: int, repeats: int, workdir: Path) -> dict:
    job, out = workdir / "vllm-lora-job.json", workdir / "vllm-lora-result.json"
    job.write_text(json.dumps({"model": str(base_hf), "dtype": DTYPE, "max_lora_rank": rank, "repeats": repeats,
                               "adapters": [str(a) for a in adapters], "prompt": PROMPT, "max_tokens": MAX_TOKENS,
                               "max_model_len": MAX_MODEL_LEN}))
    src = str(Path(tangram.__file__).resolve().parents[1])
    proc = subprocess.run([python, "-m", "tangram.bench.lora_vllm_peer", str(job), str(out)], capture_output=True,
                          text=True, timeout=1800, env={**os.environ, "PYTHONPATH": src})
    if proc.returncode != 0:
        raise RuntimeError(f"plain vLLM's adapter loads failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(out.read_text())


def _settle(pool: DevicePool, active: int) -> None:
    end = time.monotonic() + SETTLE_S
    while pool.totals()["active"] != active and time.monotonic() < end:
        time.sleep(0.01)


def _greedy(backend, adapter: Path) -> list[int]:
    q = OutputQueue()
    backend.submit(PROMPT, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True), q, arrival=time.perf_counter(),
                   adapter=str(adapter))
    while True:
        out = q.get(timeout=600)
        if out.finished:
            if out.error:
                raise RuntimeError(f"the vllm backend's adapter request failed: {out.error}")
            return out.output_ids


def _ours(base: Checkpoint, adapters: list[Path], rank: int, repeats: int) -> tuple[list[dict], list[int]]:
    adapter_bytes = sum(Checkpoint(a).index.total_bytes for a in adapters)
    cfg = EngineConfig(dtype=DTYPE, kv_cache_bytes=256 << 20, max_model_len=MAX_MODEL_LEN, max_loras=1,
                       max_lora_rank=rank)
    # the weights, the engine's own copy and its KV cache (both charged to the pool), the adapters, a margin
    capacity = 2 * base.index.total_bytes + cfg.kv_cache_bytes + adapter_bytes + (256 << 20)
    pool = DevicePool(capacity, "cpu", PoolConfig(shared=True))
    backend = start_backend("vllm", base, pool, cfg, name="lora-base", arrival=time.perf_counter())
    rows = []
    # as in a server once its deployments are up: no full collection over the start-up objects inside a timed bind
    # (one is 0.1-0.4 s here; plain vLLM's side collects before each timed load)
    freeze_startup_heap()
    try:
        idle = pool.totals()["active"]
        for path in adapters:
            times: dict[str, list[float]] = {"cold": [], "pool": []}
            split: tuple[float, float] = (0.0, 0.0)  # the cold bind's time: the pool's acquire, the shell's bind
            for f in path.iterdir():
                evict_from_page_cache(f)
            for state in ["cold"] + ["pool"] * repeats:
                t0 = time.perf_counter()
                ref = backend.adapters.acquire(str(path))
                times[state].append(time.perf_counter() - t0)
                loaded = backend.adapters.last_bind.bytes_loaded
                if (state == "cold") != (loaded > 0):
                    raise RuntimeError(f"a {state} adapter load read {loaded} bytes")
                if state == "cold":
                    split = (backend.adapters.last_bind.seconds, backend.adapters.last_shell_s)
                backend.adapters.release(ref)
                _settle(pool, idle)
            rows.append({"adapter": str(path), **times, "split": split})
        greedy = _greedy(backend, adapters[0])
    finally:
        thaw_heap()
        backend.stop()
    return rows, greedy


def vllm_rows(base: Checkpoint, base_hf: Path, pairs: list[tuple[Path, Path]], rank: int, repeats: int,
              workdir: Path) -> dict[str, Any]:
    """The vLLM rows and their summary keys, or a note of why there are none (no vLLM interpreter)."""
    found = vllm_python()
    if found.python is None:
        return {"note": f"no vLLM rows: {found.note}"}
    os.environ.setdefault("TANGRAM_VLLM_PYTHON", found.python)
    rank = next(r for r in VLLM_LORA_RANKS if r >= rank)  # vLLM's max_lora_rank takes only these
    peer = _peer(found.python, base_hf, [s for s, _ in pairs], rank, repeats, workdir)
    ours, greedy = _ours(base, [c for _, c in pairs], rank, repeats)
    if greedy != peer["greedy"]:
        raise RuntimeError(f"the vllm backend's adapter output {greedy} differs from plain vLLM's {peer['greedy']}")
    rows = [{"adapter": Path(o["adapter"]).name, "tangram_vllm_cold_s": o["cold"][0],
             "tangram_vllm_cold_pool_s": round(o["split"][0], 5), "tangram_vllm_cold_shell_s": round(o["split"][1], 5),
             "tangram_vllm_pool_ms": statistics.median(o["pool"]) * 1e3, "vllm_cold_s": statistics.median(p["cold"]),
             "vllm_warm_s": statistics.median(p["warm"]), "vllm_cold_runs_s": [round(x, 4) for x in p["cold"]]}
            for o, p in zip(ours, peer["loads"])]
    ours_cold = statistics.median(r["tangram_vllm_cold_s"] for r in rows)
    peer_cold = statistics.median(r["vllm_cold_s"] for r in rows)
    return {"rows": rows, "dtype": DTYPE, "greedy_equal": True,
            "summary": {"vllm_backend_adapter_load_s": round(ours_cold, 5),
                        "vllm_adapter_load_s": round(peer_cold, 5),
                        "vllm_backend_adapter_load_speedup": ratio(peer_cold, ours_cold),
                        "vllm_backend_adapter_pool_hit_ms":
                            round(statistics.median(r["tangram_vllm_pool_ms"] for r in rows), 4)}}
