"""Runs a transformers causal LM over KV held in pool blocks: one forward per step, logits of sampled rows out.

The packed path (`attention.py`) runs every sequence of the step in one
forward with no padding. Models whose attention does not go through
transformers' attention interface run through `kv.PagedCache` instead: the
decodes padded together in one forward, each prompt chunk in its own.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from transformers import PreTrainedModel

from tangram.engine.attention import NAME, ChunkMeta, PackedStep, supports_packed, use_packed
from tangram.engine.batch import SeqWork, StepPlan
from tangram.engine.lora_update import Adapter, active, plan
from tangram.kv import KVAllocator, PagedCache, SeqSlot
from tangram.threads import on_team_cpus


def cache_argument(model: PreTrainedModel) -> str:
    """The forward keyword that takes a `Cache`: `cache` since transformers 5.x (where `past_key_values` is
    deprecated and warns on every call), `past_key_values` before."""
    params = inspect.signature(model.forward).parameters  # follows the deprecation wrapper to the real forward
    return "cache" if "cache" in params else "past_key_values"


def _adapter(item: SeqWork) -> Adapter | None:
    """The LoRA adapter a sequence's tokens run with (None: the base alone)."""
    return None if item.request is None else item.request.adapter


def by_adapter(work: list[SeqWork]) -> list[SeqWork]:
    """`work` ordered by LoRA adapter (in order of first appearance, the base's sequences last; stable), so
    that each adapter's tokens are one slice of the packed step; `work` itself when no sequence has one."""
    slots: dict[int, int] = {}
    for item in work:
        adapter = _adapter(item)
        if adapter is not None:
            slots.setdefault(id(adapter), len(slots))
    if not slots:
        return work
    return sorted(work, key=lambda item: slots.get(id(_adapter(item)), len(slots)))


class ModelRunner:
    """Forward passes of one model over its KV blocks; inputs on the model's device, [rows, vocab] logits back."""

    def __init__(self, model: PreTrainedModel, kv: KVAllocator, *, packed: bool | None = None) -> None:
        self.model, self.kv = model, kv
        self.device = kv.device()
        self.packed = supports_packed(model) if packed is None else packed
        if self.packed:
            use_packed(model)
        elif model.config._attn_implementation == NAME:  # a kept skeleton a packed runner used before
            model.set_attn_implementation("sdpa")
        self.cache_kwarg = cache_argument(model)
        spec = kv.spec
        w = spec.row_elems
        n = kv.elements.numel()
        self._rows = kv.elements.as_strided((n - w + 1, w), (1, 1))  # row i = elements[i : i + w], reads only
        le = spec.layer_elems
        self._blocks = kv.elements.as_strided((n - le + 1, le), (1, 1))  # one layer of the block at i, reads only
        self._cols = torch.arange(w, device=self.device)
        self.waits = None  # templates.WaitForWeights while a background load runs (execute-while-load)
        self.recorder = None  # templates.Recorder for the first forward, when no template exists yet
        self.on_recorded: Callable[[object, int], None] | None = None

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> torch.Tensor:
        """Run a step's tokens; logits [sum of `logit_rows`, vocab] in plan order: the last position of each
        sampled sequence, every position of one with `all_logits` (prompt logprobs)."""
        with on_team_cpus():  # a stepping thread's forward on its own CPU, its workers on the others (threads.py)
            logits = self._packed(plan.work) if self.packed else self._padded(plan.work)
        if self.waits is not None and self.waits.finished:
            self.waits.remove()  # between forwards, on the engine thread
            self.waits = None
        return logits

    def prefill(self, ids: list[int], blocks: list[int]) -> torch.Tensor:
        """Logits [1, vocab] after the whole sequence `ids`, its KV written to `blocks` (none cached before)."""
        return self.run(StepPlan([SeqWork(None, 0, list(ids), True, blocks)]))

    def _call(self, kwargs: dict, tokens: int) -> torch.Tensor:
        recorder, self.recorder = self.recorder, None
        if recorder is None:
            return self.model(**kwargs).logits
        with recorder:
            out = self.model(**kwargs).logits
        if self.on_recorded is not None:
            self.on_recorded(recorder, tokens)
        return out

    # ------------------------------------------------------------------ packed

    def _packed(self, work: list[SeqWork]) -> torch.Tensor:
        dev, spec = self.device, self.kv.spec
        bt = spec.block_tokens
        ids: list[int] = []
        positions: list[int] = []
        write: list[torch.Tensor] = []
        keep: list[int] = []
        chunks: list[ChunkMeta] = []
        decodes: list[SeqWork] = []
        decode_rows: list[int] = []
        spans = []  # (begin, end, adapter) of each sequence's tokens: the step's LoRA groups
        placed: dict[int, tuple[int, int]] = {}
        for item in by_adapter(work):  # each adapter's tokens one slice; logits still in plan order (keep)
            begin = len(ids)
            ids.extend(item.tokens)
            spans.append((begin, len(ids), _adapter(item)))
            placed[id(item)] = (begin, len(ids))
            positions.extend(range(item.start, item.end))
            write.append(self._row_offsets(item.blocks, item.start, item.end))
            if len(item.tokens) == 1 and item.start > 0:
                decodes.append(item)
                decode_rows.append(begin)
            else:
                read = None if item.start == 0 else self._row_offsets(item.blocks, 0, item.end)
                chunks.append(ChunkMeta(begin, len(ids), item.start, read))
        for item in work:
            begin, end = placed[id(item)]
            if item.all_logits:
                keep.extend(range(begin, end))
            elif item.sample:
                keep.append(end - 1)
        rows = torch.cat(write)
        step = PackedStep(
            elements=self.kv.elements, rows=self._rows, blocks=self._blocks, layer_elems=spec.layer_elems, kv_heads=spec.kv_heads,
            head_dim=spec.head_dim, write=(rows.unsqueeze(1) + self._cols).reshape(-1),
            decode_rows=None, decode_blocks=None, decode_bias=None, decode_lens=None, chunks=chunks,
            all_decode=not chunks)
        if decodes:
            step.decode_blocks, step.decode_bias, step.decode_lens = self._decode_tables(decodes, bt)
            if chunks:
                step.decode_rows = torch.tensor(decode_rows, dtype=torch.int64, device=dev)
        kwargs = {"input_ids": torch.tensor([ids], dtype=torch.int64, device=dev),
                  "position_ids": torch.tensor([positions], dtype=torch.int64, device=dev),
                  "use_cache": False, "logits_to_keep": torch.tensor(keep, dtype=torch.int64, device=dev),
                  "tangram_step": step}
        with active(plan(spans, dev)):
            return self._call(kwargs, len(ids))[0]

    def _row_offsets(self, blocks: list[int], start: int, stop: int) -> torch.Tensor:
        """Element offsets (layer 0) of the KV rows of positions [start, stop) of a sequence with `blocks`."""
        spec = self.kv.spec
        bt, w = spec.block_tokens, spec.row_elems
        if stop - start == 1:
            return torch.tensor([blocks[start // bt] + (start % bt) * w], dtype=torch.int64, device=self.device)
        table = torch.tensor(blocks[start // bt: (stop - 1) // bt + 1], dtype=torch.int64, device=self.device)
        pos = torch.arange(start, stop, device=self.device)
        return table[pos // bt - start // bt] + (pos % bt) * w

    def _decode_tables(self, decodes: list[SeqWork], bt: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Block offsets [B, blocks] of each decode's K/V (its new token included; short tables padded with a
        valid block), the bias [B, 1, 1, blocks x block_tokens] masking what is not its own, lengths [B]."""
        dev = self.device
        lens = [item.end for item in decodes]
        width = -(-max(lens) // bt)
        table = torch.tensor([d.blocks[:width] + [d.blocks[0]] * (width - len(d.blocks[:width])) for d in decodes],
                             dtype=torch.int64, device=dev)
        lengths = torch.tensor(lens, dtype=torch.int64, device=dev)
        pos = torch.arange(width * bt, device=dev)
        bias = torch.zeros(len(decodes), 1, 1, width * bt, dtype=torch.float32, device=dev)
        bias.masked_fill_((pos.unsqueeze(0) >= lengths.unsqueeze(1))[:, None, None, :], float("-inf"))
        return table, bias, lengths

    # ------------------------------------------------------------------ padded (models outside the interface)

    def _padded(self, work: list[SeqWork]) -> torch.Tensor:
        decodes = [x for x in work if len(x.tokens) == 1 and x.start > 0]
        groups = ([decodes] if decodes else []) + [[x] for x in work if not (len(x.tokens) == 1 and x.start > 0)]
        rows: dict[int, torch.Tensor] = {}
        for group in groups:
            every = len(group) == 1 and group[0].all_logits  # a prompt chunk runs alone
            width = max(len(x.tokens) for x in group)  # rows of [len(group), width] tokens, left-padded
            with active(plan([(i * width, (i + 1) * width, _adapter(x)) for i, x in enumerate(group)], self.device)):
                logits = self.forward_padded([x.tokens for x in group],
                                             [SeqSlot([self.kv.offset(b) for b in x.blocks], x.start)
                                              for x in group], every=every)
            for i, x in enumerate(group):
                rows[id(x)] = logits if every else logits[i:i + 1]
        sampled = [rows[id(x)] for x in work if x.logit_rows]
        return torch.cat(sampled) if sampled else torch.empty(0, device=self.device)

    @torch.inference_mode()
    def forward_padded(self, tokens: list[list[int]], slots: list[SeqSlot], every: bool = False) -> torch.Tensor:
        """Next-token logits [B, vocab] for sequences that each add `tokens[i]` (left-padded to the longest);
        `every`: one sequence's logits of each of its positions, [len(tokens[0]), vocab]."""
        news = [len(x) for x in tokens]
        t = max(news)
        cache = PagedCache(self.kv.spec, self.kv.elements, slots, news)
        lengths = [s.past + n for s, n in zip(slots, news)]
        ids = torch.tensor([[0] * (t - len(x)) + list(x) for x in tokens], dtype=torch.int64, device=self.device)
        past = torch.tensor([s.past for s in slots], dtype=torch.int64, device=self.device).unsqueeze(1)
        pad = torch.tensor([t - n for n in news], dtype=torch.int64, device=self.device).unsqueeze(1)
        positions = (past + torch.arange(t, device=self.device) - pad).clamp_min(0)
        kwargs = {"input_ids": ids, "attention_mask": cache.attention_mask(lengths), "position_ids": positions,
                  self.cache_kwarg: cache, "use_cache": True, "logits_to_keep": 0 if every else 1}
        out = self._call(kwargs, t)
        return out[0] if every else out[:, -1, :]
