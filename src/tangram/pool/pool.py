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

from tangram.pool.arena import Arena, Block, resolve_capacity
from tangram.pool.loading import LoadJob, verified_load
from tangram.pool.policy import (
    Extent, Policy, State, decayed_rate, eviction_order, find_window, fragmentation, largest_free, retention_gain,
)
from tangram.pool.poolmap import ArenaMap, merge_extents
from tangram.pool.records import Binding, Eviction, KVBlock, ModelStats, PoolFullError, Resident, eviction
from tangram.store import Checkpoint, Loader
from tangram.store.loader import typed_view
from tangram.store.plan import ordered_groups

log = logging.getLogger(__name__)
__all__ = ["Binding", "DevicePool", "Eviction", "KVBlock", "PoolFullError"]


class DevicePool:
    """One pool per device: an arena allocated once, shared by every model on that device. Thread-safe.

    `capacity` is bytes (int), a fraction of the device's memory (float in (0, 1]: of total memory on the CPU, of
    free memory on CUDA) or None (the default rule); see `tangram.pool.capacity`.
    `retain=False` frees a model's tensors when its last binding is released (no reuse across instances).
    `share=False` keys tensors per checkpoint, so two models never share one (a conventional engine's copy
    of the weights per instance; the baselines of bench coldstart).
    `on_evict` is told what each allocation evicted (called under the pool's lock: it must be quick).
    """

    def __init__(
        self,
        capacity: int | float | None,
        device: str | torch.device = "cpu",
        *,
        policy: Policy | str = Policy.TANGRAM,
        loader: Loader | None = None,
        half_life_s: float = 300.0,
        reload_bandwidth: float = 2e9,
        clock: Callable[[], float] = time.monotonic,
        retain: bool = True,
        share: bool = True,
        on_evict: Callable[[Eviction], None] | None = None,
    ) -> None:
        self.device = torch.device(device)
        alignment = 4096  # >= CUDA's 256; page aligned on CPU so O_DIRECT reads land in place
        self.arena = Arena(resolve_capacity(capacity, self.device), self.device, alignment)
        self.policy = Policy(policy)
        self.loader = loader or Loader()
        self.half_life_s = half_life_s
        self.reload_bandwidth = reload_bandwidth  # bytes/s of the tier evicted bytes come back from
        self.clock = clock
        self.retain = retain  # False: released tensors are freed at once (the baselines of bench coldstart)
        self.share = share
        self.on_evict = on_evict
        self._tensors: dict[str, Resident] = {}
        self._models: dict[str, ModelStats] = {}
        self._kv: dict[str, KVBlock] = {}
        self._kv_ids = itertools.count()
        self._lock = threading.RLock()
        self._space = threading.Condition(self._lock)  # notified when active bytes become free or retained

    @property
    def capacity(self) -> int:
        """Usable bytes of the arena."""
        return self.arena.capacity

    # ------------------------------------------------------------------ acquire / release

    def acquire(self, checkpoint: Checkpoint | str | Path, model: str | None = None, *,
                order: Sequence[Sequence[str]] | None = None, background: bool = False) -> Binding:
        """Bind a model's tensors: reuse resident ones, load only the missing ones.

        `order`: groups of tensor names to load one after the other (a template's
        first-use order). `background`: return as soon as space is placed and
        load on a thread; `binding.ready[name]` is set when a tensor has landed
        and `binding.job.done` when all have (wait for it before `release`).
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
            stats.rate = decayed_rate(stats.rate, stats.last, now, self.half_life_s) + 1.0 / self.half_life_s
            stats.last = now
            reused = [k for k in by_key if k in self._tensors and not self._tensors[k].failed]
            reused_set = set(reused)
            missing = [k for k in by_key if k not in reused_set]
            for k in reused:
                self._pin(self._tensors[k], model, now)
            try:
                placed = self._allocate([(k, by_key[k][1].nbytes) for k in missing], model)
            except PoolFullError:
                for k in reused:
                    self._unpin(self._tensors[k])
                stats.rate, stats.last = before  # a retried acquire must not count twice
                raise
            for k, block in placed.items():
                r = Resident(k, block, by_key[k][1].nbytes)
                self._tensors[k] = r
                self._pin(r, model, now)
            pinned = [self._tensors[k] for k in by_key]
        views: dict[str, torch.Tensor] = {}
        ready: dict[str, threading.Event] = {}
        for name, entry in index.tensors.items():
            r = self._tensors[keys[name]]
            views[name] = typed_view(self.arena.view(r.block, entry.nbytes), entry.torch_dtype, entry.shape)
            ready[name] = r.ready
        for alias, target in index.aliases.items():
            views[alias], ready[alias] = views[target], ready[target]
        binding = Binding(model, views, list(by_key), sum(by_key[k][1].nbytes for k in missing),
                          sum(by_key[k][1].nbytes for k in reused), 0.0, ready=ready, residents=pinned)
        name_of = {by_key[k][0]: k for k in missing}
        dests = {n: self.arena.view(placed[k], by_key[k][1].nbytes) for n, k in name_of.items()}
        job = LoadJob(ordered_groups(list(name_of), order), verified_load(self.loader, ckpt, dests),
                      {n: self._tensors[k].ready for n, k in name_of.items()},
                      lambda exc: self._drop_failed([self._tensors[k] for k in missing]),
                      (lambda stats: setattr(binding, "load", stats)) if missing else None)
        binding.job = job
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
                self._unpin(r)

    def release(self, binding: Binding) -> None:
        """Drop a binding's references; its tensors stay retained until space is needed."""
        with self._lock:
            if binding.released:
                return
            binding.released = True
            for r in binding.residents:
                if not r.failed:
                    self._unpin(r)
                    if not self.retain and r.refs == 0 and self._tensors.get(r.key) is r:
                        self._evict(r.key)  # a conventional engine keeps nothing once an instance ends
            self._space.notify_all()

    def _keys(self, index) -> dict[str, str]:
        """Registry key of each stored tensor: its content key, prefixed by the checkpoint's when not sharing."""
        keys = {name: entry.key for name, entry in index.tensors.items()}
        if self.share:
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

    def _pin(self, r: Resident, model: str, now: float) -> None:
        r.refs += 1
        r.models.add(model)
        r.last_used = now
        r.uses += 1

    def _unpin(self, r: Resident) -> None:
        r.refs -= 1
        assert r.refs >= 0, f"reference count of {r.key} went negative"

    # ------------------------------------------------------------------ placement

    def extents(self) -> list[Extent]:
        """The arena as the policies see it: used and free extents in offset order, with gains."""
        now = self.clock()
        out = [Extent(off, size, State.FREE) for off, size in self.arena.gaps()]
        for b in self.arena.blocks():
            if b.key in self._kv:  # KV cache blocks are active while they exist
                out.append(Extent(b.offset, b.size, State.ACTIVE, None))
                continue
            r = self._tensors[b.key]
            out.append(Extent(b.offset, b.size, State.ACTIVE if r.refs else State.RETAINED, r.key,
                              self._gain(r, now), r.last_used, r.uses))
        return sorted(out, key=lambda e: e.offset)

    def _gain(self, r: Resident, now: float) -> float:
        rates = [decayed_rate(self._models[m].rate, self._models[m].last, now, self.half_life_s) for m in r.models]
        return retention_gain(rates, r.nbytes, self.reload_bandwidth)

    def _evict(self, key: str) -> Resident:
        r = self._tensors.pop(key)
        assert r.refs == 0, "never evict active bytes"
        self.arena.free(r.block.offset)
        return r

    def _report(self, owner: str | None, evicted: list[Resident]) -> None:
        if evicted and self.on_evict is not None:
            self.on_evict(eviction(owner, evicted))

    def _allocate(self, wants: list[tuple[str, int]], owner: str | None) -> dict[str, Block]:
        """Blocks for (key, nbytes) pairs of `owner` (a model; None: KV); evicts retained tensors per policy;
        PoolFullError if impossible."""
        sizes = [(k, self.arena.size_of(n)) for k, n in wants]
        total = sum(s for _, s in sizes)
        if not sizes:
            return {}
        extents = self.extents()
        available = sum(e.size for e in extents if e.state is not State.ACTIVE)
        if total > available:
            raise PoolFullError(str(self.device), total, available)
        if self.policy is Policy.TANGRAM:
            window = find_window(extents, total, lambda e: e.gain)
            if window is not None:  # pack the model's missing tensors together
                self._report(owner, [self._evict(extents[i].key) for i in window.evict])  # type: ignore[arg-type]
                placed, pos = {}, window.offset
                for k, s in sizes:
                    placed[k] = self.arena.place(pos, s, k)
                    pos += s
                return placed
        return self._allocate_each(sizes, owner, extents)

    def _allocate_each(self, sizes: list[tuple[str, int]], owner: str | None,
                       ext: list[Extent] | None = None) -> dict[str, Block]:
        """Tensor by tensor, first fit, evicting in policy order until each fits; rolls back on failure (what
        it evicted stays evicted)."""
        placed: dict[str, Block] = {}
        evicted: list[Resident] = []
        ext = self.extents() if ext is None else ext
        victims = [ext[i].key for i in eviction_order(ext, self.policy)]
        try:
            for k, s in sorted(sizes, key=lambda ks: -ks[1]):  # big ones first: less fragmentation
                off = self.arena.first_fit(s)
                while off is None and victims:
                    victim = victims.pop(0)
                    if victim in self._tensors and self._tensors[victim].refs == 0:
                        evicted.append(self._evict(victim))
                    off = self.arena.first_fit(s)
                if off is None:
                    free = sum(size for _, size in self.arena.gaps())
                    raise PoolFullError(str(self.device), s, free)
                placed[k] = self.arena.place(off, s, k)
        except PoolFullError:
            for block in placed.values():
                self.arena.free(block.offset)
            raise
        finally:
            self._report(owner, evicted)
        return placed

    # ------------------------------------------------------------------ KV cache blocks (ElasticKV)

    def allocate_kv(self, nbytes: int) -> KVBlock:
        """One KV cache block of `nbytes` from the pool, active until `free_kv`.

        Free bytes first; then retained tensors are evicted (policy order: for
        `tangram` the least gain per byte first); when only active bytes are
        left, PoolFullError (back-pressure: wait for a block or a release).
        """
        with self._lock:
            key = f"kv:{next(self._kv_ids)}"
            size = self.arena.size_of(nbytes)
            off = self.arena.first_fit(size)  # fast path: no eviction needed
            if off is not None:
                block = self.arena.place(off, size, key)
            else:
                block = self._allocate_each([(key, size)], None)[key]
            kv = KVBlock(key, self.arena.view(block, nbytes), block)
            self._kv[key] = kv
            return kv

    def free_kv(self, kv: KVBlock) -> None:
        """Return a KV block to the pool (idempotent)."""
        with self._lock:
            if self._kv.pop(kv.key, None) is not None:
                self.arena.free(kv.block.offset)
                self._space.notify_all()

    # ------------------------------------------------------------------ introspection

    def pool_map(self) -> ArenaMap:
        """The arena merged per model and state (`poolmap.merge_extents`), under the lock, in O(residents)."""
        with self._lock:
            return merge_extents(self.extents(), lambda key: self._tensors[key].models, capacity=self.capacity,
                                 policy=self.policy.value)

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
                    "totals": totals, "kv_bytes": sum(b.block.size for b in self._kv.values()),  # part of active
                    "largest_free": largest_free(ext), "fragmentation": fragmentation(ext), "tensors": tensors}
