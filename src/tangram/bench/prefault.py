"""Touch the machine's free memory once before a benchmark, so that no system measured pays the first touch.

On a VM whose memory the hypervisor backs lazily (Firecracker-style VMs, as the development VM), the first write
to guest memory never touched since boot runs at about 1 GB/s, and the same memory written again after it was
freed at about 20 GB/s (measured on the 2-core VM: 0.7-1.0 against 18-22 GB/s, `docs/benchmarks.md`). Which
system of a benchmark gets never-touched pages is up to the guest kernel: a large fresh buffer (a pool's arena,
a 1 GB adapter's landing place) is likely to, a small recycled one is not. That turned a 985 MB adapter's
DRAM-tier hit from 0.1 s into 0.75 s in the first of three rounds, and the cold loads' spread with it.
`prefault_host_memory` writes (and frees) the free memory once, in 1 GiB steps, so every later allocation of
the run finds host-backed pages, as on a machine that has been up for a while; on other machines it costs
about a second. The result JSON records what it touched and how fast (`host.memory_prefault`).
"""

from __future__ import annotations

import mmap
import time
from typing import Any

import torch
from rich.console import Console

from tangram.bench.common import step_progress

STEP_BYTES = 1 << 30
MARGIN_BYTES = 2 << 30  # left untouched for the page cache and the run itself
_last: dict[str, Any] | None = None


def mem_free_bytes() -> int | None:
    """MemFree of /proc/meminfo (bytes), None where there is none."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemFree:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def prefault_host_memory(limit_bytes: int | None = None, console: Console | None = None) -> dict[str, Any]:
    """Write every page of the free memory (less a margin; at most `limit_bytes`) once, then free it; what it
    touched: bytes, seconds, and GB/s per GiB (slow where the hypervisor had not backed it yet)."""
    global _last
    free = mem_free_bytes()
    if free is None:
        _last = {"bytes": 0, "note": "no /proc/meminfo: nothing touched"}
        return _last
    nbytes = max(0, free - MARGIN_BYTES)
    if limit_bytes is not None:
        nbytes = min(nbytes, limit_bytes)
    nbytes -= nbytes % STEP_BYTES
    rates: list[float] = []
    t0 = time.perf_counter()
    if nbytes:
        region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            region.madvise(mmap.MADV_HUGEPAGE)
        buf = torch.frombuffer(region, dtype=torch.uint8)
        steps = nbytes // STEP_BYTES
        with step_progress(console or Console(), steps, "touching free memory once", enabled=console is not None
                           ) as bar:
            for i in range(steps):
                s = time.perf_counter()
                buf[i * STEP_BYTES:(i + 1) * STEP_BYTES].fill_(1)
                rates.append(round(STEP_BYTES / (time.perf_counter() - s) / 1e9, 2))
                bar.advance()
        del buf
        region.close()
    _last = {"bytes": nbytes, "seconds": round(time.perf_counter() - t0, 2), "gbps_per_gib": rates}
    return _last


def last_prefault() -> dict[str, Any] | None:
    """What this process's `prefault_host_memory` touched (None: it did not run)."""
    return _last
