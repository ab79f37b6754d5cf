"""Convert a Hugging Face model directory (safetensors, sharded or not, or PyTorch .bin) to a Tangram checkpoint."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from tangram.progress import byte_progress
from tangram.store.errors import (
    CheckpointError,
    CorruptCheckpointError,
    DestinationExistsError,
    MissingFileError,
    UnsupportedFormatError,
)
from tangram.store.format import CheckpointIndex
from tangram.store.writer import save

log = logging.getLogger(__name__)

MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def _weight_files(src: Path) -> tuple[str, list[Path]]:
    """Find the weights of `src`: ("safetensors" | "bin", files in order)."""
    for kind, index_name, single, pattern in (
        ("safetensors", "model.safetensors.index.json", "model.safetensors", "*.safetensors"),
        ("bin", "pytorch_model.bin.index.json", "pytorch_model.bin", "*.bin"),
    ):
        index = src / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise CorruptCheckpointError(index, f"not a valid shard index ({exc})") from None
            files = [src / name for name in dict.fromkeys(weight_map.values())]
            for f in files:
                if not f.is_file():
                    raise MissingFileError(f, f"shard listed in {index_name} is missing")
            return kind, files
        if (src / single).is_file():
            return kind, [src / single]
        found = sorted(p for p in src.glob(pattern) if p.name != "training_args.bin")
        if found:
            return kind, found
    others = sorted(p.name for p in src.iterdir() if p.suffix in {".gguf", ".h5", ".msgpack", ".pt", ".ckpt", ".onnx"})
    hint = f" (found {', '.join(others)}; convert those to safetensors first)" if others else ""
    raise UnsupportedFormatError(src, f"no safetensors or PyTorch .bin weights found{hint}")


def iter_tensors(kind: str, files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (name, tensor) pairs from the weight files, one file open at a time."""
    for f in files:
        if kind == "safetensors":
            try:
                with safe_open(f, framework="pt") as fh:
                    for key in fh.keys():
                        yield key, fh.get_tensor(key)
            except (OSError, RuntimeError, ValueError, SafetensorError) as exc:
                if isinstance(exc, CheckpointError):
                    raise
                raise CorruptCheckpointError(f, f"cannot read safetensors file ({exc})") from None
        else:
            try:
                state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # torch raises many types for bad pickles
                raise CorruptCheckpointError(f, f"cannot read PyTorch weights ({type(exc).__name__}: {exc})") from None
            if not isinstance(state, dict):
                raise UnsupportedFormatError(f, f"holds a {type(state).__name__}, not a state dict")
            yield from state.items()


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    overwrite: bool = False,
    require_tokenizer: bool = True,
    show_progress: bool = False,
) -> CheckpointIndex:
    """Convert the Hugging Face model directory `src` into a Tangram checkpoint at `dst`.

    Copies config, generation config, tokenizer files and chat template through.
    Tied or equal tensors are stored once. Raises a CheckpointError subclass naming
    the file and the problem for anything it cannot convert faithfully.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise MissingFileError(src, "source model directory does not exist")
    if dst.exists() and not overwrite:
        raise DestinationExistsError(dst, "destination already exists (pass --force to replace it)")
    if not (src / "config.json").is_file():
        raise MissingFileError(src / "config.json", "no model config in the source directory")
    if require_tokenizer and not any((src / t).is_file() for t in TOKENIZER_FILES):
        raise MissingFileError(src, f"no tokenizer ({', '.join(TOKENIZER_FILES)}) in the source directory")
    kind, files = _weight_files(src)
    config = json.loads((src / "config.json").read_text())
    extra = {name: src / name for name in MODEL_FILES if (src / name).is_file()}
    with byte_progress(f"convert {src.name}", sum(f.stat().st_size for f in files), show_progress) as advance:
        index = save(
            iter_tensors(kind, files),
            dst,
            extra_files=extra,
            overwrite=overwrite,
            progress=advance,
            source=str(src.resolve()),
            source_format=kind,
            model_type=config.get("model_type"),
            architectures=config.get("architectures"),
        )
    log.info("converted %s (%s, %d files) -> %s", src, kind, len(files), dst)
    return index
