"""LoRA adapters in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`) as Tangram checkpoints.

A converted adapter is an ordinary Tangram checkpoint (aligned, content-hashed,
loadable by the loader, the DRAM tier and the device pool) whose tensors are
named by the base model's module they update, PEFT's `base_model.model.`
prefix removed: `model.layers.0.self_attn.q_proj.lora_A.weight` ([r, in]) and
`...lora_B.weight` ([out, r]). The index metadata holds `kind = "lora"` and
the `lora` block (`AdapterInfo`): rank, alpha, scaling and the modules.

What the engine cannot apply faithfully is refused with a clear error: other
PEFT types, DoRA, `modules_to_save`, LoRA biases, `fan_in_fan_out`, per-module
rank or alpha patterns, targets outside the decoder layers' linear modules or
absent from the base, and shapes that do not match the base's weights.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tangram.store.convert import iter_tensors
from tangram.store.errors import CheckpointError, CorruptCheckpointError, MissingFileError, UnsupportedFormatError
from tangram.store.format import CheckpointIndex
from tangram.store.writer import save

log = logging.getLogger(__name__)

ADAPTER_KIND = "lora"
CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
# a tensor PEFT writes for a LoRA module: <module>.lora_A.weight / <module>.lora_B.weight
_TENSOR = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")
# the modules an adapter may update: linear layers inside the decoder layers (not embeddings, not lm_head,
# whose input rows no longer map one to one onto the step's tokens)
_LAYER_MODULE = re.compile(r"^model\.layers\.\d+\.")


class AdapterError(CheckpointError):
    """An adapter that cannot be served on this base (unsupported feature, unknown module, shape mismatch)."""


class PeftLoraConfig(BaseModel):
    """The fields of PEFT's `adapter_config.json` that decide what an adapter computes (others are ignored)."""

    model_config = ConfigDict(extra="allow")

    peft_type: str = "LORA"
    r: int = Field(8, ge=1)
    lora_alpha: float = Field(8, gt=0)
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: list[str] | None = None
    bias: str = "none"
    lora_bias: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: dict[str, Any] = Field(default_factory=dict)
    alpha_pattern: dict[str, Any] = Field(default_factory=dict)
    target_modules: list[str] | str | None = None
    base_model_name_or_path: str | None = None

    def scaling(self) -> float:
        """PEFT's scaling of the update: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def refusal(self) -> str | None:
        """Why the engine cannot apply this adapter as PEFT does, or None."""
        if self.peft_type.upper() != "LORA":
            return f"peft_type {self.peft_type!r} is not supported (only LORA)"
        if self.use_dora:
            return "DoRA adapters (use_dora) are not supported: they rescale the base weight per column"
        if self.modules_to_save:
            return (f"modules_to_save ({', '.join(self.modules_to_save)}) is not supported: it replaces whole "
                    "modules of the base")
        if self.bias != "none" or self.lora_bias:
            return "LoRA biases (bias / lora_bias) are not supported"
        if self.fan_in_fan_out:
            return "fan_in_fan_out (Conv1D bases such as GPT-2) is not supported"
        if self.rank_pattern or self.alpha_pattern:
            return "per-module rank_pattern / alpha_pattern is not supported"
        return None


class AdapterInfo(BaseModel):
    """What the engine needs of a converted adapter (the `lora` block of its index metadata)."""

    r: int
    alpha: float
    scaling: float
    modules: list[str]  # base module names, e.g. model.layers.0.self_attn.q_proj
    base: str | None = None  # PEFT's base_model_name_or_path, for information

    @classmethod
    def of(cls, index: CheckpointIndex, path: Path | str = "") -> AdapterInfo:
        """The adapter block of a checkpoint's index; AdapterError when it is not a converted adapter."""
        if index.metadata.get("kind") != ADAPTER_KIND or "lora" not in index.metadata:
            raise AdapterError(Path(path), "not a converted LoRA adapter (no `kind = lora` in its index)")
        return cls.model_validate(index.metadata["lora"])

    @staticmethod
    def tensor_names(module: str) -> tuple[str, str]:
        """The names of a module's A ([r, in]) and B ([out, r]) tensors."""
        return f"{module}.lora_A.weight", f"{module}.lora_B.weight"


def is_peft_adapter(path: Path) -> bool:
    """Whether `path` is a PEFT adapter directory."""
    return (path / CONFIG_FILE).is_file()


def read_peft_config(src: Path) -> PeftLoraConfig:
    """Parse and check a PEFT adapter's config; AdapterError for what cannot be served."""
    path = src / CONFIG_FILE
    if not path.is_file():
        raise MissingFileError(path, "no adapter_config.json: not a PEFT adapter directory")
    try:
        config = PeftLoraConfig.model_validate(json.loads(path.read_text()))
    except (ValueError, UnicodeDecodeError) as exc:
        detail = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
        raise CorruptCheckpointError(path, f"not a valid adapter config ({detail})") from None
    why = config.refusal()
    if why is not None:
        raise AdapterError(path, why)
    return config


def _weights(src: Path) -> tuple[str, Path]:
    for name in WEIGHT_FILES:
        if (src / name).is_file():
            return ("safetensors" if name.endswith(".safetensors") else "bin"), src / name
    raise MissingFileError(src / WEIGHT_FILES[0], "the adapter has no weights (adapter_model.safetensors)")


def _renamed(kind: str, file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in iter_tensors(kind, [file]):
        yield name.removeprefix(PEFT_PREFIX), tensor


def check_against_base(shapes: dict[str, tuple[int, ...]], base: CheckpointIndex, *, where: Path,
                       config: PeftLoraConfig | None = None) -> list[str]:
    """The adapter's modules (sorted) after checking every tensor against the base; AdapterError otherwise.

    `shapes` maps the adapter's (renamed) tensor names to their shapes.
    """
    parts: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, shape in shapes.items():
        m = _TENSOR.match(name)
        if m is None:
            raise AdapterError(where, f"tensor {name!r} is not a LoRA A/B weight (embedding LoRA, DoRA magnitudes "
                               "and saved modules are not supported)")
        parts.setdefault(m["module"], {})[m["part"]] = shape
    if not parts:
        raise AdapterError(where, "the adapter holds no LoRA tensors")
    for module, ab in sorted(parts.items()):
        if set(ab) != {"lora_A", "lora_B"}:
            raise AdapterError(where, f"module {module!r} has {', '.join(sorted(ab))} but not both lora_A and lora_B")
        weight = f"{module}.weight"
        if not _LAYER_MODULE.match(module) or weight not in base.names():
            raise AdapterError(where, f"target module {module!r} is not a linear module of the base's decoder "
                               "layers")
        a, b = ab["lora_A"], ab["lora_B"]
        out_in = tuple(base.entry(weight).shape)
        if len(a) != 2 or len(b) != 2 or len(out_in) != 2 or a[0] != b[1]:
            raise AdapterError(where, f"module {module!r}: lora_A {list(a)} and lora_B {list(b)} are not a "
                               "rank-r pair")
        if (b[0], a[1]) != out_in:
            raise AdapterError(where, f"module {module!r}: the adapter is [out {b[0]}, in {a[1]}], the base's "
                               f"weight is {list(out_in)} (an adapter of another base model?)")
        if config is not None and a[0] != config.r:
            raise AdapterError(where, f"module {module!r} has rank {a[0]}, the config says r = {config.r}")
    if config is not None and isinstance(config.target_modules, list):
        leaves = {m.rsplit(".", 1)[-1] for m in parts}
        unknown = [t for t in config.target_modules if t not in leaves and not any(m.endswith(t) for m in parts)]
        if unknown:
            raise AdapterError(where, f"target_modules {unknown} have no LoRA tensors (unknown target modules)")
    return sorted(parts)


def convert_adapter(src: str | Path, dst: str | Path, base: CheckpointIndex, *,
                    overwrite: bool = False) -> CheckpointIndex:
    """Convert the PEFT adapter directory `src` into a Tangram adapter checkpoint at `dst`, checked against the
    index of its base model. Raises AdapterError (or another CheckpointError) naming the problem."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise MissingFileError(src, "adapter directory does not exist")
    config = read_peft_config(src)
    kind, file = _weights(src)
    shapes = {name: tuple(t.shape) for name, t in _renamed(kind, file)}  # read once to check before writing
    modules = check_against_base(shapes, base, where=file, config=config)
    info = AdapterInfo(r=config.r, alpha=config.lora_alpha, scaling=config.scaling(), modules=modules,
                       base=config.base_model_name_or_path)
    index = save(_renamed(kind, file), dst, extra_files={CONFIG_FILE: src / CONFIG_FILE}, overwrite=overwrite,
                 source=str(src.resolve()), source_format=f"peft-{kind}", kind=ADAPTER_KIND,
                 lora=info.model_dump(), model_type=base.metadata.get("model_type"),
                 architectures=base.metadata.get("architectures"))
    log.info("converted adapter %s (rank %d, %d modules) -> %s", src, config.r, len(modules), dst)
    return index


def check_adapter(index: CheckpointIndex, base: CheckpointIndex, path: Path) -> AdapterInfo:
    """A converted adapter's info after checking it against `base` (a deploy on another base fails here)."""
    info = AdapterInfo.of(index, path)
    shapes = {name: tuple(index.entry(name).shape) for name in index.names()}
    if check_against_base(shapes, base, where=path) != sorted(info.modules):
        raise UnsupportedFormatError(path, "the adapter's tensors do not match the modules its index lists")
    return info
