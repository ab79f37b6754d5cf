"""Greedy output equals transformers' `generate` for every architecture the tests cover, under chunked
prefill, preemption and mixed batches (prompt chunks and decodes in one forward), on the packed attention
path and on the padded one (models outside transformers' attention interface)."""

from __future__ import annotations

import pytest

from conftest import ENGINE_ARCHS, engine_checkpoint, engine_model, reference_greedy
from tangram.engine import EngineConfig, Instance, OutputQueue, SamplingParams
from tangram.engine.attention import NAME, supports_packed
from tangram.engine.runner import ModelRunner
from tangram.pool import DevicePool

PROMPTS = [[5, 17, 33, 9, 60, 7, 101], [40, 41], [3, 200, 150, 90, 12, 11, 10, 9, 8, 77, 78, 79],
           [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26]]
GREEDY = SamplingParams(max_tokens=16, ignore_eos=True)


def padded(inst: Instance) -> None:
    """Run `inst` through the padded cache, as a model without the attention interface would."""
    inst.engine.runner = ModelRunner(inst.model, inst.kv, packed=False)


@pytest.fixture(params=ENGINE_ARCHS)
def arch_model(request, tmp_path):
    model = engine_model(request.param)
    refs = [reference_greedy(model, p, GREEDY.max_tokens) for p in PROMPTS]
    assert all(len(set(r)) > 3 for r in refs), "degenerate reference: the test would prove little"
    return engine_checkpoint(model, tmp_path), refs


@pytest.mark.parametrize("path", ["packed", "padded"])
def test_chunked_prefill_and_mixed_steps_match_transformers(arch_model, path):
    ckpt, refs = arch_model
    with Instance(ckpt, DevicePool(64 << 20), EngineConfig(block_tokens=4, max_step_tokens=5)) as inst:
        if path == "padded":
            padded(inst)
        eng = inst.engine
        assert eng.runner.packed is (path == "packed")
        sinks = [OutputQueue() for _ in PROMPTS]
        eng.add_request(PROMPTS[0], GREEDY, sink=sinks[0])
        eng.add_request(PROMPTS[3], GREEDY, sink=sinks[3])
        for _ in range(3):
            eng.step()  # a decoding and 19 prompt tokens being chunked 5 (minus decodes) at a time
        eng.add_request(PROMPTS[1], GREEDY, sink=sinks[1])  # joins while the others are mid-flight
        eng.add_request(PROMPTS[2], GREEDY, sink=sinks[2])
        eng.run_until_idle()
        outs = [list(s.q.queue)[-1] for s in sinks]
        assert [o.output_ids for o in outs] == refs
        assert inst.kv.in_use == 0


@pytest.mark.parametrize("path", ["packed", "padded"])
def test_preemption_recomputes_to_the_same_tokens(arch_model, path):
    ckpt, refs = arch_model
    with Instance(ckpt, DevicePool(64 << 20), EngineConfig(block_tokens=4)) as probe:
        block, weights = probe.kv.block_size, probe.pool.snapshot()["totals"]["active"]
    # 14 blocks (56 tokens) for four sequences that end at 23-35 tokens: they cannot all run to the end
    with Instance(ckpt, DevicePool(weights + 14 * block), EngineConfig(block_tokens=4, max_step_tokens=8)) as inst:
        if path == "padded":
            padded(inst)
        outs = inst.engine.generate(PROMPTS, GREEDY)
        assert inst.engine.totals.preemptions > 0
        assert [o.output_ids for o in outs] == refs
        assert inst.kv.in_use == 0


def test_models_outside_the_attention_interface_take_the_padded_path(arch_model, monkeypatch):
    ckpt, _ = arch_model
    with Instance(ckpt, DevicePool(64 << 20), EngineConfig(block_tokens=4)) as inst:
        assert supports_packed(inst.model) and inst.engine.runner.packed
        assert inst.model.config._attn_implementation == NAME
        padded(inst)
        assert inst.model.config._attn_implementation == "sdpa"  # the kept skeleton is switched back
        monkeypatch.setattr(type(inst.model), "_supports_attention_backend", False)
        assert not supports_packed(inst.model)
        monkeypatch.setattr(inst.model.config, "attn_logit_softcapping", 30.0, raising=False)
        monkeypatch.undo()
        monkeypatch.setattr(inst.model.config, "attn_logit_softcapping", 30.0, raising=False)
        assert not supports_packed(inst.model)  # soft-capped logits are not what the packed attention computes
