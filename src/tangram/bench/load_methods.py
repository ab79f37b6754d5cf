"""The contenders of `bench load`: Tangram's loader, its peers, and the limits they are held to.

Every loader fills the same destination (`Target`: one pre-touched device buffer,
each stored tensor at a fixed 256-byte aligned offset) and is checked against the
index hashes afterwards. Peers run with their best settings found on the
development machines; each is imported lazily, so a missing peer is skipped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tangram.bench.synthetic import SyntheticCheckpoint
from tangram.store import Checkpoint, CheckpointIndex, HostCache, Loader
from tangram.store.format import ALIGNMENT, align_up
from tangram.store import probe, probe_auto
from tangram.store.hashing import hash_bytes
from tangram.store.io import host_buffer
from tangram.pool import Binding, DevicePool
from tangram.store.loader import DEST_ALIGNMENT

log = logging.getLogger(__name__)


@dataclass
class Target:
    """The destination every method fills: one device buffer and a flat uint8 view per stored tensor."""

    device: torch.device
    index: CheckpointIndex
    buffer: torch.Tensor
    views: dict[str, torch.Tensor]

    @classmethod
    def create(cls, index: CheckpointIndex, device: torch.device) -> Target:
        """Lay out the stored tensors in file order at DEST_ALIGNMENT (page) aligned offsets of a pre-touched buffer."""
        order = sorted(index.tensors, key=lambda n: (index.tensors[n].file, index.tensors[n].offset))
        offsets: dict[str, int] = {}
        total = 0
        for name in order:
            offsets[name] = total
            total += align_up(index.tensors[name].nbytes, DEST_ALIGNMENT)
        # Slack past the last tensor: a whole number of blocks per data file, so plain reads of the data
        # files (the raw_read limit) can land in this buffer instead of a scratch buffer of their own.
        total += (len(index.files) + 1) * ALIGNMENT
        if device.type == "cuda":
            buf = torch.zeros(total, dtype=torch.uint8, device=device)
        else:
            buf = host_buffer(total)
        views = {n: buf[offsets[n] : offsets[n] + index.tensors[n].nbytes] for n in order}
        return cls(device, index, buf, views)

    def view(self, name: str) -> torch.Tensor:
        """Destination bytes of tensor `name` (aliases resolved)."""
        return self.views[self.index.resolve(name)]

    def place(self, name: str, tensor: torch.Tensor) -> None:
        """Copy a loaded tensor's bytes into its destination."""
        src = tensor.detach()
        if not src.is_contiguous():
            src = src.contiguous()
        self.view(name).copy_(src.reshape(-1).view(torch.uint8))

    def clear(self) -> None:
        """Zero the buffer, so bytes a method failed to write cannot pass the check."""
        self.buffer.zero_()
        self.sync()

    def sync(self) -> None:
        """Wait for queued device work."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def mismatches(self) -> list[str]:
        """Stored tensors whose destination bytes differ from the index hash."""
        self.sync()
        host = self.buffer.cpu() if self.device.type == "cuda" else self.buffer
        base = self.buffer.data_ptr()
        bad = []
        for name, view in self.views.items():
            start = view.data_ptr() - base
            if hash_bytes(host[start : start + view.numel()]) != self.index.tensors[name].hash:
                bad.append(name)
        return bad


@contextmanager
def _env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class Method(ABC):
    """A way to get a checkpoint's bytes into the target. `fmt` names the synthetic file format it reads."""

    name: str = ""
    fmt: str = ""
    kind: str = "loader"  # "loader" (checked) or "limit"
    settings: dict[str, Any] = field(default_factory=dict)

    def unavailable(self) -> str | None:
        """Why this method cannot run here (None when it can)."""
        return None

    def files(self, ckpt: SyntheticCheckpoint) -> list[Path]:
        """Files this method reads (evicted for cold runs, read through for warm runs)."""
        return ckpt.files(self.fmt)

    def prepare(self, ckpt: SyntheticCheckpoint, target: Target) -> None:
        """Untimed set-up before the first run."""

    @abstractmethod
    def run(self, ckpt: SyntheticCheckpoint, target: Target) -> None:
        """The timed load: every byte ends in `target`."""

    def result(self, target: Target) -> Target:
        """Where the bytes of the last run are, for the content check (default: `target`)."""
        return target

    def finish(self) -> None:
        """Untimed clean-up after a run has been checked."""

    def release(self) -> None:
        """Free what `prepare` allocated (a method with buffers of its own holds them only during its phase)."""


def _importable(module: str) -> str | None:
    try:
        __import__(module)
    except Exception as exc:  # noqa: BLE001 - any import failure makes the peer unavailable
        return f"{module} not importable: {type(exc).__name__}: {exc}"
    return None


class TangramMethod(Method):
    """Tangram's Loader with its defaults (read method, threads and chunk size measured by the store's probe).

    `verify=False` (row `tangram_noverify`) turns off the hash check of the bytes read, to measure its cost.
    The default row, like a long-lived server, does not hash again what this process verified before in an
    unchanged file (store/verified.py); `reverify=True` (row `tangram_rehash`) hashes every read, as a process
    loading a file for the first time does.
    """

    def __init__(self, cache: bool = False, verify: bool = True, reverify: bool | None = None) -> None:
        super().__init__("tangram_rehash" if reverify else "tangram" if verify else "tangram_noverify", "tangram")
        self.verify, self.reverify = verify, reverify
        self.loader = self._new_loader()
        self.cached = cache
        self.cache: HostCache | None = None  # the DRAM tier, filled by `prepare`
        self.settings = {"threads": self.loader.threads, "chunk_bytes": self.loader.chunk_bytes, "method": None,
                         "verify": verify, "reverify": self.loader.reverify}

    def _new_loader(self, cache: HostCache | None = None) -> Loader:
        return Loader(cache=cache, verify=self.verify, reverify=self.reverify)

    def prepare(self, ckpt: SyntheticCheckpoint, target: Target) -> None:
        opened = Checkpoint(ckpt.tangram_dir)
        if opened.index.files:
            # The store measures the filesystem once per machine (probe.py), untimed: here when nothing measured
            # it yet (or only at 256 MiB while this file has the size of the large measurement).
            first = opened.file_path(0)
            if probe.forced_method() is None and probe_auto.auto_enabled() and (
                    probe.remembered(first) is None or (first.stat().st_size >= probe.LARGE_PROBE_BYTES
                                                        and probe.remembered_large(first) is None)):
                if first.stat().st_size >= probe.MIN_PROBE_BYTES:
                    probe.measure(first)
            cfg = self.loader.config(first, opened.index.total_bytes)
            self.settings.update(method=cfg.method.value, threads=cfg.threads, chunk_bytes=cfg.chunk_bytes)
        if self.cached:
            self.cache = HostCache(opened.index.total_bytes + (64 << 20))
            self.loader = self._new_loader(self.cache)
            self.loader.load_into(opened, target.views)
            self.cache.wait_idle()
            missing = [n for n, e in opened.index.tensors.items() if e.hash not in self.cache]
            if missing:
                raise RuntimeError(f"host cache did not take {len(missing)} tensors (first {missing[0]!r})")

    def run(self, ckpt: SyntheticCheckpoint, target: Target) -> None:
        if self.cached and self.cache is None:
            raise RuntimeError("the DRAM tier is not filled (prepare first)")
        stats = self.loader.load_into(Checkpoint(ckpt.tangram_dir), target.views)
        if self.cached and stats.bytes_from_disk:
            raise RuntimeError(f"dram run read {stats.bytes_from_disk} bytes from disk (cache miss)")

    def release(self) -> None:
        if self.cached:  # drop the DRAM tier: the loader holding it goes too
            self.cache = None
            self.loader = self._new_loader()


class SafetensorsMethod(Method):
    """safetensors.torch.load_file to host memory, then a copy into the target."""

    def __init__(self) -> None:
        super().__init__("safetensors", "safetensors", settings={"call": "load_file(path, device='cpu')"})

    def unavailable(self) -> str | None:
        return _importable("safetensors.torch")

    def run(self, ckpt: SyntheticCheckpoint, target: Target) -> None:
        from safetensors.torch import load_file

        for name, t in load_file(str(ckpt.safetensors_path), device="cpu").items():
            target.place(name, t)
        target.sync()


class TorchMmapMethod(Method):
    """torch.load(mmap=True, weights_only=True), then a copy into the target (the copy faults the pages in)."""

    def __init__(self) -> None:
        super().__init__("torch_mmap", "torch", settings={"call": "torch.load(path, mmap=True, weights_only=True)"})

    def run(self, ckpt: SyntheticCheckpoint, target: Target) -> None:
        state = torch.load(ckpt.torch_path, mmap=True, weights_only=True, map_location="cpu")
        for name, t in state.items():
            target.place(name, t)
        target.sync()


class FastSafetensorsMethod(Method):
    """fastsafetensors without GDS (pread into bounce buffers by its C++ threads), then a copy into the target.

    Buffered reads and 4 threads were its fastest settings on the 2-core development
    machines, cold and warm (O_DIRECT, its default on local disks, was slower there
    and defeats the page cache). Override with TANGRAM_BENCH_FST_ODIRECT=1.
    """

    def __init__(self) -> None:
        odirect = os.environ.get("TANGRAM_BENCH_FST_ODIRECT", "0")
        super().__init__("fastsafetensors", "safetensors",
                         settings={"nogds": True, "max_threads": 4, "bbuf_size_kb": 16 * 1024, "odirect": odirect == "1"})

    def unavailable(self) -> str | None:
        return _importable("fastsafetensors")

    def run(self, ckpt: SyntheticCheckpoint, target: Target) -> None:
        from fastsafetensors import SafeTensorsFileLoader

        s = self.settings
        with _env(FASTSAFETENSORS_ODIRECT="1" if s["odirect"] else "0"):
            loader = SafeTensorsFileLoader(None, str(target.device), nogds=True, max_threads=s["max_threads"],
                                           bbuf_size_kb=s["bbuf_size_kb"], set_numa=False)
            try:
                loader.add_filenames({0: [str(ckpt.safetensors_path)]})
                fb = loader.copy_files_to_device()
                try:
                    for name in loader.get_keys():
                        target.place(name, fb.get_tensor(name))
                    target.sync()
                finally:
                    fb.close()
            finally:
                loader.close()


class RunaiMethod(Method):
    """runai-model-streamer's SafetensorsStreamer to host memory (library defaults: they measured best), then a copy."""

    def __init__(self) -> None:
        super().__init__("runai_model_streamer", "safetensors", settings={"device": "cpu", "owned": True})

    def unavailable(self) -> str | None:
        os.environ.setdefault("RUNAI_STREAMER_LOG_LEVEL", "WARNING")
        return _importable("runai_model_streamer")

    def run(self, ckpt: SyntheticCheckpoint, target: Target) -> None:
        from runai_model_streamer import SafetensorsStreamer

        with SafetensorsStreamer() as streamer:
            streamer.stream_file(str(ckpt.safetensors_path), device="cpu")
            for name, t in streamer.get_tensors():
                target.place(name, t)
        target.sync()


class TensorizerMethod(Method):
    """tensorizer's TensorDeserializer straight to the device with parallel readers, then a copy into the target."""

    def __init__(self, num_readers: int = 2) -> None:
        super().__init__("tensorizer", "tensorizer", settings={"num_readers": num_readers, "lazy_load": False})

    def unavailable(self) -> str | None:
        return _importable("tensorizer")

    def run(self, ckpt: SyntheticCheckpoint, target: Target) -> None:
        from tensorizer import TensorDeserializer

        des = TensorDeserializer(str(ckpt.tensorizer_path), device=target.device,
                                 num_readers=self.settings["num_readers"])
        try:
            for name, t in des.items():
                target.place(name, t)
            target.sync()
        finally:
            des.close()


class PoolMethod(Method):
    """Tangram's device pool: a re-acquire of a released model whose tensors are retained (a pure re-bind)."""

    def __init__(self) -> None:
        super().__init__("tangram", "tangram", settings={"state": "pool hit: acquire after release"})
        self.pool: DevicePool | None = None
        self.binding: Binding | None = None
        self.opened: Checkpoint | None = None

    def prepare(self, ckpt: SyntheticCheckpoint, target: Target) -> None:
        # A deployed model's index is read once, at deploy time; a restart re-binds from it.
        self.opened = Checkpoint(ckpt.tangram_dir)
        capacity = sum(align_up(e.nbytes, 4096) for e in self.opened.index.tensors.values()) + (1 << 20)
        self.pool = DevicePool(capacity, target.device)
        self.pool.release(self.pool.acquire(self.opened))  # the cold load that leaves the tensors retained

    def run(self, ckpt: SyntheticCheckpoint, target: Target) -> None:
        assert self.pool is not None
        self.binding = self.pool.acquire(self.opened)
        if self.binding.bytes_loaded:
            raise RuntimeError(f"pool miss: {self.binding.bytes_loaded} bytes loaded")

    def result(self, target: Target) -> Target:
        assert self.pool is not None and self.binding is not None
        raw = {n: t.reshape(-1).view(torch.uint8) for n, t in self.binding.tensors.items() if n in target.index.tensors}
        return Target(target.device, target.index, self.pool.arena.buffer, raw)

    def finish(self) -> None:
        if self.pool is not None and self.binding is not None:
            self.pool.release(self.binding)
            self.binding = None

    def release(self) -> None:
        self.finish()
        self.pool = None  # freed at the next gc.collect() (the pool holds reference cycles)
        self.opened = None


def loader_methods(formats: list[str]) -> tuple[list[Method], dict[str, str]]:
    """Tangram and every importable peer whose file format was generated; plus the skipped ones with reasons."""
    candidates: list[Method] = [
        TangramMethod(), TangramMethod(verify=False), TangramMethod(reverify=True), SafetensorsMethod(),
        TorchMmapMethod(), FastSafetensorsMethod(), RunaiMethod(), TensorizerMethod(),
    ]
    methods: list[Method] = []
    skipped: dict[str, str] = {}
    for m in candidates:
        reason = m.unavailable() or (None if m.fmt in formats else f"no {m.fmt} file generated")
        if reason:
            skipped[m.name] = reason
        else:
            methods.append(m)
    return methods, skipped
