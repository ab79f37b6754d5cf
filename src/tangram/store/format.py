"""Tangram checkpoint format: a directory with an index, aligned data files and model files.

Layout of a checkpoint directory::

    tangram.json        index (this module): format version, files, tensors, aliases
    data-00000.bin ...  raw tensor bytes, every tensor starting on a 4 KiB boundary
    config.json, generation_config.json, tokenizer files, chat template (copied through)

A tensor's *identity* is its content hash plus dtype and shape; later stages
(the device pool) use it to share equal tensors across models.
"""

from __future__ import annotations

import functools
import json
import math
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field, ValidationError

from tangram.store.errors import CorruptCheckpointError, MissingFileError
from tangram.store.hashing import BLOCK_BYTES, hash_bytes

FORMAT_NAME = "tangram"
FORMAT_VERSION = 1
INDEX_FILE = "tangram.json"
ALIGNMENT = 4096
HASH_ALGO = "xxh3_128"
PARSED_KEEP = 256  # parsed indexes kept by content (read_index)

# Every dtype an LLM checkpoint uses; fp8 variants only where this torch has them.
_DTYPE_NAMES = [
    "float64", "float32", "float16", "bfloat16",
    "int64", "int32", "int16", "int8", "uint8", "uint16", "uint32", "uint64", "bool",
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
    "complex64",
]
DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name) for name in _DTYPE_NAMES if isinstance(getattr(torch, name, None), torch.dtype)
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """Index name of a torch dtype; raises ValueError for dtypes the format does not store."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} is not supported by the Tangram format") from None


def align_up(value: int, alignment: int = ALIGNMENT) -> int:
    """Round `value` up to a multiple of `alignment`."""
    return (value + alignment - 1) // alignment * alignment


class DataFile(BaseModel):
    """One data file of a checkpoint."""

    name: str
    size: int = Field(ge=0)


class TensorEntry(BaseModel):
    """Where one stored tensor lives and what it is."""

    file: int = Field(ge=0)
    dtype: str
    shape: list[int]
    offset: int = Field(ge=0)
    nbytes: int = Field(ge=0)
    hash: str
    # xxh3-128 of each `block_bytes` block, for tensors of more than one block (hashing.block_hashes): a load
    # verifies these, in parallel; empty in indexes written before them (the identity hash is checked then)
    blocks: list[str] = Field(default_factory=list)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype of this tensor."""
        return DTYPES[self.dtype]

    @functools.cached_property
    def key(self) -> str:
        """Tensor identity: content hash + dtype + shape (computed once: an index is never changed)."""
        return f"{self.hash}:{self.dtype}:{'x'.join(map(str, self.shape))}"


class CheckpointIndex(BaseModel):
    """The index of a Tangram checkpoint (`tangram.json`)."""

    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION
    alignment: int = ALIGNMENT
    hash_algo: str = HASH_ALGO
    block_bytes: int = BLOCK_BYTES
    files: list[DataFile]
    tensors: dict[str, TensorEntry]
    # name -> stored tensor name, for tied or content-equal tensors stored once
    aliases: dict[str, str] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)

    def names(self) -> list[str]:
        """Every tensor name, stored and aliased, in a stable order."""
        return sorted([*self.tensors, *self.aliases])

    def resolve(self, name: str) -> str:
        """Stored tensor name behind `name` (itself unless it is an alias)."""
        if name in self.tensors:
            return name
        try:
            return self.aliases[name]
        except KeyError:
            raise KeyError(f"no tensor named {name!r} in this checkpoint") from None

    def entry(self, name: str) -> TensorEntry:
        """The stored entry behind a (possibly aliased) tensor name."""
        return self.tensors[self.resolve(name)]

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data (each stored tensor once, without padding)."""
        return sum(e.nbytes for e in self.tensors.values())

    def check_files(self, directory: Path) -> None:
        """Check that every data file exists with the size the index records."""
        for df in self.files:
            path = directory / df.name
            if not path.is_file():
                raise MissingFileError(path, "data file listed in the index is missing")
            actual = path.stat().st_size
            if actual != df.size:
                raise CorruptCheckpointError(
                    path, f"data file is {actual} bytes, the index says {df.size} (truncated or overwritten)"
                )

    def check_entries(self, index_path: Path) -> None:
        """Check the index against itself (format, aliases, each tensor's dtype, shape, size, alignment and span)."""
        directory = index_path.parent
        if self.format != FORMAT_NAME:
            raise CorruptCheckpointError(index_path, f"format is {self.format!r}, expected {FORMAT_NAME!r}")
        if self.version > FORMAT_VERSION:
            raise CorruptCheckpointError(
                index_path, f"format version {self.version} is newer than this Tangram supports ({FORMAT_VERSION})"
            )
        if self.block_bytes <= 0 or self.block_bytes % ALIGNMENT:
            raise CorruptCheckpointError(index_path, f"block_bytes {self.block_bytes} is not a positive multiple of "
                                         f"{ALIGNMENT}")
        for name, target in self.aliases.items():
            if target not in self.tensors:
                raise CorruptCheckpointError(index_path, f"alias {name!r} points to unknown tensor {target!r}")
        for name, e in self.tensors.items():
            if e.dtype not in DTYPES:
                raise CorruptCheckpointError(index_path, f"tensor {name!r} has unknown dtype {e.dtype!r}")
            if e.file >= len(self.files):
                raise CorruptCheckpointError(index_path, f"tensor {name!r} refers to data file #{e.file}, which does not exist")
            if any(d < 0 for d in e.shape):
                raise CorruptCheckpointError(index_path, f"tensor {name!r} has a negative dimension {e.shape}")
            expected = math.prod(e.shape) * DTYPES[e.dtype].itemsize
            if e.nbytes != expected:
                raise CorruptCheckpointError(
                    index_path, f"tensor {name!r}: {e.nbytes} bytes recorded, {expected} expected for {e.dtype}{e.shape}"
                )
            if e.offset % ALIGNMENT:
                raise CorruptCheckpointError(
                    index_path, f"tensor {name!r} starts at offset {e.offset}, not aligned to {ALIGNMENT} bytes"
                )
            if e.blocks and len(e.blocks) != (want := -(-e.nbytes // self.block_bytes)):
                raise CorruptCheckpointError(index_path, f"tensor {name!r}: {len(e.blocks)} block hashes recorded, "
                                             f"{want} expected")
            end = e.offset + e.nbytes
            size = self.files[e.file].size
            if end > size:
                raise CorruptCheckpointError(
                    directory / self.files[e.file].name,
                    f"tensor {name!r} spans bytes {e.offset}..{end}, past the end of the file ({size} bytes)",
                )


_PARSED: OrderedDict[str, CheckpointIndex] = OrderedDict()
_PARSED_LOCK = threading.Lock()


def read_index(path: str | Path) -> CheckpointIndex:
    """Read and validate the index of the checkpoint directory `path`.

    Parsed indexes are kept by the xxh3-128 of the file's bytes (`PARSED_KEEP` at most): reading the bytes again
    (tens of KB) is cheap next to parsing and validating them (2-3 ms for a 272-tensor index, on a pool-hit start's
    path); the data files are checked again on every read. A kept index is shared: nothing may change it."""
    directory = Path(path)
    index_path = directory / INDEX_FILE
    if not directory.is_dir():
        raise MissingFileError(directory, "checkpoint directory does not exist")
    if not index_path.is_file():
        raise MissingFileError(index_path, "no Tangram index here (not a Tangram checkpoint, or an unfinished write)")
    data = index_path.read_bytes()
    digest = hash_bytes(data)
    with _PARSED_LOCK:
        index = _PARSED.get(digest)
        if index is not None:
            _PARSED.move_to_end(digest)
    if index is None:
        index = _parse(data, index_path)
        with _PARSED_LOCK:
            _PARSED[digest] = index
            while len(_PARSED) > PARSED_KEEP:
                _PARSED.popitem(last=False)
    index.check_files(directory)
    return index


def _parse(data: bytes, index_path: Path) -> CheckpointIndex:
    """The index in `data` (the bytes of `index_path`), parsed and checked against itself."""
    try:
        index = CheckpointIndex.model_validate(json.loads(data))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(index_path, f"index is not valid JSON ({exc})") from None
    except ValidationError as exc:
        raise CorruptCheckpointError(index_path, f"index does not match the format: {exc.errors()[0]['msg']} "
                                     f"at {'.'.join(map(str, exc.errors()[0]['loc']))}") from None
    index.check_entries(index_path)
    return index


class Checkpoint:
    """An opened (index read and validated) Tangram checkpoint directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.index = read_index(self.path)

    def file_path(self, file: int) -> Path:
        """Path of data file number `file`."""
        return self.path / self.index.files[file].name

    def data_files(self) -> list[Path]:
        """Paths of every data file, in index order (what a cold read of the checkpoint touches)."""
        return [self.file_path(i) for i in range(len(self.index.files))]

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, tensors={len(self.index.tensors)}, bytes={self.index.total_bytes})"
