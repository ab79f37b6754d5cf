"""The arena: one device buffer allocated once, carved into extents.

Pure bookkeeping of byte ranges; which range holds what, and which may be
evicted, is decided by the pool and its policy. On CUDA the buffer is touched
whole at construction; on the CPU its pages are touched ahead of the highest
placement on a thread (`tangram.pool.touch`), so an idle server holds only the
memory it uses (plus the touch-ahead) rather than its whole capacity.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from tangram.pool import touch
from tangram.pool.capacity import device_memory, resolve_capacity
from tangram.store.format import align_up
from tangram.store.io import host_buffer

__all__ = ["Arena", "Block", "POOL_ALIGNMENT", "free_device_bytes", "resolve_capacity"]
POOL_ALIGNMENT = 4096  # >= CUDA's 256; page aligned on CPU so O_DIRECT reads land in place


@dataclass
class Block:
    """A used range of the arena: [offset, offset + size) holding tensor `key`."""

    offset: int
    size: int
    key: str


class Arena:
    """Fixed-capacity byte arena on one device with aligned first-fit placement."""

    def __init__(self, capacity_bytes: int, device: torch.device, alignment: int,
                 touch_ahead: int | None = None) -> None:
        """`touch_ahead` (CPU): bytes kept touched beyond the highest placement, and touched at construction
        (default `touch.TOUCH_AHEAD_BYTES`)."""
        self.alignment = alignment
        self.capacity = capacity_bytes // alignment * alignment
        if self.capacity <= 0:
            raise ValueError(f"pool capacity {capacity_bytes} bytes holds no {alignment}-byte unit: must be larger")
        self.device = device
        self.toucher: touch.Toucher | None = None
        if device.type == "cpu":
            self.buffer = host_buffer(self.capacity, touch=False)  # page aligned, huge pages where allowed
            ahead = touch.TOUCH_AHEAD_BYTES if touch_ahead is None else touch_ahead
            self.toucher = touch.Toucher(self.buffer, ahead)
            self.toucher.need(0)  # the first placements land in touched memory
        else:
            self.buffer = torch.empty(self.capacity, dtype=torch.uint8, device=device)
            self.buffer.zero_()  # touch it once, now, not on the load path
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
        if self.toucher is not None:
            self.toucher.need(offset + size)
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
    return device_memory(device)[1]
