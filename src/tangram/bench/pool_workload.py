"""Workload of `tangram bench pool`: synthetic model families, unrelated models, a seeded serverless trace.

Pure generation (models and trace are deterministic under a seed) plus writing
the checkpoints once under a work directory.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from tangram.store import read_index, save
from tangram.workload import ModelSpec, raw_model, zipf_popularity

MB = 1 << 20
ROW_BYTES = 2048  # bytes of one row of a synthetic tensor: fp16 x 1024 columns
WORKLOAD_VERSION = 1  # bump when the contents or layout of generated checkpoints change


# --------------------------------------------------------------------------- workload


@dataclass(frozen=True)
class Workload:
    """The models, the pool capacity and the trace of one benchmark run."""

    models: list[ModelSpec]  # RAW models: an embedding and per layer an attention and an MLP fp16 tensor
    capacity: int
    trace: list[tuple[float, str, float]]  # (arrival time, model, hold seconds), trace time
    max_active: int
    half_life_s: float
    popularity: dict[str, float] = field(default_factory=dict)

    def families(self) -> dict[str, list[str]]:
        """Base name -> its variants' names."""
        out: dict[str, list[str]] = {}
        for m in self.models:
            if m.base is not None:
                out.setdefault(m.base, []).append(m.name)
        return out


def _scaled(mb: float, scale: float) -> int:
    """`mb` MiB times `scale`, as a whole number of tensor rows."""
    return max(1, round(mb * scale * MB / ROW_BYTES)) * ROW_BYTES


def make_models(scale: float, seed: int = 0) -> list[ModelSpec]:
    """Two families (base + 3 variants differing in 1-2 layers) and six unrelated models; sizes times `scale`."""
    rng = random.Random(seed * 7919 + 17)
    models: list[ModelSpec] = []
    seeds = iter(range(seed * 1000 + 1, seed * 1000 + 1000))
    families = [("fam-a", 4.0, 1.0, 2.0, 8), ("fam-b", 2.0, 1.0, 2.0, 6)]  # name, embed, attn, mlp MiB, layers
    for fam, emb, attn, mlp, layers in families:
        base = raw_model(f"{fam}-base", _scaled(emb, scale), _scaled(attn, scale), _scaled(mlp, scale), layers,
                         seed=next(seeds))
        models.append(base)
        for v in range(1, 4):
            k = rng.choice((1, 2))
            changed = tuple(sorted(rng.sample(range(layers), k)))
            models.append(replace(base, name=f"{fam}-v{v}", seed=next(seeds), base=base.name, changed=changed))
    for i, total_mb in enumerate((8, 12, 16, 20, 24, 32)):  # unrelated: embed + 4 layers
        layers = 4
        per_layer = total_mb * 0.8 / layers
        models.append(raw_model(f"solo-{total_mb}m", _scaled(total_mb * 0.2, scale), _scaled(per_layer / 3, scale),
                                _scaled(per_layer * 2 / 3, scale), layers, seed=next(seeds)))
    return models


def make_trace(
    names: list[str], n_events: int, seed: int, *, zipf_s: float = 1.1, mean_gap_s: float = 1.0,
    mean_hold_s: float = 1.5,
) -> tuple[list[tuple[float, str, float]], dict[str, float]]:
    """A seeded trace: Poisson arrivals, Zipf popularity over a seeded ranking of `names`, exponential holds."""
    rng = random.Random(seed)
    popularity = zipf_popularity(names, zipf_s, rng)
    ranked, weights = list(popularity), list(popularity.values())
    t = 0.0
    trace: list[tuple[float, str, float]] = []
    for _ in range(n_events):
        t += rng.expovariate(1.0 / mean_gap_s)
        model = rng.choices(ranked, weights)[0]
        trace.append((round(t, 6), model, round(rng.expovariate(1.0 / mean_hold_s), 6)))
    return trace, popularity


def make_workload(*, scale: float, n_events: int, seed: int, capacity_fraction: float = 0.45,
                  max_active: int = 3, half_life_s: float = 60.0) -> Workload:
    """Models, pool capacity (`capacity_fraction` of the sum of the model sizes) and trace."""
    models = make_models(scale, seed)
    trace, popularity = make_trace([m.name for m in models], n_events, seed)
    capacity = int(capacity_fraction * sum(m.raw_nbytes for m in models))
    return Workload(models, capacity, trace, max_active, half_life_s, popularity)


def _tensor_bytes(nbytes: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    raw = torch.empty((nbytes + 7) // 8, dtype=torch.int64).random_(generator=gen).view(torch.uint8)[:nbytes]
    return raw.view(torch.float16).view(nbytes // ROW_BYTES, ROW_BYTES // 2)


def model_state(model: ModelSpec, by_name: dict[str, ModelSpec]) -> dict[str, torch.Tensor]:
    """Contents of `model`: its base's bytes except the changed layers (each tensor seeded by its position)."""
    base = by_name[model.base] if model.base is not None else model
    state: dict[str, torch.Tensor] = {}
    for j, (name, nbytes, layer) in enumerate(model.raw_layout()):
        own = model.base is not None and layer in model.changed
        state[name] = _tensor_bytes(nbytes, (model.seed if own else base.seed) * 100_003 + j)
    return state


def ensure_models(models: list[ModelSpec], root: Path, step: Any = None) -> dict[str, Path]:
    """Write every model's checkpoint under `root/<name>` unless an identical one is there; name -> path."""
    by_name = {m.name: m for m in models}
    out: dict[str, Path] = {}
    root.mkdir(parents=True, exist_ok=True)
    for m in models:
        target = root / m.name
        spec_file = root / f"{m.name}.spec.json"
        want = {"version": WORKLOAD_VERSION, "model": asdict(m), "base": asdict(by_name[m.base]) if m.base else None}
        want = json.loads(json.dumps(want))  # tuples -> lists, as read back
        try:
            have = json.loads(spec_file.read_text())
            read_index(target)
        except Exception:  # noqa: BLE001 - anything wrong means regenerate
            have = None
        if have != want:
            if step:
                step(m.name)
            spec_file.unlink(missing_ok=True)
            shutil.rmtree(target, ignore_errors=True)
            save(model_state(m, by_name), target, model=m.name, synthetic=True)
            spec_file.write_text(json.dumps(want, indent=1))
        out[m.name] = target
    return out


def unique_entries(path: Path) -> dict[str, int]:
    """Tensor identity -> nbytes for every distinct tensor of a checkpoint."""
    out: dict[str, int] = {}
    for entry in read_index(path).tensors.values():
        out.setdefault(entry.key, entry.nbytes)
    return out
