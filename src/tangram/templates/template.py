"""A model's start-up template: what its first prefill used, in order; stored next to its checkpoint.

Versioned and tied to the exact checkpoint (hash of its index) and library
versions: any change invalidates it, and an unreadable template is ignored
with a warning (the next run records a fresh one). A template only changes
the order and overlap of work, never the numbers computed.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import transformers
import xxhash
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tangram import __version__
from tangram.paths import data_dir, file_version
from tangram.store.format import INDEX_FILE

log = logging.getLogger(__name__)

VERSION = 2  # 2: the unread fields hidden_shape, ops, workspace_bytes are gone
FILE = "tangram-template.json"


class Template(BaseModel):
    """Traced start-up of one checkpoint."""

    model_config = ConfigDict(extra="forbid")

    version: int = VERSION
    checkpoint_id: str
    libraries: dict[str, str]
    architecture: str
    groups: list[list[str]] = Field(description="tensor names by module, in first-use order")
    prefill_tokens: int = Field(description="prompt length of the recorded prefill (what `warm` runs)")

    @property
    def order(self) -> list[str]:
        """Every tensor name in first-use order."""
        return [n for g in self.groups for n in g]


def checkpoint_id(checkpoint: Path) -> str:
    """Identity of a checkpoint: the hash of its index (which holds every tensor's content hash)."""
    return xxhash.xxh3_128_hexdigest((checkpoint / INDEX_FILE).read_bytes())


def libraries() -> dict[str, str]:
    """Versions a template depends on."""
    return {"tangram": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def template_path(checkpoint: Path) -> Path:
    """Next to the checkpoint when that directory is writable, else in the data dir under its identity."""
    if os.access(checkpoint, os.W_OK):
        return checkpoint / FILE
    return data_dir() / "templates" / f"{checkpoint_id(checkpoint)}.json"


# template path -> (stamp of the template and index files, the valid template read from them): a restart of a
# checkpoint in this process reads, hashes and validates nothing again (about 1 ms for SmolLM2)
_read: dict[Path, tuple[tuple, Template]] = {}


def _stamp(path: Path, checkpoint: Path) -> tuple | None:
    a, b = file_version(path), file_version(checkpoint / INDEX_FILE)
    return None if a is None or b is None else (a, b)


def save_template(checkpoint: Path, template: Template) -> Path:
    """Write atomically."""
    path = template_path(checkpoint)
    _read.pop(path, None)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(template.model_dump_json())
    tmp.replace(path)
    return path


def load_template(checkpoint: Path) -> Template | None:
    """The checkpoint's valid template, or None (absent, stale, or corrupted: warned and ignored)."""
    path = template_path(checkpoint)
    if not path.is_file():
        return None
    stamp = _stamp(path, checkpoint)
    known = _read.get(path)
    if stamp is not None and known is not None and known[0] == stamp and known[1].libraries == libraries():
        return known[1]
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and data.get("version") != VERSION:  # an older layout: not an error
            log.info("start-up template %s has version %s, not %s; re-recording", path, data.get("version"), VERSION)
            return None
        template = Template.model_validate(data)
    except (OSError, ValueError, ValidationError) as exc:
        log.warning("ignoring the unreadable start-up template %s (%s); a new one will be recorded", path,
                    str(exc).splitlines()[0])
        return None
    if template.version != VERSION or template.libraries != libraries():
        log.info("start-up template %s was recorded with other versions; re-recording", path)
        return None
    if template.checkpoint_id != checkpoint_id(checkpoint):
        log.info("start-up template %s belongs to another version of the checkpoint; re-recording", path)
        return None
    if stamp is not None:
        _read[path] = (stamp, template)
    return template
