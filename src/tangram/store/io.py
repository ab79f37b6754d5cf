"""Read mechanisms: execute one planned ReadRun with pread, O_DIRECT or mmap.

Thin wrappers over the system calls. Each raises CorruptCheckpointError naming
the file when it ends early (a truncated data file), never returns short data.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import re
import threading
from enum import Enum
from pathlib import Path

import numpy as np
import torch

from tangram.store.errors import CorruptCheckpointError
from tangram.store.format import ALIGNMENT, align_up
from tangram.store.plan import ReadRun, tail

_SCRATCH = bytearray(64 << 10)  # padding between coalesced tensors lands here; its content is never used


class ReadMethod(str, Enum):
    """How bytes move from a data file to memory."""

    PREAD = "pread"  # buffered preadv straight into the destination (scatter)
    ODIRECT = "odirect"  # O_DIRECT into an aligned buffer, then copy
    MMAP = "mmap"  # mmap(MAP_POPULATE) of the range, then copy
    AUTO = "auto"  # chunks the page cache holds: buffered; the others: O_DIRECT (checked with mincore)


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
MADV_POPULATE_WRITE = 23  # Linux >= 5.14: fault pages in writable without changing their contents


def populate_in_background(buf: torch.Tensor, chunk: int = 4 << 20) -> threading.Event:
    """Fault a host buffer's pages in on a thread (content untouched, so it may already be in use).

    Returns an event set when done. Without MADV_POPULATE_WRITE (older kernels)
    it is set at once and pages fault in on first write instead.
    """
    done = threading.Event()
    base, n = buf.data_ptr(), buf.numel()

    def run() -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # yield the CPU to real work
        except OSError:
            pass
        try:
            for off in range(0, n, chunk):  # ctypes drops the GIL during each call
                if _libc.madvise(ctypes.c_void_p(base + off), ctypes.c_size_t(min(chunk, n - off)),
                                MADV_POPULATE_WRITE) != 0:
                    return
        finally:
            done.set()

    threading.Thread(target=run, name="populate", daemon=True).start()
    return done


def host_buffer(nbytes: int, *, pin: bool = False, touch: bool = True) -> torch.Tensor:
    """A flat uint8 host buffer, page aligned, transparent-huge-page backed where possible, pre-touched.

    `pin` gives page-locked memory for asynchronous copies to CUDA; `touch=False`
    leaves the pages to fault in on first write (or to `populate_in_background`).
    """
    if pin:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)  # cudaHostAlloc touches the pages
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        region.madvise(mmap.MADV_HUGEPAGE)  # fewer page faults on first touch
    buf = torch.frombuffer(region, dtype=torch.uint8)  # keeps `region` alive
    if touch:
        buf[:: mmap.PAGESIZE].zero_()
    return buf


def shared_host_buffer(nbytes: int) -> tuple[torch.Tensor, int]:
    """A flat uint8 host buffer in shared memory (a memfd) that other processes can map, and its file descriptor.

    Another process of the same user maps it at `fd_path(fd)` (`tangram.vllm.weights.arena_of`). Pages fault in
    on first write, 4 KiB each where the kernel gives shared memory no transparent huge pages (the common default).
    """
    fd = os.memfd_create("tangram-arena", os.MFD_CLOEXEC)
    os.ftruncate(fd, max(nbytes, 1))
    region = mmap.mmap(fd, max(nbytes, 1), flags=mmap.MAP_SHARED)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        region.madvise(mmap.MADV_HUGEPAGE)  # honoured where shmem THP is "advise"
    return torch.frombuffer(region, dtype=torch.uint8)[:nbytes], fd


def fd_path(fd: int) -> str:
    """The path at which another process of this user opens this process's file descriptor `fd`."""
    return f"/proc/{os.getpid()}/fd/{fd}"


def direct_reads_land_fast(shared: bool) -> bool:
    """Whether an O_DIRECT read into a host buffer (shared memory if `shared`) runs at the disk's speed.

    A direct read pins every destination page: into 4 KiB pages of shared memory a cold 269 MB read took
    0.11-0.22 s against 0.074 s into private huge pages, and 0.082-0.104 s read into a private bounce and
    copied (2-core VM). Shared memory gets huge pages only where the kernel's shmem THP setting allows.
    """
    if not shared:
        return True
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled").read_text()
    except OSError:
        return False
    chosen = re.search(r"\[(\w+)\]", text)
    return chosen is not None and chosen.group(1) in ("always", "within_size", "advise", "force")


def segment_views(run: ReadRun) -> list[memoryview]:
    """One writable view per segment of `run`: its destination bytes, or scratch for padding."""
    out: list[memoryview] = []
    for seg in run.segments:
        if seg.dest is None:
            out.append(memoryview(_SCRATCH)[: seg.length])
        else:
            out.append(memoryview(seg.dest[seg.dest_start : seg.dest_start + seg.length].numpy()))
    return out


def _truncated(path: Path, run: ReadRun, got: int) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        path,
        f"data file ends early: needed bytes {run.offset}..{run.offset + run.length}, "
        f"got {got} bytes at offset {run.offset} (truncated file?)",
    )


def preadv_full(fd: int, views: list[memoryview], offset: int, path: Path, run: ReadRun) -> None:
    """preadv until every view is filled; a read of 0 bytes before that means the file is truncated."""
    done = 0
    while views:
        n = os.preadv(fd, views, offset + done)
        if n == 0:
            raise _truncated(path, run, done)
        done += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]




def cached_fraction(fd: int, offset: int, length: int, *, samples: int = 2, sample_bytes: int = 128 << 10) -> float:
    """Fraction of a file range that the page cache holds (mincore; triggers no I/O). See `Residency.fraction`."""
    res = Residency(fd)
    try:
        return res.fraction(offset, length, samples=samples, sample_bytes=sample_bytes)
    finally:
        res.close()


class Residency:
    """Page-cache residency of one open file, through one read-only mapping of it made once (mincore).

    A load asks once per chunk; mapping and unmapping the chunk each time cost
    about 0.2 ms per chunk under load (the unmap's TLB flush, the GIL for numpy),
    4-7% of a reader thread's time on a cold 1 GB load. Thread-safe.
    """

    def __init__(self, fd: int) -> None:
        self.size = os.fstat(fd).st_size
        self._region = mmap.mmap(fd, self.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) if self.size else None
        self._base = np.frombuffer(self._region, dtype=np.uint8, count=1).ctypes.data if self._region else 0

    def fraction(self, offset: int, length: int, *, samples: int = 2, sample_bytes: int = 128 << 10) -> float:
        """Fraction of [offset, offset + length) in the page cache.

        Long ranges are sampled: `samples` evenly spaced windows of `sample_bytes`
        (the first and the last by default); a full walk of a 16 MiB chunk cost 5%
        of reading it cold, and files are mostly cached whole or not at all.
        """
        if length <= 0:
            return 1.0
        page = mmap.PAGESIZE
        start = offset // page * page
        size = min(offset + length, self.size) - start
        if size <= 0 or self._region is None:
            return 0.0
        if size <= samples * sample_bytes:
            windows = [(start, size)]
        else:
            step = (size - sample_bytes) // (samples - 1) // page * page
            windows = [(start + i * step, sample_bytes) for i in range(samples)]
        resident = total = 0
        for at, n in windows:
            pages = (n + page - 1) // page
            vec = (ctypes.c_ubyte * pages)()
            if _libc.mincore(ctypes.c_void_p(self._base + at), ctypes.c_size_t(n), vec) != 0:
                return 0.0
            resident += int(np.count_nonzero(np.frombuffer(vec, dtype=np.uint8) & 1))  # bit 0: resident
            total += pages
        return resident / total

    def close(self) -> None:
        """Drop the mapping."""
        if self._region is not None:
            self._region.close()
            self._region = None


def _aligned(view_owner: torch.Tensor, length: int) -> bool:
    return view_owner.data_ptr() % ALIGNMENT == 0 and length % ALIGNMENT == 0


def read_direct(fd: int, run: ReadRun, bounce: torch.Tensor, path: Path, need: int | None = None, *,
                through_bounce: bool = False) -> None:
    """O_DIRECT read of `run`: aligned destination parts are read into directly, the rest through `bounce`.

    `fd` is opened with O_DIRECT; `run` starts on an aligned file offset; `bounce`
    is page aligned and at least the run's length rounded up to ALIGNMENT. Only
    the first `need` bytes (default: all) must exist in the file. `through_bounce`:
    every part goes through `bounce` and a copy (destinations in 4 KiB-page shared
    memory, see `direct_reads_land_fast`).
    """
    need = run.length if need is None else need
    while run.segments:
        views: list[memoryview] = []
        copies: list[tuple[int, int, int, torch.Tensor]] = []  # (run position, bounce position, length, dest)
        rel = bpos = bstart = 0
        for seg in run.segments:
            dst = seg.dest[seg.dest_start : seg.dest_start + seg.length] if seg.dest is not None else None
            if dst is not None and not through_bounce and _aligned(dst, seg.length):
                if bpos > bstart:
                    views.append(memoryview(bounce[bstart:bpos].numpy()))
                views.append(memoryview(dst.numpy()))
                bstart = bpos
            else:
                if dst is not None:
                    copies.append((rel, bpos, seg.length, dst))
                bpos += seg.length
            rel += seg.length
        if bpos > bstart:  # the final bounce part may end mid-block: round up (a short read at EOF is fine)
            views.append(memoryview(bounce[bstart : bstart + align_up(bpos - bstart)].numpy()))
        n = os.preadv(fd, views, run.offset)
        restart = n
        for at, bp, length, dst in copies:
            if at + length <= n:
                copy_bytes(dst, bounce[bp : bp + length])
            elif at < n:
                restart = min(restart, at)  # partly read: read it again (destination segments start aligned)
        if n >= need:
            return
        if n == 0 or n % ALIGNMENT or run.offset + need > os.fstat(fd).st_size:
            raise _truncated(path, run, n)  # the file ends before the bytes we need
        if restart == 0:
            raise OSError(f"{path}: O_DIRECT read made no progress at offset {run.offset}")
        run = tail(run, restart)  # rare: a short but aligned read; go on after it
        need -= restart


def read_scatter(fd: int, run: ReadRun, path: Path) -> None:
    """Buffered read of `run` straight into its CPU destinations (one preadv per run)."""
    views = segment_views(run)
    preadv_full(fd, views, run.offset, path, run)


def copy_bytes(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy flat uint8 `src` into `dst` of the same length; host to host on the calling thread alone.

    torch's `copy_` splits a host copy over its OpenMP threads: on a busy machine
    each copy then waits for a descheduled peer, and copies of a few MiB ran at
    0.04-0.6 GB/s on the 2-core VM while a plain memcpy kept 5-11 GB/s. numpy's
    copy is one memcpy that releases the GIL, so reader threads copy in parallel.
    """
    if dst.device.type == "cpu" and src.device.type == "cpu":
        if dst.numel():
            np.copyto(dst.numpy(), src.numpy())
    else:
        dst.copy_(src)


def scatter_from(src: torch.Tensor, run: ReadRun, *, non_blocking: bool = False) -> None:
    """Copy a run's bytes from a contiguous host buffer `src` to its destinations."""
    pos = 0
    for seg in run.segments:
        if seg.dest is not None:
            seg.dest[seg.dest_start : seg.dest_start + seg.length].copy_(src[pos : pos + seg.length], non_blocking=non_blocking)
        pos += seg.length


def read_mmap(fd: int, run: ReadRun, path: Path) -> None:
    """Map the run's range with MAP_POPULATE and copy it to the destinations."""
    size = os.fstat(fd).st_size
    if run.offset + run.length > size:
        raise _truncated(path, run, max(0, size - run.offset))
    # Read-only shared mapping: a private writable one makes MAP_POPULATE copy every page (3x slower).
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    region = mmap.mmap(fd, run.length, flags=flags, prot=mmap.PROT_READ, offset=run.offset)
    try:
        src = np.frombuffer(region, dtype=np.uint8)
        pos = 0
        for seg in run.segments:
            if seg.dest is not None:
                np.copyto(seg.dest[seg.dest_start : seg.dest_start + seg.length].numpy(), src[pos : pos + seg.length])
            pos += seg.length
        del src
    finally:
        region.close()


def open_data_file(path: Path, *, direct: bool) -> int:
    """Open a data file for reading (O_DIRECT when asked); raises OSError if the filesystem refuses."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECT", 0) if direct else 0)
    return os.open(path, flags)


def populate_page_cache(path: Path) -> None:
    """Read a file once through the page cache (for warm-read measurements)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        buf = bytearray(8 << 20)
        pos = 0
        while pos < size:
            n = os.preadv(fd, [buf], pos)
            if n == 0:
                break
            pos += n
    finally:
        os.close(fd)


def resident_fraction(path: Path, samples: int = 64) -> float:
    """Fraction of a file in the page cache now (`samples` evenly spaced windows; for measurements)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        res = Residency(fd)
        try:
            return res.fraction(0, res.size, samples=samples)
        finally:
            res.close()
    finally:
        os.close(fd)


def evict_from_page_cache(path: Path) -> None:
    """Drop a file's pages from the (guest) page cache, for cold-read measurements."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def odirect_supported(path: Path) -> bool:
    """Whether O_DIRECT reads work on the filesystem holding `path`."""
    try:
        fd = open_data_file(path, direct=True)
    except OSError:
        return False
    try:
        buf = host_buffer(ALIGNMENT)
        os.preadv(fd, [memoryview(buf.numpy())], 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
