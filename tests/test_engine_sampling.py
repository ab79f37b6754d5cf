"""Penalties, logit bias, logprobs, prompt logprobs and n > 1 through the engine, against references computed
directly from the tiny model's own logits (transformers' forward over the whole sequence)."""

from __future__ import annotations

import pytest
import torch

from conftest import engine_checkpoint, engine_model, reference_greedy
from tangram.engine import EngineConfig, Instance, OutputQueue, SamplingParams
from tangram.engine.runner import ModelRunner
from tangram.pool import DevicePool
from test_sampling_penalties import reference

PROMPT = [5, 17, 33, 9, 60, 7, 101]  # 7 tokens: the last of its 4-token blocks is partly filled
PROMPT8 = [5, 17, 33, 9, 60, 7, 101, 44]  # 8: no partly filled block


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    model = engine_model("llama")
    return model, engine_checkpoint(model, tmp_path_factory.mktemp("llama"))


def start(ckpt, **cfg) -> Instance:
    return Instance(ckpt, DevicePool(64 << 20), EngineConfig(block_tokens=4, **cfg))


def raw_logits(model, ids: list[int]) -> torch.Tensor:
    """The model's float32 next-token logits after each position of `ids` [len(ids), vocab]."""
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()


def reference_processed_greedy(model, prompt: list[int], p: SamplingParams, n: int) -> list[int]:
    """Greedy tokens with the bias and penalties applied to the model's logits by the plain-Python reference."""
    out: list[int] = []
    for _ in range(n):
        row = reference(raw_logits(model, prompt + out)[-1].tolist(), p, prompt, out)
        out.append(max(range(len(row)), key=lambda t: row[t]))
    return out


def run(inst, prompts, params) -> list[list]:
    """Every output of each request, in order."""
    sinks = [OutputQueue() for _ in prompts]
    for prompt, p, sink in zip(prompts, params, sinks):
        inst.engine.add_request(prompt, p, sink=sink)
    inst.engine.run_until_idle()
    return [list(s.q.queue) for s in sinks]


def test_penalties_and_bias_match_the_reference_beside_a_plain_request(llama):
    model, ckpt = llama
    base = dict(max_tokens=12, ignore_eos=True)
    params = [SamplingParams(**base), SamplingParams(repetition_penalty=1.8, **base),
              SamplingParams(frequency_penalty=1.5, presence_penalty=0.5, **base),
              SamplingParams(logit_bias={203: -100.0, 111: 2.5}, **base)]
    plain = reference_greedy(model, PROMPT, 12)
    refs = [plain] + [reference_processed_greedy(model, PROMPT, p, 12) for p in params[1:]]
    assert all(r != plain for r in refs[1:]), "a penalty that changes nothing proves nothing"
    with start(ckpt, max_step_tokens=6) as inst:
        outs = run(inst, [PROMPT] * 4, params)
        assert [o[-1].output_ids for o in outs] == refs
        assert inst.kv.in_use == 0


def test_logit_bias_outside_the_vocabulary_is_a_request_error(llama):
    from tangram.engine import RequestError

    with start(llama[1]) as inst, pytest.raises(RequestError, match="logit_bias: token id 256"):
        inst.engine.add_request(PROMPT, SamplingParams(logit_bias={256: 1.0}))


@pytest.mark.parametrize("path", ["packed", "padded"])
def test_logprobs_are_the_raw_model_distribution(llama, path):
    model, ckpt = llama
    params = [SamplingParams(max_tokens=6, ignore_eos=True, logprobs=3),
              SamplingParams(max_tokens=6, ignore_eos=True, logprobs=0, temperature=0.8, seed=4,
                             repetition_penalty=1.5),
              SamplingParams(max_tokens=6, ignore_eos=True)]
    with start(ckpt) as inst:
        if path == "padded":
            inst.engine.runner = ModelRunner(inst.model, inst.kv, packed=False)
        outs = run(inst, [PROMPT, PROMPT8, [40, 41]], params)
    for prompt, p, seq in zip([PROMPT, PROMPT8], params, outs):
        ids = seq[-1].output_ids
        entries = [e for o in seq for e in (o.logprobs or [])]
        assert [e.token_id for e in entries] == ids  # one entry per token, streamed with its token
        lp = torch.log_softmax(raw_logits(model, prompt + ids), -1)[len(prompt) - 1:-1]  # before sampling
        for j, e in enumerate(entries):
            assert e.logprob == pytest.approx(lp[j, ids[j]].item(), abs=1e-4)
            assert e.token == {0: "<unk>", 1: "<s>", 2: "</s>"}.get(ids[j], f"w{ids[j]}")  # special ones kept
            top = lp[j].topk(p.logprobs)
            assert [c.token_id for c in e.top] == top.indices.tolist()
            assert [c.logprob for c in e.top] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert all(o.logprobs is None for o in outs[2])  # not asked: none computed


@pytest.mark.parametrize("path", ["packed", "padded"])
@pytest.mark.parametrize("max_tokens", [0, 3])
def test_prompt_logprobs_under_chunked_prefill(llama, path, max_tokens):
    model, ckpt = llama
    prompt = [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26]
    with start(ckpt, max_step_tokens=5) as inst:
        if path == "padded":
            inst.engine.runner = ModelRunner(inst.model, inst.kv, packed=False)
        p = SamplingParams(max_tokens=max_tokens, ignore_eos=True, prompt_logprobs=2)
        beside = SamplingParams(max_tokens=4, ignore_eos=True)
        outs = run(inst, [prompt, PROMPT], [p, beside])
        assert inst.kv.in_use == 0
    seq = outs[0]
    got = seq[0].prompt_logprobs
    assert all(o.prompt_logprobs is None for o in seq[1:])  # sent once
    assert (got[0].token_id, got[0].token, got[0].logprob, got[0].top) == (prompt[0], "w8", None, [])
    assert len(got) == len(prompt)
    lp = torch.log_softmax(raw_logits(model, prompt), -1)
    for j in range(1, len(prompt)):
        assert got[j].token_id == prompt[j]
        assert got[j].logprob == pytest.approx(lp[j - 1, prompt[j]].item(), abs=1e-4)
        assert [c.token_id for c in got[j].top] == lp[j - 1].topk(2).indices.tolist()
    assert seq[-1].output_ids == (reference_greedy(model, prompt, max_tokens) if max_tokens else [])
    assert seq[-1].finish_reason == "length" and seq[-1].completion_tokens == max_tokens
    assert outs[1][-1].output_ids == reference_greedy(model, PROMPT, 4)


def counted_tokens(inst) -> list[int]:
    """Wraps the runner: records how many tokens each forward runs."""
    seen: list[int] = []
    real = inst.engine.runner.run

    def run(plan):
        seen.append(plan.num_tokens)
        return real(plan)

    inst.engine.runner.run = run
    return seen


@pytest.mark.parametrize("prompt", [PROMPT, PROMPT8])
def test_n_greedy_sequences_prefill_once_and_share_the_prompt(llama, prompt):
    model, ckpt = llama
    with start(ckpt) as inst:
        tokens = counted_tokens(inst)
        sink = OutputQueue()
        inst.engine.add_request(prompt, SamplingParams(n=3, max_tokens=6, ignore_eos=True), sink=sink)
        inst.engine.step()  # the prompt, and each sequence's first token
        shared = -(-len(prompt) // 4) + 2 * (len(prompt) % 4 > 0)  # prompt blocks, and two copies of a part one
        assert inst.kv.in_use == shared
        inst.engine.run_until_idle()
        outs = list(sink.q.queue)
        assert inst.kv.in_use == 0
    assert tokens[0] == len(prompt) and sum(tokens) == len(prompt) + 3 * 5  # one prefill, then decodes
    ref = reference_greedy(model, prompt, 6)
    finals = [o for o in outs if o.finish_reason]
    assert sorted(o.index for o in finals) == [0, 1, 2] and all(o.output_ids == ref for o in finals)
    assert [o.finished for o in outs].count(True) == 1 and outs[-1].finished
    assert outs[-1].completion_tokens == 18
    for i in range(3):
        assert [t for o in outs if o.index == i for t in o.token_ids] == ref


def test_n_seeded_sequences_equal_separate_requests_with_successive_seeds(llama):
    _, ckpt = llama
    base = dict(max_tokens=8, ignore_eos=True, temperature=1.0)
    with start(ckpt) as inst:
        together = run(inst, [PROMPT], [SamplingParams(n=3, seed=11, **base)])[0]
        alone = [run(inst, [PROMPT], [SamplingParams(seed=11 + i, **base)])[0][-1].output_ids for i in range(3)]
    by_index = [[t for o in together if o.index == i for t in o.token_ids] for i in range(3)]
    assert by_index == alone and len({tuple(a) for a in alone}) > 1


def test_aborting_an_n_request_ends_every_sequence_and_frees_all_blocks(llama):
    _, ckpt = llama
    with start(ckpt) as inst:
        sink = OutputQueue()
        req = inst.engine.add_request(PROMPT, SamplingParams(n=4, max_tokens=30, ignore_eos=True), sink=sink)
        for _ in range(3):
            inst.engine.step()
        inst.engine.abort(req.id)
        inst.engine.run_until_idle()
        outs = list(sink.q.queue)
        assert inst.kv.in_use == 0 and not inst.engine.has_work()
    assert sorted(o.index for o in outs if o.finish_reason == "abort") == [0, 1, 2, 3]
    assert outs[-1].finished and [o.finished for o in outs].count(True) == 1


def test_an_n_request_aborted_before_its_prompt_ran_ends_every_sequence(llama):
    _, ckpt = llama
    with start(ckpt) as inst:
        sink = OutputQueue()
        req = inst.engine.add_request(PROMPT, SamplingParams(n=3, max_tokens=4), sink=sink)
        inst.engine.abort(req.id)
        inst.engine.run_until_idle()
        outs = list(sink.q.queue)
        assert inst.kv.in_use == 0
    assert sorted(o.index for o in outs) == [0, 1, 2] and outs[-1].finished


def test_n_sequences_complete_when_the_pool_cannot_hold_them_all(llama):
    """Four sequences of 13 tokens in 4 blocks of 4: the last fork finds no block for its copy (it recomputes
    the prompt once admitted) and growth preempts; every sequence still ends with the greedy tokens."""
    model, ckpt = llama
    with start(ckpt) as probe:
        block, weights = probe.kv.block_size, probe.pool.snapshot()["totals"]["active"]
    with Instance(ckpt, DevicePool(weights + 4 * block), EngineConfig(block_tokens=4)) as inst:
        sink = OutputQueue()
        inst.engine.add_request(PROMPT, SamplingParams(n=4, max_tokens=6, ignore_eos=True), sink=sink)
        inst.engine.run_until_idle()
        outs = list(sink.q.queue)
        assert inst.kv.in_use == 0 and inst.engine.scheduler.blocks.holders == {}
        assert inst.engine.totals.preemptions > 0 and inst.engine.totals.kv_waits > 0
    ref = reference_greedy(model, PROMPT, 6)
    finals = sorted((o for o in outs if o.finish_reason), key=lambda o: o.index)
    assert [o.index for o in finals] == [0, 1, 2, 3] and all(o.output_ids == ref for o in finals)


def test_n_with_prompt_logprobs_scores_the_prompt_once(llama):
    model, ckpt = llama
    with start(ckpt) as inst:
        tokens = counted_tokens(inst)
        outs = run(inst, [PROMPT], [SamplingParams(n=2, max_tokens=3, ignore_eos=True, prompt_logprobs=1,
                                                   logprobs=1)])[0]
    assert tokens[0] == len(PROMPT) and sum(tokens) == len(PROMPT) + 2 * 2
    scored = [o for o in outs if o.prompt_logprobs is not None]
    assert len(scored) == 1 and scored[0].index == 0 and len(scored[0].prompt_logprobs) == len(PROMPT)
    assert scored[0].prompt_text == "w5 w17 w33 w9 w60 w7 w101"
    for i in range(2):
        assert len([e for o in outs if o.index == i for e in o.logprobs]) == 3


def test_outputs_with_logprobs_cross_a_process_boundary(llama):
    """Cluster mode ships each RequestOutput to the head as a Ray object (pickled)."""
    import pickle

    with start(llama[1]) as inst:
        seq = run(inst, [PROMPT], [SamplingParams(max_tokens=2, logprobs=2, prompt_logprobs=1, n=2)])[0]
    for out in seq:
        again = pickle.loads(pickle.dumps(out))
        assert (again.logprobs, again.prompt_logprobs, again.index) == (out.logprobs, out.prompt_logprobs, out.index)


def test_requests_using_none_of_the_features_touch_none_of_their_code(llama, monkeypatch):
    from tangram.engine import logprobs as logprobs_module
    from tangram.engine import penalties

    def boom(*args, **kwargs):
        raise AssertionError("a plain step ran feature code")

    for module, name in [(penalties, "apply"), (penalties, "min_p_filter"), (logprobs_module, "score")]:
        monkeypatch.setattr(module, name, boom)
    model, ckpt = llama
    with start(ckpt, max_step_tokens=5) as inst:
        real = inst.engine.runner.run
        shapes: list[tuple[int, int]] = []

        def one_row_each(plan):  # the runner keeps only the sampled rows' logits, as before
            out = real(plan)
            shapes.append((out.shape[0], len(plan.sampled)))
            return out

        inst.engine.runner.run = one_row_each
        outs = run(inst, [PROMPT, PROMPT8], [SamplingParams(max_tokens=5, ignore_eos=True),
                                            SamplingParams(max_tokens=5, ignore_eos=True, temperature=0.7, seed=2,
                                                           top_p=0.9)])
    assert outs[0][-1].output_ids == reference_greedy(model, PROMPT, 5)
    assert all(o.logprobs is None and o.prompt_logprobs is None for seq in outs for o in seq)
    assert shapes and all(got == want for got, want in shapes)
