"""The parallel, pipelined checkpoint loader.

`Loader.load_into` moves the requested stored tensors of a checkpoint into
caller-owned destination bytes (a pre-touched host region, or device memory
such as a pool arena): DRAM-cache hits are copied from the host cache tier,
the rest is planned into coalesced aligned reads; reader threads execute both
(copies in chunks), and hash every tensor read from disk as its bytes land.
On CPU the reads land straight in the destination; on CUDA they land in a ring
of pinned staging buffers whose asynchronous host-to-device copies on
per-thread streams overlap with the next reads. What was read from disk is
copied into the host cache behind the load (`HostCache.fill_behind`): a load
never waits for the cache.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from tangram.store import io, probe
from tangram.store.cache import HostCache
from tangram.store.execute import ReadConfig, StagingRing, execute
from tangram.store.format import Checkpoint
from tangram.store.io import ReadMethod
from tangram.store.plan import CopyRun, Piece, ReadRun, ordered_groups, plan_copies, plan_reads
from tangram.store.verified import VERIFIED, FileStamp, Range, VerifiedRanges, reverify_default

log = logging.getLogger(__name__)

DEST_ALIGNMENT = 4096  # tensors placed by `load` start on pages: O_DIRECT reads land in them directly


@dataclass
class LoadStats:
    """What one load did."""

    tensors: int = 0
    bytes_from_disk: int = 0
    bytes_from_cache: int = 0
    bytes_padding: int = 0
    bytes_known: int = 0  # of bytes_from_disk: not hashed again (verified before, file unchanged: verified.py)
    reads: int = 0
    seconds: float = 0.0
    method: str = ""
    threads: int = 0
    chunk_bytes: int = 0

    @property
    def bytes_total(self) -> int:
        """Payload bytes placed in destinations."""
        return self.bytes_from_disk + self.bytes_from_cache


class Loader:
    """Loads checkpoint tensors into destinations; one instance is reused across loads (thread-safe)."""

    def __init__(
        self,
        *,
        threads: int | None = None,
        method: ReadMethod | str | None = None,
        chunk_bytes: int | None = None,
        cache: HostCache | None = None,
        staging_buffers: int | None = None,
        verify: bool = True,
        reverify: bool | None = None,
        verified: VerifiedRanges = VERIFIED,
    ) -> None:
        """Unset `threads`, `method`, `chunk_bytes` come from the per-filesystem measurement (probe.py).

        `verify`: check the bytes read from disk against the index hashes (the default; off only to measure
        what the check costs). Bytes this process verified before, in a file unchanged since, are not hashed
        again (`verified`: the process's memory, store/verified.py); `reverify` (default: TANGRAM_REVERIFY)
        hashes them anyway."""
        self.verify = verify
        self.reverify = reverify_default() if reverify is None else reverify
        self.verified = verified
        self.threads = threads
        self.method = ReadMethod(method) if method is not None else None
        self.chunk_bytes = chunk_bytes
        self.cache = cache
        self._staging_count = staging_buffers
        self._staging: StagingRing | None = None
        self._staging_lock = threading.Lock()
        self.last_stats: LoadStats | None = None  # stats of the latest `load` (informational)

    def config(self, path: Path, nbytes: int | None = None) -> ReadConfig:
        """The read configuration for reading `nbytes` from a data file's filesystem: measured defaults
        (for that size: probe.choose_config) with this loader's overrides applied."""
        method = self.method or probe.forced_method()
        base = probe.config_for(method) if method is not None else probe.choose_config(path, nbytes)
        return ReadConfig(base.method, self.threads or base.threads, self.chunk_bytes or base.chunk_bytes)

    def _ring(self, config: ReadConfig) -> StagingRing:
        with self._staging_lock:
            if self._staging is None or self._staging.nbytes < config.chunk_bytes:
                self._staging = StagingRing(self._staging_count or 2 * max(2, config.threads), config.chunk_bytes)
            return self._staging

    def load_into(
        self,
        checkpoint: Checkpoint | str | Path,
        dests: Mapping[str, torch.Tensor],
        *,
        verify: bool | None = None,
        progress: Callable[[int], None] | None = None,
        order: Sequence[Sequence[str]] | None = None,
        landed: Callable[[str], None] | None = None,
        through_bounce: bool = False,
    ) -> LoadStats:
        """Fill `dests` (stored tensor name -> flat uint8 tensor of its nbytes, one device) from `checkpoint`.

        `verify` (default: this loader's `verify`, on unless turned off) checks
        every tensor read from disk against its index hash as its bytes land,
        on the reader threads (bytes this process verified before, in a file
        unchanged since, are not hashed again unless `reverify`: verified.py); a mismatch raises HashMismatchError naming the
        file and the tensor, and that tensor is never reported landed. Host-cache
        hits were verified when cached. Only the named tensors are read.
        `order`: groups of names to load one group after the other (a
        template's first-use order) on all reader threads at once, instead of
        in file order; `landed(name)` is called as each tensor arrives whole
        (execute-while-load). `through_bounce` (CPU): direct reads land in bounce buffers and are copied, for
        destinations where they are slow (`io.direct_reads_land_fast`).
        """
        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
        verify = self.verify if verify is None else verify
        start = time.perf_counter()
        index = ckpt.index
        stats = LoadStats()
        devices = {t.device for t in dests.values()}
        if len(devices) > 1:
            raise ValueError(f"destinations span several devices: {sorted(map(str, devices))}")
        device = devices.pop() if devices else torch.device("cpu")
        groups = ordered_groups(list(dests), order)
        memo = verify and not self.reverify
        stamps: dict[int, FileStamp | None] = {}  # stat'ed before the read, compared after it (None: unreadable)
        pieces: list[list[Piece]] = [[] for _ in groups]
        hits: list[list[tuple[Piece, torch.Tensor]]] = [[] for _ in groups]
        empty: list[str] = []
        for g, group in enumerate(groups):
            for name in group:
                dest = dests[name]
                entry = index.tensors[index.resolve(name)]
                if dest.dtype != torch.uint8 or dest.dim() != 1 or not dest.is_contiguous():
                    raise ValueError(f"destination of {name!r} must be a flat contiguous uint8 tensor")
                if dest.numel() != entry.nbytes:
                    raise ValueError(f"destination of {name!r} holds {dest.numel()} bytes, needs {entry.nbytes}")
                if entry.nbytes == 0:
                    empty.append(name)
                    continue
                cached = self.cache.get(entry.hash) if self.cache is not None else None
                check = verify
                if memo and cached is None:
                    if entry.file not in stamps:
                        stamps[entry.file] = _stamp(ckpt.file_path(entry.file))
                    stamp = stamps[entry.file]
                    check = stamp is None or not self.verified.known(stamp, Range(entry.offset, entry.nbytes, entry.hash))
                piece = Piece(name, entry.file, entry.offset, entry.nbytes, dest, entry.hash if check else None,
                              tuple(entry.blocks) if check else (), index.block_bytes)
                if cached is not None and cached.numel() == entry.nbytes:
                    hits[g].append((replace(piece, hash=None, blocks=()), cached))
                    stats.bytes_from_cache += entry.nbytes
                else:
                    pieces[g].append(piece)
                    stats.bytes_known += 0 if check or not verify else entry.nbytes
        stats.tensors = len(dests)
        disk = [p for group in pieces for p in group]
        config = self.config(ckpt.file_path(disk[0].file), sum(p.nbytes for p in disk)) if disk else probe.DEFAULT
        stats.method, stats.threads, stats.chunk_bytes = config.method.value, config.threads, config.chunk_bytes
        tasks: list[ReadRun | CopyRun] = []
        for g in range(len(groups)):  # group after group: its cache hits, then its coalesced reads
            tasks += plan_copies(hits[g], chunk_bytes=config.chunk_bytes)
            runs = plan_reads(pieces[g], chunk_bytes=config.chunk_bytes, piece_cuts=True)
            stats.reads += len(runs)
            stats.bytes_from_disk += sum(r.payload for r in runs)
            stats.bytes_padding += sum(r.length for r in runs) - sum(r.payload for r in runs)
            tasks += runs
        if not disk:  # copies only: no read-ahead to protect, so at least two threads share them
            config = ReadConfig(config.method, max(2, self.threads or 2), config.chunk_bytes)
        if landed is not None:
            for name in empty:
                landed(name)
        if tasks:
            paths = {f: ckpt.file_path(f) for f in {p.file for p in disk}}
            execute(tasks, paths, config, device, staging=lambda: self._ring(config), progress=progress,
                    landed=(lambda piece: landed(piece.name)) if landed is not None else None,
                    through_bounce=through_bounce)
        if memo:
            self._remember(ckpt, stamps, [p for p in disk if p.hash is not None])
        if self.cache is not None and disk:
            self.cache.fill_behind((index.tensors[index.resolve(p.name)].hash, p.dest) for p in disk)
        stats.seconds = time.perf_counter() - start
        log.debug("loaded %s: %s", ckpt.path, stats)
        return stats

    def _remember(self, ckpt: Checkpoint, before: Mapping[int, FileStamp | None], hashed: list[Piece]) -> None:
        """Record the ranges a load just verified, per data file, if the file did not change while it read."""
        by_file: dict[int, list[Range]] = {}
        for p in hashed:
            by_file.setdefault(p.file, []).append(Range(p.offset, p.nbytes, p.hash))  # type: ignore[arg-type]
        for f, ranges in by_file.items():
            first, after = before.get(f), _stamp(ckpt.file_path(f))
            if first is not None and after is not None:
                self.verified.record(first, after, ranges)

    def load(
        self,
        checkpoint: Checkpoint | str | Path,
        device: str | torch.device = "cpu",
        *,
        names: Iterable[str] | None = None,
        verify: bool | None = None,
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


def _stamp(path: Path) -> FileStamp | None:
    """The file's stamp, None when it cannot be stat'ed (the read then fails with its own clear error)."""
    try:
        return FileStamp.of(path)
    except OSError:
        return None


def typed_view(raw: torch.Tensor, dtype: torch.dtype, shape: list[int] | tuple[int, ...]) -> torch.Tensor:
    """Reinterpret flat uint8 bytes as a tensor of `dtype` and `shape` (no copy)."""
    if raw.numel() == 0:
        return torch.empty(shape, dtype=dtype, device=raw.device)
    return raw.view(dtype).view(shape)

