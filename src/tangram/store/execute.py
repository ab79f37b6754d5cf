"""Execute planned reads on reader threads, into CPU or CUDA destinations.

CPU destinations are filled by the chosen read method directly. CUDA
destinations go through a ring of pinned staging buffers: a thread reads a
chunk into a free buffer, enqueues asynchronous host-to-device copies on its
own stream and records an event; the buffer is reused once the event is done,
so copies overlap the next reads.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import torch

from tangram.store import io
from tangram.store.io import ReadMethod
from tangram.store.format import ALIGNMENT, align_up
from tangram.store.plan import Piece, ReadRun, Segment


AUTO_CACHED = 0.5  # AUTO reads a chunk through the page cache when at least this much of it is there


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
    runs: list[ReadRun],
    paths: Mapping[int, Path],
    config: ReadConfig,
    device: torch.device,
    *,
    staging: Callable[[], StagingRing] | None = None,
    progress: Callable[[int], None] | None = None,
    landed: Callable[[Piece], None] | None = None,
) -> None:
    """Read every run into its destinations with `config`; returns when all bytes have landed.

    Runs are started in list order. `landed(piece)` is called (from a reader
    thread) as soon as all of a piece's bytes are in its destination, on CUDA
    once its copies have finished, so a consumer may start on it at once.
    """
    method = config.method
    if device.type == "cuda" and method is ReadMethod.MMAP:
        method = ReadMethod.PREAD  # staging is pinned host memory: read into it directly
    fds: dict[int, int] = {}
    dfds: dict[int, int] = {}
    local = threading.local()

    def bounce() -> torch.Tensor:
        if not hasattr(local, "bounce"):
            local.bounce = io.host_buffer(config.chunk_bytes + ALIGNMENT)
        return local.bounce

    def read(run: ReadRun, need: int) -> None:
        """Read `run` (its first `need` bytes must exist) with the configured method."""
        path = paths[run.file]
        if method is ReadMethod.PREAD:
            io.read_scatter(fds[run.file], run, path)
        elif method is ReadMethod.MMAP:
            io.read_mmap(fds[run.file], run, path)
        elif method is ReadMethod.ODIRECT:
            io.read_direct(dfds[run.file], run, bounce(), path, need)
        elif io.cached_fraction(fds[run.file], run.offset, need) >= AUTO_CACHED:  # AUTO, warm: memory speed
            io.read_scatter(fds[run.file], ReadRun(run.file, run.offset, _trim(run.segments, need)), path)
        else:  # AUTO, cold: from the disk, past the page cache
            io.read_direct(dfds[run.file], run, bounce(), path, need)

    left: dict[int, int] = {}
    if landed is not None:
        for run in runs:
            for seg in run.segments:
                if seg.piece is not None:
                    left[id(seg.piece)] = left.get(id(seg.piece), 0) + seg.length
    left_lock = threading.Lock()

    def completed(run: ReadRun) -> list[Piece]:
        """Pieces whose last bytes were in `run`."""
        done = []
        with left_lock:
            for seg in run.segments:
                if seg.piece is not None:
                    left[id(seg.piece)] -= seg.length
                    if left[id(seg.piece)] == 0:
                        done.append(seg.piece)
        return done

    def cuda_work(run: ReadRun) -> None:
        if not hasattr(local, "stream"):
            local.stream = torch.cuda.Stream(device)
        assert staging is not None, "CUDA destinations need a staging ring"
        ring = staging()
        buf = ring.take()
        length = run.length if method is ReadMethod.PREAD else align_up(run.length)
        try:
            read(ReadRun(run.file, run.offset, [Segment(length, buf, 0)]), run.length)
        except BaseException:
            ring.give(buf, None)
            raise
        with torch.cuda.stream(local.stream):
            io.scatter_from(buf, run, non_blocking=True)
            event = torch.cuda.Event()
            event.record(local.stream)
        ring.give(buf, event)
        if progress:
            progress(run.payload)
        if landed is not None and (done := completed(run)):
            event.synchronize()  # the consumer's stream must not read before this thread's copies end
            for piece in done:
                landed(piece)

    def cpu_work(run: ReadRun) -> None:
        read(run, run.length)
        if progress:
            progress(run.payload)
        if landed is not None:
            for piece in completed(run):
                landed(piece)

    try:
        for f in sorted({r.file for r in runs}):
            if method is not ReadMethod.ODIRECT:
                fds[f] = io.open_data_file(paths[f], direct=False)
            if method in (ReadMethod.ODIRECT, ReadMethod.AUTO):
                try:
                    dfds[f] = io.open_data_file(paths[f], direct=True)
                except OSError as exc:
                    if method is ReadMethod.ODIRECT:
                        raise OSError(exc.errno, f"{paths[f]}: O_DIRECT not supported here ({exc.strerror})") from None
                    method = ReadMethod.PREAD  # AUTO on a filesystem without O_DIRECT: buffered reads only
        run_all(cuda_work if device.type == "cuda" else cpu_work, runs, config.threads)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        for fd in [*fds.values(), *dfds.values()]:
            os.close(fd)


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
    """Run fn over items on `threads` threads, in order; the first error cancels the rest and is raised."""
    if threads <= 1 or len(items) <= 1:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(max_workers=min(threads, len(items)), thread_name_prefix="tangram-load") as pool:
        futures = [pool.submit(fn, item) for item in items]
        wait(futures, return_when=FIRST_EXCEPTION)
        for fut in futures:
            if fut.done() and not fut.cancelled() and fut.exception() is not None:
                for other in futures:
                    other.cancel()
                raise fut.exception()  # type: ignore[misc]
