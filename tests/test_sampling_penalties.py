"""Logit bias, repetition / frequency / presence penalties and min_p: exact against a per-row reference
computed from the logits with plain Python (vLLM's semantics), batched with rows that use none of them."""

from __future__ import annotations

import math

import pydantic
import pytest
import torch

from tangram.engine import penalties
from tangram.engine.sampling import SamplingParams, make_generator, sample

VOCAB = 12


def reference(row: list[float], p: SamplingParams, prompt: list[int], output: list[int]) -> list[float]:
    """vLLM's order: bias, repetition (prompt + output), frequency and presence (output)."""
    out = list(row)
    for tok, bias in p.logit_bias.items():
        out[tok] += bias
    seen = set(prompt) | set(output)
    for t in range(len(out)):
        if t in seen and p.repetition_penalty != 1.0:
            out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
        c = output.count(t)
        out[t] -= p.frequency_penalty * c + p.presence_penalty * (c > 0)
    return out


def logits_for(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


CASES = [
    SamplingParams(repetition_penalty=1.7),
    SamplingParams(repetition_penalty=0.6),
    SamplingParams(frequency_penalty=0.9),
    SamplingParams(presence_penalty=-1.5),
    SamplingParams(frequency_penalty=0.4, presence_penalty=1.1, repetition_penalty=1.3),
    SamplingParams(logit_bias={3: 7.5, 0: -100.0}),
    SamplingParams(logit_bias={5: 2.0}, frequency_penalty=2.0),
]
HISTORIES = [([1, 2, 2, 9], [4, 4, 4, 2]), ([0, 11], [3, 5, 5]), ([7], [])]


@pytest.mark.parametrize("p", CASES)
def test_processed_logits_equal_the_reference(p):
    logits = logits_for(len(HISTORIES))
    work = logits.clone()
    penalties.apply(work, [0, 1, 2], [p] * 3, HISTORIES)
    for i, (prompt, output) in enumerate(HISTORIES):
        want = reference(logits[i].tolist(), p, prompt, output)
        assert work[i].tolist() == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("p", CASES)
def test_greedy_rows_take_the_argmax_of_the_processed_logits(p):
    logits = logits_for(3, seed=4)
    plain = SamplingParams()
    params = [plain, p, plain]
    histories = [HISTORIES[0], HISTORIES[1], HISTORIES[2]]
    got = sample(logits, params, None, histories).tolist()
    want = reference(logits[1].tolist(), p, *HISTORIES[1])
    assert got[1] == max(range(VOCAB), key=lambda t: want[t])
    assert got[0] == int(logits[0].argmax()) and got[2] == int(logits[2].argmax())  # untouched neighbours


def test_penalties_change_the_choice():
    logits = torch.tensor([[5.0, 4.0, 0.0]])
    hist = [([0], [0, 0])]
    assert sample(logits, [SamplingParams()], None, hist).tolist() == [0]
    assert sample(logits, [SamplingParams(repetition_penalty=2.0)], None, hist).tolist() == [1]  # 5/2 < 4
    assert sample(logits, [SamplingParams(frequency_penalty=0.6)], None, hist).tolist() == [1]  # 5 - 1.2 < 4
    assert sample(logits, [SamplingParams(presence_penalty=1.5)], None, hist).tolist() == [1]
    assert sample(logits, [SamplingParams(logit_bias={2: 10.0})], None, hist).tolist() == [2]


def test_the_callers_logits_are_never_changed():
    logits = logits_for(2)
    before = logits.clone()
    sample(logits, [SamplingParams(repetition_penalty=3.0, logit_bias={1: 50.0}), SamplingParams()], None,
           HISTORIES[:2])
    assert torch.equal(logits, before)


def test_min_p_keeps_exactly_the_tokens_above_the_floor():
    probs = torch.tensor([0.5, 0.3, 0.12, 0.05, 0.03])
    scaled = probs.log().unsqueeze(0)
    kept = torch.isfinite(penalties.min_p_filter(scaled, torch.tensor([0.2]))).tolist()[0]
    assert kept == [p >= 0.2 * 0.5 for p in probs.tolist()] == [True, True, True, False, False]
    assert torch.isfinite(penalties.min_p_filter(scaled, torch.tensor([0.0]))).all()


def test_min_p_sampling_never_draws_below_the_floor():
    logits = torch.tensor([[2.0, 1.9, 0.0, -1.0, -3.0]])
    p = SamplingParams(temperature=1.0, min_p=0.5, seed=3)
    gen = make_generator(p, torch.device("cpu"))
    probs = torch.softmax(logits[0], -1)
    allowed = {t for t in range(5) if probs[t] >= 0.5 * probs.max()}
    seen = {int(sample(logits, [p], [gen], [([], [])])[0]) for _ in range(300)}
    assert seen == allowed == {0, 1}


def test_min_p_applies_after_temperature():
    logits = torch.tensor([[2.0, 0.0]])  # at temperature 1: p1/p0 = e^-2 = 0.135; at 4: e^-0.5 = 0.61
    cold = SamplingParams(temperature=1.0, min_p=0.3, seed=0)
    hot = SamplingParams(temperature=4.0, min_p=0.3, seed=0)
    g1, g2 = make_generator(cold, torch.device("cpu")), make_generator(hot, torch.device("cpu"))
    assert {int(sample(logits, [cold], [g1], [([], [])])[0]) for _ in range(200)} == {0}
    assert {int(sample(logits, [hot], [g2], [([], [])])[0]) for _ in range(200)} == {0, 1}
    assert math.exp(-0.5) > 0.3 > math.exp(-2)


def test_plain_rows_need_no_histories():
    logits = logits_for(2)
    assert sample(logits, [SamplingParams(), SamplingParams(temperature=0.5, seed=1)],
                  [None, make_generator(SamplingParams(temperature=0.5, seed=1), torch.device("cpu"))]).shape == (2,)


@pytest.mark.parametrize("bad", [
    {"presence_penalty": 2.5}, {"frequency_penalty": -3.0}, {"repetition_penalty": 0.0}, {"min_p": 1.5},
    {"logit_bias": {5: 101.0}}, {"logit_bias": {-1: 1.0}}, {"logprobs": 21}, {"n": 0}, {"max_tokens": 0},
])
def test_out_of_range_values_are_rejected(bad):
    with pytest.raises(pydantic.ValidationError) as ei:
        SamplingParams(**bad)
    assert next(iter(bad)) in str(ei.value)


def test_logit_bias_ids_are_checked_against_the_vocabulary():
    assert SamplingParams(logit_bias={5: 1.0}).vocab_errors(256) is None
    assert "logit_bias" in SamplingParams(logit_bias={5: 1.0, 300: 1.0}).vocab_errors(256)


def test_logprob_scoring_in_slices_equals_one_log_softmax(monkeypatch):
    from tangram.engine import logprobs

    logits = logits_for(7, seed=9).to(torch.bfloat16)
    targets, ks = [3, 1, 0, 11, 5, 5, 2], [0, 2, 5, 1, 0, 3, 12]
    whole = logprobs.score(logits, targets, ks)
    monkeypatch.setattr(logprobs, "SCORE_ROWS", 3)
    assert logprobs.score(logits, targets, ks) == whole
    lp = torch.log_softmax(logits.float(), -1)
    for i, (chosen, ids, vals) in enumerate(whole):
        assert chosen == lp[i, targets[i]].item()
        assert ids == lp[i].topk(ks[i]).indices.tolist() if ks[i] else ids == []
