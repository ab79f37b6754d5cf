"""Batched sampling: greedy, temperature, top-k, top-p, seeds, parameter validation."""

from __future__ import annotations

import pydantic
import pytest
import torch

from tangram.engine.sampling import SamplingParams, filter_logits, make_generator, sample


def test_greedy_is_argmax_per_row():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 1.0, 0.0]])
    assert sample(logits, [SamplingParams(), SamplingParams()]).tolist() == [1, 0]


def test_mixed_batch_keeps_greedy_rows_greedy():
    logits = torch.tensor([[0.0, 0.0, 9.0], [0.0, 1.0, 0.0]])
    p = [SamplingParams(), SamplingParams(temperature=1.0, top_k=1)]
    assert sample(logits, p).tolist() == [2, 1]  # top_k=1 leaves one token to sample


def test_top_k_restricts_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(1, 1)
    p = SamplingParams(temperature=5.0, top_k=2, seed=0)
    gen = make_generator(p, torch.device("cpu"))
    seen = {int(sample(logits, [p], [gen])[0]) for _ in range(300)}
    assert seen == {0, 1}


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = filter_logits(probs.log(), torch.tensor([0]), torch.tensor([0.7]))
    assert torch.isfinite(out).tolist() == [[True, True, False, False]]  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    out = filter_logits(probs.log(), torch.tensor([0]), torch.tensor([0.01]))
    assert torch.isfinite(out).tolist() == [[True, False, False, False]]  # the top token always stays


def test_filter_keeps_original_token_positions():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0]])
    out = filter_logits(logits, torch.tensor([2]), torch.tensor([1.0]))
    assert torch.isfinite(out).tolist() == [[False, True, False, True]]
    assert out[0, 1] == 5.0 and out[0, 3] == 4.0


def test_seed_makes_sampling_reproducible():
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(0))
    p = SamplingParams(temperature=1.0, seed=123)
    a = [int(sample(logits, [p], [make_generator(p, torch.device("cpu"))])[0]) for _ in range(3)]
    gen = make_generator(p, torch.device("cpu"))
    b = [int(sample(logits, [p], [gen])[0]) for _ in range(20)]
    assert len(set(a)) == 1  # fresh generator, same seed: same token
    assert len(set(b)) > 1  # one generator advancing: different draws


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": -0.1},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"max_tokens": 0},
        {"seed": -3},
        {"stop": [""]},
        {"stop_token_ids": [-1]},
        {"unknown_field": 1},
    ],
)
def test_invalid_parameters_are_rejected_clearly(bad):
    with pytest.raises(pydantic.ValidationError) as ei:
        SamplingParams(**bad)
    field = next(iter(bad))
    assert field in str(ei.value)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="do not match"):
        sample(torch.zeros(2, 5), [SamplingParams()])


# --------------------------------------------------------------------------- the batched exponential-race draw


def seeded_tokens(logits_row, params, steps, others):
    """Tokens of the seeded row over `steps` draws, batched with `others` [(logits, params, generator)]."""
    gen = make_generator(params, torch.device("cpu"))
    out = []
    for _ in range(steps):
        rows = [(logits_row, params, gen), *others]
        shift = len(out) % len(rows)
        perm = [*range(shift, len(rows)), *range(shift)]  # the seeded row moves around the batch
        batch = [rows[i] for i in perm]
        picked = sample(torch.stack([r[0] for r in batch]), [r[1] for r in batch], [r[2] for r in batch])
        out.append(int(picked[perm.index(0)]))
    return out


def test_a_seed_reproduces_its_tokens_alone_and_in_any_batch():
    g = torch.Generator().manual_seed(0)
    row = torch.randn(500, generator=g)
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=42)
    alone = seeded_tokens(row, p, 12, [])
    assert len(set(alone)) > 3  # really sampled
    other_seed = SamplingParams(temperature=0.8, seed=7)
    for others in (
        [(torch.randn(500, generator=g), SamplingParams(), None)],
        [(torch.randn(500, generator=g), SamplingParams(temperature=1.3), None)],
        [(torch.randn(500, generator=g), SamplingParams(temperature=1.0, top_k=5), None),
         (torch.randn(500, generator=g), other_seed, make_generator(other_seed, torch.device("cpu"))),
         (torch.randn(500, generator=g), SamplingParams(), None)],
    ):
        assert seeded_tokens(row, p, 12, others) == alone


def test_the_sampled_distribution_is_softmax_over_temperature():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    temperature, n = 0.7, 20_000
    want = torch.softmax(logits / temperature, dim=-1)
    for seeded in (False, True):
        params = [SamplingParams(temperature=temperature, seed=5 if seeded else None)] * n
        gens = [make_generator(params[0], torch.device("cpu"))] * n if seeded else None
        with torch.random.fork_rng():
            torch.manual_seed(1234)
            picked = sample(logits.expand(n, -1).contiguous(), params, gens)
        freq = torch.bincount(picked, minlength=len(logits)).double() / n
        stderr = (want.double() * (1 - want.double()) / n).sqrt()
        assert torch.all((freq - want).abs() <= 5 * stderr + 1e-4), (seeded, freq, want)


def test_top_k_and_top_p_masks_are_honoured_in_a_mixed_batch():
    logits = torch.tensor([3.0, 2.5, 2.0, 1.0, 0.5, 0.0, -0.5, -1.0])
    n = 3000
    params = ([SamplingParams(temperature=2.0, top_k=3)] * n + [SamplingParams(temperature=2.0, top_p=0.6)] * n
              + [SamplingParams(temperature=2.0)] * n + [SamplingParams()] * n)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        picked = sample(logits.expand(len(params), -1).contiguous(), params)
    top_k, top_p, free, greedy = picked.split(n)
    probs = torch.softmax(logits / 2.0, dim=-1)
    nucleus = int((torch.cumsum(probs, 0) - probs < 0.6).sum())  # tokens ranked above the 0.6 mass, plus one
    assert set(top_k.tolist()) == {0, 1, 2}
    assert set(top_p.tolist()) == set(range(nucleus)) and nucleus < len(logits)
    assert set(free.tolist()) == set(range(len(logits)))  # the unfiltered rows are not cut by their neighbours
    assert set(greedy.tolist()) == {0}


def test_temperature_zero_rows_are_argmax_beside_sampled_rows():
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(), SamplingParams(temperature=1.0, seed=1), SamplingParams(seed=9),
              SamplingParams(temperature=5.0), SamplingParams(), SamplingParams(temperature=0.5, top_k=2)]
    gens = [make_generator(p, torch.device("cpu")) for p in params]
    out = sample(logits, params, gens)
    argmax = logits.argmax(dim=-1)
    assert [int(out[i]) for i in (0, 2, 4)] == [int(argmax[i]) for i in (0, 2, 4)]


def test_rows_without_top_k_or_top_p_skip_the_sort(monkeypatch):
    import tangram.engine.sampling as sampling

    def no_sort(*args, **kwargs):
        raise AssertionError("filter_logits called without top-k/top-p")

    monkeypatch.setattr(sampling, "filter_logits", no_sort)
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    out = sample(logits, [SamplingParams(temperature=1.0), SamplingParams(), SamplingParams(temperature=0.3, seed=2)],
                 [None, None, torch.Generator().manual_seed(2)])
    assert out.shape == (3,) and int(out[1]) == int(logits[1].argmax())
    with pytest.raises(AssertionError, match="without top-k"):
        sample(logits[:1], [SamplingParams(temperature=1.0, top_k=3)])
