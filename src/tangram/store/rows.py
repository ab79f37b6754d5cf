"""Reading a few rows of a stored tensor straight from its data file.

For an embedding lookup that cannot wait for the whole matrix: the first
forward of a cold start needs only its prompt's rows, a few KB out of tens of
MB, while the matrix itself loads last (templates/overlap.py).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from tangram.store.errors import CorruptCheckpointError
from tangram.store.format import Checkpoint


def read_rows(ckpt: Checkpoint, name: str, rows: Sequence[int]) -> torch.Tensor:
    """Rows `rows` of the stored tensor `name` (first dimension), in the order given, as a CPU tensor.

    Raises IndexError for a row outside the tensor and CorruptCheckpointError
    when the data file ends before a row.
    """
    index = ckpt.index
    entry = index.tensors[index.resolve(name)]
    if not entry.shape:
        raise ValueError(f"{name} is a scalar: it has no rows")
    count = entry.shape[0]
    row_bytes = entry.nbytes // count if count else 0
    bad = [r for r in rows if not 0 <= r < count]
    if bad:
        raise IndexError(f"row {bad[0]} is outside {name} ({count} rows)")
    if not rows:
        return torch.empty((0, *entry.shape[1:]), dtype=entry.torch_dtype)
    out = np.empty((len(rows), row_bytes), dtype=np.uint8)
    path = ckpt.file_path(entry.file)
    fd = os.open(path, os.O_RDONLY)
    try:
        offsets = [entry.offset + r * row_bytes for r in rows]
        for off in offsets:  # start every read at once; the reads below then mostly find the page cache filled
            os.posix_fadvise(fd, off, row_bytes, os.POSIX_FADV_WILLNEED)
        for i, off in enumerate(offsets):
            got = os.preadv(fd, [out[i]], off)
            if got != row_bytes:
                raise CorruptCheckpointError(path, f"data file ends early: row {rows[i]} of {name} needs bytes "
                                             f"{off}..{off + row_bytes}, got {got} (truncated file?)")
    finally:
        os.close(fd)
    return torch.from_numpy(out).view(entry.torch_dtype).view(len(rows), *entry.shape[1:])
