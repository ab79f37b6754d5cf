"""The arena: one device buffer allocated once, carved into extents.

Pure bookkeeping of byte ranges; which range holds what, and which may be
evicted, is decided by the pool and its policy. On CUDA the buffer is touched
whole at construction; on the CPU its pages are touched ahead of the highest
placement on a thread (`tangram.pool.touch`), so an idle server holds only the
memory it uses (plus the touch-ahead) rather than its whole capacity.
"""

from __future__ import annotations

import torch

from tangram.pool import touch
from tangram.pool.capacity import device_memory, resolve_capacity
from tangram.pool.ledger import Ledger, Placement
from tangram.store import io

__all__ = ["Arena", "POOL_ALIGNMENT", "free_device_bytes", "resolve_capacity"]
POOL_ALIGNMENT = 4096  # >= CUDA's 256; page aligned on CPU so O_DIRECT reads land in place


class Arena:
    """Fixed-capacity byte arena on one device: a buffer and the `Ledger` of its used ranges.

    `direct_reads_fast`: whether O_DIRECT reads may land in the buffer directly (`io.direct_reads_land_fast`);
    otherwise the loader reads through bounce buffers."""

    def __init__(self, capacity_bytes: int, device: torch.device, alignment: int = POOL_ALIGNMENT,
                 touch_ahead: int | None = None, shared: bool = False) -> None:
        """`touch_ahead` (CPU): bytes kept touched beyond the highest placement, and touched at construction
        (default `touch.TOUCH_AHEAD_BYTES`). `shared` (CPU): the buffer is shared memory that engine processes
        map (`share_path`)."""
        self.ledger = Ledger(capacity_bytes, alignment)
        self.alignment, self.capacity = alignment, self.ledger.capacity
        self.device = device
        self.toucher: touch.Toucher | None = None
        self._shared_fd: int | None = None
        self.direct_reads_fast = io.direct_reads_land_fast(shared) if device.type == "cpu" else True
        if device.type == "cpu":
            if shared:
                self.buffer, self._shared_fd = io.shared_host_buffer(self.capacity)
            else:
                self.buffer = io.host_buffer(self.capacity, touch=False)  # page aligned, huge pages where allowed
            ahead = touch.TOUCH_AHEAD_BYTES if touch_ahead is None else touch_ahead
            self.toucher = touch.Toucher(self.buffer, ahead)
            self.toucher.need(0)  # the first placements land in touched memory
        else:
            self.buffer = torch.empty(self.capacity, dtype=torch.uint8, device=device)
            self.buffer.zero_()  # touch it once, now, not on the load path

    @property
    def share_path(self) -> str | None:
        """Where another process of this user maps the buffer (`io.fd_path` of its memfd), None if private."""
        return None if self._shared_fd is None else io.fd_path(self._shared_fd)

    def offset_of(self, view: torch.Tensor) -> int:
        """Byte offset in the buffer of a view into it."""
        offset = view.data_ptr() - self.buffer.data_ptr()
        if not 0 <= offset <= self.capacity - view.numel() * view.element_size():
            raise ValueError("the tensor is not a view into this arena")
        return offset

    def size_of(self, nbytes: int) -> int:
        """Bytes an allocation of `nbytes` occupies (aligned, at least one unit)."""
        return self.ledger.size_of(nbytes)

    def blocks(self) -> list[Placement]:
        """Used ranges in offset order."""
        return self.ledger.blocks()

    def gaps(self) -> list[tuple[int, int]]:
        """Free ranges (offset, size) in offset order."""
        return self.ledger.gaps()

    def first_fit(self, size: int) -> int | None:
        """Offset of the first free range of `size` bytes."""
        return self.ledger.first_fit(size)

    def place(self, offset: int, size: int, key: str) -> Placement:
        """Mark [offset, offset + size) used by `key` (must be free and aligned); touch memory ahead of it."""
        p = self.ledger.place(offset, size, key)
        self.touched(p)
        return p

    def touched(self, p: Placement) -> None:
        """Keep the memory touched up to and beyond a placement made in the ledger directly (CPU)."""
        if self.toucher is not None:
            self.toucher.need(p.offset + p.size)

    def free(self, offset: int) -> None:
        """Release the range starting at `offset`."""
        self.ledger.free(offset)

    def view(self, block: Placement, nbytes: int) -> torch.Tensor:
        """The first `nbytes` of a range as a flat uint8 tensor (a view, no copy)."""
        return self.buffer[block.offset : block.offset + nbytes]


def free_device_bytes(device: torch.device) -> int:
    """Free memory of a device now: CUDA's free bytes, or the host's available physical memory."""
    return device_memory(device)[1]
