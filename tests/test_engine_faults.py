"""A failing engine step fails exactly its requests (error output, KV freed) and the engine serves the rest.

Regression of issue 14, critical defect 1: a request whose sampling raised
(`top_k` = 2**63) left its batch running, so the engine loop retried the same
step forever and every later request to the instance timed out with its KV held.
"""

from __future__ import annotations

import threading
import time

import pytest

from conftest import engine_checkpoint, engine_model, reference_greedy
from tangram.engine import EngineConfig, Instance, OutputQueue, SamplingParams
from tangram.engine import sampling as sampling_module
from tangram.engine.loop import EngineLoop
from tangram.pool import DevicePool

PROMPTS = [[5, 17, 33, 9], [40, 41, 42], [3, 200, 150]]
GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    model = engine_model("llama")
    return model, engine_checkpoint(model, tmp_path_factory.mktemp("llama"))


def start(ckpt) -> Instance:
    return Instance(ckpt, DevicePool(64 << 20), EngineConfig(block_tokens=4))


def final(sink: OutputQueue, timeout: float = 30.0):
    out = sink.get(timeout=timeout)
    while not out.finished:
        out = sink.get(timeout=timeout)
    return out


def submit(inst, prompt, params=GREEDY):
    sink = OutputQueue()
    return inst.engine.add_request(prompt, params, sink=sink), sink


def assert_kv_free(inst) -> None:
    assert inst.kv.in_use == 0 and inst.pool.snapshot()["kv_bytes"] == 0


def test_a_request_whose_sampling_raises_fails_alone_and_the_rest_of_its_batch_completes(llama):
    model, ckpt = llama
    # the parameters of the defect; model_construct skips validation, as a bound the API forgot to check would
    bad = SamplingParams.model_construct(**{**GREEDY.model_dump(), "temperature": 1.0, "top_k": 2**63})
    with start(ckpt) as inst:
        (_, a), (_, b), (_, c) = submit(inst, PROMPTS[0]), submit(inst, PROMPTS[1], bad), submit(inst, PROMPTS[2])
        inst.engine.run_until_idle()  # one prefill batch of the three, then decode steps
        outs = [final(s) for s in (a, b, c)]
        assert outs[1].finish_reason == "error" and "sampling failed" in outs[1].error
        assert outs[1].completion_tokens == 0
        for i in (0, 2):
            assert outs[i].finish_reason == "length" and outs[i].error is None
            assert outs[i].output_ids == reference_greedy(model, PROMPTS[i], GREEDY.max_tokens)
        assert_kv_free(inst)
        later = inst.engine.generate([PROMPTS[1]], GREEDY)[0]
        assert later.output_ids == reference_greedy(model, PROMPTS[1], GREEDY.max_tokens)
        assert_kv_free(inst)


def test_a_sampler_that_raises_mid_decode_for_one_request_fails_it_alone(llama, monkeypatch):
    model, ckpt = llama
    real, steps = sampling_module.sample, {"n": 0}
    poisoned = SamplingParams(max_tokens=6, ignore_eos=True, temperature=1.0, seed=4242)

    def sample(logits, params, generators=None, histories=None):  # the public seam the engine samples through
        steps["n"] += 1
        if steps["n"] > 2 and poisoned in params:  # after the prefill and one decode step
            raise RuntimeError("sampler exploded")
        return real(logits, params, generators, histories)

    monkeypatch.setattr(sampling_module, "sample", sample)
    with start(ckpt) as inst:
        (_, a), (_, b) = submit(inst, PROMPTS[0]), submit(inst, PROMPTS[1], poisoned)
        inst.engine.run_until_idle()
        bad, good = final(b), final(a)
        assert bad.finish_reason == "error" and "sampler exploded" in bad.error
        assert bad.completion_tokens == 2  # what it had before the failing step
        assert good.finish_reason == "length"
        assert good.output_ids == reference_greedy(model, PROMPTS[0], GREEDY.max_tokens)
        assert_kv_free(inst)
        later = inst.engine.generate([PROMPTS[2]], GREEDY)[0]
        assert later.output_ids == reference_greedy(model, PROMPTS[2], GREEDY.max_tokens)
        assert_kv_free(inst)


def test_a_detokenizer_failure_fails_only_its_request(llama):
    model, ckpt = llama
    with start(ckpt) as inst:
        req, bad = submit(inst, PROMPTS[0])
        _, good = submit(inst, PROMPTS[1])

        def push(ids):
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

        req.text.push = push  # this request's text stream breaks on its first token
        inst.engine.run_until_idle()
        out = final(bad)
        assert out.finish_reason == "error" and "postprocess failed" in out.error
        assert final(good).output_ids == reference_greedy(model, PROMPTS[1], GREEDY.max_tokens)
        assert_kv_free(inst)


def test_a_failure_while_growing_kv_fails_the_decode_batch_and_frees_its_blocks(llama, monkeypatch):
    model, ckpt = llama
    with start(ckpt) as inst:
        sinks = [submit(inst, p)[1] for p in PROMPTS[:2]]  # 4 and 3 tokens: both need a new block soon
        real = inst.kv.allocate
        state = {"armed": False}

        def allocate(n):
            if state["armed"]:
                state["armed"] = False
                raise RuntimeError("allocator bug")
            return real(n)

        monkeypatch.setattr(inst.kv, "allocate", allocate)
        inst.engine.step()  # prefill: blocks for the prompts
        state["armed"] = True
        inst.engine.run_until_idle()
        outs = [final(s) for s in sinks]
        assert all(o.finish_reason == "error" and "allocator bug" in o.error for o in outs)
        assert_kv_free(inst)
        later = inst.engine.generate([PROMPTS[0]], GREEDY)[0]
        assert later.output_ids == reference_greedy(model, PROMPTS[0], GREEDY.max_tokens)


def test_the_engine_loop_never_retries_a_failing_step_on_the_same_requests(llama, monkeypatch):
    model, ckpt = llama
    with start(ckpt) as inst:
        eng = inst.engine
        real_step, raised = eng.step, []
        poison: list = []

        def step() -> bool:  # a failure no request can be blamed for, while the poisoned request is queued
            if poison and poison[0].finish_reason is None:
                raised.append(time.perf_counter())
                raise RuntimeError("step blew up")
            return real_step()

        monkeypatch.setattr(eng, "step", step)
        loop = EngineLoop(eng).start()
        try:
            with eng.work:  # queued and marked poisoned before the loop thread can step it
                req, sink = submit(inst, PROMPTS[0])
                poison.append(req)
            out = final(sink, timeout=10)
            assert out.finish_reason == "error" and "step blew up" in out.error
            time.sleep(0.3)  # a spinning loop would call the step again and again meanwhile
            assert len(raised) == 1
            assert_kv_free(inst)
            ok = [final(submit(inst, p)[1]) for p in PROMPTS]  # later requests are served
            for p, o in zip(PROMPTS, ok):
                assert o.finish_reason == "length" and o.output_ids == reference_greedy(model, p, GREEDY.max_tokens)
            assert len(raised) == 1 and threading.active_count() > 0
            assert_kv_free(inst)
        finally:
            loop.stop()


def test_a_failing_decode_in_the_engine_loop_fails_its_requests_and_serves_later_ones(llama, monkeypatch):
    model, ckpt = llama
    with start(ckpt) as inst:
        eng = inst.engine
        real, calls = eng.runner.run, []

        def run(plan):
            calls.append(plan.num_tokens)
            if len(calls) == 2:  # the first decode step (after the prefill)
                raise RuntimeError("kernel fault")
            return real(plan)

        monkeypatch.setattr(eng.runner, "run", run)
        loop = EngineLoop(eng).start()
        try:
            out = final(submit(inst, PROMPTS[0])[1])
            assert out.finish_reason == "error" and "step failed" in out.error and "kernel fault" in out.error
            assert_kv_free(inst)
            later = final(submit(inst, PROMPTS[1])[1])
            assert later.output_ids == reference_greedy(model, PROMPTS[1], GREEDY.max_tokens)
            assert len(calls) == 2 + GREEDY.max_tokens  # the failed step was not retried
        finally:
            loop.stop()
        assert_kv_free(inst)
