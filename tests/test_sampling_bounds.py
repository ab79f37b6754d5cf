"""The engine's sampling contract is bounded: every value SamplingParams accepts samples without overflow."""

from __future__ import annotations

import pydantic
import pytest
import torch

from tangram.engine.sampling import SEED_LIMIT, TOKEN_ID_LIMIT, TOP_K_LIMIT, SamplingParams, filter_logits, \
    make_generator, sample


@pytest.mark.parametrize("bad", [
    {"top_k": TOP_K_LIMIT + 1},
    {"top_k": 2**63},  # the request that wedged a deployment: torch cannot hold it in an int64 tensor
    {"seed": SEED_LIMIT},
    {"seed": 2**70},
    {"stop_token_ids": [TOKEN_ID_LIMIT]},
    {"stop_token_ids": [2**64]},
    {"max_tokens": 10**7},
])
def test_out_of_range_values_are_rejected(bad):
    with pytest.raises(pydantic.ValidationError) as ei:
        SamplingParams(**bad)
    assert next(iter(bad)) in str(ei.value)


def test_the_largest_accepted_values_sample():
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=1.0, top_k=TOP_K_LIMIT, seed=SEED_LIMIT - 1),
              SamplingParams(temperature=0.7, top_k=3, seed=0, stop_token_ids=[TOKEN_ID_LIMIT - 1])]
    gens = [make_generator(p, torch.device("cpu")) for p in params]
    out = sample(logits, params, gens)
    assert out.shape == (2,) and all(0 <= t < 50 for t in out.tolist())


def test_a_top_k_beyond_the_vocabulary_keeps_every_token():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0]])
    out = filter_logits(logits, torch.tensor([TOP_K_LIMIT]), torch.tensor([1.0]))
    assert torch.equal(out, logits)
