"""Crash-safe writer of Tangram checkpoints (`save`).

Everything is written under a temporary sibling directory, fsynced, and renamed
into place last, so a half-written checkpoint never carries the final name.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from tangram import __version__
from tangram.store.errors import CheckpointError, DestinationExistsError
from tangram.store.format import (
    ALIGNMENT,
    INDEX_FILE,
    CheckpointIndex,
    DataFile,
    TensorEntry,
    align_up,
    dtype_name,
)
from tangram.store.hashing import BLOCK_BYTES, as_bytes, block_hashes, hash_bytes

log = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 2 << 30
_ZEROS = bytes(4096)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _ShardWriter:
    """Appends aligned tensors to numbered data files."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.files: list[DataFile] = []
        self._fh = None
        self._pos = 0

    def _open_next(self) -> None:
        self.close()
        name = f"data-{len(self.files):05d}.bin"
        self._fh = open(self.directory / name, "wb")  # noqa: SIM115 - closed in close()
        self.files.append(DataFile(name=name, size=0))
        self._pos = 0

    def write(self, data: torch.Tensor) -> tuple[int, int]:
        """Write the uint8 tensor `data` aligned; return (file number, offset)."""
        n = data.numel()
        if self._fh is None or (self._pos > 0 and align_up(self._pos) + n > self.max_bytes):
            self._open_next()
        assert self._fh is not None
        pad = align_up(self._pos) - self._pos
        if pad:
            self._fh.write(_ZEROS[:pad])
            self._pos += pad
        offset = self._pos
        if n:
            view = memoryview(data.numpy())
            written = 0
            while written < n:  # a short write must never silently lose a tail
                written += self._fh.write(view[written:])
        self._pos += n
        self.files[-1].size = self._pos
        return len(self.files) - 1, offset

    def close(self) -> None:
        """Flush and fsync the open file."""
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None


def _items(state: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
    return state.items() if isinstance(state, Mapping) else state


def save(
    state: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    path: str | Path,
    *,
    extra_files: Mapping[str, Path] | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    block_bytes: int = BLOCK_BYTES,
    progress: Any = None,
    **metadata: Any,
) -> CheckpointIndex:
    """Write tensors as a Tangram checkpoint at `path`.

    `state` is a state dict or an iterable of (name, tensor) pairs (streamed: one
    tensor in memory at a time). Tensors with equal identity (tied weights or
    equal content) are stored once and recorded as aliases. `extra_files` maps
    file names in the checkpoint to source files copied through (config,
    tokenizer...). Tensors larger than `block_bytes` also record the hash of
    each block (loads verify those in parallel). `progress(nbytes)` is called
    after each tensor. Keyword `metadata` is stored in the index.
    """
    dst = Path(path)
    if block_bytes <= 0 or block_bytes % ALIGNMENT:
        raise ValueError(f"block_bytes must be a positive multiple of {ALIGNMENT}, not {block_bytes}")
    if dst.exists() and not overwrite:
        raise DestinationExistsError(dst, "destination already exists (pass overwrite=True / --force to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        shards = _ShardWriter(tmp, max_shard_bytes)
        tensors: dict[str, TensorEntry] = {}
        aliases: dict[str, str] = {}
        by_key: dict[str, str] = {}
        try:
            for name, tensor in _items(state):
                if name in tensors or name in aliases:
                    raise CheckpointError(dst, f"tensor name {name!r} appears twice")
                data = as_bytes(tensor)
                digest = hash_bytes(data)
                dname = dtype_name(tensor.dtype)
                entry = TensorEntry(file=0, dtype=dname, shape=list(tensor.shape), offset=0, nbytes=data.numel(), hash=digest)
                if entry.key in by_key:
                    aliases[name] = by_key[entry.key]
                else:
                    entry.blocks = block_hashes(data, block_bytes)
                    entry.file, entry.offset = shards.write(data)
                    tensors[name] = entry
                    by_key[entry.key] = name
                if progress is not None:
                    progress(data.numel())
        finally:
            shards.close()
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
            with open(tmp / name, "rb") as fh:
                os.fsync(fh.fileno())
        metadata.setdefault("created_by", f"tangram {__version__}")
        index = CheckpointIndex(files=shards.files, tensors=tensors, aliases=aliases, metadata=metadata,
                                block_bytes=block_bytes)
        index_tmp = tmp / INDEX_FILE
        with open(index_tmp, "w") as fh:
            json.dump(index.model_dump(), fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if dst.exists():  # overwrite: move the old one aside first, so a crash leaves one whole copy
            trash = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:12]}"
            dst.rename(trash)
            try:
                tmp.rename(dst)
            except BaseException:
                trash.rename(dst)
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(dst)
        _fsync_dir(dst.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved %d tensors (%d aliases, %.1f MB) to %s", len(tensors), len(aliases), index.total_bytes / 1e6, dst)
    return index
