"""The host DRAM cache tier of one Ray node, shared by the worker actors of that node.

The bytes live in the node's shared-memory object store (Ray's plasma): a
`NodeCache` actor, placed on the node, keeps an LRU index from content hash to
the `ObjectRef` of the tensor's bytes. It owns those objects (it re-puts the
bytes a worker offers: a copy within the node's shared memory), so they outlive
the worker that filled them. Workers of the node read a hit zero-copy (a
read-only numpy view of the node's shared memory) and copy it into their pool.
Dropping an index entry releases the object.

`NodeCacheClient` gives a worker the `HostCache` interface the `Loader` and the
`Worker` use (`get`, `in`, `fill`), so both run unchanged on top of it.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import ray
import torch
from ray.actor import ActorHandle

from tangram.store.cache import PendingFills
from tangram.store.hashing import as_bytes, hash_bytes

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
class NodeCache:
    """Content hash -> ObjectRef of the tensor's bytes in this node's object store, LRU within a byte capacity."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[str, tuple[ray.ObjectRef, int]] = OrderedDict()
        self._used = 0
        self.hits = self.misses = self.evictions = 0

    def node_id(self) -> str:
        """The Ray node this cache lives on."""
        return ray.get_runtime_context().get_node_id()

    def lookup(self, key: str) -> list[ray.ObjectRef]:
        """`[ref]` of the cached bytes for `key` (marked recently used), or `[]` (a list: refs stay refs)."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return []
        self._entries.move_to_end(key)
        self.hits += 1
        return [entry[0]]

    def keys(self) -> list[str]:
        """Every cached content hash."""
        return list(self._entries)

    def missing(self, keys: list[str]) -> list[str]:
        """The keys of `keys` that are not cached."""
        return [k for k in keys if k not in self._entries]

    def add(self, key: str, refs: list[ray.ObjectRef], nbytes: int) -> bool:
        """Cache the bytes of `key` offered in `refs[0]` (a copy this actor owns); evicts LRU entries to fit."""
        if nbytes > self.capacity_bytes:
            return False
        if key in self._entries:
            self._entries.move_to_end(key)
            return True
        while self._entries and self._used + nbytes > self.capacity_bytes:
            _, (_, n) = self._entries.popitem(last=False)
            self._used -= n
            self.evictions += 1
        own = ray.put(ray.get(refs[0]))  # zero-copy read, one copy in the node's shared memory
        self._entries[key] = (own, nbytes)
        self._used += nbytes
        return True

    def stats(self) -> dict:
        """Capacity, bytes and entries held, hits, misses and evictions."""
        return {"capacity": self.capacity_bytes, "used": self._used, "entries": len(self._entries),
                "hits": self.hits, "misses": self.misses, "evictions": self.evictions}


class NodeCacheClient:
    """A worker's view of its node's `NodeCache`, with the `HostCache` interface the `Loader` uses.

    `in` answers from a snapshot of the keys (refreshed by `refresh`, used for
    placement estimates only); `get` always asks the cache actor.
    """

    def __init__(self, cache: ActorHandle, capacity_bytes: int) -> None:
        self.cache, self.capacity_bytes = cache, capacity_bytes
        self._keys: set[str] = set()
        self._filler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tangram-node-cache-fill")
        self._pending = PendingFills()
        self.hits = self.misses = 0

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def refresh(self, keys: Iterable[str]) -> None:
        """Replace the key snapshot (from `NodeCache.keys`)."""
        self._keys = set(keys)

    def get(self, key: str) -> torch.Tensor | None:
        """The cached bytes of `key` as a flat uint8 tensor over the node's shared memory, or None."""
        refs = ray.get(self.cache.lookup.remote(key))
        if not refs:
            self.misses += 1
            return None
        try:
            arr = ray.get(refs[0], timeout=60)
        except ray.exceptions.ObjectLostError:
            self.misses += 1
            return None
        self.hits += 1
        with warnings.catch_warnings():  # a read-only view: the loader only copies from it
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(arr)

    def fill_behind(self, items: Iterable[tuple[str, torch.Tensor]]) -> None:
        """`fill` on the background thread, its copies hash-checked before they are published (the caller may have
        reused the source meanwhile; see `HostCache.fill_behind`)."""
        todo = list(items)
        if todo and self.capacity_bytes > 0:
            self._pending.add(self._filler.submit(self.fill, todo, verified=False))

    def fill(self, items: Iterable[tuple[str, torch.Tensor]], *, verified: bool = False) -> None:
        """Cache (content hash, loaded tensor) pairs in the node's object store: the bytes are put now, while
        the caller still owns them; the publication (after a hash check unless `verified`: the loader checked
        them as they landed) happens in the background."""
        todo = list(items)
        if not todo or self.capacity_bytes <= 0:
            return
        wanted = set(ray.get(self.cache.missing.remote([k for k, _ in todo])))
        staged = []
        for key, data in todo:
            if key not in wanted or data.numel() * data.element_size() > self.capacity_bytes:
                continue
            src = data.detach().reshape(-1).view(torch.uint8) if data.is_contiguous() else as_bytes(data)
            staged.append((key, ray.put(src.cpu().numpy()), src.numel()))  # owned here until the actor re-puts it
        if staged:
            self._pending.add(self._filler.submit(self._publish, staged, verified))

    def _publish(self, staged: list[tuple[str, ray.ObjectRef, int]], verified: bool = False) -> None:
        t0, added = time.perf_counter(), 0
        for key, ref, nbytes in staged:
            if not verified and hash_bytes(memoryview(ray.get(ref))) != key:
                log.warning("node cache: bytes for %s do not match their hash; not cached", key)
                continue
            if ray.get(self.cache.add.remote(key, [ref], nbytes)):
                self._keys.add(key)
                added += nbytes
        log.debug("node cache: added %d bytes in %.3f s", added, time.perf_counter() - t0)

    def pending_fills(self) -> int:
        """Background publications not finished yet (each is forgotten as it completes)."""
        return len(self._pending)

    def wait_idle(self) -> None:
        """Block until background fills have finished."""
        self._pending.wait()
