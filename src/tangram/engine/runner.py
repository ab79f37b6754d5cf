"""Runs a transformers causal LM over KV held in pool blocks: prefill a batch of prompts, decode a batch."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from transformers import PreTrainedModel

from tangram.kv import KVAllocator, PagedCache, SeqSlot


def cache_argument(model: PreTrainedModel) -> str:
    """The forward keyword that takes a `Cache`: `cache` since transformers 5.x (where `past_key_values` is
    deprecated and warns on every call), `past_key_values` before."""
    params = inspect.signature(model.forward).parameters  # follows the deprecation wrapper to the real forward
    return "cache" if "cache" in params else "past_key_values"


class ModelRunner:
    """Forward passes of one model; inputs on the model's device, logits of the last position back."""

    def __init__(self, model: PreTrainedModel, kv: KVAllocator) -> None:
        self.model, self.kv = model, kv
        self.device = kv.device()
        self.cache_kwarg = cache_argument(model)
        self.waits = None  # templates.WaitForWeights while a background load runs (execute-while-load)
        self.recorder = None  # templates.Recorder for the first prefill, when no template exists yet
        self.on_recorded: Callable[[object, int], None] | None = None

    @torch.inference_mode()
    def forward(self, tokens: list[list[int]], slots: list[SeqSlot]) -> torch.Tensor:
        """Next-token logits [B, vocab] for sequences that each add `tokens[i]` (left-padded to the longest)."""
        news = [len(x) for x in tokens]
        t = max(news)
        cache = PagedCache(self.kv.spec, self.kv.elements, slots, news)
        lengths = [s.past + n for s, n in zip(slots, news)]
        ids = torch.tensor([[0] * (t - len(x)) + list(x) for x in tokens], dtype=torch.int64, device=self.device)
        past = torch.tensor([s.past for s in slots], dtype=torch.int64, device=self.device).unsqueeze(1)
        pad = torch.tensor([t - n for n in news], dtype=torch.int64, device=self.device).unsqueeze(1)
        positions = (past + torch.arange(t, device=self.device) - pad).clamp_min(0)
        kwargs = {"input_ids": ids, "attention_mask": cache.attention_mask(lengths), "position_ids": positions,
                  self.cache_kwarg: cache, "use_cache": True, "logits_to_keep": 1}
        recorder, self.recorder = self.recorder, None
        if recorder is not None:
            with recorder:
                out = self.model(**kwargs)
            if self.on_recorded is not None:
                self.on_recorded(recorder, t)
        else:
            out = self.model(**kwargs)
        if self.waits is not None and self.waits.finished:
            self.waits.remove()  # between forwards, on the engine thread
            self.waits = None
        return out.logits[:, -1, :]

    def prefill(self, ids: list[int], offsets: list[int]) -> torch.Tensor:
        """Logits [1, vocab] after the whole sequence `ids` (no KV cached yet)."""
        return self.forward([ids], [SeqSlot(offsets, 0)])

    def prefill_batch(self, ids: list[list[int]], offsets: list[list[int]]) -> torch.Tensor:
        """Logits [B, vocab] after each whole sequence (no KV cached yet), in one forward."""
        return self.forward(ids, [SeqSlot(o, 0) for o in offsets])

    def decode(self, last: list[int], slots: list[SeqSlot]) -> torch.Tensor:
        """Logits [B, vocab] after one new token per sequence."""
        return self.forward([[t] for t in last], slots)
