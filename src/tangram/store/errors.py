"""Typed errors of the checkpoint store. Every one names the file and the problem."""

from __future__ import annotations

from pathlib import Path


class CheckpointError(Exception):
    """Base class: something is wrong with a checkpoint or a conversion request."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class CorruptCheckpointError(CheckpointError):
    """The checkpoint's bytes or index are inconsistent (truncated, out of range, bad dtype)."""


class HashMismatchError(CorruptCheckpointError):
    """A tensor's recomputed content hash differs from the one in the index."""


class UnsupportedFormatError(CheckpointError):
    """The source directory holds no weights format Tangram can convert."""


class MissingFileError(CheckpointError):
    """A file the checkpoint needs (index, data file, tokenizer) is absent."""


class DestinationExistsError(CheckpointError):
    """Refusing to overwrite an existing checkpoint."""
