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
