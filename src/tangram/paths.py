"""Where Tangram keeps its data (converted checkpoints, measured machine facts), and how a file's version is told."""

from __future__ import annotations

import os
from pathlib import Path

ENV_DATA_DIR = "TANGRAM_HOME"


def data_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Return (and create) the data directory: `override`, else $TANGRAM_HOME, else ~/.cache/tangram."""
    if override is not None:
        path = Path(override)
    elif os.environ.get(ENV_DATA_DIR):
        path = Path(os.environ[ENV_DATA_DIR])
    else:
        path = Path.home() / ".cache" / "tangram"
    path.mkdir(parents=True, exist_ok=True)
    return path


def file_version(path: Path) -> tuple[int, int, int] | None:
    """(inode, size, mtime in ns) of a file: what changes when it is rewritten; None when it cannot be read.
    Caches of what was parsed from a file key their entries by it."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns
