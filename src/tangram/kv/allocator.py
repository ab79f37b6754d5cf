"""KV block allocation from the device pool: `elastic` (on demand) or `reserve` (all up front).

`elastic` takes each block from the pool when a sequence grows into it and
gives it back when the sequence ends, so idle KV memory stays available for
retained parameters; when the pool has only active bytes left, `allocate`
returns None and the engine waits (back-pressure). `reserve` takes the maximum
KV size from the pool once, at start, as conventional engines do, and hands
blocks out of that reservation.
"""

from __future__ import annotations

import enum
import threading

import torch

from tangram.kv.spec import KVSpec
from tangram.pool import DevicePool, PoolFullError
from tangram.pool.arena import Block
from tangram.pool.pool import KVBlock


class KVMode(str, enum.Enum):
    """How KV memory is taken from the pool."""

    ELASTIC = "elastic"
    RESERVE = "reserve"


class KVAllocator:
    """Hands out KV blocks of one model's geometry from one device pool. Thread-safe."""

    def __init__(self, pool: DevicePool, spec: KVSpec, mode: KVMode | str = KVMode.ELASTIC,
                 reserve_blocks: int = 0) -> None:
        self.pool, self.spec, self.mode = pool, spec, KVMode(mode)
        if pool.arena.capacity % spec.dtype.itemsize:
            raise ValueError("pool capacity is not a multiple of the KV element size")
        self.elements = pool.arena.buffer.view(spec.dtype)  # typed view of the whole arena, no copy
        self._lock = threading.Lock()
        self._free: list[KVBlock] = []
        self._reserved: list[KVBlock] = []
        self.in_use = 0
        self.peak = 0
        if self.mode is KVMode.RESERVE:
            if reserve_blocks < 1:
                raise ValueError("reserve mode needs reserve_blocks >= 1")
            size = pool.arena.size_of(spec.block_bytes)
            try:  # one contiguous reservation carved into blocks: one allocation instead of thousands
                parent = pool.allocate_kv(size * reserve_blocks)
                self._reserved = [parent]
                self._free = [KVBlock(f"{parent.key}/{i}", parent.data[i * size:(i + 1) * size],
                                      Block(parent.block.offset + i * size, size, parent.key))
                              for i in range(reserve_blocks)]
            except PoolFullError:  # fragmented pool: block by block
                try:
                    for _ in range(reserve_blocks):
                        self._reserved.append(pool.allocate_kv(spec.block_bytes))
                except PoolFullError:
                    self.close()
                    raise
                self._free = list(self._reserved)

    def offset(self, block: KVBlock) -> int:
        """Element offset of a block in `elements`."""
        return block.block.offset // self.spec.dtype.itemsize

    def allocate(self, n: int) -> list[KVBlock] | None:
        """`n` blocks, all or none; None when there is no room now (wait for blocks to come back)."""
        if n <= 0:
            return []
        with self._lock:
            if self.mode is KVMode.RESERVE:
                if len(self._free) < n:
                    return None
                out = [self._free.pop() for _ in range(n)]
            else:
                out = []
                try:
                    for _ in range(n):
                        out.append(self.pool.allocate_kv(self.spec.block_bytes))
                except PoolFullError:
                    for b in out:
                        self.pool.free_kv(b)
                    return None
            self.in_use += n
            self.peak = max(self.peak, self.in_use)
            return out

    def free(self, blocks: list[KVBlock]) -> None:
        """Give blocks back (to the reservation, or to the pool)."""
        if not blocks:
            return
        with self._lock:
            self.in_use -= len(blocks)
            if self.mode is KVMode.RESERVE:
                self._free.extend(blocks)
            else:
                for b in blocks:
                    self.pool.free_kv(b)

    def capacity_blocks(self) -> int | None:
        """Blocks this allocator can ever hold at once: the reservation, or None (elastic: up to the pool)."""
        return self.in_use + len(self._free) if self.mode is KVMode.RESERVE else None

    @property
    def reserved_bytes(self) -> int:
        """Pool bytes held by the reservation (0 in elastic mode)."""
        return sum(b.block.size for b in self._reserved)

    def close(self) -> None:
        """Return a reservation to the pool (blocks still in use are the engine's to free first)."""
        with self._lock:
            for b in self._reserved:
                self.pool.free_kv(b)
            self._reserved, self._free = [], []

    def device(self) -> torch.device:
        """Device of the KV memory."""
        return self.elements.device
