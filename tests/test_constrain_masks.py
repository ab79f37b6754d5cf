"""The token-mask arithmetic of structured output against a plain reference (pure tensors, no model)."""

from __future__ import annotations

import pytest
import torch

from tangram.engine import constrain


class FixedMask:
    """A grammar state stand-in whose next mask is given."""

    def __init__(self, allowed: list[int], vocab: int) -> None:
        words = (vocab + 31) // 32
        bits = torch.zeros(words * 32, dtype=torch.bool)
        bits[allowed] = True
        self.mask = (bits.view(words, 32).int() << torch.arange(32, dtype=torch.int32)).sum(-1, dtype=torch.int32)
        self.mask = self.mask.view(1, words)  # the int32 bitmask llguidance writes (bit k of word w: token 32w+k)

    def next_mask(self) -> torch.Tensor:
        return self.mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_masks_leave_allowed_logits_and_block_the_rest_on_their_rows_only(dtype):
    vocab = 100  # not a multiple of 32: the last word's tail is no token
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, vocab, generator=g).to(dtype)
    before = logits.clone()
    allowed = {1: [0, 31, 32, 33, 63, 64, 99], 3: [7]}
    failed = constrain.apply_masks(list(allowed), [FixedMask(a, vocab) for a in allowed.values()], logits)
    assert failed == {}
    for row in (0, 2):
        assert torch.equal(logits[row], before[row])
    for row, ids in allowed.items():
        keep = torch.zeros(vocab, dtype=torch.bool)
        keep[ids] = True
        assert torch.equal(logits[row][keep], before[row][keep])
        assert torch.isneginf(logits[row][~keep]).all()
    assert logits[3].argmax().item() == 7
