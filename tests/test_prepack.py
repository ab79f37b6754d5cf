"""oneDNN-packed Linear weights: same outputs as the plain linear, a cache by tensor identity that keeps held
entries and evicts unheld ones least recently used first, and instances that hold and release them."""

from __future__ import annotations

import pytest
import torch

from conftest import engine_checkpoint, engine_model, reference_greedy
from tangram.engine import EngineConfig, Instance, SamplingParams
from tangram.engine import prepack as prepack_module
from tangram.engine.prepack import PackedCache, PackedLinear, available, packable, prepack, unpack
from tangram.pool import DevicePool

pytestmark = pytest.mark.skipif(not available("cpu"), reason="this PyTorch has no oneDNN")


def linear(dtype: torch.dtype, n_in: int = 24, n_out: int = 40) -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(n_in, n_out).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_packed_linear_computes_what_the_plain_one_does(dtype):
    lin = linear(dtype)
    x = torch.randn(5, 24, dtype=dtype)
    plain = lin(x)
    cache = PackedCache(1 << 30)
    held = prepack(lin, {lin.weight.data_ptr(): "w"}, hint=4, cache=cache)
    if dtype not in packable():  # a CPU whose oneDNN has no bf16 path (AVX2 only): the linear stays plain
        assert held == [] and cache.bytes == 0 and "forward" not in lin.__dict__ and torch.equal(lin(x), plain)
        return
    assert held == ["w"] and isinstance(lin.__dict__["forward"], PackedLinear)
    tol = 1e-5 if dtype is torch.float32 else 2e-2
    torch.testing.assert_close(lin(x), plain, rtol=tol, atol=tol)
    torch.testing.assert_close(lin(x.unsqueeze(0)), plain.unsqueeze(0), rtol=tol, atol=tol)  # [B, T, K] inputs
    unpack(lin)
    assert "forward" not in lin.__dict__ and torch.equal(lin(x), plain)


def test_weights_without_an_identity_or_of_other_dtypes_stay_plain():
    lin, half = linear(torch.float32), linear(torch.float16)
    cache = PackedCache(1 << 30)
    assert prepack(lin, {}, hint=4, cache=cache) == []
    assert prepack(half, {half.weight.data_ptr(): "h"}, hint=4, cache=cache) == []
    assert cache.bytes == 0 and "forward" not in lin.__dict__


def test_held_entries_stay_and_unheld_ones_are_evicted_oldest_first():
    w = [torch.randn(32, 32) for _ in range(3)]  # 4 kB each
    cache = PackedCache(limit_bytes=8192)
    for i, t in enumerate(w):
        cache.acquire(f"w{i}", t, hint=1)
    assert cache.bytes == 3 * 4096  # over the limit, but every entry is held
    cache.release(["w0", "w1"])
    assert cache.get("w0") is None and cache.get("w1") is not None and cache.bytes == 8192
    cache.acquire("w1", w[1], hint=1)  # a hit: nothing packed again
    assert cache.bytes == 8192
    cache.limit = 4096
    cache.release(["w1", "w1", "w2"])
    assert cache.bytes == 4096 and cache.get("w2") is None and cache.get("w1") is not None  # w1 used last


def test_an_evicted_weight_runs_the_plain_linear():
    lin = linear(torch.float32)
    x = torch.randn(3, 24)
    cache = PackedCache(limit_bytes=0)
    prepack(lin, {lin.weight.data_ptr(): "w"}, hint=2, cache=cache)
    cache.release(["w"])  # nobody holds it and the limit is 0: evicted
    assert cache.get("w") is None
    assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))


def test_instances_hold_packed_weights_and_a_pool_hit_packs_nothing_new(tmp_path, monkeypatch):
    cache = PackedCache(1 << 30)
    monkeypatch.setattr(prepack_module, "PACKED", cache)
    import tangram.engine.instance as instance_module

    monkeypatch.setattr(instance_module, "PACKED", cache)
    model = engine_model("llama")
    ckpt = engine_checkpoint(model, tmp_path)
    ref = reference_greedy(model, [5, 17, 33, 9], 10)
    pool = DevicePool(64 << 20)
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    with Instance(ckpt, pool, EngineConfig(block_tokens=4)) as inst:
        assert len(inst.packed) >= 4 * 2  # every Linear of both layers (and the head)
        assert inst.engine.generate([[5, 17, 33, 9]], params)[0].output_ids == ref
        packed_bytes = cache.bytes
    assert cache.bytes == packed_bytes and not cache._holds  # released, still cached
    with Instance(ckpt, pool, EngineConfig(block_tokens=4)) as again:  # pool hit: same tensors, same identities
        assert cache.bytes == packed_bytes
        assert again.engine.generate([[5, 17, 33, 9]], params)[0].output_ids == ref
    with Instance(ckpt, pool, EngineConfig(block_tokens=4, prepack="off")) as plain:
        assert plain.packed == [] and not any("forward" in m.__dict__ for m in plain.model.modules())
        assert plain.engine.generate([[5, 17, 33, 9]], params)[0].output_ids == ref


def test_a_model_routed_before_for_the_same_tensors_keeps_its_routing_and_takes_the_holds_again():
    lin = linear(torch.float32)
    x = torch.randn(3, 24)
    plain = lin(x)
    cache = PackedCache(limit_bytes=0)  # nothing unheld stays cached
    ids = {lin.weight.data_ptr(): "w", lin.bias.data_ptr(): "b"}
    assert prepack(lin, ids, hint=2, cache=cache) == ["w"]
    routed = lin.__dict__["forward"]
    cache.release(["w"])
    assert cache.get("w") is None  # evicted: the next hold packs it again, from the module's weight
    assert prepack(lin, dict(ids), hint=2, cache=cache) == ["w"]
    assert lin.__dict__["forward"] is routed and cache.get("w") is not None and cache._holds == {"w": 1}
    torch.testing.assert_close(lin(x), plain)
    other = {lin.weight.data_ptr(): "w2", lin.bias.data_ptr(): "b"}  # other bytes at the same address
    assert prepack(lin, other, hint=2, cache=cache) == ["w2"]
    assert lin.__dict__["forward"] is not routed and lin.__dict__["forward"].ident == "w2"
    unpack(lin)
    assert prepack(lin, other, hint=2, cache=cache) == ["w2"] and lin.__dict__["forward"].ident == "w2"
