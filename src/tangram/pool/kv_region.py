"""KV cache memory of one engine inside a device pool (ElasticKV): a typed view of the arena and its blocks.

A region hands out blocks as element offsets into `elements` (the whole arena
viewed in the KV dtype, no copy). `elastic`: blocks come from the pool as
sequences grow; a freed block goes on the region's free list, so the next
allocation takes it back in O(1), and the pool reclaims every idle block
before it places anything else or reports its state, so idle KV bytes stay
available for weights exactly as free bytes are. With the free list empty, the
region places a run of adjacent blocks with one search of the free bytes (runs
double up to `RUN_CAP_BLOCKS` / `RUN_CAP_BYTES`; beyond what was asked they
take at most `SLACK_BLOCKS` when the pool is short), each block its own
placement, the surplus on the free list: allocation is O(1) amortized. When no
run fits, blocks are placed one by one, evicting retained tensors as the
policy orders. When only active bytes are left, `allocate` returns None
(back-pressure). `reserve`: one reservation taken
at creation and carved into blocks; allocate / free only move blocks between
the reservation's free list and the engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tangram.pool.records import PoolFullError

RUN_CAP_BLOCKS = 64  # most blocks one run places
RUN_CAP_BYTES = 64 << 20  # and most bytes (large blocks: shorter runs)
SLACK_BLOCKS = 2  # surplus a run may take beyond what was asked when the pool is short
SHORT_SHARE = 4  # the pool is short when a run would take more than 1/SHORT_SHARE of its free bytes

if TYPE_CHECKING:
    from tangram.pool.pool import DevicePool


class KVRegion:
    """Blocks of `block_bytes` for one engine's KV cache; made by `DevicePool.kv_region`. Thread-safe."""

    def __init__(self, pool: DevicePool, elements: torch.Tensor, block_bytes: int, reserve_blocks: int = 0) -> None:
        self._pool, self.elements, self.block_bytes = pool, elements, block_bytes
        self.block_size = pool.arena.size_of(block_bytes)  # arena bytes one block occupies
        self._itemsize = elements.element_size()
        self.elastic = reserve_blocks == 0
        self._idle: list[int] = []  # byte offsets of blocks held but unused
        self._reserved: list[int] = []  # byte offsets of the reservation's placements
        self._run = 1  # blocks the next run places (doubles per run, back to 1 when the pool reclaims)
        self._run_cap = max(1, min(RUN_CAP_BLOCKS, RUN_CAP_BYTES // self.block_size))
        self.closed = False
        if not self.elastic:
            self._reserve(reserve_blocks)

    def _reserve(self, blocks: int) -> None:
        pool = self._pool
        try:  # one contiguous reservation carved into blocks: one placement instead of thousands
            parent = pool._kv_place(self.block_size * blocks)
            self._reserved = [parent]
            self._idle = [parent + i * self.block_size for i in range(blocks)]
        except PoolFullError:  # fragmented pool: block by block
            try:
                for _ in range(blocks):
                    self._reserved.append(pool._kv_place(self.block_bytes))
            except PoolFullError:
                self.close()
                raise
            self._idle = list(self._reserved)
        self._idle.reverse()  # hand out the lowest offsets first

    def allocate(self, n: int) -> list[int] | None:
        """`n` blocks (element offsets), all or none; None when there is no room now (wait for space)."""
        if n <= 0:
            return []
        pool = self._pool
        with pool._lock:
            if self.closed:
                raise RuntimeError("KV region is closed")
            if not self.elastic:
                if len(self._idle) < n:
                    return None
                return [self._idle.pop() // self._itemsize for _ in range(n)]
            out = [self._idle.pop() for _ in range(min(n, len(self._idle)))]
            try:
                if len(out) < n:
                    self._grow(n - len(out), out)
            except PoolFullError:
                self._idle.extend(out)
                pool._space.notify_all()
                return None
            return [b // self._itemsize for b in out]

    def _grow(self, want: int, out: list[int]) -> None:
        """Append `want` new blocks to `out` (under the pool's lock, the free list empty): one run, its surplus on
        the free list; when no run fits, one by one with eviction (PoolFullError: those placed are in `out`)."""
        pool = self._pool
        k = max(want, self._run)
        if k > want and k * self.block_size * SHORT_SHARE > pool.capacity - pool.arena.ledger.used:
            k = min(k, want + SLACK_BLOCKS)  # the pool is short: take little more than asked
        got = pool._kv_place_run(self.block_size, k)
        if not got and k > want:
            got = pool._kv_place_run(self.block_size, want)
        if got:
            self._run = min(2 * self._run, self._run_cap)
            out.extend(got[:want])
            self._idle.extend(reversed(got[want:]))  # the lowest offsets are handed out first
            return
        for _ in range(want):  # no free range holds them together: free gaps first, then evict
            out.append(pool._kv_place(self.block_bytes))

    def free(self, blocks: list[int]) -> None:
        """Give blocks back (to the free list: the reservation's, or the pool's to reclaim)."""
        if not blocks:
            return
        with self._pool._lock:
            if self.closed:  # elastic blocks freed after close go straight back to the pool
                for b in blocks if self.elastic else []:
                    self._pool._kv_free(b * self._itemsize)
                return
            self._idle.extend(b * self._itemsize for b in blocks)
            self._pool._space.notify_all()

    def reclaim(self) -> None:
        """Elastic: hand every idle block back to the pool (called by the pool, under its lock)."""
        if self.elastic and self._idle:
            for off in self._idle:
                self._pool._kv_free(off)
            self._idle = []
            self._run = 1  # the pool wanted the bytes: grow again from one block

    @property
    def reserved_bytes(self) -> int:
        """Pool bytes held by the reservation (0 when elastic)."""
        return sum(self._pool._kv_size(off) for off in self._reserved)

    def wait_for_space(self, timeout: float) -> bool:
        """Block until a release or a KV free in the pool (or `timeout` s); True if woken by one."""
        return self._pool.wait_for_space(timeout)

    def close(self) -> None:
        """Return everything this region holds to the pool (blocks still in use are the engine's to free first)."""
        with self._pool._lock:
            if self.closed:
                return
            self.reclaim()
            for off in self._reserved:
                self._pool._kv_free(off)
            self._reserved, self._idle = [], []
            self.closed = True
            self._pool._regions.discard(self)
            self._pool._space.notify_all()
