"""Synthetic checkpoints for benchmarks: exact tensor shapes of real models, random contents.

A model's tensor list comes from its transformers config instantiated on the meta
device (no memory, no download). Contents are random bytes from a seeded generator
(one seed per tensor, so every format of one model holds the same bytes). Each
model is written once under `<root>/<name>/` in every requested format and reused
by later runs; a manifest written last marks a complete set.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tangram.store import read_index, save
from tangram.workload import ModelSpec  # the one model description (re-exported: bench load names it here)

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
GENERATOR_VERSION = 2  # bump when the contents or layout of generated files change
SEED = 20240611

FORMATS = ("tangram", "safetensors", "torch", "tensorizer")


def _qwen2(name: str, hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int = 151936) -> ModelSpec:
    return ModelSpec(
        name,
        "Qwen2Config",
        dict(
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            vocab_size=vocab,
            tie_word_embeddings=True,
        ),
    )


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        _qwen2("qwen2-0.5b", 896, 4864, 24, 14, 2),  # ~0.99 GB fp16 (lm_head tied to the embedding)
        _qwen2("qwen2-1.5b", 1536, 8960, 28, 12, 2),  # ~3.1 GB fp16
        _qwen2("qwen2.5-3b", 2048, 11008, 36, 16, 2),  # ~6.2 GB fp16 (Qwen2.5-3B's shapes, tied embedding)
        _qwen2("qwen2-0.5b-2l", 896, 4864, 2, 14, 2),  # quick mode: ~0.33 GB, the real embedding and 2 layers
        _qwen2("tiny-qwen2", 64, 128, 2, 4, 2, vocab=1024),  # unit tests: ~0.4 MB
    )
}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a model; `tied_to` names the tensor it shares storage with."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    tied_to: str | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of this tensor."""
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def tensor_specs(spec: ModelSpec) -> list[TensorSpec]:
    """The state-dict tensors of `spec`, built on the meta device (tied parameters marked)."""
    from transformers import AutoModelForCausalLM

    config = spec.transformers_config()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=spec.torch_dtype)
    first_name: dict[int, str] = {}
    out: list[TensorSpec] = []
    for name, param in model.named_parameters(remove_duplicate=False):
        tied = first_name.setdefault(id(param), name)
        out.append(TensorSpec(name, tuple(param.shape), param.dtype, None if tied == name else tied))
    params = {t.name for t in out}
    for name, buf in model.state_dict().items():  # persistent buffers, if the architecture has any
        if name not in params:
            out.append(TensorSpec(name, tuple(buf.shape), buf.dtype))
    return out


def random_tensor(t: TensorSpec, seed: int) -> torch.Tensor:
    """A tensor of `t`'s dtype and shape filled with random bytes from `seed`."""
    words = (t.nbytes + 7) // 8
    gen = torch.Generator().manual_seed(seed)
    raw = torch.empty(words, dtype=torch.int64).random_(generator=gen).view(torch.uint8)[: t.nbytes]
    return raw.view(t.dtype).view(t.shape) if t.nbytes else torch.empty(t.shape, dtype=t.dtype)


def random_state(specs: list[TensorSpec], seed: int = SEED) -> dict[str, torch.Tensor]:
    """Random contents for every tensor; tied tensors are the same tensor object."""
    state: dict[str, torch.Tensor] = {}
    for i, t in enumerate(specs):
        state[t.name] = state[t.tied_to] if t.tied_to else random_tensor(t, seed + i)
    return state


@dataclass
class SyntheticCheckpoint:
    """Paths of one synthetic model in every format written."""

    name: str
    root: Path
    total_bytes: int  # bytes of unique tensors (each tied tensor once)
    tensors: int
    formats: list[str] = field(default_factory=list)

    @property
    def tangram_dir(self) -> Path:
        """Tangram checkpoint directory."""
        return self.root / "tangram"

    @property
    def safetensors_path(self) -> Path:
        """safetensors file (unique tensors only, like a tied Hugging Face checkpoint)."""
        return self.root / "model.safetensors"

    @property
    def torch_path(self) -> Path:
        """torch.save file, loadable with torch.load(mmap=True)."""
        return self.root / "model.pt"

    @property
    def tensorizer_path(self) -> Path:
        """tensorizer file."""
        return self.root / "model.tensors"

    def files(self, fmt: str) -> list[Path]:
        """Every file a loader of format `fmt` reads."""
        if fmt == "tangram":
            d = self.tangram_dir
            return [d / "tangram.json", *sorted(d.glob("data-*.bin"))]
        return [{"safetensors": self.safetensors_path, "torch": self.torch_path, "tensorizer": self.tensorizer_path}[fmt]]


def tensorizer_available() -> bool:
    """Whether tensorizer can be imported."""
    try:
        import tensorizer  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return True


def _write_formats(
    state: dict[str, torch.Tensor], unique: dict[str, torch.Tensor], tmp: Path, formats: list[str], spec: ModelSpec,
    step: Callable[[str], None],
) -> None:
    if "tangram" in formats:
        step("tangram")
        save(state, tmp / "tangram", model=spec.name, synthetic=True)
    if "safetensors" in formats:
        step("safetensors")
        from safetensors.torch import save_file

        save_file(unique, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if "torch" in formats:
        step("torch")
        torch.save(unique, tmp / "model.pt")
    if "tensorizer" in formats:
        step("tensorizer")
        from tensorizer import TensorSerializer

        ser = TensorSerializer(str(tmp / "model.tensors"))
        ser.write_state_dict(unique)
        ser.close()
    for f in tmp.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def ensure_checkpoint(
    spec: ModelSpec,
    root: Path,
    *,
    formats: list[str] | None = None,
    step: Callable[[str], None] | None = None,
) -> SyntheticCheckpoint:
    """Return `spec`'s synthetic checkpoint under `root/<name>`, generating what is missing.

    `formats` defaults to every format (tensorizer only when importable).
    `step(label)` is called before each generation stage (progress display).
    """
    wanted = list(formats or [f for f in FORMATS if f != "tensorizer" or tensorizer_available()])
    step = step or (lambda label: None)
    target = root / spec.name
    manifest = _read_manifest(target)
    if manifest is not None and manifest.get("spec") == _spec_key(spec) and set(wanted) <= set(manifest["formats"]):
        return SyntheticCheckpoint(spec.name, target, manifest["total_bytes"], manifest["tensors"], manifest["formats"])
    t0 = time.perf_counter()
    step("shapes")
    specs = tensor_specs(spec)
    step("contents")
    state = random_state(specs)
    unique = {t.name: state[t.name] for t in specs if t.tied_to is None}
    total = sum(t.nbytes for t in specs if t.tied_to is None)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{spec.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_formats(state, unique, tmp, wanted, spec, step)
        info = {
            "generator_version": GENERATOR_VERSION, "spec": _spec_key(spec), "formats": wanted,
            "total_bytes": total, "tensors": len(unique), "seed": SEED,
        }
        (tmp / MANIFEST).write_text(json.dumps(info, indent=1))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    read_index(target / "tangram")  # validates what was written
    log.info("generated synthetic %s (%.2f GB, %s) in %.1f s", spec.name, total / 1e9, wanted, time.perf_counter() - t0)
    return SyntheticCheckpoint(spec.name, target, total, len(unique), wanted)


def _spec_key(spec: ModelSpec) -> dict[str, Any]:
    return {"architecture": spec.architecture, "config": spec.config, "dtype": spec.dtype, "version": GENERATOR_VERSION}


def _read_manifest(target: Path) -> dict[str, Any] | None:
    try:
        return json.loads((target / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


