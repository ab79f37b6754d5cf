"""KV block allocation from the device pool: `elastic` (on demand) or `reserve` (all up front).

`elastic` takes each block from the pool when a sequence grows into it and
gives it back when the sequence ends, so idle KV memory stays available for
retained parameters; when the pool has only active bytes left, `allocate`
returns None and the engine waits (back-pressure). `reserve` takes the maximum
KV size from the pool once, at start, as conventional engines do, and hands
blocks out of that reservation. The memory itself is a `KVRegion` of the pool;
a block is its element offset in `elements`.
"""

from __future__ import annotations

import enum
import threading

import torch

from tangram.kv.spec import KVSpec
from tangram.pool import DevicePool


class KVMode(str, enum.Enum):
    """How KV memory is taken from the pool."""

    ELASTIC = "elastic"
    RESERVE = "reserve"


class KVAllocator:
    """Hands out KV blocks of one model's geometry from one device pool. Thread-safe."""

    def __init__(self, pool: DevicePool, spec: KVSpec, mode: KVMode | str = KVMode.ELASTIC,
                 reserve_blocks: int = 0) -> None:
        self.spec, self.mode = spec, KVMode(mode)
        if self.mode is KVMode.RESERVE and reserve_blocks < 1:
            raise ValueError("reserve mode needs reserve_blocks >= 1")
        self.region = pool.kv_region(spec.block_bytes, spec.dtype,
                                     reserve_blocks if self.mode is KVMode.RESERVE else 0)
        self.elements = self.region.elements  # typed view of the whole arena, no copy
        self._lock = threading.Lock()
        self.in_use = 0
        self.peak = 0

    @property
    def block_size(self) -> int:
        """Pool bytes one block occupies (its size, aligned)."""
        return self.region.block_size

    def offset(self, block: int) -> int:
        """Element offset of a block in `elements` (a block is its offset)."""
        return block

    def block_view(self, block: int) -> torch.Tensor:
        """One block's elements (a view into the pool, no copy)."""
        return self.elements[block : block + self.spec.block_bytes // self.spec.dtype.itemsize]

    def allocate(self, n: int) -> list[int] | None:
        """`n` blocks, all or none; None when there is no room now (wait for blocks to come back)."""
        if n <= 0:
            return []
        with self._lock:
            out = self.region.allocate(n)
            if out is None:
                return None
            self.in_use += n
            self.peak = max(self.peak, self.in_use)
            return out

    def free(self, blocks: list[int]) -> None:
        """Give blocks back (to the reservation, or to the pool)."""
        if not blocks:
            return
        with self._lock:
            self.in_use -= len(blocks)
            self.region.free(blocks)

    def wait_for_space(self, timeout: float) -> bool:
        """Block until blocks or weights come back to the pool (or `timeout` s); True if woken by one."""
        return self.region.wait_for_space(timeout)

    @property
    def reserved_bytes(self) -> int:
        """Pool bytes held by the reservation (0 in elastic mode)."""
        return self.region.reserved_bytes

    def close(self) -> None:
        """Return a reservation (and idle blocks) to the pool (blocks still in use are the engine's to free first)."""
        self.region.close()

    def device(self) -> torch.device:
        """Device of the KV memory."""
        return self.elements.device
