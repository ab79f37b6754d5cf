"""A kept skeleton re-bound to pooled tensors computes exactly as a fresh build, by the same kernels."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from conftest import engine_checkpoint, engine_model
from tangram.engine.skeleton import RuntimeCache, bind, build_causal_lm, unbind
from tangram.pool import DevicePool


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return engine_checkpoint(engine_model("llama"), tmp_path_factory.mktemp("skeleton"))


def ops(model, ids: torch.Tensor) -> dict[str, int]:
    """aten ops of one prefill that keeps only the last position's logits (as the engine's forward does)."""
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return {e.key: e.count for e in prof.key_averages()}


def test_a_rebound_skeleton_runs_the_same_kernels_as_a_fresh_build(ckpt):
    pool = DevicePool(64 << 20)
    binding = pool.acquire(ckpt)
    model = build_causal_lm(ckpt, binding.tensors)
    ids = torch.arange(3, 19).unsqueeze(0)
    fresh = ops(model, ids)
    with torch.inference_mode():
        want = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits
    unbind(model)
    assert all(p.is_meta for p in model.parameters())
    bind(model, binding.tensors, ckpt)
    # the lm_head's input is the last position sliced from [1, T, H]: matmul folds it into one mm only for a
    # weight that requires grad; otherwise it expands the weight to a batch and copies it (aten::bmm + copy_)
    assert all(p.requires_grad for p in model.parameters())
    again = ops(model, ids)
    assert "aten::bmm" not in again and again.get("aten::mm") == fresh.get("aten::mm")
    assert again.get("aten::copy_", 0) == fresh.get("aten::copy_", 0)
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids, use_cache=False, logits_to_keep=1).logits, want)
    pool.release(binding)


def test_a_skeleton_bound_from_a_meta_model_without_grad_flags_gets_them(ckpt):
    pool = DevicePool(64 << 20)
    binding = pool.acquire(ckpt)
    cache = RuntimeCache()
    model = cache.model(ckpt, binding.tensors)
    for p in model.parameters():
        p.requires_grad_(False)
    cache.release(model)  # unbound: meta tensors only
    assert cache.model(ckpt, binding.tensors) is model
    assert all(p.requires_grad for p in model.parameters())
    cache.release(model)
    pool.release(binding)


def test_a_rebind_goes_through_the_learnt_slots_and_keeps_ties(tmp_path):
    from conftest import engine_model as make

    ckpt = engine_checkpoint(make("qwen2"), tmp_path)  # tied embeddings: one tensor, two parameters
    pool = DevicePool(64 << 20)
    binding = pool.acquire(ckpt)
    cache = RuntimeCache()
    model = cache.model(ckpt, binding.tensors)
    with torch.inference_mode():
        want = model(input_ids=torch.arange(3, 11).unsqueeze(0), use_cache=False).logits
    cache.release(model)
    assert all(p.is_meta for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the meta stand-ins stay tied
    calls = []
    real = type(model).load_state_dict
    type(model).load_state_dict = lambda self, *a, **k: calls.append(1) or real(self, *a, **k)
    try:
        assert cache.model(ckpt, binding.tensors) is model
    finally:
        type(model).load_state_dict = real
    assert not calls  # the slots, not a module walk
    assert model.lm_head.weight is model.model.embed_tokens.weight
    views = {t.data_ptr() for t in binding.tensors.values()}
    assert all(p.data_ptr() in views for p in model.parameters())  # the pool's bytes, no copy
    with torch.inference_mode():
        assert torch.equal(model(input_ids=torch.arange(3, 11).unsqueeze(0), use_cache=False).logits, want)
    cache.release(model)
    fewer = {k: v for k, v in binding.tensors.items() if k != "model.norm.weight"}
    with pytest.raises(Exception, match="lacks"):  # tensors that do not fit the slots: a full bind, its errors
        cache.model(ckpt, fewer)
    pool.release(binding)
