"""The machine state each `bench load` run needs (page cache cold or warm) and the memory it takes.

A cold run's files are evicted from the page cache; a warm run's files, and of the checkpoint only
they, are read through it. `memory_budget` states the bytes each phase holds at once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tangram.bench.limits import RawRead
from tangram.bench.load_methods import Target
from tangram.bench.synthetic import SyntheticCheckpoint
from tangram.store import Checkpoint
from tangram.store.format import align_up
from tangram.store.io import evict_from_page_cache, populate_page_cache


def make_cold(files: Sequence[Path]) -> None:
    """Drop `files` from the page cache."""
    for p in files:
        evict_from_page_cache(p)


def make_warm(files: Sequence[Path], ckpt: SyntheticCheckpoint) -> None:
    """Leave `files` (and of this checkpoint only they) in the page cache.

    The other formats' files go first: read twice by their own warm runs they sit on the kernel's
    active list, and pages read once land on the inactive list, whose tail is reclaimed first. With
    four 6.2 GB files a populate then evicted its own first pages while reading the rest (44-61% of
    a qwen2.5-3b data file resident with 18 GB available; docs/store.md), so a "warm" run read from disk.
    """
    mine = set(files)
    for fmt in ckpt.formats:
        for p in ckpt.files(fmt):
            if p not in mine:
                evict_from_page_cache(p)
    for p in files:
        populate_page_cache(p)


def memory_budget(ckpt: SyntheticCheckpoint, target: Target, raws: Sequence[RawRead], nbytes: int) -> dict[str, Any]:
    """Bytes each phase of this model's runs holds at once, its peak, and the machine's memory.

    The target lives through every phase; the DRAM tier, the pool arena and the memcpy source only in
    their own phase; a warm run needs its largest file in the page cache; a peer makes its own host copy.
    """
    scratch = [r.scratch for r in raws if r.scratch is not None]
    own_scratch = sum({id(t): t.numel() for t in scratch if t.data_ptr() != target.buffer.data_ptr()}.values())
    parts = {
        "target": target.buffer.numel(),
        "dram_tier": nbytes + (64 << 20),
        "pool": sum(align_up(e.nbytes, 4096) for e in Checkpoint(ckpt.tangram_dir).index.tensors.values()) + (1 << 20),
        "raw_read_scratch": own_scratch,
        "memcpy_source": nbytes,
        "page_cache_file": max(sum(p.stat().st_size for p in ckpt.files(f)) for f in ckpt.formats),
        "peer_host_copy": nbytes,
    }
    t = parts["target"]
    phases = {
        "cold": t + parts["raw_read_scratch"] + parts["peer_host_copy"],
        "warm": t + parts["page_cache_file"] + parts["peer_host_copy"],
        "dram": t + parts["dram_tier"],
        "pool": t + parts["pool"],
        "memcpy": t + parts["memcpy_source"],
    }
    return {**parts, "phases": phases, "peak": max(phases.values()), "machine": mem_total()}


def mem_total() -> int:
    """The machine's physical memory in bytes (0 when unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0
