"""Pool policies as pure functions over hand-made arena states (no I/O)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tangram.pool.policy import (
    Extent, PoolPolicy, State, decayed_rate, eviction_order, find_window, fragmentation, largest_free, retention_gain,
)

F, R, A = State.FREE, State.RETAINED, State.ACTIVE


def layout(*specs: tuple[int, State, float]) -> list[Extent]:
    """Extents from (size, state, gain) in order."""
    out, pos = [], 0
    for i, (size, state, gain) in enumerate(specs):
        out.append(Extent(pos, size, state, None if state is F else f"t{i}", gain, last_used=float(i), uses=float(10 - i)))
        pos += size
    return out


def test_gain_is_rate_times_reload_seconds():
    assert retention_gain([0.5, 0.25], 2_000_000_000, 2e9) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        retention_gain([1.0], 10, 0)


def test_decayed_rate_halves_per_half_life():
    assert decayed_rate(4.0, 10.0, 20.0, 10.0) == pytest.approx(2.0)
    assert decayed_rate(4.0, 10.0, 5.0, 10.0) == 4.0


def test_window_prefers_free_space_then_least_gain():
    ext = layout((100, R, 5.0), (100, F, 0), (100, A, 0), (100, R, 1.0), (100, R, 2.0))
    w = find_window(ext, 100, lambda e: e.gain)
    assert (w.offset, w.evict, w.cost) == (100, (), 0.0)  # the free extent costs nothing
    w = find_window(ext, 200, lambda e: e.gain)
    assert w.offset == 300 and w.evict == (3, 4) and w.cost == pytest.approx(3.0)  # 3.0 < 5.0 (+free)
    ext2 = layout((100, R, 2.0), (100, F, 0), (100, A, 0), (100, R, 1.0), (100, R, 2.0))
    w = find_window(ext2, 200, lambda e: e.gain)
    assert w.offset == 0 and w.evict == (0,)  # 2.0 (one tensor + free) < 3.0


def test_window_never_spans_active_bytes():
    ext = layout((100, F, 0), (10, A, 0), (100, F, 0))
    assert find_window(ext, 150, lambda e: e.gain) is None
    assert find_window(ext, 100, lambda e: e.gain).offset == 0


def test_window_takes_whole_retained_tensors():
    ext = layout((50, F, 0), (300, R, 1.0))
    w = find_window(ext, 100, lambda e: e.gain)
    assert w.evict == (1,) and w.size == 350


def test_eviction_orders():
    ext = layout((100, R, 9.0), (400, R, 9.0), (100, A, 0), (100, R, 1.0))
    assert eviction_order(ext, PoolPolicy.LRU) == [0, 1, 3]  # last_used = position
    assert eviction_order(ext, PoolPolicy.LFU) == [3, 1, 0]  # uses = 10 - position
    assert eviction_order(ext, PoolPolicy.TANGRAM) == [3, 1, 0]  # gain per byte: 0.01, 0.0225, 0.09


def test_fragmentation_and_largest_free():
    ext = layout((100, F, 0), (50, F, 0), (10, A, 0), (50, F, 0))
    assert largest_free(ext) == 150
    assert fragmentation(ext) == pytest.approx(1 - 150 / 200)
    assert fragmentation(layout((10, A, 0))) == 0.0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 50), st.sampled_from([F, R, A]), st.floats(0, 10)), min_size=1, max_size=12),
       st.integers(1, 200))
def test_window_is_optimal_against_brute_force(specs, need):
    ext = layout(*specs)
    got = find_window(ext, need, lambda e: e.gain)
    best = None
    for i in range(len(ext)):
        size, cost = 0, 0.0
        for j in range(i, len(ext)):
            if ext[j].state is A:
                break
            size += ext[j].size
            cost += ext[j].gain if ext[j].state is R else 0.0
            if size >= need:
                best = cost if best is None else min(best, cost)
                break
    if best is None:
        assert got is None
    else:
        assert got is not None and got.cost == pytest.approx(best, abs=1e-9)
        assert got.size >= need
        assert all(ext[k].state is R for k in got.evict)


def test_worked_example_of_docs_pool_md():
    ext = layout((2, A, 0), (2, R, 5.0), (1, F, 0), (3, R, 1.0), (2, R, 1.0))
    w = find_window(ext, 4, lambda e: e.gain)
    assert (w.offset, w.evict, w.cost, w.size) == (4, (3,), 1.0, 4)
