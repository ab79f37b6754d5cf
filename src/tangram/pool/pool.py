"""The device memory pool: content-addressed tensor registry over one arena, with retention.

`acquire(checkpoint)` binds every tensor of a model already resident (shared by
content identity `hash:dtype:shape`, across models) and loads only the missing
ones into the arena through the loader, each checked against its hash as it
lands (a tensor is shared only once its bytes matched); `release(binding)` drops the
references and leaves the tensors *retained* for the next start. Space for
missing tensors comes from free bytes, then from evicting retained tensors as
the policy decides; active bytes are never touched: when they would have to
be, `PoolFullError` is raised (callers turn it into waiting).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from tangram.pool.arena import Arena, resolve_capacity
from tangram.pool.config import PoolConfig
from tangram.pool.kv_region import KVRegion
from tangram.pool.ledger import LedgerFull, Placement, allocate, place_each
from tangram.pool.loading import LoadHandle, LoadJob, verified_load
from tangram.pool.policy import (
    Extent, PoolPolicy, State, decayed_rate, fragmentation, largest_free, retention_gain,
)
from tangram.pool.poolmap import ArenaMap, merge_extents
from tangram.pool.records import Binding, Eviction, ModelStats, PoolFullError, Resident, eviction
from tangram.pool.safetensors_loader import SafetensorsLoader
from tangram.store import Checkpoint, Loader
from tangram.store.loader import typed_view
from tangram.store.plan import ordered_groups

log = logging.getLogger(__name__)
__all__ = ["Binding", "DevicePool", "Eviction", "KVRegion", "PoolConfig", "PoolFullError"]


class DevicePool:
    """One pool per device: an arena allocated once, shared by every model on that device. Thread-safe.

    `capacity` is bytes (int), a fraction of the device's memory (float in (0, 1]: of total memory on the CPU, of
    free memory on CUDA) or None (the default rule); see `tangram.pool.capacity`. `config` fixes placement,
    retention, sharing and loading for the pool's life (`PoolConfig`; keyword overrides of its fields are taken
    too); `loader` is the Tangram loader to read with (`config.loader="safetensors"` reads the original files).
    `on_evict` is told what each allocation evicted (called under the pool's lock: it must be quick).
    """

    def __init__(
        self,
        capacity: int | float | None,
        device: str | torch.device = "cpu",
        config: PoolConfig | None = None,
        *,
        loader: Loader | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_evict: Callable[[Eviction], None] | None = None,
        **overrides,
    ) -> None:
        self.device = torch.device(device)
        base = config or PoolConfig()
        self.config = PoolConfig.model_validate({**base.model_dump(), **overrides}) if overrides else base
        self.arena = Arena(resolve_capacity(capacity, self.device), self.device, shared=bool(self.config.shared))
        self._loader = (SafetensorsLoader(self.config.safetensors_sources) if self.config.loader == "safetensors"
                        else loader or Loader())
        self.clock = clock
        self.on_evict = on_evict
        self._tensors: dict[str, Resident] = {}
        self._models: dict[str, ModelStats] = {}
        self._kv: dict[str, Placement] = {}
        self._kv_bytes = 0  # arena bytes of every KV placement (in use or idle in a region)
        self._kv_at: dict[int, str] = {}
        self._regions: set[KVRegion] = set()
        self._kv_ids = itertools.count()
        self._lock = threading.RLock()
        self._space = threading.Condition(self._lock)  # notified when active bytes become free or retained

    @property
    def capacity(self) -> int:
        """Usable bytes of the arena."""
        return self.arena.capacity

    @property
    def policy(self) -> PoolPolicy:
        """Placement / eviction policy (`config.policy`; the config is frozen, fixed at construction)."""
        return self.config.policy

    @property
    def loader(self) -> Loader:
        """What reads missing tensors."""
        return self._loader  # type: ignore[return-value]

    # ------------------------------------------------------------------ acquire / release

    def acquire(self, checkpoint: Checkpoint | str | Path, model: str | None = None, *,
                order: Sequence[Sequence[str]] | None = None, background: bool = False) -> Binding:
        """Bind a model's tensors: reuse resident ones, load only the missing ones.

        `order`: groups of tensor names to load one after the other (a template's
        first-use order). `background`: return as soon as space is placed and
        load on a thread; `binding.loading` (a `LoadHandle`) tells when each
        tensor has landed and when the load is over (wait for it before `release`).
        """
        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
        model = model or str(ckpt.path.resolve())
        index = ckpt.index
        start = time.perf_counter()
        keys = self._keys(index)
        by_key = {}
        for name, entry in index.tensors.items():
            by_key.setdefault(keys[name], (name, entry))
        with self._lock:
            now = self.clock()
            stats = self._models.setdefault(model, ModelStats())
            before = (stats.rate, stats.last)
            half = self.config.half_life_s
            stats.rate = decayed_rate(stats.rate, stats.last, now, half) + 1.0 / half
            stats.last = now
            reused = [k for k in by_key if k in self._tensors and not self._tensors[k].failed]
            reused_set = set(reused)
            missing = [k for k in by_key if k not in reused_set]
            for k in reused:
                self._tensors[k].pin(model, now)
            try:  # a pool hit places nothing: no extents to compute
                placed = self._allocate([(k, by_key[k][1].nbytes) for k in missing], model) if missing else {}
            except PoolFullError:
                for k in reused:
                    self._tensors[k].unpin()
                stats.rate, stats.last = before  # a retried acquire must not count twice
                raise
            for k, block in placed.items():
                r = Resident(key=k, block=block, nbytes=by_key[k][1].nbytes)
                self._tensors[k] = r
                r.pin(model, now)
            pinned = [self._tensors[k] for k in by_key]
        views: dict[str, torch.Tensor] = {}
        ready: dict[str, threading.Event] = {}
        for name, entry in index.tensors.items():
            r = self._tensors[keys[name]]
            shape = (entry.torch_dtype, tuple(entry.shape))
            view = r.views.get(shape)  # a pool hit binds the views made by the tensor's first binding
            if view is None:
                view = r.views[shape] = typed_view(self.arena.view(r.block, entry.nbytes), *shape)
            views[name] = view
            ready[name] = r.ready
        for alias, target in index.aliases.items():
            views[alias], ready[alias] = views[target], ready[target]
        name_of = {by_key[k][0]: k for k in missing}
        dests = {n: self.arena.view(placed[k], by_key[k][1].nbytes) for n, k in name_of.items()}
        handle: LoadHandle | None = None
        load = verified_load(self.loader, ckpt, dests, through_bounce=not self.arena.direct_reads_fast)
        job = LoadJob(ordered_groups(list(name_of), order), load,
                      {n: self._tensors[k].ready for n, k in name_of.items()},
                      lambda exc: self._drop_failed([self._tensors[k] for k in missing]),
                      (lambda stats: handle._finished(stats)) if missing else None)  # type: ignore[union-attr]
        handle = LoadHandle(job, ready, lambda: any(r.failed for r in pinned))
        binding = Binding(model, views, list(by_key), sum(by_key[k][1].nbytes for k in missing),
                          sum(by_key[k][1].nbytes for k in reused), 0.0, handle, residents=pinned)
        if background:
            job.start()
            binding.seconds = time.perf_counter() - start
            return binding
        job.run()
        if job.error is not None:
            self._unpin_all(pinned)
            raise job.error
        for r in pinned:  # another acquire may still be loading a shared tensor
            r.ready.wait()
        if any(r.failed for r in pinned):
            self._unpin_all(pinned)
            raise RuntimeError(f"a concurrent load of a shared tensor of {model} failed; retry the acquire")
        binding.seconds = time.perf_counter() - start
        return binding

    def _drop_failed(self, loading: list[Resident]) -> None:
        """A load failed: the tensors it had not landed leave the registry (marked failed for waiters) and their
        space is freed. Those it landed are whole and stay: another binding may already be computing with them."""
        with self._lock:
            for r in [r for r in loading if not r.ready.is_set()]:
                r.failed = True
                if self._tensors.get(r.key) is r:
                    del self._tensors[r.key]
                    self.arena.free(r.block.offset)
                r.ready.set()

    def _unpin_all(self, pinned: list[Resident]) -> None:
        with self._lock:
            for r in [r for r in pinned if not r.failed]:
                r.unpin()

    def release(self, binding: Binding) -> None:
        """Drop a binding's references; its tensors stay retained until space is needed."""
        with self._lock:
            if binding.released:
                return
            binding.released = True
            for r in binding.residents:
                if not r.failed:
                    r.unpin()
                    if not self.config.retain and r.refs == 0 and self._tensors.get(r.key) is r:
                        self._evict(r.key)  # a conventional engine keeps nothing once an instance ends
            self._space.notify_all()

    def _keys(self, index) -> dict[str, str]:
        """Registry key of each stored tensor: its content key, prefixed by the checkpoint's when not sharing."""
        keys = {name: entry.key for name, entry in index.tensors.items()}
        if self.config.share:
            return keys
        ns = hashlib.sha256("\n".join(f"{n}={k}" for n, k in sorted(keys.items())).encode()).hexdigest()[:16]
        return {name: f"{ns}/{k}" for name, k in keys.items()}

    def resident_bytes(self, index) -> int:
        """Bytes of a checkpoint index's distinct tensors resident in this pool now (active or retained)."""
        keys = {k: index.tensors[name].nbytes for name, k in self._keys(index).items()}
        with self._lock:
            return sum(n for k, n in keys.items() if k in self._tensors and not self._tensors[k].failed)

    def exclusive_bytes(self, binding: Binding) -> int:
        """Active bytes that releasing `binding` would make evictable: its tensors no other binding holds."""
        with self._lock:
            return sum(r.nbytes for r in binding.residents if r.refs == 1 and not r.failed and not binding.released)

    def footprint(self, binding: Binding) -> int:
        """Arena bytes a binding's tensors occupy (shared tensors counted once)."""
        with self._lock:
            return sum(self._tensors[k].block.size for k in binding.keys if k in self._tensors)

    def wait_for_space(self, timeout: float) -> bool:
        """Block until a release or a KV free (or `timeout` s); True if woken by one."""
        with self._space:
            return self._space.wait(timeout)

    # ------------------------------------------------------------------ placement

    def extents(self) -> list[Extent]:
        """The arena as the policies see it: used and free extents in offset order, with gains (idle KV blocks
        are handed back first: they are free bytes)."""
        self._reclaim_kv()
        return self._describe()

    def _reclaim_kv(self) -> None:
        for region in list(self._regions):
            region.reclaim()

    def _describe(self) -> list[Extent]:
        now, half = self.clock(), self.config.half_life_s
        rates = {m: decayed_rate(s.rate, s.last, now, half) for m, s in self._models.items()}  # once per model

        def describe(b: Placement) -> Extent:
            if b.key in self._kv:  # KV cache blocks are active while they exist
                return Extent(b.offset, b.size, State.ACTIVE, None)
            r = self._tensors[b.key]
            gain = retention_gain([rates[m] for m in r.models], r.nbytes, self.config.reload_bandwidth)
            state = State.ACTIVE if r.refs else State.RETAINED
            return Extent(b.offset, b.size, state, r.key, gain, r.last_used, r.uses)
        return self.arena.ledger.extents(describe)

    def _evict(self, key: str) -> Resident:
        r = self._tensors.pop(key)
        assert r.refs == 0, "never evict active bytes"
        self.arena.free(r.block.offset)
        return r

    def _report(self, owner: str | None, evicted: list[Resident]) -> None:
        if evicted and self.on_evict is not None:
            self.on_evict(eviction(owner, evicted))

    def _evictable(self, evicted: list[Resident]) -> Callable[[str], bool]:
        def evict(key: str) -> bool:
            r = self._tensors.get(key)
            if r is None or r.refs:
                return False
            evicted.append(self._evict(key))
            return True
        return evict

    def _allocate(self, wants: list[tuple[str, int]], owner: str | None, *, each: bool = False
                  ) -> dict[str, Placement]:
        """Ranges for (key, nbytes) pairs of `owner` (a model; None: KV) by the ledger's placement rule (`each`:
        one by one, no window); evicts retained tensors per policy; PoolFullError if impossible."""
        sizes = [(k, self.arena.size_of(n)) for k, n in wants]
        evicted: list[Resident] = []
        rule = place_each if each else allocate
        self._reclaim_kv()  # before the free ranges are searched, as `extents` would
        try:
            placed = rule(self.arena.ledger, sizes, self._describe, self.policy, self._evictable(evicted))
        except LedgerFull as exc:
            raise PoolFullError(str(self.device), exc.need, exc.available) from None
        finally:
            self._report(owner, evicted)
        for p in placed.values():
            self.arena.touched(p)
        return placed

    # ------------------------------------------------------------------ KV cache regions (ElasticKV)

    def kv_region(self, block_bytes: int, dtype: torch.dtype, reserve_blocks: int = 0) -> KVRegion:
        """A region of KV blocks of `block_bytes` for one engine, its view typed `dtype` (`KVRegion`).

        Elastic (`reserve_blocks=0`): each block comes from the pool when asked
        for: free bytes first, then retained tensors are evicted (policy order:
        for `tangram` the least gain per byte first); when only active bytes are
        left, the region's allocate returns None (back-pressure). Otherwise
        `reserve_blocks` are taken now (PoolFullError if they cannot be).
        """
        itemsize = torch.empty((), dtype=dtype).element_size()
        if self.capacity % itemsize:
            raise ValueError("pool capacity is not a multiple of the KV element size")
        if reserve_blocks < 0:
            raise ValueError("reserve_blocks must be >= 0")
        with self._lock:
            region = KVRegion(self, self.arena.buffer.view(dtype), block_bytes, reserve_blocks)
            if region.elastic:
                self._regions.add(region)
            return region

    def _kv_place(self, nbytes: int) -> int:
        """Byte offset of a new KV placement of `nbytes` (under the lock); PoolFullError when only active bytes
        are left."""
        with self._lock:
            key = f"kv:{next(self._kv_ids)}"
            size = self.arena.size_of(nbytes)
            off = self.arena.first_fit(size)  # fast path: no eviction needed
            block = (self.arena.place(off, size, key) if off is not None
                     else self._allocate([(key, size)], None, each=True)[key])
            self._kv[key] = block
            self._kv_at[block.offset] = key
            self._kv_bytes += block.size
            return block.offset

    def _kv_place_run(self, block_size: int, blocks: int) -> list[int]:
        """Byte offsets of `blocks` adjacent KV placements of `block_size` arena bytes each, found by one first fit
        in free bytes (under the lock; no eviction); [] when no free range holds them all."""
        with self._lock:
            off = self.arena.first_fit(block_size * blocks)
            if off is None:
                return []
            ledger, out = self.arena.ledger, []
            for i in range(blocks):  # one placement per block: each is freed and reclaimed on its own
                key = f"kv:{next(self._kv_ids)}"
                block = ledger.place(off + i * block_size, block_size, key)
                self._kv[key] = block
                self._kv_at[block.offset] = key
                out.append(block.offset)
            self._kv_bytes += block_size * blocks
            self.arena.touched(block)
            return out

    def _kv_free(self, offset: int) -> None:
        with self._lock:
            key = self._kv_at.pop(offset, None)
            if key is not None:
                self._kv_bytes -= self._kv.pop(key).size
                self.arena.free(offset)
                self._space.notify_all()

    def _kv_size(self, offset: int) -> int:
        key = self._kv_at.get(offset)
        return 0 if key is None else self._kv[key].size

    # ------------------------------------------------------------------ introspection

    def pool_map(self) -> ArenaMap:
        """The arena merged per model and state (`poolmap.merge_extents`), under the lock, in O(residents)."""
        with self._lock:
            return merge_extents(self.extents(), lambda key: self._tensors[key].models, capacity=self.capacity,
                                 policy=self.policy.value)

    def totals(self) -> dict[str, int]:
        """Bytes per state (free, retained, active) from running sums and the registry: no extents, no gains."""
        with self._lock:
            for region in list(self._regions):
                region.reclaim()  # idle KV blocks are free bytes, as in `extents`
            active = sum(r.block.size for r in self._tensors.values() if r.refs)
            retained = sum(r.block.size for r in self._tensors.values()) - active
            return {State.FREE.value: self.capacity - self.arena.ledger.used, State.RETAINED.value: retained,
                    State.ACTIVE.value: active + self._kv_bytes}

    def snapshot(self) -> dict:
        """Per tensor state, bytes, models and gain; totals per state; KV bytes; largest free block; fragmentation."""
        with self._lock:
            ext = self.extents()
            totals = {s.value: sum(e.size for e in ext if e.state is s) for s in State}
            tensors = [
                {"key": e.key, "state": e.state.value, "bytes": e.size, "offset": e.offset,
                 "models": sorted(self._tensors[e.key].models), "gain": e.gain}
                for e in ext if e.key is not None
            ]
            return {"device": str(self.device), "capacity": self.capacity, "policy": self.policy.value,
                    "totals": totals, "kv_bytes": sum(b.size for b in self._kv.values()),  # part of active
                    "largest_free": largest_free(ext), "fragmentation": fragmentation(ext), "tensors": tensors}
