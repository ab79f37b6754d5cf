"""The pool map: extents merged per model and state (pure, on 100,000 tensors' worth of extents), the pool's map
against its snapshot, and the eviction hook (what was evicted, how many bytes, for whom)."""

from __future__ import annotations

import torch

from conftest import make_tensor
from tangram.pool import DevicePool, Eviction
from tangram.pool.policy import Extent, State
from tangram.pool.poolmap import merge_extents
from tangram.store import Loader, save

KB = 4096


def many_extents(n: int = 100_000) -> tuple[list[Extent], dict[str, set[str]]]:
    """`n` one-page extents: runs of tensors of models a, b and the shared (c, d), a KV run, free gaps."""
    extents, models, off = [], {}, 0
    plan = [(State.ACTIVE, ("a",), 30_000), (State.ACTIVE, ("b",), 10_000), (State.FREE, (), 1),
            (State.RETAINED, ("b",), 20_000), (State.RETAINED, ("c", "d"), 25_000), (State.ACTIVE, None, 5_000),
            (State.FREE, (), 1), (State.RETAINED, ("a",), 9_998)]
    assert sum(k for *_, k in plan) == n
    for i, (state, names, count) in enumerate(plan):
        if state is State.FREE:  # a gap is one maximal extent, as the arena reports it
            extents.append(Extent(off, 3 * KB, State.FREE))
            off += 3 * KB
            continue
        for j in range(count):
            key = None if names is None else f"t{i}.{j}"
            extents.append(Extent(off, KB, state, key, 0.001 if state is State.RETAINED else 0.0))
            if key is not None:
                models[key] = set(names)
            off += KB
    return extents, models


def test_a_hundred_thousand_tensors_merge_into_one_segment_per_run():
    extents, models = many_extents()
    m = merge_extents(extents, models.__getitem__, capacity=extents[-1].end)
    assert [(s.state, s.models) for s in m.segments] == [
        ("active", ("a",)), ("active", ("b",)), ("free", ()), ("retained", ("b",)), ("retained", ("c", "d")),
        ("kv", ()), ("free", ()), ("retained", ("a",))]
    assert [s.tensors for s in m.segments] == [30_000, 10_000, 0, 20_000, 25_000, 5_000, 0, 9_998]
    for state in State:  # totals are the sums of the input, by state
        assert m.totals[state.value] == sum(e.size for e in extents if e.state is state)
    assert m.kv_bytes == 5_000 * KB and m.tensors == 30_000 + 10_000 + 20_000 + 25_000 + 9_998
    assert sum(s.size for s in m.segments) == m.capacity == sum(e.size for e in extents)
    assert m.largest_free == 3 * KB and abs(m.fragmentation - 0.5) < 1e-12
    assert abs(m.segments[4].gain - 25_000 * 0.001) < 1e-6 and m.segments[0].gain == 0.0


def test_interleaved_models_and_a_gap_do_not_merge():
    ext = [Extent(0, KB, State.RETAINED, "x", 1.0), Extent(KB, KB, State.RETAINED, "y", 2.0),
           Extent(2 * KB, KB, State.RETAINED, "x2", 3.0), Extent(3 * KB, KB, State.ACTIVE, "x3"),
           Extent(5 * KB, KB, State.ACTIVE, "x4")]  # not adjacent to x3: a hole the caller left out
    m = merge_extents(ext, {"x": {"a"}, "y": {"b"}, "x2": {"a"}, "x3": {"a"}, "x4": {"a"}}.__getitem__,
                      capacity=6 * KB)
    assert [(s.offset, s.state, s.models) for s in m.segments] == [
        (0, "retained", ("a",)), (KB, "retained", ("b",)), (2 * KB, "retained", ("a",)), (3 * KB, "active", ("a",)),
        (5 * KB, "active", ("a",))]


def models_on_disk(tmp_path):
    for seed, name in ((1, "m1"), (2, "m2")):
        save({f"layer{i}.weight": make_tensor((4096,), torch.float32, seed=seed * 100 + i) for i in range(4)},
             tmp_path / name)
    return tmp_path / "m1", tmp_path / "m2"


def test_the_pool_map_equals_the_snapshot_and_an_eviction_names_whose_bytes_went_for_whom(tmp_path):
    m1, m2 = models_on_disk(tmp_path)
    seen: list[Eviction] = []
    pool = DevicePool(6 * 16384, loader=Loader(method="pread"), on_evict=seen.append)  # room for 1.5 models
    b1 = pool.acquire(m1, model="one")
    region = pool.kv_region(KB, torch.uint8)
    kv = region.allocate(1)
    snap, arena = pool.snapshot(), pool.pool_map()
    assert arena.totals == snap["totals"] and arena.kv_bytes == snap["kv_bytes"] == KB
    assert arena.largest_free == snap["largest_free"] and arena.fragmentation == snap["fragmentation"]
    assert arena.tensors == len(snap["tensors"]) == 4
    assert [(s.state, s.models, s.tensors) for s in arena.segments] == [
        ("active", ("one",), 4), ("kv", (), 1), ("free", (), 0)]
    region.free(kv)
    pool.release(b1)
    assert not seen
    b2 = pool.acquire(m2, model="two")  # needs one's retained bytes
    assert len(seen) == 1
    ev = seen[0]
    assert ev.for_model == "two" and ev.victims == {"one": ev.bytes} and ev.bytes >= 2 * 16384 and ev.tensors >= 2
    arena = pool.pool_map()
    assert arena.totals == pool.snapshot()["totals"]
    assert {s.models for s in arena.segments if s.state == "active"} == {("two",)}
    pool.release(b2)
    assert pool.kv_region(6 * 16384 - 4096, torch.uint8).allocate(1)  # needs retained bytes: evicted for no model
    assert seen[-1].for_model is None and seen[-1].bytes > 0
