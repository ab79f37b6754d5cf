"""Host DRAM cache tier: a node-level, byte-bounded, content-addressed cache of tensor bytes.

Keyed by content hash, so a tensor shared by two checkpoints is cached once. Entries
are pinned when CUDA is present, so a hit becomes one asynchronous host-to-device copy.
Filling happens off the load path on a background thread; every filled entry
is re-hashed and dropped if it does not match, so a cache never serves wrong bytes.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from tangram.store.hashing import as_bytes, hash_bytes
from tangram.store.io import host_buffer

log = logging.getLogger(__name__)


class HostCache:
    """LRU cache of tensor bytes in host memory with a byte capacity."""

    def __init__(self, capacity_bytes: int, *, pin: bool | None = None) -> None:
        if capacity_bytes < 0:
            raise ValueError("capacity_bytes must be >= 0")
        self.capacity_bytes = capacity_bytes
        self.pin = torch.cuda.is_available() if pin is None else pin
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()
        self._filler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tangram-cache-fill")
        self._pending: list[Future[None]] = []
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def used_bytes(self) -> int:
        """Bytes held by cached entries."""
        return self._used

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

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
        """Copy `data` (any device) into the cache under `key`; False if it can never fit."""
        src = data.detach().reshape(-1).view(torch.uint8) if data.is_contiguous() else as_bytes(data)
        n = src.numel()
        if n > self.capacity_bytes:
            return False
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return True
            self._make_room(n)
        buf = host_buffer(n, pin=self.pin, touch=False)
        buf.copy_(src)
        with self._lock:
            if key in self._entries:  # a concurrent put won
                return True
            self._make_room(n)
            self._entries[key] = buf
            self._used += n
        return True

    def _make_room(self, nbytes: int) -> None:
        while self._entries and self._used + nbytes > self.capacity_bytes:
            _, old = self._entries.popitem(last=False)
            self._used -= old.numel()
            self.evictions += 1

    def fill_async(self, items: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Cache (content hash, loaded tensor bytes) pairs in the background, verifying each hash."""
        todo = [(k, t) for k, t in items if k not in self]
        if todo and self.capacity_bytes > 0:
            self._pending.append(self._filler.submit(self._fill, todo))

    def _fill(self, items: list[tuple[str, torch.Tensor]]) -> None:
        for key, data in items:
            if not self.put(key, data):
                continue
            with self._lock:
                buf = self._entries.get(key)
            if buf is not None and hash_bytes(buf) != key:
                log.warning("host cache: bytes for %s changed before they were cached; entry dropped", key)
                self.discard(key)

    def discard(self, key: str) -> None:
        """Remove one entry if present."""
        with self._lock:
            buf = self._entries.pop(key, None)
            if buf is not None:
                self._used -= buf.numel()

    def wait_idle(self) -> None:
        """Block until background fills have finished (tests and benchmarks)."""
        pending, self._pending = self._pending, []
        for fut in pending:
            fut.result()

    def clear(self) -> None:
        """Drop every entry."""
        self.wait_idle()
        with self._lock:
            self._entries.clear()
            self._used = 0
