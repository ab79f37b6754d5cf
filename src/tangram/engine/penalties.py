"""Logit processing with vLLM's semantics, batched over the rows that ask for it: logit bias, then the
repetition penalty (over prompt and output tokens), then frequency and presence penalties (over output
tokens); `min_p` after temperature. Rows that use none of these cost nothing: callers pass only the rows
that do (`processed(params)`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # sampling.py imports this module
    from tangram.engine.sampling import SamplingParams

History = tuple[Sequence[int], Sequence[int]]  # (prompt ids, output ids) of one row


def penalized(p: SamplingParams) -> bool:
    """Whether a request's rows need the repetition / frequency / presence penalties."""
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def processed(p: SamplingParams) -> bool:
    """Whether a request's logits are changed before sampling (bias or penalties): greedy rows included."""
    return bool(p.logit_bias) or penalized(p)


def _counts(seqs: list[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """Occurrences [len(seqs), vocab] (float32) of each token id in each sequence."""
    width = max((len(s) for s in seqs), default=0)
    counts = torch.zeros(len(seqs), vocab + 1, dtype=torch.float32, device=device)
    if width == 0:
        return counts[:, :vocab]
    ids = torch.full((len(seqs), width), vocab, dtype=torch.int64)  # padding counts into the extra column
    for i, s in enumerate(seqs):
        if s:
            ids[i, :len(s)] = torch.as_tensor(s, dtype=torch.int64)
    ids = ids.to(device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    return counts[:, :vocab]


def apply(logits: torch.Tensor, rows: list[int], params: Sequence[SamplingParams],
          histories: Sequence[History]) -> None:
    """Bias and penalize `rows` of float32 `logits` [batch, vocab] in place; `params[j]` and `histories[j]`
    belong to `rows[j]`."""
    if not rows:
        return
    dev, vocab = logits.device, logits.shape[-1]
    idx = torch.tensor(rows, dtype=torch.int64, device=dev)
    sub = logits.index_select(0, idx)
    biased = [j for j, p in enumerate(params) if p.logit_bias]
    if biased:
        r = [j for j in biased for _ in params[j].logit_bias]
        c = [t for j in biased for t in params[j].logit_bias]
        v = [b for j in biased for b in params[j].logit_bias.values()]
        sub.index_put_((torch.tensor(r, device=dev), torch.tensor(c, device=dev)),
                       torch.tensor(v, dtype=sub.dtype, device=dev), accumulate=True)
    pen = [j for j, p in enumerate(params) if penalized(p)]
    if pen:
        part = sub[pen]
        out_counts = _counts([histories[j][1] for j in pen], vocab, dev)
        rep = torch.tensor([params[j].repetition_penalty for j in pen], device=dev).unsqueeze(1)
        if bool((rep != 1.0).any()):
            seen = (_counts([histories[j][0] for j in pen], vocab, dev) > 0) | (out_counts > 0)
            scaled = torch.where(part > 0, part / rep, part * rep)
            part = torch.where(seen, scaled, part)
        freq = torch.tensor([params[j].frequency_penalty for j in pen], device=dev).unsqueeze(1)
        pres = torch.tensor([params[j].presence_penalty for j in pen], device=dev).unsqueeze(1)
        part = part - freq * out_counts - pres * (out_counts > 0).float()
        sub[pen] = part
    logits.index_copy_(0, idx, sub)


def min_p_filter(scaled: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) tokens whose probability is below `min_p` times the row's most likely token's, of
    temperature-scaled float32 logits [rows, vocab]; `min_p` [rows] (0 keeps every token)."""
    probs = torch.softmax(scaled, dim=-1)
    floor = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(-1)
    return scaled.masked_fill(probs < floor, float("-inf"))
