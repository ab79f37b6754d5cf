"""What a user names a model by: `demo`, a Tangram checkpoint, or a Hugging Face directory (converted once)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from tangram.paths import data_dir
from tangram.store import convert
from tangram.store.errors import CheckpointError, MissingFileError
from tangram.store.format import INDEX_FILE

log = logging.getLogger(__name__)


def converted_path(hf_dir: Path) -> Path:
    """Where the Tangram copy of a Hugging Face directory lives (keyed by its path and file stamps)."""
    stamp = hashlib.sha256(str(hf_dir.resolve()).encode())
    for f in sorted(hf_dir.iterdir()):
        if f.is_file():
            st = f.stat()
            stamp.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return data_dir() / "converted" / f"{hf_dir.name}-{stamp.hexdigest()[:12]}"


def resolve_model(name_or_path: str | Path, *, show_progress: bool = False) -> Path:
    """A Tangram checkpoint directory for `demo`, a checkpoint, or a Hugging Face model directory."""
    if str(name_or_path) == "demo":
        from tangram.demo import fetch_demo

        return fetch_demo(show_progress=show_progress)
    path = Path(name_or_path)
    if (path / INDEX_FILE).is_file():
        return path
    if (path / "config.json").is_file():
        dst = converted_path(path)
        if not (dst / INDEX_FILE).is_file():
            log.info("converting %s to %s", path, dst)
            convert(path, dst, overwrite=True, show_progress=show_progress)
        return dst
    if not path.exists():
        raise MissingFileError(path, "no such model: give `demo`, a Tangram checkpoint or a Hugging Face directory")
    raise CheckpointError(path, "neither a Tangram checkpoint (no index) nor a Hugging Face directory (no config.json)")
