"""Pipeline parts of the executor: the hashing stage, hashed buffered reads, the bounce buffers kept across loads."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from tangram.store import io
from tangram.store.landing import Aborted, Landing
from tangram.store.plan import Piece, ReadRun
from tangram.store.workers import KEPT


def read_hashed(fd: int, run: ReadRun, path: Path, tracker: Landing, part_bytes: int,
                done: list[tuple[Piece, list]]) -> None:
    """Buffered read of `run` into its CPU destinations in parts of `part_bytes`, each part hashed right after
    its copy, while it is still in the CPU cache; appends each piece it completes, with its copy events, to
    `done` (also those completed before a failure).

    A warm load is bound by memory bandwidth: hashing a whole chunk after its copy read
    every byte from DRAM again. Each piece's hash position is held (`Landing.hold`) for
    the whole run: only its first piece can continue a chunk another thread holds,
    which is planned earlier and never waits for this one.
    """
    views = io.segment_views(run)
    hashers: list[Any] = [tracker.hold(s.piece, s.dest_start) if s.piece is not None else None
                          for s in run.segments]
    bounds, at = [], 0
    for seg in run.segments:
        bounds.append((at, at + seg.length))
        at += seg.length
    first = 0  # the first segment not yet wholly read
    for lo in range(0, at, part_bytes):
        hi = min(at, lo + part_bytes)
        touched = []
        i = first
        while i < len(bounds) and bounds[i][0] < hi:
            b, e = bounds[i]
            touched.append((i, views[i][max(lo, b) - b : min(hi, e) - b]))
            i += 1
        io.preadv_full(fd, [v for _, v in touched], run.offset + lo, path, run)
        for i, view in touched:
            if hashers[i] is not None:
                hashers[i].update(view)
            seg = run.segments[i]
            if bounds[i][1] <= hi:
                first = i + 1
                if seg.piece is not None and (events := tracker.release(seg.piece, seg.length)) is not None:
                    done.append((seg.piece, events))


class BouncePool:
    """Pre-touched O_DIRECT bounce buffers kept across loads (at most `keep` idle).

    Allocating and touching a 16 MiB bounce buffer per reader thread per load
    delayed each thread's first read by about 7 ms: 3-5% of a cold 1 GB load.
    """

    def __init__(self, keep: int = 8) -> None:
        self._keep = keep
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        """An idle buffer of at least `nbytes`, else a new one."""
        with self._lock:
            for i, buf in enumerate(self._free):
                if buf.numel() >= nbytes:
                    return self._free.pop(i)
        return io.host_buffer(nbytes)

    def give(self, buf: torch.Tensor) -> None:
        """Return a buffer taken with `take` (no load uses it any more)."""
        with self._lock:
            self._free.append(buf)
            self._free.sort(key=lambda b: b.numel())
            while len(self._free) > self._keep:
                self._free.pop(0)  # the smallest go first


class HashStage:
    """One hashing thread per reader thread: lands (hashes, verifies, reports) each chunk its reader read, in order.

    A reader's chunks are queued in its plan order, so a hashing thread only ever
    waits (Landing.arrived) for a part planned before its own, which another
    hashing thread already holds or will get: no cycle, no deadlock. The threads
    are kept across loads (store/workers.py).
    """

    def __init__(self, land: Callable[[ReadRun], None], tracker: Landing) -> None:
        self._land = land
        self._tracker = tracker
        self._local = threading.local()
        self._lock = threading.Lock()
        self._lanes: list[tuple[queue.SimpleQueue[ReadRun | None], Future]] = []
        self.failed = threading.Event()

    def submit(self, run: ReadRun) -> None:
        """Queue `run` (its bytes are in their destinations) on the calling reader's hashing thread."""
        lane = getattr(self._local, "lane", None)
        if lane is None:
            lane = self._local.lane = queue.SimpleQueue()
            future = KEPT.submit(lambda: self._drain(lane), "tangram-hash")
            with self._lock:
                self._lanes.append((lane, future))
        lane.put(run)

    def _drain(self, lane: queue.SimpleQueue[ReadRun | None]) -> list[BaseException]:
        """Land the runs of one reader's lane in order until it is closed; the errors raised, in order."""
        errors: list[BaseException] = []
        while (run := lane.get()) is not None:
            try:
                self._land(run)
            except Aborted as exc:
                errors.append(exc)
            except BaseException as exc:
                self.failed.set()  # readers stop taking chunks; hashing threads waiting on a part stop
                self._tracker.abort()
                errors.append(exc)
        return errors

    def close(self) -> list[BaseException]:
        """Wait until every queued chunk is hashed or aborted; returns the errors raised, lane by lane in order."""
        with self._lock:
            lanes = list(self._lanes)
        for lane, _ in lanes:
            lane.put(None)
        return [e for _, future in lanes for e in future.result()]
