"""The parallel, pipelined checkpoint loader.

`Loader.load_into` moves the requested stored tensors of a checkpoint into
caller-owned destination bytes (a pre-touched host region, or device memory
such as a pool arena): DRAM-cache hits are copied from the host cache tier,
the rest is planned into coalesced aligned reads executed by several reader
threads. On CPU the reads land straight in the destination; on CUDA they land
in a ring of pinned staging buffers whose asynchronous host-to-device copies
on per-thread streams overlap with the next reads.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor, wait, FIRST_EXCEPTION
from dataclasses import dataclass
from pathlib import Path

import torch

from tangram.store import io
from tangram.store.cache import HostCache
from tangram.store.errors import HashMismatchError
from tangram.store.format import Checkpoint
from tangram.store.hashing import hash_bytes
from tangram.store.io import ReadMethod
from tangram.store.plan import Piece, ReadRun, plan_reads
from tangram.store.probe import choose_method

log = logging.getLogger(__name__)

DEST_ALIGNMENT = 256  # byte alignment of tensors placed by `load` (>= CUDA's 256)


def default_threads() -> int:
    """Reader threads: enough to keep the disk queue full, bounded by the cores."""
    return max(2, min(8, os.cpu_count() or 2))


@dataclass
class LoadStats:
    """What one load did."""

    tensors: int = 0
    bytes_from_disk: int = 0
    bytes_from_cache: int = 0
    bytes_padding: int = 0
    reads: int = 0
    seconds: float = 0.0
    method: str = ""
    threads: int = 0

    @property
    def bytes_total(self) -> int:
        """Payload bytes placed in destinations."""
        return self.bytes_from_disk + self.bytes_from_cache


class _StagingRing:
    """A fixed set of pinned host buffers, each reusable once its last copy has finished."""

    def __init__(self, count: int, nbytes: int) -> None:
        self.nbytes = nbytes
        self._free: queue.Queue[tuple[torch.Tensor, torch.cuda.Event | None]] = queue.Queue()
        for _ in range(count):
            self._free.put((io.host_buffer(nbytes, pin=True), None))

    def take(self) -> torch.Tensor:
        buf, event = self._free.get()
        if event is not None:
            event.synchronize()
        return buf

    def give(self, buf: torch.Tensor, event: torch.cuda.Event) -> None:
        self._free.put((buf, event))


class Loader:
    """Loads checkpoint tensors into destinations; one instance is reused across loads (thread-safe)."""

    def __init__(
        self,
        *,
        threads: int | None = None,
        method: ReadMethod | str | None = None,
        chunk_bytes: int = 16 << 20,
        cache: HostCache | None = None,
        staging_buffers: int | None = None,
    ) -> None:
        self.threads = threads or default_threads()
        self.method = ReadMethod(method) if method is not None else None
        self.chunk_bytes = chunk_bytes
        self.cache = cache
        self._staging_count = staging_buffers or 2 * self.threads
        self._staging: _StagingRing | None = None
        self._staging_lock = threading.Lock()
        self.last_stats: LoadStats | None = None  # stats of the latest `load` (informational)

    def _ring(self) -> _StagingRing:
        with self._staging_lock:
            if self._staging is None:
                self._staging = _StagingRing(self._staging_count, self.chunk_bytes)
            return self._staging

    def load_into(
        self,
        checkpoint: Checkpoint | str | Path,
        dests: Mapping[str, torch.Tensor],
        *,
        verify: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> LoadStats:
        """Fill `dests` (stored tensor name -> flat uint8 tensor of its nbytes, one device) from `checkpoint`.

        With `verify`, every tensor read from disk is re-hashed and a mismatch
        raises HashMismatchError. Only the named tensors are read.
        """
        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
        start = time.perf_counter()
        index = ckpt.index
        stats = LoadStats(threads=self.threads)
        devices = {t.device for t in dests.values()}
        if len(devices) > 1:
            raise ValueError(f"destinations span several devices: {sorted(map(str, devices))}")
        device = devices.pop() if devices else torch.device("cpu")
        cuda = device.type == "cuda"
        pieces: list[Piece] = []
        for name, dest in dests.items():
            entry = index.tensors[index.resolve(name)]
            if dest.dtype != torch.uint8 or dest.dim() != 1 or not dest.is_contiguous():
                raise ValueError(f"destination of {name!r} must be a flat contiguous uint8 tensor")
            if dest.numel() != entry.nbytes:
                raise ValueError(f"destination of {name!r} holds {dest.numel()} bytes, needs {entry.nbytes}")
            cached = self.cache.get(entry.hash) if self.cache is not None else None
            if cached is not None and cached.numel() == entry.nbytes:
                dest.copy_(cached, non_blocking=cuda)
                stats.bytes_from_cache += entry.nbytes
                if progress:
                    progress(entry.nbytes)
            else:
                pieces.append(Piece(name, entry.file, entry.offset, entry.nbytes, dest))
        stats.tensors = len(dests)
        method = self.method or (choose_method(ckpt.file_path(pieces[0].file)) if pieces else ReadMethod.PREAD)
        if cuda and method is ReadMethod.MMAP:
            method = ReadMethod.PREAD  # staging is pinned memory: read into it directly
        stats.method = method.value
        runs = plan_reads(pieces, chunk_bytes=self.chunk_bytes)
        stats.reads = len(runs)
        stats.bytes_from_disk = sum(r.payload for r in runs)
        stats.bytes_padding = sum(r.length for r in runs) - stats.bytes_from_disk
        if runs:
            self._execute(ckpt, runs, method, device, progress)
        if cuda:
            torch.cuda.synchronize(device)
        if verify:
            self._verify(ckpt, pieces)
        if self.cache is not None and pieces:
            self.cache.fill_async((index.tensors[index.resolve(p.name)].hash, p.dest) for p in pieces)
        stats.seconds = time.perf_counter() - start
        log.debug("loaded %s: %s", ckpt.path, stats)
        return stats

    def _execute(
        self,
        ckpt: Checkpoint,
        runs: list[ReadRun],
        method: ReadMethod,
        device: torch.device,
        progress: Callable[[int], None] | None,
    ) -> None:
        direct = method is ReadMethod.ODIRECT
        fds: dict[int, int] = {}
        try:
            for f in sorted({r.file for r in runs}):
                fds[f] = io.open_data_file(ckpt.file_path(f), direct=direct)
            if device.type == "cuda":
                ring = self._ring()
                local = threading.local()

                def work(run: ReadRun) -> None:
                    if not hasattr(local, "stream"):
                        local.stream = torch.cuda.Stream(device)
                    buf = ring.take()
                    try:
                        io.read_contiguous(fds[run.file], run, buf, ckpt.file_path(run.file), direct=direct)
                    except BaseException:
                        ring.give(buf, torch.cuda.Event())
                        raise
                    with torch.cuda.stream(local.stream):
                        io.scatter_from(buf, run, non_blocking=True)
                        event = torch.cuda.Event()
                        event.record(local.stream)
                    ring.give(buf, event)
                    if progress:
                        progress(run.payload)

            else:
                local = threading.local()

                def work(run: ReadRun) -> None:
                    path = ckpt.file_path(run.file)
                    if method is ReadMethod.PREAD:
                        io.read_scatter(fds[run.file], run, path)
                    elif method is ReadMethod.MMAP:
                        io.read_mmap(fds[run.file], run, path)
                    else:
                        if not hasattr(local, "bounce"):
                            local.bounce = io.host_buffer(self.chunk_bytes + io.ALIGNMENT)
                        io.read_contiguous(fds[run.file], run, local.bounce, path, direct=True)
                        io.scatter_from(local.bounce, run)
                    if progress:
                        progress(run.payload)

            _run_all(work, runs, self.threads)
        finally:
            for fd in fds.values():
                os.close(fd)

    def _verify(self, ckpt: Checkpoint, pieces: list[Piece]) -> None:
        index = ckpt.index

        def check(p: Piece) -> None:
            entry = index.tensors[index.resolve(p.name)]
            got = hash_bytes(p.dest.cpu() if p.dest.device.type != "cpu" else p.dest)
            if got != entry.hash:
                raise HashMismatchError(
                    ckpt.file_path(p.file), f"tensor {p.name!r}: content hash {got} differs from the index ({entry.hash})"
                )

        _run_all(check, pieces, self.threads)

    def load(
        self,
        checkpoint: Checkpoint | str | Path,
        device: str | torch.device = "cpu",
        *,
        names: Iterable[str] | None = None,
        verify: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Load tensors (all, or `names`) into one fresh buffer on `device`; return name -> typed tensor."""
        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
        index = ckpt.index
        wanted = index.names() if names is None else list(names)
        stored = sorted({index.resolve(n) for n in wanted}, key=lambda s: (index.tensors[s].file, index.tensors[s].offset))
        offsets: dict[str, int] = {}
        total = 0
        for s in stored:
            offsets[s] = total
            total += io.align_up(index.tensors[s].nbytes, DEST_ALIGNMENT)
        dev = torch.device(device)
        buf = io.host_buffer(total) if dev.type == "cpu" else torch.empty(total, dtype=torch.uint8, device=dev)
        dests = {s: buf[offsets[s] : offsets[s] + index.tensors[s].nbytes] for s in stored}
        self.last_stats = self.load_into(ckpt, dests, verify=verify, progress=progress)
        typed = {s: typed_view(dests[s], index.tensors[s].torch_dtype, index.tensors[s].shape) for s in stored}
        return {n: typed[index.resolve(n)] for n in wanted}


def typed_view(raw: torch.Tensor, dtype: torch.dtype, shape: list[int] | tuple[int, ...]) -> torch.Tensor:
    """Reinterpret flat uint8 bytes as a tensor of `dtype` and `shape` (no copy)."""
    if raw.numel() == 0:
        return torch.empty(shape, dtype=dtype, device=raw.device)
    return raw.view(dtype).view(shape)


def _run_all(fn: Callable, items: list, threads: int) -> None:
    """Run fn over items on `threads` threads; the first error cancels the rest and is raised."""
    if threads <= 1 or len(items) <= 1:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(max_workers=min(threads, len(items)), thread_name_prefix="tangram-load") as pool:
        futures = [pool.submit(fn, item) for item in items]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for fut in futures:
            if fut.done() and fut.exception() is not None:
                for other in futures:
                    other.cancel()
                raise fut.exception()  # type: ignore[misc]
