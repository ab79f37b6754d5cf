"""Touch a host arena's pages ahead of use, on a thread, instead of all of it up front.

A copy into fresh anonymous memory pays a page fault per page (docs/design.md: 1.5-2
GB/s with 4 KiB pages against 10-13 GB/s into touched memory), so the arena's
pages should be faulted in before a load writes them; but faulting in all of a
multi-GiB arena at start makes an idle server hold all of it. `Toucher` keeps a
*frontier*: below it every page is touched or belongs to a placement (whose
writer faults the pages it writes). `need(end)` (the arena calls it for every
placement) moves the frontier to `end` if it was below, and raises the target
to `end + ahead`; a thread advances the frontier to the target with
MADV_POPULATE_WRITE, which never changes the content. First-fit placement
fills the arena from the bottom, so the next placement usually lands in the
touched range above the last one. A placement beyond the frontier is skipped
rather than touched: populating pages while its load writes them made both
slower (measured: contention on the same page faults). The buffer is backed by
transparent huge pages where the kernel allows (`host_buffer`), which makes
each fault, and the touching, cheap.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import mmap
import os
import threading

import torch

from tangram.store.io import MADV_POPULATE_WRITE

log = logging.getLogger(__name__)
TOUCH_AHEAD_BYTES = 512 << 20  # touched beyond the highest placement: the next model (or KV growth) lands there
CHUNK_BYTES = 4 << 20  # one madvise call: small, so the frontier advances (and a placement may pass it) as it goes
NICE = 19  # yield the CPU to the loads and the engine: measured on a busy 2-core host, a 1 GiB load into a fresh
# pool ran at 4.4 GB/s median with the touching at nice 19, 0.8 GB/s at nice 0 (it took the load's CPU), 3.1 GB/s
# with no touching, 5.2 GB/s into a pool touched whole beforehand
_LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class Toucher:
    """Faults the pages of one host buffer in, bottom up, to a target that only grows. Thread-safe."""

    def __init__(self, buf: torch.Tensor, ahead: int = TOUCH_AHEAD_BYTES) -> None:
        self._buf = buf
        self.size = buf.numel()
        self.ahead = ahead
        self.nice = NICE
        self._lock = threading.Lock()
        self._mark = 0  # the frontier: bytes [0, mark) are touched or placed
        self._target = 0
        self._running = False
        self._failed = False
        self.idle = threading.Event()  # set while no touching is under way
        self.idle.set()

    @property
    def mark(self) -> int:
        """The frontier: bytes at the bottom of the buffer touched, or placed (and faulted in by their writer)."""
        with self._lock:
            return self._mark

    @property
    def target(self) -> int:
        """Bytes the toucher touches before it stops."""
        with self._lock:
            return self._target

    def need(self, end: int) -> None:
        """Bytes up to `end` are placed: touch up to `end + ahead` in the background (not the placement itself:
        what lies above the frontier is left to its writer)."""
        page = mmap.PAGESIZE  # every madvise starts on a page boundary
        end = min(self.size, -(-max(end, 0) // page) * page)
        self._extend(end, min(self.size, end + -(-self.ahead // page) * page))

    def touch_all(self) -> None:
        """Touch the whole buffer in the background (`idle` tells when it is done), whatever is placed."""
        self._extend(0, self.size)

    def _extend(self, end: int, target: int) -> None:
        with self._lock:
            self._mark = max(self._mark, end)
            if target <= self._target or self._failed:
                return
            self._target = target
            if self._running:
                return  # the running thread picks up the new target
            self._running = True
            self.idle.clear()
        threading.Thread(target=self._run, name="pool-touch", daemon=True).start()

    def _run(self) -> None:
        if self.nice:
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)
        base = self._buf.data_ptr()
        while True:
            with self._lock:
                if self._mark >= self._target or self._failed:
                    self._running = False
                    self.idle.set()
                    return
                off = self._mark
                n = min(CHUNK_BYTES, self._target - off)
            if _LIBC.madvise(ctypes.c_void_p(base + off), ctypes.c_size_t(n), MADV_POPULATE_WRITE) != 0:
                # an older kernel (no MADV_POPULATE_WRITE): pages fault in on first write instead
                log.debug("MADV_POPULATE_WRITE failed (errno %d): pool pages fault in on first use",
                          ctypes.get_errno())
                with self._lock:
                    self._failed = True
                continue
            with self._lock:
                self._mark = max(self._mark, off + n)  # a placement may have moved it past this chunk
