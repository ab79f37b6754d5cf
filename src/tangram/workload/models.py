"""`ModelSpec`: the one description of a synthetic model that benchmarks and tests generate checkpoints from.

A model is an architecture with its config values, a dtype and a seed: either a
transformers architecture (`architecture` is a config class name such as
"Qwen2Config", shapes come from instantiating it; the contents are random, from
the seed) or `RAW`, plain fp16 tensors of given byte sizes (an embedding and
per layer an attention and an MLP tensor) for benchmarks that only move bytes.
A *variant* (`base` set) is its base with the layers in `changed` re-drawn from
its own seed; every other tensor is byte-identical to the base's, so a device
pool shares it by content.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

RAW = "raw"  # architecture of byte-only models: config embed_bytes, attn_bytes, mlp_bytes, num_hidden_layers


@dataclass(frozen=True)
class ModelSpec:
    """A synthetic model: architecture, config values, dtype, seed; a variant names its `base` and `changed` layers."""

    name: str
    architecture: str  # transformers config class name, e.g. "Qwen2Config", or RAW
    config: dict[str, Any] = field(hash=False)
    dtype: str = "float16"
    seed: int = 0
    base: str | None = None
    changed: tuple[int, ...] = ()

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype every parameter is stored in."""
        return getattr(torch, self.dtype)

    @property
    def layers(self) -> int:
        """Number of transformer layers."""
        return int(self.config["num_hidden_layers"])

    @property
    def vocab(self) -> int:
        """Vocabulary size (transformers architectures)."""
        return int(self.config["vocab_size"])

    @property
    def context(self) -> int:
        """max_position_embeddings: what a reserve-mode engine reserves per sequence (transformers architectures)."""
        return int(self.config["max_position_embeddings"])

    def transformers_config(self):
        """The transformers config object of this spec (not for RAW models)."""
        if self.architecture == RAW:
            raise ValueError(f"{self.name}: a raw model has no transformers config")
        import transformers

        return getattr(transformers, self.architecture)(**self.config)

    def kv_bytes_per_token(self) -> int:
        """KV bytes of one token across all layers (keys and values, in this spec's dtype): the engine's geometry."""
        from tangram.kv.spec import KVSpec

        return KVSpec.from_config(self.config, self.torch_dtype).bytes_per_token()

    def raw_layout(self) -> list[tuple[str, int, int]]:
        """(name, nbytes, layer or -1) of every tensor of a RAW model."""
        if self.architecture != RAW:
            raise ValueError(f"{self.name}: only a raw model has a fixed byte layout")
        c = self.config
        out = [("model.embed_tokens.weight", int(c["embed_bytes"]), -1)]
        for i in range(self.layers):
            out.append((f"model.layers.{i}.self_attn.weight", int(c["attn_bytes"]), i))
            out.append((f"model.layers.{i}.mlp.weight", int(c["mlp_bytes"]), i))
        return out

    @property
    def raw_nbytes(self) -> int:
        """Bytes of a RAW model."""
        return sum(n for _, n, _ in self.raw_layout())


def transformer(name: str, arch: str, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
                vocab: int, context: int, *, seed: int, dtype: str = "float32") -> ModelSpec:
    """A small Qwen2 (`arch` "qwen2", tied embeddings) or Llama ("llama", untied) with bos/eos/pad 1/2/0."""
    classes = {"qwen2": ("Qwen2Config", True), "llama": ("LlamaConfig", False)}
    if arch not in classes:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(classes)}")
    cls, tied = classes[arch]
    config = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=context,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=tied)
    return ModelSpec(name, cls, config, dtype, seed)


def raw_model(name: str, embed_bytes: int, attn_bytes: int, mlp_bytes: int, layers: int, *, seed: int) -> ModelSpec:
    """A RAW fp16 model: an embedding and `layers` x (attention, MLP) tensors of the given byte sizes."""
    config = dict(embed_bytes=embed_bytes, attn_bytes=attn_bytes, mlp_bytes=mlp_bytes, num_hidden_layers=layers)
    return ModelSpec(name, RAW, config, "float16", seed)


def family(base: ModelSpec, variants: dict[str, tuple[int, ...]], seed_offset: int = 100) -> list[ModelSpec]:
    """`base` and one variant per entry (name -> changed layers), seeded base.seed + `seed_offset` + i."""
    out = [base]
    for i, (name, changed) in enumerate(variants.items()):
        out.append(replace(base, name=name, seed=base.seed + seed_offset + i, base=base.name, changed=tuple(changed)))
    return out
