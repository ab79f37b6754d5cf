"""Checkpoint store: the Tangram format, its writer and converter, the loader and the host cache tier.

Public API::

    save(state_dict, path, **metadata)   write a checkpoint (crash-safe)
    convert(src, dst)                    Hugging Face model directory -> checkpoint
    load(path, device="cpu")             -> dict[str, torch.Tensor]
    read_index(path)                     -> CheckpointIndex
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tangram.store.cache import HostCache
from tangram.store.convert import convert
from tangram.store.errors import (
    CheckpointError,
    CorruptCheckpointError,
    DestinationExistsError,
    HashMismatchError,
    MissingFileError,
    UnsupportedFormatError,
)
from tangram.store.format import Checkpoint, CheckpointIndex, TensorEntry, read_index
from tangram.store.io import ReadMethod
from tangram.store.loader import Loader, LoadStats
from tangram.store.writer import save


def load(
    path: str | Path,
    device: str | torch.device = "cpu",
    *,
    names: list[str] | None = None,
    verify: bool = False,
    **loader_options: Any,
) -> dict[str, torch.Tensor]:
    """Load a checkpoint's tensors (all, or `names`) onto `device` with a default Loader."""
    return Loader(**loader_options).load(path, device, names=names, verify=verify)


__all__ = [
    "Checkpoint", "CheckpointError", "CheckpointIndex", "CorruptCheckpointError", "DestinationExistsError",
    "HashMismatchError", "HostCache", "LoadStats", "Loader", "MissingFileError", "ReadMethod", "TensorEntry",
    "UnsupportedFormatError", "convert", "load", "read_index", "save",
]
