"""ElasticKV mechanisms: block geometry, the allocator's accounting in both modes, the paged cache's layout."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from tangram.kv import KVAllocator, KVSpec, PagedCache, SeqSlot
from tangram.pool import DevicePool, PoolFullError


def spec(block_tokens=4, dtype=torch.float32) -> KVSpec:
    return KVSpec(layers=2, kv_heads=2, head_dim=8, dtype=dtype, block_tokens=block_tokens)


@pytest.mark.parametrize("arch,heads,dim", [("llama", 2, 8), ("gpt2", 4, 8), ("opt", 4, 8), ("qwen3", 2, 16)])
def test_spec_from_config(arch, heads, dim):
    s = KVSpec.from_config(tiny_config(arch), torch.float16, 16)
    assert (s.layers, s.kv_heads, s.head_dim) == (2, heads, dim)
    assert s.block_bytes == 2 * 16 * 2 * heads * dim * 2
    assert s.blocks_for(16) == 1 and s.blocks_for(17) == 2


def test_elastic_allocation_is_all_or_nothing_and_returns_to_the_pool():
    s = spec()
    pool = DevicePool(8 * 4096)
    kv = KVAllocator(pool, s)
    a = kv.allocate(5)
    assert len(a) == 5 and pool.snapshot()["kv_bytes"] == 5 * 4096
    assert kv.allocate(4) is None  # only 3 left: nothing taken
    assert pool.snapshot()["kv_bytes"] == 5 * 4096 and kv.in_use == 5
    b = kv.allocate(3)
    kv.free(a)
    kv.free(b)
    assert kv.in_use == 0 and kv.peak == 8 and pool.snapshot()["kv_bytes"] == 0


def test_reserve_mode_holds_its_blocks_until_closed():
    s = spec()
    pool = DevicePool(8 * 4096)
    kv = KVAllocator(pool, s, "reserve", reserve_blocks=6)
    assert pool.snapshot()["kv_bytes"] == kv.reserved_bytes == 6 * 4096
    assert KVAllocator(pool, s).reserved_bytes == 0  # elastic: nothing held ahead
    a = kv.allocate(6)
    assert kv.allocate(1) is None
    kv.free(a)
    assert pool.snapshot()["kv_bytes"] == 6 * 4096  # still reserved
    kv.close()
    assert pool.snapshot()["kv_bytes"] == kv.reserved_bytes == 0
    with pytest.raises(PoolFullError):
        KVAllocator(pool, s, "reserve", reserve_blocks=9)
    assert pool.snapshot()["kv_bytes"] == 0  # a failed reservation gives back what it took


def test_paged_cache_writes_rows_into_blocks_and_gathers_left_padded():
    s = spec(block_tokens=4)
    pool = DevicePool(16 * 4096)
    kv = KVAllocator(pool, s)
    blocks = [kv.allocate(2), kv.allocate(1)]
    slots = [SeqSlot([kv.offset(b) for b in blocks[0]], 5), SeqSlot([kv.offset(b) for b in blocks[1]], 2)]
    torch.manual_seed(0)
    past = [torch.randn(2, 2, 2, 5, 8), torch.randn(2, 2, 2, 2, 8)]  # per sequence: [layer, k/v, head, token, dim]
    for slot, hist in zip(slots, past):  # fill the history through a cache of one sequence
        for t in range(hist.shape[3]):
            c = PagedCache(s, kv.elements, [SeqSlot(slot.offsets, t)], 1)
            for layer in range(2):
                c.write_and_gather(layer, hist[layer, 0, :, t:t + 1].unsqueeze(0), hist[layer, 1, :, t:t + 1].unsqueeze(0))
    new_k, new_v = torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8)
    c = PagedCache(s, kv.elements, slots, 1)
    assert c.get_seq_length() == 5 and c.get_mask_sizes(1, 0) == (6, 0)
    keys, values = c.write_and_gather(1, new_k, new_v)
    assert keys.shape == (2, 2, 6, 8)
    torch.testing.assert_close(keys[0], torch.cat([past[0][1, 0], new_k[0]], dim=1), rtol=0, atol=0)
    torch.testing.assert_close(values[1, :, 3:], torch.cat([past[1][1, 1], new_v[1]], dim=1), rtol=0, atol=0)
    mask = c.attention_mask([6, 3])
    assert mask.tolist() == [[1] * 6, [0, 0, 0, 1, 1, 1]]
    assert torch.isfinite(values).all()  # padding rows point at real data, never garbage


def test_paged_cache_rejects_a_layout_mismatch_and_too_few_blocks():
    s = spec()
    pool = DevicePool(4 * 4096)
    kv = KVAllocator(pool, s)
    off = [kv.offset(b) for b in kv.allocate(1)]
    with pytest.raises(ValueError, match="holds 1 blocks"):
        PagedCache(s, kv.elements, [SeqSlot(off, 4)], 1)
    c = PagedCache(s, kv.elements, [SeqSlot(off, 0)], 2)
    with pytest.raises(ValueError, match="KV layout expects"):
        c.write_and_gather(0, torch.zeros(1, 3, 2, 8), torch.zeros(1, 3, 2, 8))


def test_a_sequence_never_writes_outside_its_blocks():
    s = spec(block_tokens=4)
    pool = DevicePool(8 * 4096)
    kv = KVAllocator(pool, s)
    mine, other = kv.allocate(1), kv.allocate(1)
    view = kv.block_view(other[0])
    view.fill_(7.0)
    c = PagedCache(s, kv.elements, [SeqSlot([kv.offset(mine[0])], 0)], 4)
    for layer in range(2):
        c.write_and_gather(layer, torch.ones(1, 2, 4, 8), torch.ones(1, 2, 4, 8))
    assert bool((view == 7.0).all())


def test_paged_cache_batched_prefill_writes_only_the_real_rows_of_padded_prompts():
    s = spec(block_tokens=4)
    pool = DevicePool(16 * 4096)
    kv = KVAllocator(pool, s)
    long, short = kv.allocate(2), kv.allocate(1)
    untouched = kv.block_view(short[0]).clone()
    slots = [SeqSlot([kv.offset(b) for b in long], 0), SeqSlot([kv.offset(short[0])], 0)]
    c = PagedCache(s, kv.elements, slots, [6, 2])  # the second prompt is left-padded by 4 rows
    assert c.get_seq_length() == 0 and c.get_mask_sizes(6, 0) == (6, 0)
    torch.manual_seed(1)
    k, v = torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    keys, _ = c.write_and_gather(0, k, v)
    torch.testing.assert_close(keys[0], k[0], rtol=0, atol=0)
    torch.testing.assert_close(keys[1, :, 4:], k[1, :, 4:], rtol=0, atol=0)  # its two real rows, right-aligned
    assert c.attention_mask([6, 2]).tolist() == [[1] * 6, [0, 0, 0, 0, 1, 1]]
    # the short prompt's block holds its 2 real rows of layer 0 and nothing of the padding
    after = kv.block_view(short[0]).view(2, 4, 2, 2, 8)  # [layer, token, k/v, head, dim]
    torch.testing.assert_close(after[0, :2, 0], k[1, :, 4:].transpose(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(after[0, 2:], untouched.view(2, 4, 2, 2, 8)[0, 2:], rtol=0, atol=0)


def test_a_model_spec_prices_kv_by_the_engines_geometry():
    from tangram.workload import transformer

    m = transformer("gqa", "llama", 64, 128, 3, 8, 2, 100, 64, seed=0, dtype="float16")
    engine = KVSpec.from_config(m.transformers_config(), torch.float16, block_tokens=4)
    assert m.kv_bytes_per_token() == engine.bytes_per_token() == 3 * 2 * 2 * 8 * 2
    assert KVSpec.from_config(m.config, torch.float16, block_tokens=4) == engine  # a dict of the fields reads alike
