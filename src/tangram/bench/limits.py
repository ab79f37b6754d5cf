"""The limits `bench load` holds loaders to: plain reads, a plain copy, and pinned host-to-device.

Each is a `Method` of kind "limit": timed like a loader, but not content-checked
(it moves the same bytes without parsing or placing tensors).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from tangram.bench.load_methods import Method, Target
from tangram.bench.synthetic import SyntheticCheckpoint
from tangram.store.format import ALIGNMENT, align_up
from tangram.store.io import host_buffer


class Limit(Method):
    """A limit: set up once with an optional shared pre-touched host `scratch` buffer."""

    def prepare(self, ckpt: SyntheticCheckpoint, target: Target, scratch: torch.Tensor | None = None) -> None:
        """Untimed set-up; may use `scratch` instead of allocating."""


class RawRead(Limit):
    """Limit: plain reads of Tangram's data files into one pre-touched host buffer, no parsing, no placement."""

    def __init__(self, threads: int, chunk_bytes: int, direct: bool = False) -> None:
        label = f"{'odirect ' if direct else ''}{threads}x{chunk_bytes >> 20}MiB"
        super().__init__(f"raw_read[{label}]", "tangram", kind="limit",
                         settings={"threads": threads, "chunk_bytes": chunk_bytes, "o_direct": direct})
        self.threads, self.chunk, self.direct = threads, chunk_bytes, direct
        self.scratch: torch.Tensor | None = None
        self.pool: ThreadPoolExecutor | None = None
        self.nbytes = 0

    def unavailable(self) -> str | None:
        return None if not self.direct or hasattr(os, "O_DIRECT") else "no O_DIRECT on this platform"

    def files(self, ckpt: SyntheticCheckpoint) -> list[Path]:
        return [p for p in ckpt.files("tangram") if p.suffix == ".bin"]

    def prepare(self, ckpt: SyntheticCheckpoint, target: Target, scratch: torch.Tensor | None = None) -> None:
        sizes = [p.stat().st_size for p in self.files(ckpt)]
        self.nbytes = sum(sizes)
        need = sum(align_up(s) for s in sizes) + ALIGNMENT
        self.scratch = scratch if scratch is not None and scratch.numel() >= need else host_buffer(need)
        if self.threads > 1:
            self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="bench-raw-read")
        if self.direct:  # fail here, not in a timed run, where the filesystem refuses O_DIRECT
            os.close(os.open(self.files(ckpt)[0], os.O_RDONLY | os.O_DIRECT))

    def run(self, ckpt: SyntheticCheckpoint, target: Target) -> None:
        assert self.scratch is not None
        view = memoryview(self.scratch.numpy())
        flags = os.O_RDONLY | (os.O_DIRECT if self.direct else 0)
        fds: list[int] = []
        try:
            jobs: list[tuple[int, int, int, int]] = []  # fd, file offset, buffer offset, length
            base = 0
            for path in self.files(ckpt):
                fd = os.open(path, flags)
                fds.append(fd)
                size = os.fstat(fd).st_size
                jobs += [(fd, off, base + off, min(self.chunk, size - off)) for off in range(0, size, self.chunk)]
                base += align_up(size)

            def read(job: tuple[int, int, int, int]) -> None:
                fd, off, at, length = job
                want = align_up(length) if self.direct else length
                done = 0
                while done < length:
                    n = os.preadv(fd, [view[at + done : at + want]], off + done)
                    if n == 0:
                        raise OSError(f"short read at offset {off + done}")
                    done += n

            if self.pool is None:
                for job in jobs:
                    read(job)
            else:
                list(self.pool.map(read, jobs))
        finally:
            for fd in fds:
                os.close(fd)

    def close(self) -> None:
        """Stop the reader threads and drop the buffer."""
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None
        self.scratch = None


def raw_read_variants(direct_ok: bool) -> list[RawRead]:
    """The plain-read strategies tried for the cold limit (the best median wins)."""
    variants = [RawRead(1, 64 << 20), RawRead(2, 16 << 20), RawRead(4, 16 << 20)]
    if direct_ok and hasattr(os, "O_DIRECT"):
        variants.append(RawRead(2, 16 << 20, direct=True))
    return variants


class Memcpy(Limit):
    """Limit: one plain copy of the payload bytes between two pre-touched host buffers."""

    def __init__(self) -> None:
        super().__init__("memcpy", "tangram", kind="limit", settings={"torch_threads": torch.get_num_threads()})
        self.src: torch.Tensor | None = None
        self.dst: torch.Tensor | None = None
        self.nbytes = 0

    def prepare(self, ckpt: SyntheticCheckpoint, target: Target, scratch: torch.Tensor | None = None) -> None:
        self.nbytes = target.index.total_bytes
        self.src = scratch[: self.nbytes] if scratch is not None and scratch.numel() >= self.nbytes else host_buffer(self.nbytes)
        host_target = target.device.type == "cpu" and target.buffer.numel() >= self.nbytes
        self.dst = target.buffer[: self.nbytes] if host_target else host_buffer(self.nbytes)

    def run(self, ckpt: SyntheticCheckpoint, target: Target) -> None:
        assert self.src is not None and self.dst is not None
        self.dst.copy_(self.src)

    def release(self) -> None:
        self.src = self.dst = None


class H2DPinned(Limit):
    """Limit (CUDA only): one copy of the payload bytes from pinned host memory into the device buffer."""

    def __init__(self) -> None:
        super().__init__("h2d_pinned", "tangram", kind="limit")
        self.src: torch.Tensor | None = None
        self.nbytes = 0

    def prepare(self, ckpt: SyntheticCheckpoint, target: Target, scratch: torch.Tensor | None = None) -> None:
        self.nbytes = target.index.total_bytes
        self.src = host_buffer(self.nbytes, pin=True)

    def run(self, ckpt: SyntheticCheckpoint, target: Target) -> None:
        assert self.src is not None
        target.buffer[: self.nbytes].copy_(self.src, non_blocking=True)
        target.sync()

    def release(self) -> None:
        self.src = None
