"""Greedy output checks against transformers that allow for a near-tie in 16-bit dtypes."""

from __future__ import annotations

import torch


def assert_greedy_within_ties(model, prompt: list[int], got: list[int], ref: list[int]) -> int:
    """`got` equals transformers' greedy `ref` up to the first step where they differ, and there `ref`'s top two
    logits were a near-tie at bf16 resolution (2 ulps: a summation order, e.g. of a padded batch, decides it).

    Returns how many tokens agree (all of `got` when it is a prefix of `ref`).
    """
    n = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
    if n < min(len(got), len(ref)):
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + ref[:n]])).logits[0, -1].float()
        ulp = 2.0 ** (torch.floor(torch.log2(logits.abs().max())).item() - 7)
        gap = (logits[ref[n]] - logits[got[n]]).item()
        assert gap <= 2 * ulp, f"step {n}: token {got[n]} is {gap:.4f} below {ref[n]}, no near-tie ({ulp} ulp)"
    return n
