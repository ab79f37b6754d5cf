"""Host DRAM cache tier: a node-level, byte-bounded, content-addressed cache of tensor bytes.

Keyed by content hash, so a tensor shared by two checkpoints is cached once. Entries
are pinned when CUDA is present, so a hit becomes one asynchronous host-to-device copy.
`fill` copies before it returns, for a caller that reuses its bytes at once;
`fill_behind` (the loader's: a load's path never waits for the cache) copies
on a background thread and hashes each copy, since the pool may have reused
the source meanwhile. Bytes the loader verified while reading and copied
before `fill` returned are served at once; every other copy is hashed on a
background thread and served only if it matches, so a cache never serves
wrong bytes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from tangram.store.hashing import as_bytes, hash_bytes
from tangram.store.io import copy_bytes, host_buffer

log = logging.getLogger(__name__)
FILL_NICE = 10  # background copies into the cache run behind the threads that serve


class HostCache:
    """LRU cache of tensor bytes in host memory with a byte capacity."""

    def __init__(self, capacity_bytes: int, *, pin: bool | None = None) -> None:
        if capacity_bytes < 0:
            raise ValueError("capacity_bytes must be >= 0")
        self.capacity_bytes = capacity_bytes
        self.pin = torch.cuda.is_available() if pin is None else pin
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._staged: dict[str, torch.Tensor] = {}  # copied, hash not yet checked: not served
        self._used = 0
        self._lock = threading.Lock()
        self._filler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tangram-cache-fill",
                                          initializer=background_priority)
        self._pending = PendingFills()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def used_bytes(self) -> int:
        """Bytes held by cached entries."""
        return self._used

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries or key in self._staged

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def get(self, key: str) -> torch.Tensor | None:
        """The cached bytes for `key` (a flat uint8 host tensor), marking it recently used, or None."""
        with self._lock:
            buf = self._entries.get(key)
            if buf is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return buf

    def put(self, key: str, data: torch.Tensor) -> bool:
        """Copy one tensor's bytes (any device) into the cache under `key`, trusting the caller that `key` names
        them (the loader's `fill` of verified bytes; an entry already there is marked recently used); False if it
        can never fit."""
        if _flat_bytes(data).numel() > self.capacity_bytes:
            return False
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return True
        self.fill([(key, data)], verified=True)
        return True

    def _copy(self, src: torch.Tensor) -> torch.Tensor:
        buf = host_buffer(src.numel(), pin=self.pin, touch=False)
        copy_bytes(buf, src)
        return buf

    def _make_room(self, nbytes: int) -> None:
        while self._entries and self._used + nbytes > self.capacity_bytes:
            _, old = self._entries.popitem(last=False)
            self._used -= old.numel()
            self.evictions += 1

    def fill(self, items: Iterable[tuple[str, torch.Tensor]], *, verified: bool = False) -> None:
        """Cache (content hash, loaded bytes) pairs: copied now, while the caller still owns the bytes (a pool
        may reuse them right after). `verified`: the caller checked the bytes against their hashes (the
        loader does as they land), so the copies are served at once; otherwise each is served once a background
        check of its hash has passed."""
        if self.capacity_bytes <= 0:
            return
        staged = []
        for key, data in items:
            if key in self:
                continue
            src = _flat_bytes(data)
            if src.numel() > self.capacity_bytes:
                continue
            buf = self._copy(src)
            with self._lock:
                if verified:
                    self._publish(key, buf)
                else:
                    self._staged[key] = buf
            staged.append(key)
        if staged and not verified:
            self._pending.add(self._filler.submit(self._verify, staged))

    def fill_behind(self, items: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Cache (content hash, bytes) pairs later, on the background thread: each is copied there and served only
        if the copy matches its hash (a source changed before its copy is left out). For sources that stay put
        for a while but may be reused (a pool's tensors after a load); the caller never waits for the copies."""
        todo = [(key, data) for key, data in items  # sizes from metadata: no view on the load's path
                if self.capacity_bytes > 0 and key not in self and data.numel() * data.element_size()
                <= self.capacity_bytes]
        if todo:
            self._pending.add(self._filler.submit(self._copy_checked, todo))

    def _copy_checked(self, items: list[tuple[str, torch.Tensor]]) -> None:
        for key, data in items:
            if key in self:
                continue
            buf = self._copy(_flat_bytes(data))
            if hash_bytes(buf) != key:
                log.info("host cache: the bytes for %s changed before they were copied; not cached", key)
                continue
            with self._lock:
                self._publish(key, buf)

    def _publish(self, key: str, buf: torch.Tensor) -> None:
        """Serve `buf` under `key` (lock held)."""
        if key not in self._entries:
            self._make_room(buf.numel())
            self._entries[key] = buf
            self._used += buf.numel()

    def _verify(self, keys: list[str]) -> None:
        for key in keys:
            with self._lock:
                buf = self._staged.get(key)
            if buf is None:
                continue
            ok = hash_bytes(buf) == key
            with self._lock:
                self._staged.pop(key, None)
                if ok:
                    self._publish(key, buf)
            if not ok:
                log.warning("host cache: bytes for %s do not match their hash; not cached", key)

    def discard(self, key: str) -> None:
        """Remove one entry if present."""
        with self._lock:
            buf = self._entries.pop(key, None)
            if buf is not None:
                self._used -= buf.numel()

    def pending_fills(self) -> int:
        """Background hash checks not finished yet (each is forgotten as it completes)."""
        return len(self._pending)

    def wait_idle(self) -> None:
        """Block until background fills have finished (tests and benchmarks)."""
        self._pending.wait()

    def clear(self) -> None:
        """Drop every entry."""
        self.wait_idle()
        with self._lock:
            self._entries.clear()
            self._staged.clear()
            self._used = 0


class PendingFills:
    """The background fill jobs of a cache that have not finished: each removes itself when done, so a
    long-running server keeps none of them (nothing has to call `wait`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._futures: set[Future[None]] = set()

    def add(self, fut: Future[None]) -> None:
        """Track `fut` until it completes."""
        with self._lock:
            self._futures.add(fut)
        fut.add_done_callback(self._done)  # runs at once if it is already done

    def _done(self, fut: Future[None]) -> None:
        with self._lock:
            self._futures.discard(fut)
        if not fut.cancelled() and fut.exception() is not None:
            log.warning("background cache fill failed: %s", fut.exception())

    def __len__(self) -> int:
        with self._lock:
            return len(self._futures)

    def wait(self) -> None:
        """Block until no job is left, including those added by a job while it ran."""
        while True:
            with self._lock:
                futures = list(self._futures)
            if not futures:
                return
            for fut in futures:
                fut.result()


def background_priority() -> None:
    """Lower the calling thread's CPU priority (a cache fill yields to loads and engine steps)."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), FILL_NICE)


def _flat_bytes(data: torch.Tensor) -> torch.Tensor:
    """`data`'s bytes as a flat uint8 tensor (a view when contiguous)."""
    return data.detach().reshape(-1).view(torch.uint8) if data.is_contiguous() else as_bytes(data)
