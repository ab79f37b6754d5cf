"""The shape of one KV cache block, derived from a model's config."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import SimpleNamespace

import torch


@dataclass(frozen=True)
class KVSpec:
    """KV geometry of a model: a block holds `block_tokens` tokens of every layer, keys and values.

    Block layout (elements): [layers, block_tokens, 2, kv_heads, head_dim], so one
    (layer, token) row of keys and values is `row_elems` contiguous elements.
    """

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    block_tokens: int = 16

    @classmethod
    def from_config(cls, config, dtype: torch.dtype, block_tokens: int = 16) -> KVSpec:
        """Geometry from a transformers config, or a dict of its fields (Llama, Qwen, Mistral, OPT, GPT-2 name
        their fields alike)."""
        if isinstance(config, Mapping):
            config = SimpleNamespace(**config)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        if block_tokens < 1:
            raise ValueError("block_tokens must be >= 1")
        return cls(text.num_hidden_layers, kv_heads, head_dim, dtype, block_tokens)

    @property
    def row_elems(self) -> int:
        """Elements of one (layer, token) row: keys then values of every KV head."""
        return 2 * self.kv_heads * self.head_dim

    @property
    def layer_elems(self) -> int:
        """Elements of one layer inside a block."""
        return self.block_tokens * self.row_elems

    @property
    def block_bytes(self) -> int:
        """Bytes of one block."""
        return self.layers * self.layer_elems * self.dtype.itemsize

    def blocks_for(self, tokens: int) -> int:
        """Blocks needed to hold `tokens` tokens."""
        return math.ceil(tokens / self.block_tokens)

    def bytes_per_token(self) -> int:
        """KV bytes one token costs across all layers."""
        return self.layers * self.row_elems * self.dtype.itemsize
