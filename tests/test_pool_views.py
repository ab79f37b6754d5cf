"""A pool hit binds the typed views its tensors' first binding made; an evicted tensor's views go with it."""

from __future__ import annotations

import torch

from conftest import make_tensor
from tangram.pool import DevicePool
from tangram.store import Loader, save


def test_a_pool_hit_rebinds_the_same_views_and_a_reload_makes_new_ones(tmp_path):
    state = {"a": make_tensor((1024,), torch.float32, seed=1), "b": make_tensor((16, 64), torch.float16, seed=2)}
    save(state, tmp_path / "m")
    save({"c": make_tensor((4 * 1024,), torch.float32, seed=3)}, tmp_path / "other")  # the whole pool
    pool = DevicePool(4 * 4096, loader=Loader(method="pread"))
    first = pool.acquire(tmp_path / "m")
    pool.release(first)
    hit = pool.acquire(tmp_path / "m")
    assert hit.bytes_loaded == 0
    for name, want in state.items():
        assert hit.tensors[name] is first.tensors[name]  # no new view objects on a pool hit
        assert hit.tensors[name].dtype == want.dtype and hit.tensors[name].shape == want.shape
        assert torch.equal(hit.tensors[name].view(torch.uint8), want.view(torch.uint8))
    pool.release(hit)
    pool.release(pool.acquire(tmp_path / "other"))  # all of m is evicted for it
    again = pool.acquire(tmp_path / "m")
    assert again.bytes_loaded > 0
    for name, want in state.items():
        assert again.tensors[name] is not first.tensors[name]
        assert torch.equal(again.tensors[name].view(torch.uint8), want.view(torch.uint8))
    pool.release(again)


def test_totals_equal_the_extents_whatever_the_pool_holds(tmp_path):
    from tangram.pool.policy import State

    save({"a": make_tensor((1024,), torch.float32, seed=1)}, tmp_path / "m")
    save({"b": make_tensor((2048,), torch.float32, seed=2)}, tmp_path / "n")
    pool = DevicePool(16 * 4096, loader=Loader(method="pread"))

    def from_extents() -> dict[str, int]:
        ext = pool.extents()
        return {s.value: sum(e.size for e in ext if e.state is s) for s in State}

    assert pool.totals() == from_extents()
    m = pool.acquire(tmp_path / "m")
    region = pool.kv_region(4096, torch.uint8)
    reserved = pool.kv_region(4096, torch.uint8, reserve_blocks=2)
    kv = [region.allocate(1) for _ in range(5)]  # runs leave idle blocks: reclaimed by both
    assert pool.totals() == from_extents()
    pool.release(pool.acquire(tmp_path / "n"))
    region.free(kv.pop())
    assert pool.totals() == from_extents() and pool.totals()["retained"] == 8192
    pool.release(m)
    for blocks in kv:
        region.free(blocks)
    reserved.close()
    assert pool.totals() == from_extents() == {"free": 16 * 4096 - 12288, "retained": 12288, "active": 0}
