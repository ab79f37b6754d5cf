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


def _keys(rows: list[int], seqs: list[Sequence[int]], vocab: int) -> torch.Tensor:
    """Flat indices (row x vocab + token) into a [batch, vocab] tensor of every token of `seqs[i]` in `rows[i]`."""
    parts = [torch.as_tensor(s, dtype=torch.int64) + r * vocab for r, s in zip(rows, seqs) if len(s)]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)


def apply(logits: torch.Tensor, rows: list[int], params: Sequence[SamplingParams],
          histories: Sequence[History]) -> None:
    """Bias and penalize `rows` of float32 `logits` [batch, vocab] in place; `params[j]` and `histories[j]`
    belong to `rows[j]`. Sparse: the work is in the tokens a row has seen, not in its vocabulary (a dense
    [rows, vocab] pass costs milliseconds per step on a CPU)."""
    if not rows:
        return
    if not logits.is_contiguous():
        raise ValueError("penalties are applied to a contiguous logits tensor")
    dev, vocab = logits.device, logits.shape[-1]
    flat = logits.view(-1)

    def per_key(values: list[float], keys: torch.Tensor) -> torch.Tensor:  # each key's row's value
        by_row = torch.zeros(logits.shape[0], dtype=flat.dtype)
        by_row[rows] = torch.tensor(values, dtype=flat.dtype)
        return by_row.to(dev)[keys // vocab]

    biased = [j for j, p in enumerate(params) if p.logit_bias]
    if biased:
        keys = [rows[j] * vocab + t for j in biased for t in params[j].logit_bias]
        vals = [b for j in biased for b in params[j].logit_bias.values()]
        flat.index_add_(0, torch.tensor(keys, device=dev), torch.tensor(vals, dtype=flat.dtype, device=dev))
    rep = [j for j, p in enumerate(params) if p.repetition_penalty != 1.0]
    if rep:  # tokens of the prompt or the output: positive logits divided, negative multiplied
        at = [rows[j] for j in rep]
        seen = torch.unique(torch.cat([_keys(at, [histories[j][0] for j in rep], vocab),
                                       _keys(at, [histories[j][1] for j in rep], vocab)])).to(dev)
        factor = per_key([p.repetition_penalty for p in params], seen)
        vals = flat[seen]
        flat[seen] = torch.where(vals > 0, vals / factor, vals * factor)
    counted = [j for j, p in enumerate(params) if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0]
    if counted:  # output tokens: frequency x occurrences + presence, subtracted
        at = [rows[j] for j in counted]
        keys, counts = torch.unique(_keys(at, [histories[j][1] for j in counted], vocab), return_counts=True)
        keys, counts = keys.to(dev), counts.to(dev, flat.dtype)
        flat[keys] -= (per_key([p.frequency_penalty for p in params], keys) * counts
                       + per_key([p.presence_penalty for p in params], keys))


def min_p_filter(scaled: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) tokens whose probability is below `min_p` times the row's most likely token's, of
    temperature-scaled float32 logits [rows, vocab]; `min_p` [rows] (0 keeps every token)."""
    probs = torch.softmax(scaled, dim=-1)
    floor = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(-1)
    return scaled.masked_fill(probs < floor, float("-inf"))
