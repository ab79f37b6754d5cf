"""How much execute-while-load can save at most on this machine (the template section's yardstick).

Two timings of one model, nothing else running, interleaved: a cold load from
disk into an empty pool (page cache dropped) and right after it a prefill on an
instance already loaded (`sequential_s`, as a start without a template runs
them), and the two at once (`both_s`: the load on a thread, as
execute-while-load runs it). If the two used separate resources, both at once
would take max(load, prefill); where disk reads take the same CPUs as the
forward (a VM whose virtual disk is served by the host on the guest's cores,
buffered reads copying through the page cache), they take about load + prefill
and no load order can hide anything.
"""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path

from tangram.engine import EngineConfig, Instance
from tangram.pool import DevicePool
from tangram.store import Checkpoint, Loader, read_index
from tangram.store.io import evict_from_page_cache


def overlap_bound(sequential_s: float, both_s: float) -> float:
    """The speed-up running the load and the prefill together gives over one after the other."""
    return sequential_s / both_s


def probe_overlap(ckpt: Path, prompt: list[int], repeats: int = 3, device: str = "cpu") -> dict[str, float]:
    """Median seconds of a cold load and of the prefill after it, of the two in sequence and at once, and the
    `bound` (see `overlap_bound`), with the pools on `device` (the benchmark server's device)."""
    size = read_index(ckpt).total_bytes
    resident = DevicePool(int(size * 1.25) + (64 << 20), device, loader=Loader())
    with Instance(ckpt, resident, EngineConfig(templates=False, max_batch=1)) as inst:
        runner, kv = inst.engine.runner, inst.kv

        def prefill() -> float:
            blocks = kv.allocate(kv.spec.blocks_for(len(prompt)))
            try:
                t0 = time.perf_counter()
                runner.prefill(prompt, [kv.offset(b) for b in blocks])
                return time.perf_counter() - t0
            finally:
                kv.free(blocks)

        def cold_load() -> tuple[float, threading.Thread]:
            """An empty pool (every byte from disk), the page cache dropped; then the load starts on a thread."""
            pool = DevicePool(int(size * 1.1) + (16 << 20), device, loader=Loader())
            for f in Checkpoint(ckpt).data_files():
                evict_from_page_cache(f)
            t0 = time.perf_counter()
            thread = threading.Thread(target=lambda: pool.release(pool.acquire(ckpt, model="probe")), daemon=True)
            thread.start()
            return t0, thread

        for _ in range(2):
            prefill()  # first-run costs (allocator, kernel choice) are not what is probed
        times: dict[str, list[float]] = {"load_s": [], "prefill_s": [], "sequential_s": [], "both_s": []}
        for _ in range(repeats):
            t0, loading = cold_load()
            loading.join()
            t1 = time.perf_counter()
            prefill()
            t2 = time.perf_counter()
            times["load_s"].append(t1 - t0)
            times["prefill_s"].append(t2 - t1)
            times["sequential_s"].append(t2 - t0)
            t0, loading = cold_load()
            prefill()
            loading.join()
            times["both_s"].append(time.perf_counter() - t0)
    out = {k: statistics.median(v) for k, v in times.items()}
    out["bound"] = overlap_bound(out["sequential_s"], out["both_s"])
    return out
