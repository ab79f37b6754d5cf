"""The pool's contracts: the simulator's pool places by the real pool's ledger, KV regions, PoolConfig."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from conftest import make_tensor
from tangram.control import ServeConfig
from tangram.pool import DevicePool, PoolConfig, PoolFullError, PoolPolicy
from tangram.serve.server import build_workers
from tangram.sim.pool import SimPool, SimPoolFull
from tangram.store import Loader, read_index, save
from tangram.worker import Worker

KB = 4096


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Six checkpoints of 1-3 tensors of 4-16 KiB (page multiples: the real pool's alignment adds nothing)."""
    root = tmp_path_factory.mktemp("contracts")
    out = []
    for i in range(6):
        state = {f"layer{j}.weight": make_tensor((1024 * (1 + (i + j) % 4),), torch.float32, seed=10 * i + j)
                 for j in range(1 + i % 3)}
        save(state, root / f"m{i}")
        index = read_index(root / f"m{i}")
        out.append((root / f"m{i}", {e.key: e.nbytes for e in index.tensors.values()}))
    return out


def placement(pool: DevicePool) -> dict[str, tuple[int, str]]:
    return {t["key"]: (t["offset"], t["state"]) for t in pool.snapshot()["tensors"]}


def sim_placement(sim: SimPool, now: float) -> dict[str, tuple[int, str]]:
    return {e.key: (e.offset, e.state.value) for e in sim.extents(now) if e.key is not None}


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.integers(0, 5), st.booleans()), min_size=5, max_size=30),
       policy=st.sampled_from(list(PoolPolicy)))
def test_the_simulated_pool_places_and_evicts_exactly_as_the_real_pool(models, ops, policy):
    """Same history, same clock: the same tensors at the same offsets, the same failures, the same victims."""
    now = [0.0]
    pool = DevicePool(40 * KB, policy=policy, loader=Loader(method="pread"), clock=lambda: now[0])
    sim = SimPool(40 * KB, policy=policy)
    held: list[tuple] = []
    for step, (m, hold) in enumerate(ops):
        now[0] = 10.0 * step
        path, tensors = models[m]
        try:
            b = pool.acquire(path, model=f"m{m}")
        except PoolFullError:
            with pytest.raises(SimPoolFull):
                sim.acquire(f"m{m}", tensors, now[0])
        else:
            loaded, _ = sim.acquire(f"m{m}", tensors, now[0])
            assert b.bytes_loaded == sum(tensors[k] for k in loaded)
            if hold and len(held) < 2:
                held.append((b, tensors))
            else:
                pool.release(b)
                sim.release(tensors)
        assert placement(pool) == sim_placement(sim, now[0])
    for b, tensors in held:
        pool.release(b)
        sim.release(tensors)
    assert placement(pool) == sim_placement(sim, now[0])


def test_a_freed_kv_block_is_reused_at_once_and_idle_blocks_are_free_bytes_to_the_pool(models):
    seen = []
    pool = DevicePool(8 * KB, loader=Loader(method="pread"), on_evict=seen.append)
    region = pool.kv_region(KB, torch.float16)
    blocks = region.allocate(8)
    assert blocks is not None and region.allocate(1) is None  # only active bytes: back-pressure
    assert sorted(blocks) == [i * KB // 2 for i in range(8)]  # element offsets of the 4 KiB blocks
    region.free(blocks[:3])
    again = region.allocate(2)
    assert again is not None and set(again) <= set(blocks[:3])  # from the region's free list
    assert pool.snapshot()["kv_bytes"] == 7 * KB  # the idle block counts as free, not as KV
    path, tensors = next((p, t) for p, t in models if sum(t.values()) == KB)
    b = pool.acquire(path)  # lands in the idle block: nothing evicted, nothing waits
    assert b.bytes_loaded == KB and not seen and region.allocate(1) is None
    pool.release(b)
    region.free(again + blocks[3:])
    region.close()
    snap = pool.snapshot()
    assert snap["kv_bytes"] == 0 and snap["totals"]["free"] == 7 * KB


def test_a_reserved_region_hands_out_only_its_reservation():
    pool = DevicePool(8 * KB)
    region = pool.kv_region(KB, torch.uint8, reserve_blocks=3)
    assert region.reserved_bytes == pool.snapshot()["kv_bytes"] == 3 * KB
    got = region.allocate(3)
    assert got is not None and region.allocate(1) is None  # five free units in the pool do not count
    region.free(got)
    assert pool.snapshot()["kv_bytes"] == 3 * KB  # freed blocks stay in the reservation
    region.close()
    assert pool.snapshot()["kv_bytes"] == 0 and region.reserved_bytes == 0
    with pytest.raises(PoolFullError):
        pool.kv_region(KB, torch.uint8, reserve_blocks=9)
    assert pool.snapshot()["kv_bytes"] == 0  # a failed reservation leaves nothing behind


def test_pool_settings_are_a_configuration_fixed_at_construction():
    pool = DevicePool(4 * KB, config=PoolConfig(retain=False, share=False, policy="lru"))
    assert (pool.config.retain, pool.config.share, pool.policy) == (False, False, PoolPolicy.LRU)
    for attr, value in (("loader", Loader()), ("policy", "tangram")):
        with pytest.raises(AttributeError):
            setattr(pool, attr, value)
    with pytest.raises(ValidationError):
        pool.config.retain = True  # frozen
    assert DevicePool(4 * KB, policy="lfu").config == PoolConfig(policy="lfu")  # keyword overrides, validated
    with pytest.raises(ValidationError):
        DevicePool(4 * KB, policy="mru")
    with pytest.raises(ValidationError):
        PoolConfig(reload_bandwidth=0)
    with pytest.raises(ValidationError, match="needs safetensors_sources"):
        PoolConfig(loader="safetensors")


def test_serve_config_carries_the_pool_config_to_every_worker():
    assert ServeConfig().pool == PoolConfig(shared=False)  # no vllm deployment: a private arena
    config = ServeConfig.model_validate({"pool_capacity": 1 << 20, "cpu_devices": 2,
                                         "pool": {"retain": False, "share": False}})
    workers, _ = build_workers(config)
    assert [(w.pool.config.retain, w.pool.config.share) for w in workers] == [(False, False)] * 2
    assert Worker(0, "cpu", 1 << 20, pool=PoolConfig(policy="lru")).pool.policy is PoolPolicy.LRU
    with pytest.raises(ValidationError):
        ServeConfig.model_validate({"pool": {"retained": False}})


def test_the_safetensors_loader_is_a_pool_configuration(tmp_path):
    from safetensors.torch import save_file

    state = {"w": make_tensor((1024,), torch.float32, seed=3)}
    save(state, tmp_path / "ckpt")
    (tmp_path / "hf").mkdir()
    save_file(state, str(tmp_path / "hf" / "model.safetensors"))
    pool = DevicePool(8 * KB, config=PoolConfig(loader="safetensors",
                                               safetensors_sources={str(tmp_path / "ckpt"): str(tmp_path / "hf")}))
    b = pool.acquire(tmp_path / "ckpt")
    assert b.load is not None and b.load.method == "safetensors"
    assert torch.equal(b.tensors["w"].view(torch.uint8), state["w"].view(torch.uint8))
