"""The arena: one device buffer allocated once (pre-touched), carved into extents.

Pure bookkeeping of byte ranges; which range holds what, and which may be
evicted, is decided by the pool and its policy.
"""

from __future__ import annotations

import bisect
import os
import threading
from dataclasses import dataclass

import torch

from tangram.store.format import align_up
from tangram.store.io import host_buffer, populate_in_background

BACKGROUND_TOUCH_BYTES = 1 << 30


def _set_event() -> threading.Event:
    event = threading.Event()
    event.set()
    return event


@dataclass
class Block:
    """A used range of the arena: [offset, offset + size) holding tensor `key`."""

    offset: int
    size: int
    key: str


class Arena:
    """Fixed-capacity byte arena on one device with aligned first-fit placement."""

    def __init__(self, capacity_bytes: int, device: torch.device, alignment: int) -> None:
        if capacity_bytes <= 0:
            raise ValueError("pool capacity must be positive")
        self.alignment = alignment
        self.capacity = capacity_bytes // alignment * alignment
        self.device = device
        if device.type == "cpu":
            # page aligned; large arenas fault their pages in on a thread so a server starts at once
            background = self.capacity >= BACKGROUND_TOUCH_BYTES
            self.buffer = host_buffer(self.capacity, touch=not background)
            self.touched = populate_in_background(self.buffer) if background else _set_event()
        else:
            self.buffer = torch.empty(self.capacity, dtype=torch.uint8, device=device)
            self.buffer.zero_()  # touch it once, now, not on the load path
            self.touched = _set_event()
        self._starts: list[int] = []  # sorted offsets of used blocks
        self._blocks: dict[int, Block] = {}

    def size_of(self, nbytes: int) -> int:
        """Bytes an allocation of `nbytes` occupies (aligned, at least one unit)."""
        return max(align_up(nbytes, self.alignment), self.alignment)

    def blocks(self) -> list[Block]:
        """Used blocks in offset order."""
        return [self._blocks[s] for s in self._starts]

    def gaps(self) -> list[tuple[int, int]]:
        """Free ranges (offset, size) in offset order."""
        out, pos = [], 0
        for s in self._starts:
            if s > pos:
                out.append((pos, s - pos))
            pos = s + self._blocks[s].size
        if pos < self.capacity:
            out.append((pos, self.capacity - pos))
        return out

    def first_fit(self, size: int, within: tuple[int, int] | None = None) -> int | None:
        """Offset of the first free range of `size` bytes (inside `within` = (offset, size) if given)."""
        lo, hi = (0, self.capacity) if within is None else (within[0], within[0] + within[1])
        for off, length in self.gaps():
            start, end = max(off, lo), min(off + length, hi)
            if end - start >= size:
                return start
        return None

    def place(self, offset: int, size: int, key: str) -> Block:
        """Mark [offset, offset + size) used by `key` (must be free and aligned)."""
        if offset % self.alignment or offset < 0 or offset + size > self.capacity:
            raise ValueError(f"bad placement {offset}+{size}")
        i = bisect.bisect_left(self._starts, offset)
        if i > 0:
            prev = self._blocks[self._starts[i - 1]]
            if prev.offset + prev.size > offset:
                raise ValueError(f"placement {offset}+{size} overlaps a used block")
        if i < len(self._starts) and self._starts[i] < offset + size:
            raise ValueError(f"placement {offset}+{size} overlaps a used block")
        block = Block(offset, size, key)
        self._starts.insert(i, offset)
        self._blocks[offset] = block
        return block

    def free(self, offset: int) -> None:
        """Release the block starting at `offset`."""
        del self._blocks[offset]
        self._starts.pop(bisect.bisect_left(self._starts, offset))

    def view(self, block: Block, nbytes: int) -> torch.Tensor:
        """The first `nbytes` of a block as a flat uint8 tensor (a view, no copy)."""
        return self.buffer[block.offset : block.offset + nbytes]


def free_device_bytes(device: torch.device) -> int:
    """Free memory of a device now: CUDA's free bytes, or the host's available physical memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def resolve_capacity(capacity: int | float, device: torch.device) -> int:
    """Bytes for a capacity given as bytes (int > 1) or as a fraction (0, 1] of the device's free memory."""
    if isinstance(capacity, float) and 0 < capacity <= 1:
        return int(free_device_bytes(device) * capacity)
    if capacity >= 1 and float(capacity).is_integer():
        return int(capacity)
    raise ValueError(f"pool capacity {capacity!r}: give bytes (an integer) or a fraction of free memory in (0, 1]")
