"""Pure parts of the engine with hand-made inputs: the step's token budget, preemption choice, block needs,
the batch size derived from the KV that fits."""

from __future__ import annotations

import pytest

from tangram.engine.step_policy import MAX_BATCH_CAP, blocks_short, derived_max_batch, prefill_chunks, victim


def test_prefill_chunks_are_fifo_within_the_budget():
    assert prefill_chunks([10, 10, 10], budget=25, seats=8) == [10, 10, 5]  # the third gets the rest
    assert prefill_chunks([10, 10, 10], budget=100, seats=2) == [10, 10]  # no free seat for the third
    assert prefill_chunks([500, 1], budget=100, seats=8) == [100]  # a long prompt is chunked, the next waits
    assert prefill_chunks([], budget=100, seats=8) == []
    assert prefill_chunks([10, 10], budget=10, seats=8) == [10]


def test_the_first_chunk_always_gets_a_token():
    assert prefill_chunks([7], budget=0, seats=1) == [1]  # decodes used the budget: one token still moves
    assert prefill_chunks([7, 3], budget=0, seats=2) == [1]
    assert prefill_chunks([7], budget=5, seats=0) == []  # but never without a seat


def test_victim_is_the_most_recent():
    assert victim(["a", "b", "c"]) == "c"
    with pytest.raises(ValueError):
        victim([])


def test_blocks_short():
    assert blocks_short(cached_tokens=0, blocks_held=0, block_tokens=16) == 1
    assert blocks_short(cached_tokens=15, blocks_held=1, block_tokens=16) == 0
    assert blocks_short(cached_tokens=16, blocks_held=1, block_tokens=16) == 1
    assert blocks_short(cached_tokens=3, blocks_held=0, block_tokens=4, new_tokens=9) == 3
    assert blocks_short(cached_tokens=0, blocks_held=5, block_tokens=4, new_tokens=8) == 0


def test_derived_max_batch_follows_the_kv_that_fits():
    assert derived_max_batch(9) == 9  # every running sequence holds at least one block
    assert derived_max_batch(0) == 1
    assert derived_max_batch(10**6) == MAX_BATCH_CAP
    assert derived_max_batch(40, cap=32) == 32
