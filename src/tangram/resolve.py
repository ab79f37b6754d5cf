"""What a user names a model by: `demo`, a Tangram checkpoint, or a Hugging Face directory (converted once),
and the copy of it in the compute dtype a deployment asks for (converted once, cached in the data dir)."""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from tangram.engine.dtype import DTYPES, SHORT, DtypeSetting, choose_dtype, compute_dtype, default_compute_dtype
from tangram.paths import data_dir
from tangram.progress import byte_progress
from tangram.store import Checkpoint, Loader, TensorEntry, convert, save
from tangram.store.errors import CheckpointError, MissingFileError
from tangram.store.format import INDEX_FILE

log = logging.getLogger(__name__)

COPY_CHUNK_BYTES = 256 << 20  # a dtype copy reads (and verifies) this much of the source at a time


def converted_path(hf_dir: Path) -> Path:
    """Where the Tangram copy of a Hugging Face directory lives (keyed by its path and file stamps)."""
    stamp = hashlib.sha256(str(hf_dir.resolve()).encode())
    for f in sorted(hf_dir.iterdir()):
        if f.is_file():
            st = f.stat()
            stamp.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return data_dir() / "converted" / f"{hf_dir.name}-{stamp.hexdigest()[:12]}"


def resolve_model(name_or_path: str | Path, *, show_progress: bool = False, dtype: DtypeSetting | None = None,
                  device: torch.device | str = "cpu") -> Path:
    """A Tangram checkpoint directory for `demo`, a checkpoint, or a Hugging Face model directory.

    With `dtype` (a deployment's setting), the checkpoint whose tensors are in the
    dtype `choose_dtype` picks for `device`: the checkpoint itself, or its copy in
    that dtype (made once; the demo is built in it straight from its source).
    """
    if str(name_or_path) == "demo":
        from tangram.demo import fetch_demo

        want = default_compute_dtype(device) if dtype in (None, "auto") else DTYPES[dtype]
        return fetch_demo(dtype=want, show_progress=show_progress)
    path = Path(name_or_path)
    if (path / INDEX_FILE).is_file():
        resolved = path
    elif (path / "config.json").is_file():
        resolved = converted_path(path)
        if not (resolved / INDEX_FILE).is_file():
            log.info("converting %s to %s", path, resolved)
            convert(path, resolved, overwrite=True, show_progress=show_progress)
    elif not path.exists():
        raise MissingFileError(path, "no such model: give `demo`, a Tangram checkpoint or a Hugging Face directory")
    else:
        raise CheckpointError(path, "neither a Tangram checkpoint (no index) nor a Hugging Face directory "
                              "(no config.json)")
    if dtype is None:
        return resolved
    stored = compute_dtype(e.torch_dtype for e in Checkpoint(resolved).index.tensors.values())
    return with_dtype(resolved, choose_dtype(dtype, stored, device), show_progress=show_progress)


def dtype_copy_path(checkpoint: Path, dtype: torch.dtype) -> Path:
    """Where the copy of `checkpoint` in `dtype` lives: keyed by its index, which holds every tensor's hash."""
    ident = hashlib.sha256((checkpoint / INDEX_FILE).read_bytes()).hexdigest()[:12]
    return data_dir() / "converted" / f"{checkpoint.name}-{SHORT.get(dtype, str(dtype))}-{ident}"


def with_dtype(checkpoint: str | Path, dtype: torch.dtype, *, show_progress: bool = False) -> Path:
    """`checkpoint` if it computes in `dtype`, else its copy whose floating tensors are cast to `dtype`.

    The copy is written once by the store's writer (fresh hashes, alignment and
    index; aliases kept), from source bytes verified against their hashes, so a
    corrupted source fails here instead of yielding a trusted copy of bad bytes.
    """
    src = Path(checkpoint)
    ckpt = Checkpoint(src)
    index = ckpt.index
    if compute_dtype(e.torch_dtype for e in index.tensors.values()) == dtype:
        return src
    dst = dtype_copy_path(src, dtype)
    if (dst / INDEX_FILE).is_file():
        return dst
    log.info("writing a %s copy of %s to %s (once)", dtype, src, dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        extra = _side_files(src, {f.name for f in index.files}, Path(tmp), dtype)
        total = sum(_cast_size(index.entry(n), dtype) for n in index.names())  # the writer counts aliases too
        with byte_progress(f"{SHORT.get(dtype, dtype)} copy of {src.name}", total, show_progress) as adv:
            save(_cast(ckpt, dtype), dst, extra_files=extra, overwrite=True, progress=adv,
                 **{**index.metadata, "dtype_of": str(src.resolve()), "dtype": str(dtype).removeprefix("torch.")})
    return dst


def _cast_size(entry: TensorEntry, dtype: torch.dtype) -> int:
    if not entry.torch_dtype.is_floating_point:
        return entry.nbytes
    return entry.nbytes // entry.torch_dtype.itemsize * dtype.itemsize


def _side_files(src: Path, data_files: set[str], tmp: Path, dtype: torch.dtype) -> dict[str, Path]:
    """Config, tokenizer and generation files to carry over (config.json naming the new dtype); not the index,
    the data files or a start-up template (which belongs to the source's identity)."""
    extra: dict[str, Path] = {}
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name in data_files or f.name.startswith(("tangram", ".")):
            continue
        extra[f.name] = f
    if "config.json" in extra:
        config = json.loads(extra["config.json"].read_text())
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        extra["config.json"] = tmp / "config.json"
    return extra


def _cast(ckpt: Checkpoint, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of the checkpoint with floating tensors cast to `dtype`, read in verified chunks."""
    index = ckpt.index
    names: dict[str, list[str]] = {s: [s] for s in index.tensors}
    for alias, target in index.aliases.items():
        names[target].append(alias)
    order = sorted(index.tensors, key=lambda s: (index.tensors[s].file, index.tensors[s].offset))
    loader = Loader(method="pread")  # no read-method probe for a one-off copy
    chunk: list[str] = []
    size = 0
    for i, stored in enumerate(order):
        chunk.append(stored)
        size += index.tensors[stored].nbytes
        if size < COPY_CHUNK_BYTES and i + 1 < len(order):
            continue
        loaded = loader.load(ckpt, "cpu", names=chunk, verify=True)
        for s in chunk:
            t = loaded[s]
            out = t.to(dtype) if t.is_floating_point() else t  # written before the next chunk is read
            for name in names[s]:
                yield name, out
        chunk, size = [], 0
