"""Seeded workloads for the simulator: models (with families sharing tensors) and a bursty request trace.

A model is a set of tensors, each identified by content (`key`) with its bytes,
plus a prefill time model (seconds = base + per_token x prompt tokens) and a
decode time per token. A *family* is a base and variants that re-draw a few
layers: every other tensor has the base's key, so a device pool holding the
base holds most of each variant. Popularity is Zipf over a seeded ranking;
arrivals are gamma distributed with a chosen coefficient of variation
(bursts, then quiet gaps); the generators are `tangram.workload`'s, shared with the benchmarks.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from tangram.workload import TraceShape, arrivals, trace_stats, zipf_popularity


@dataclass(frozen=True)
class SimModel:
    """One model: tensor key -> bytes, its family, and its prefill / decode time model."""

    name: str
    tensors: dict[str, int] = field(hash=False)
    family: str
    prefill_base_s: float
    prefill_per_token_s: float
    decode_per_token_s: float

    @property
    def nbytes(self) -> int:
        """Bytes of its distinct tensors."""
        return sum(self.tensors.values())

    def prefill_s(self, tokens: int) -> float:
        """Seconds of the first forward over `tokens` prompt tokens."""
        return self.prefill_base_s + self.prefill_per_token_s * tokens


@dataclass(frozen=True)
class Request:
    """One request of a trace: arrival (s), model, prompt tokens and tokens to generate."""

    t: float
    model: str
    prompt_tokens: int
    max_tokens: int


# (layers, bytes per layer, embedding bytes, parameters): fp16 shapes of Qwen2-0.5B / 1.5B, Llama-3.2-3B, Qwen2-7B
ARCHS = {
    "0.5b": (24, 29_000_000, 272_000_000, 0.49e9),
    "1.5b": (28, 93_000_000, 466_000_000, 1.54e9),
    "3b": (28, 201_000_000, 788_000_000, 3.2e9),
    "7b": (28, 467_000_000, 1_090_000_000, 7.6e9),
}


@dataclass(frozen=True)
class ModelMix:
    """How a model set is drawn: how many, which sizes, how many in families and how they differ."""

    n_models: int = 64
    archs: tuple[str, ...] = ("0.5b", "1.5b", "3b", "7b")
    arch_weights: tuple[float, ...] = (0.3, 0.3, 0.25, 0.15)
    family_fraction: float = 0.5  # share of models that are variants of a base
    family_size: tuple[int, int] = (2, 5)  # variants per base
    changed_layers: tuple[int, int] = (1, 4)
    flops: float = 200e12  # effective device FLOP/s of a prefill (2 x parameters x tokens)
    prefill_base_s: float = 0.02
    decode_per_token_s: float = 0.02


def make_models(mix: ModelMix, seed: int) -> list[SimModel]:
    """A seeded model set: bases of random architectures, part of them with variants sharing tensors."""
    rng = random.Random(seed * 7919 + 1)
    models: list[SimModel] = []

    def model(name: str, arch: str, family: str, keys: dict[str, int]) -> SimModel:
        params = ARCHS[arch][3]
        return SimModel(name, keys, family, mix.prefill_base_s, 2 * params / mix.flops, mix.decode_per_token_s)

    i = 0
    while len(models) < mix.n_models:
        arch = rng.choices(mix.archs, mix.arch_weights)[0]
        layers, per_layer, embed, _ = ARCHS[arch]
        base = f"m{i}"
        keys = {f"{base}.embed": embed, **{f"{base}.l{j}": per_layer for j in range(layers)}}
        models.append(model(base, arch, base, keys))
        left = mix.n_models - len(models)
        if left > 0 and rng.random() < mix.family_fraction:
            for v in range(min(left, rng.randint(*mix.family_size))):
                changed = rng.sample(range(layers), rng.randint(*mix.changed_layers))
                vkeys = dict(keys)
                for j in changed:
                    del vkeys[f"{base}.l{j}"]
                    vkeys[f"{base}.v{v}.l{j}"] = per_layer
                models.append(model(f"{base}-v{v}", arch, base, vkeys))
        i += 1
    return models[: mix.n_models]


def make_trace(models: list[SimModel], shape: TraceShape, seed: int) -> tuple[list[Request], dict[str, float]]:
    """A seeded trace and the popularity it was drawn with."""
    rng = random.Random(seed * 1_000_003 + 11)
    popularity = zipf_popularity([m.name for m in models], shape.zipf_s, rng)
    out = [Request(t, model, rng.randint(*shape.prompt_tokens), rng.randint(*shape.max_tokens))
           for t, model in arrivals(rng, shape, popularity)]
    return out, popularity


def trace_facts(trace: list[Request]) -> dict[str, object]:
    """Gap CV, duration and request mix of a trace (for results): `tangram.workload.trace_stats`."""
    return trace_stats([r.t for r in trace], [r.model for r in trace])
