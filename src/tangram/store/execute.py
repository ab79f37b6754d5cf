"""Execute planned reads on reader threads, into CPU or CUDA destinations.

CPU destinations are filled by the chosen read method directly; host-cache
hits are copied by the same reader threads, in chunks, in plan order. CUDA
destinations go through a ring of pinned staging buffers: a thread reads a
chunk into a free buffer, enqueues asynchronous host-to-device copies on its
own stream and records an event; the buffer is reused once the event is done,
so copies overlap the next reads.

Verification of chunks read from the disk (O_DIRECT) on CPU runs in a hashing
stage: each reader thread hands the chunk it just read to its own hashing
thread (FIFO, so the reader's plan order is kept) and issues its next read at
once, so the disk queue never drains while a chunk is hashed. Chunks read from
the page cache are hashed on the reader (the copy already keeps the cores busy).
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import wait
from dataclasses import dataclass
from pathlib import Path

import torch

from tangram.store import io
from tangram.store.io import ReadMethod
from tangram.store.format import ALIGNMENT, align_up
from tangram.store.landing import Aborted, Landing
from tangram.store.stages import BouncePool, HashStage, read_hashed
from tangram.store.plan import CopyRun, Piece, ReadRun, Segment, task_chains
from tangram.store.workers import KEPT


AUTO_CACHED = 0.5  # AUTO reads a chunk through the page cache when at least this much of it is there
HASH_STAGE = True  # CPU, O_DIRECT chunks: hashed on a per-reader hashing thread (False: on the reader, to compare)
# CPU, buffered chunks that are verified: read and hashed in parts of this size, each hashed while it is still in
# the CPU cache (0: the whole chunk is read, then hashed from memory). A warm load is bound by memory bandwidth;
# hashing a chunk after the copy read every byte from DRAM a second time.
HOT_PART = 1 << 20  # the L2 cache of one core of the development VM
_END = object()  # run_all: no item left


@dataclass(frozen=True)
class ReadConfig:
    """How to read: method, reader threads, chunk size."""

    method: ReadMethod = ReadMethod.PREAD
    threads: int = 2
    chunk_bytes: int = 16 << 20

    @property
    def label(self) -> str:
        """Short name, e.g. `pread/1x64MiB`."""
        return f"{self.method.value}/{self.threads}x{self.chunk_bytes >> 20}MiB"


_BOUNCES = BouncePool()


class StagingRing:
    """A fixed set of pinned host buffers, each reusable once its last copy has finished."""

    def __init__(self, count: int, nbytes: int) -> None:
        self.nbytes = nbytes
        self._free: queue.Queue[tuple[torch.Tensor, torch.cuda.Event | None]] = queue.Queue()
        for _ in range(count):
            self._free.put((io.host_buffer(nbytes, pin=True), None))

    def take(self) -> torch.Tensor:
        """A free buffer (waits for its previous copies to finish)."""
        buf, event = self._free.get()
        if event is not None:
            event.synchronize()
        return buf

    def give(self, buf: torch.Tensor, event: torch.cuda.Event | None) -> None:
        """Return a buffer; it is free once `event` has completed."""
        self._free.put((buf, event))


def execute(
    runs: Sequence[ReadRun | CopyRun],
    paths: Mapping[int, Path],
    config: ReadConfig,
    device: torch.device,
    *,
    staging: Callable[[], StagingRing] | None = None,
    progress: Callable[[int], None] | None = None,
    landed: Callable[[Piece], None] | None = None,
    through_bounce: bool = False,
) -> None:
    """Read every run (and copy every host-cache hit) into its destinations; returns when all bytes have landed.

    Runs are started in list order on `config.threads` reader threads. Pieces
    with an expected hash are verified as their bytes land (landing.py); a
    mismatch raises HashMismatchError and that piece is never reported.
    `landed(piece)` is called (from a reader thread) as soon as all of a
    piece's bytes are in its destination and verified, on CUDA once all its
    copies have finished, so a consumer may start on it at once. `through_bounce` (CPU): O_DIRECT reads land
    in a reader's bounce buffer and are copied (destinations where direct reads are slow: io.direct_reads_land_fast).
    """
    method = config.method
    if device.type == "cuda" and method is ReadMethod.MMAP:
        method = ReadMethod.PREAD  # staging is pinned host memory: read into it directly
    fds: dict[int, int] = {}
    dfds: dict[int, int] = {}
    residency: dict[int, io.Residency] = {}  # AUTO: one mapping per file for the per-chunk mincore
    bounces: list[torch.Tensor] = []  # O_DIRECT bounce buffers taken by this load's threads
    bounces_lock = threading.Lock()
    local = threading.local()
    pieces = [s.piece for r in runs if isinstance(r, ReadRun) for s in r.segments if s.piece is not None]
    tracker = Landing([*pieces, *(r.piece for r in runs if isinstance(r, CopyRun))], lambda f: paths[f])

    def bounce() -> torch.Tensor:
        if not hasattr(local, "bounce"):
            local.bounce = _BOUNCES.take(config.chunk_bytes + ALIGNMENT)
            with bounces_lock:
                bounces.append(local.bounce)
        return local.bounce

    def stream() -> torch.cuda.Stream:
        if not hasattr(local, "stream"):
            local.stream = torch.cuda.Stream(device)
        return local.stream

    def buffered(run: ReadRun, need: int) -> bool:
        """Whether `run` is read through the page cache (PREAD, MMAP, AUTO on a resident chunk)."""
        if method is ReadMethod.AUTO:  # resident: memory speed; else from the disk, past the page cache
            return residency[run.file].fraction(run.offset, need) >= AUTO_CACHED
        return method is not ReadMethod.ODIRECT

    def read(run: ReadRun, need: int, cached: bool) -> None:
        """Read `run` (its first `need` bytes must exist): through the page cache if `cached`, else O_DIRECT."""
        path = paths[run.file]
        if not cached:
            io.read_direct(dfds[run.file], run, bounce(), path, need, through_bounce=through_bounce)
        elif method is ReadMethod.MMAP:
            io.read_mmap(fds[run.file], run, path)
        else:
            io.read_scatter(fds[run.file], ReadRun(run.file, run.offset, _trim(run.segments, need)), path)

    def report(done: list[tuple[Piece, list]]) -> None:
        for piece, events in done:
            for event in events:  # every copy of the piece, whichever thread's stream it ran on
                event.synchronize()
            if landed is not None:
                landed(piece)

    def cuda_work(run: ReadRun) -> None:
        assert staging is not None, "CUDA destinations need a staging ring"
        ring = staging()
        buf = ring.take()
        length = run.length if method is ReadMethod.PREAD else align_up(run.length)
        done: list[tuple[Piece, list]] = []
        event = None
        try:
            read(ReadRun(run.file, run.offset, [Segment(length, buf, 0)]), run.length, buffered(run, run.length))
            with torch.cuda.stream(stream()):
                io.scatter_from(buf, run, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream())
            pos = 0
            for seg in run.segments:  # hash the staged bytes while they are copied: they are the bytes copied
                if seg.piece is not None:
                    events = tracker.arrived(seg.piece, seg.dest_start, buf[pos : pos + seg.length], event)
                    if events is not None:
                        done.append((seg.piece, events))
                pos += seg.length
        finally:
            ring.give(buf, event)
            report(done)  # pieces whole and verified before a failure in this run count as landed
        if progress:
            progress(run.payload)

    def land(run: ReadRun) -> None:
        """Count (and hash) the bytes of `run`, now in their CPU destinations."""
        done: list[tuple[Piece, list]] = []
        try:
            for seg in run.segments:
                if seg.piece is not None:
                    part = seg.dest[seg.dest_start : seg.dest_start + seg.length]
                    if (events := tracker.arrived(seg.piece, seg.dest_start, part)) is not None:
                        done.append((seg.piece, events))
        finally:
            report(done)  # pieces whole and verified before a failure count as landed

    def land_counted(run: ReadRun) -> None:
        land(run)
        if progress:
            progress(run.payload)

    verified = device.type == "cpu" and any(p.hash is not None or p.blocks for p in pieces)
    stage = HashStage(land_counted, tracker) if HASH_STAGE and verified else None
    hot_parts = HOT_PART if verified and 0 < HOT_PART < config.chunk_bytes else 0

    def cpu_work(run: ReadRun) -> None:
        if stage is not None and stage.failed.is_set():
            raise Aborted()
        cached = buffered(run, run.length)
        if cached and hot_parts and method is not ReadMethod.MMAP and _starts_ready(run, tracker):
            done: list[tuple[Piece, list]] = []
            try:  # from memory: each part hashed right after its copy, still in the CPU cache
                read_hashed(fds[run.file], run, paths[run.file], tracker, hot_parts, done)
            finally:
                report(done)
            if progress:
                progress(run.payload)
            return
        read(run, run.length, cached)
        if not cached and stage is not None:
            stage.submit(run)  # from the disk: hashed on this reader's hashing thread while the next read runs
        else:
            land_counted(run)  # from memory: the cores are busy copying already; a handoff only adds a switch

    def copy_work(c: CopyRun) -> None:
        dst = c.piece.dest[c.start : c.start + c.length]
        src = c.src[c.start : c.start + c.length]
        event = None
        if device.type == "cuda":
            with torch.cuda.stream(stream()):
                dst.copy_(src, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream())
        else:
            io.copy_bytes(dst, src)
        events = tracker.arrived_unhashed(c.piece, c.length, event)
        if progress:
            progress(c.length)
        if events is not None:
            report([(c.piece, events)])

    def work(item: list[ReadRun] | CopyRun) -> None:
        try:
            if isinstance(item, CopyRun):
                copy_work(item)
            else:
                for run in item:  # a chain: the chunks of one piece in order, so its hash never waits
                    (cuda_work if device.type == "cuda" else cpu_work)(run)
        except Aborted:
            raise
        except BaseException:
            tracker.abort()  # threads waiting for this run's bytes stop
            raise

    try:
        for f in sorted({r.file for r in runs if isinstance(r, ReadRun)}):
            if method is not ReadMethod.ODIRECT:
                fds[f] = io.open_data_file(paths[f], direct=False)
            if method in (ReadMethod.ODIRECT, ReadMethod.AUTO):
                try:
                    dfds[f] = io.open_data_file(paths[f], direct=True)
                except OSError as exc:
                    if method is ReadMethod.ODIRECT:
                        raise OSError(exc.errno, f"{paths[f]}: O_DIRECT not supported here ({exc.strerror})") from None
                    method = ReadMethod.PREAD  # AUTO on a filesystem without O_DIRECT: buffered reads only
        if method is ReadMethod.AUTO:
            residency.update((f, io.Residency(fd)) for f, fd in fds.items())
        errors: list[BaseException] = []
        try:
            run_all(work, _tasks(runs, config), config.threads)
        except BaseException as exc:
            errors.append(exc)
            tracker.abort()
        if stage is not None:  # every chunk read is hashed (or aborted) before the load returns or fails
            errors += stage.close()
        if errors:
            raise next((e for e in errors if not isinstance(e, Aborted)), errors[0])
        if missing := tracker.incomplete():  # every byte was read: a piece still open is a bug, never short data
            raise RuntimeError(f"load ended with {len(missing)} tensors not whole (first {missing[0]!r})")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        for buf in bounces:
            _BOUNCES.give(buf)
        for res in residency.values():
            res.close()
        for fd in [*fds.values(), *dfds.values()]:
            os.close(fd)


def _tasks(runs: Sequence[ReadRun | CopyRun], config: ReadConfig) -> list[list[ReadRun] | CopyRun]:
    """The work items in plan order: each copy alone, consecutive reads grouped into chains (plan.task_chains).

    A chain holds at most a 1/(2 x threads) share of the bytes read (and at least
    4 chunks), so a single huge piece still spreads over the reader threads.
    """
    total = sum(r.length for r in runs if isinstance(r, ReadRun))
    limit = max(4 * config.chunk_bytes, total // (2 * max(1, config.threads)))
    out: list[list[ReadRun] | CopyRun] = []
    pending: list[ReadRun] = []
    for r in [*runs, None]:
        if isinstance(r, ReadRun):
            pending.append(r)
            continue
        out += task_chains(pending, limit)
        pending = []
        if r is not None:
            out.append(r)
    return out


def _starts_ready(run: ReadRun, tracker: Landing) -> bool:
    """Whether the piece `run` starts with can be hashed at once: else another thread holds its earlier bytes,
    and the run is read whole first (its copy overlaps that wait) and hashed after."""
    first = run.segments[0].piece if run.segments else None
    return first is None or tracker.ready(first, run.segments[0].dest_start)


def _trim(segments: list[Segment], need: int) -> list[Segment]:
    """The segments covering the first `need` bytes."""
    out, pos = [], 0
    for seg in segments:
        if pos >= need:
            break
        take = min(seg.length, need - pos)
        out.append(seg if take == seg.length else Segment(take, seg.dest, seg.dest_start, seg.piece))
        pos += take
    return out


def run_all(fn: Callable, items: list, threads: int) -> None:
    """Run fn over items on `threads` threads (kept across loads: store/workers.py), started in order; the first
    error stops the rest from starting and is raised once the running ones have ended.

    An `Aborted` (a thread stopped because another failed) is raised only when no other error is there.
    """
    if threads <= 1 or len(items) <= 1:
        for item in items:
            fn(item)
        return
    todo = iter(items)
    take = threading.Lock()
    failed = threading.Event()

    def worker() -> None:
        while not failed.is_set():
            with take:
                item = next(todo, _END)
            if item is _END:
                return
            try:
                fn(item)
            except BaseException:
                failed.set()
                raise

    futures = [KEPT.submit(worker, "tangram-load") for _ in range(min(threads, len(items)))]
    wait(futures)
    errors = [e for f in futures if (e := f.exception()) is not None]
    if errors:
        raise next((e for e in errors if not isinstance(e, Aborted)), errors[0])
