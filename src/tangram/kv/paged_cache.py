"""A transformers `Cache` over pool KV blocks, built for one forward pass of a batch.

The model's own attention code calls `update(keys, values, layer)`: the new
rows are written into each sequence's blocks, and the layer's whole K/V
(left-padded to the longest sequence, matching the 2D attention mask the
runner passes) is gathered back with one `index_select` per layer over a
strided view of the arena. Prefill of a fresh sequence returns the new K/V
as they are, exactly as transformers' DynamicCache does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from tangram.kv.spec import KVSpec


@dataclass
class SeqSlot:
    """One sequence in the batch: element offsets of its blocks and how many tokens they already hold."""

    offsets: list[int]
    past: int


class _PagedLayer(CacheLayerMixin):
    is_sliding = False

    def __init__(self, cache: PagedCache, layer: int) -> None:
        super().__init__()
        self.cache, self.layer = cache, layer
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to do: the blocks exist before the forward."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self.cache.write_and_gather(self.layer, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.past_len + query_length, 0

    def get_seq_length(self) -> int:
        return self.cache.past_len

    def get_max_length(self) -> int:
        return -1


class PagedCache(Cache):
    """KV of a batch of sequences living in pool blocks, for one forward that adds `new_tokens` to each.

    `new_tokens` is one count for all, or one per sequence: then the inputs are
    left-padded to the longest, and the padding rows are neither written nor
    attended to (a batched prefill of prompts of different lengths).
    """

    def __init__(self, spec: KVSpec, elements: torch.Tensor, slots: list[SeqSlot], new_tokens: int | list[int]
                 ) -> None:
        super().__init__(layers=[_PagedLayer(self, i) for i in range(spec.layers)])
        news = [new_tokens] * len(slots) if isinstance(new_tokens, int) else list(new_tokens)
        t = max(news)
        self.spec, self.elements, self.new_tokens = spec, elements, t
        dev = elements.device
        w, bt = spec.row_elems, spec.block_tokens
        lengths = [s.past + n for s, n in zip(slots, news)]
        for s, n in zip(slots, lengths):
            if len(s.offsets) * bt < n:
                raise ValueError(f"sequence needs {n} tokens of KV but holds {len(s.offsets)} blocks")
        self.batch = len(slots)
        self.total = max(lengths)
        self.past_len = self.total - t  # query row j sits at key column past_len + j for every sequence
        self.fresh = self.batch == 1 and slots[0].past == 0  # plain prefill: hand back the new K/V
        width = max(len(s.offsets) for s in slots)
        table = torch.tensor([s.offsets + [s.offsets[0]] * (width - len(s.offsets)) for s in slots],
                             dtype=torch.int64, device=dev)
        rows = torch.arange(self.batch, device=dev).unsqueeze(1)
        past = torch.tensor([s.past for s in slots], dtype=torch.int64, device=dev).unsqueeze(1)
        pad = torch.tensor([t - n for n in news], dtype=torch.int64, device=dev).unsqueeze(1)
        cols = torch.arange(t, device=dev)
        wpos = (past + cols - pad).clamp_min(0)  # [B, T] positions written (padding rows: dropped below)
        write = (table[rows, wpos // bt] + (wpos % bt) * w).reshape(-1)
        self._keep = None if min(news) == t else (cols >= pad).reshape(-1).nonzero().squeeze(1)
        self._write = write if self._keep is None else write[self._keep]
        lens = torch.tensor(lengths, dtype=torch.int64, device=dev).unsqueeze(1)
        rpos = (torch.arange(self.total, device=dev) - (self.total - lens)).clamp_min(0)  # left padding -> token 0
        self._read = (table[rows, rpos // bt] + (rpos % bt) * w).reshape(-1)
        self._cols = torch.arange(w, device=dev)
        n = elements.numel()
        self._rows = elements.as_strided((n - w + 1, w), (1, 1))  # row i = elements[i : i + w], read-only use

    def write_and_gather(self, layer: int, keys: torch.Tensor, values: torch.Tensor):
        """Store the new K/V rows of `layer` and return the layer's full (padded) K and V."""
        spec = self.spec
        b, h, t, d = keys.shape
        if (b, h, t, d) != (self.batch, spec.kv_heads, self.new_tokens, spec.head_dim):
            raise ValueError(f"layer {layer} produced K/V of shape {(b, h, t, d)}, the KV layout expects "
                             f"{(self.batch, spec.kv_heads, self.new_tokens, spec.head_dim)}")
        shift = layer * spec.layer_elems
        new = torch.stack((keys.transpose(1, 2), values.transpose(1, 2)), dim=2).to(spec.dtype)  # [B, T, 2, H, D]
        if self._keep is not None:
            new = new.reshape(b * t, -1).index_select(0, self._keep)
        idx = ((self._write + shift).unsqueeze(1) + self._cols).reshape(-1)
        self.elements.index_copy_(0, idx, new.reshape(-1))
        if self.fresh:
            return keys, values
        g = self._rows.index_select(0, self._read + shift).view(b, self.total, 2, h, d)
        return g[:, :, 0].transpose(1, 2).contiguous(), g[:, :, 1].transpose(1, 2).contiguous()

    def attention_mask(self, lengths: list[int]) -> torch.Tensor:
        """2D mask [B, total]: ones over each sequence's own (right-aligned) tokens."""
        dev = self.elements.device
        lens = torch.tensor(lengths, device=dev).unsqueeze(1)
        return (torch.arange(self.total, device=dev) >= self.total - lens).to(torch.int64)
