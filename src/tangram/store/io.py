"""Read mechanisms: execute one planned ReadRun with pread, O_DIRECT or mmap.

Thin wrappers over the system calls. Each raises CorruptCheckpointError naming
the file when it ends early (a truncated data file), never returns short data.
"""

from __future__ import annotations

import mmap
import os
from enum import Enum
from pathlib import Path

import torch

from tangram.store.errors import CorruptCheckpointError
from tangram.store.format import ALIGNMENT, align_up
from tangram.store.plan import ReadRun

_SCRATCH = bytearray(64 << 10)  # padding between coalesced tensors lands here; its content is never used


class ReadMethod(str, Enum):
    """How bytes move from a data file to memory."""

    PREAD = "pread"  # buffered preadv straight into the destination (scatter)
    ODIRECT = "odirect"  # O_DIRECT into an aligned buffer, then copy
    MMAP = "mmap"  # mmap(MAP_POPULATE) of the range, then copy


def host_buffer(nbytes: int, *, pin: bool = False, touch: bool = True) -> torch.Tensor:
    """A flat uint8 host buffer, page aligned, transparent-huge-page backed where possible, pre-touched.

    `pin` gives page-locked memory for asynchronous copies to CUDA.
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


def _views(run: ReadRun) -> list[memoryview]:
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


def read_scatter(fd: int, run: ReadRun, path: Path) -> None:
    """Buffered read of `run` straight into its CPU destinations (one preadv per run)."""
    views = _views(run)
    preadv_full(fd, views, run.offset, path, run)


def read_contiguous(fd: int, run: ReadRun, buf: torch.Tensor, path: Path, *, direct: bool) -> None:
    """Read the whole of `run` into the start of the host buffer `buf` (staging or bounce).

    With `direct`, `fd` is O_DIRECT: the read length is rounded up to ALIGNMENT
    and `buf` must be page aligned; the final block of a file may come back short.
    """
    want = run.length
    length = align_up(want) if direct else want
    view = memoryview(buf[:length].numpy())
    done = 0
    while done < want:
        n = os.preadv(fd, [view[done:]], run.offset + done)
        if n == 0:
            raise _truncated(path, run, done)
        done += n
        if direct and done % ALIGNMENT:  # an unaligned O_DIRECT result only happens at end of file
            if done < want:
                raise _truncated(path, run, done)
            break


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
    flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_POPULATE", 0)
    region = mmap.mmap(fd, run.length, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=run.offset)
    try:
        src = torch.frombuffer(region, dtype=torch.uint8)
        scatter_from(src, run)
        del src
    finally:
        region.close()


def open_data_file(path: Path, *, direct: bool) -> int:
    """Open a data file for reading (O_DIRECT when asked); raises OSError if the filesystem refuses."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECT", 0) if direct else 0)
    return os.open(path, flags)


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
