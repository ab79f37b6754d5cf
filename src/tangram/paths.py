"""Where Tangram keeps its data (converted checkpoints, measured machine facts)."""

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
