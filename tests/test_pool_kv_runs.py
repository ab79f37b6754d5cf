"""Elastic KV blocks placed in runs: exact accounting over many cycles, fallback, reclaim for weights,
back-pressure, and the ledger's gap index against a recomputation from its placements."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from conftest import make_tensor
from tangram.pool import DevicePool
from tangram.pool import kv_region as kvr
from tangram.pool.ledger import Ledger
from tangram.store import Loader, save

KB = 4096


def gaps_from_blocks(ledger: Ledger) -> list[tuple[int, int]]:
    """The free ranges recomputed from the used ones (what the gap index must always equal)."""
    out, pos = [], 0
    for b in ledger.blocks():
        assert b.offset >= pos, f"{b} overlaps the block before it"
        if b.offset > pos:
            out.append((pos, b.offset - pos))
        pos = b.offset + b.size
    assert pos <= ledger.capacity
    if pos < ledger.capacity:
        out.append((pos, ledger.capacity - pos))
    return out


def check_pool(pool: DevicePool, in_use: int) -> dict:
    """Ledger consistent, no overlap, and the snapshot counts exactly the blocks in use as KV."""
    ledger = pool.arena.ledger
    assert ledger.gaps() == gaps_from_blocks(ledger)
    assert ledger.used == sum(b.size for b in ledger.blocks())
    snap = pool.snapshot()  # reclaims idle blocks first
    assert snap["kv_bytes"] == in_use * KB
    assert sum(snap["totals"].values()) == pool.capacity
    assert snap["totals"]["free"] == pool.capacity - ledger.used
    return snap


def test_the_gap_index_equals_the_gaps_of_the_placements_under_random_place_and_free():
    rng = random.Random(7)
    for _ in range(40):
        ledger = Ledger(rng.randint(1, 2000) * 16, 16)
        live: list[int] = []
        for step in range(250):
            if live and rng.random() < 0.45:
                ledger.free(live.pop(rng.randrange(len(live))))
            else:
                size = ledger.size_of(rng.randint(1, 300))
                off = ledger.first_fit(size) if rng.random() < 0.7 else rng.randrange(ledger.capacity // 16) * 16
                if off is None:
                    continue
                try:
                    ledger.place(off, size, f"k{step}")  # a random offset may overlap: then it must be refused
                    live.append(off)
                except ValueError:
                    pass
            assert ledger.gaps() == gaps_from_blocks(ledger)
            first = ledger.first_fit(64)
            assert first == next((o for o, n in gaps_from_blocks(ledger) if n >= 64), None)


def test_an_overlapping_placement_is_refused():
    ledger = Ledger(16 * KB, KB)
    ledger.place(2 * KB, 2 * KB, "a")
    for off, size in ((KB, 2 * KB), (3 * KB, KB), (2 * KB, KB), (3 * KB, 4 * KB)):
        with pytest.raises(ValueError, match="overlaps"):
            ledger.place(off, size, "b")
    ledger.place(4 * KB, KB, "c")  # right after: fine
    assert ledger.gaps() == [(0, 2 * KB), (5 * KB, 11 * KB)]


def test_many_allocate_free_cycles_keep_the_accounting_exact():
    pool = DevicePool(512 * KB)
    regions = [pool.kv_region(KB, torch.uint8) for _ in range(3)]
    rng = random.Random(3)
    held: list[tuple[int, list[int]]] = []
    for step in range(600):
        if held and rng.random() < 0.45:
            i, blocks = held.pop(rng.randrange(len(held)))
            regions[i].free(blocks)
        else:
            i = rng.randrange(3)
            got = regions[i].allocate(rng.randint(1, 9))
            if got is not None:
                held.append((i, got))
        if step % 50 == 0:
            check_pool(pool, sum(len(b) for _, b in held))  # also reclaims: the regions regrow their runs
        handed = [o for _, bl in held for o in bl]  # one arena, one view: offsets of all regions compare
        assert len(set(handed)) == len(handed), "a block was handed out twice"
    offsets = sorted(o for _, bl in held for o in bl)  # one view, one dtype: offsets are comparable
    assert all(b - a >= KB for a, b in zip(offsets, offsets[1:])), "two blocks in use overlap"
    check_pool(pool, len(offsets))
    for i, blocks in held:
        regions[i].free(blocks)
    for r in regions:
        r.close()
    snap = check_pool(pool, 0)
    assert snap["totals"]["free"] == pool.capacity and not pool.arena.blocks()


def test_one_block_at_a_time_is_placed_in_growing_runs_of_adjacent_blocks(monkeypatch):
    pool = DevicePool(1024 * KB)
    searches = []
    first_fit = pool.arena.first_fit
    monkeypatch.setattr(pool.arena, "first_fit", lambda size: searches.append(size) or first_fit(size))
    region = pool.kv_region(KB, torch.uint8)
    blocks = [region.allocate(1)[0] for _ in range(200)]
    assert blocks == [i * KB for i in range(200)]  # adjacent, lowest first, as one by one placed them
    assert len(searches) < 12  # runs of 1, 2, 4, ... 64 blocks: a handful of searches, not 200
    assert max(searches) <= kvr.RUN_CAP_BLOCKS * KB
    assert len(pool.arena.blocks()) >= 200  # still one placement per block
    check_pool(pool, 200)
    region.free(blocks[50:60])  # freed blocks go back one by one
    check_pool(pool, 190)


def test_a_run_that_does_not_fit_falls_back_to_single_gaps():
    pool = DevicePool(16 * KB)
    a = pool.kv_region(KB, torch.uint8)
    blocks = [a.allocate(1)[0] for _ in range(16)]
    assert a.allocate(1) is None  # the pool is all KV in use
    a.free(blocks[::2])
    check_pool(pool, 8)  # reclaimed: eight gaps of one block, none holds two adjacent blocks
    b = pool.kv_region(KB, torch.uint8)
    got = b.allocate(3)
    assert got is not None and sorted(got) == blocks[0:6:2]  # three single gaps, not one run
    assert pool.arena.first_fit(2 * KB) is None
    check_pool(pool, 11)


def test_surplus_blocks_of_a_run_are_free_bytes_for_weights(tmp_path):
    save({"w": make_tensor((8 * KB // 4,), torch.float32, seed=1)}, tmp_path / "m")  # 8 pages
    seen = []
    pool = DevicePool(40 * KB, loader=Loader(method="pread"), on_evict=seen.append)
    region = pool.kv_region(KB, torch.uint8)
    held = [region.allocate(1)[0] for _ in range(32)]
    free, idle = pool.capacity - pool.arena.ledger.used, pool.arena.ledger.used - 32 * KB
    assert free < 8 * KB <= free + idle  # the model fits only in the surplus of the region's runs too
    b = pool.acquire(tmp_path / "m")  # the region's idle blocks are handed back: nothing is evicted, no error
    assert b.bytes_loaded == 8 * KB and not seen
    check_pool(pool, 32)
    assert region.allocate(1) is None  # every byte is in use: back-pressure
    pool.release(b)
    region.free(held)


def test_a_short_pool_gives_little_more_than_asked_and_back_pressure_returns_none():
    pool = DevicePool(64 * KB)
    region = pool.kv_region(KB, torch.uint8)
    first = [region.allocate(1)[0] for _ in range(40)]  # runs grew to 16 and more
    other = pool.kv_region(KB, torch.uint8)
    assert other.allocate(1) is not None
    rest = []
    while (g := other.allocate(1)) is not None:  # another region's idle blocks are reclaimed for it
        rest += g
    assert len(first) + 1 + len(rest) == 64  # every byte of the pool went to blocks in use
    assert region.allocate(1) is None
    check_pool(pool, 64)
    region.free(first[:3])
    assert other.allocate(3) is not None and other.allocate(1) is None
    check_pool(pool, 64)


def test_the_pool_is_short_when_a_run_would_take_much_of_its_free_bytes():
    pool = DevicePool(128 * KB)
    region = pool.kv_region(KB, torch.uint8)
    for _ in range(31):  # runs of 1, 2, 4, 8, 16 blocks: no surplus left
        region.allocate(1)
    assert pool.arena.ledger.used == 31 * KB
    region.allocate(1)  # a run of 32 would take a third of the 97 free blocks: the pool is short
    assert pool.arena.ledger.used == (32 + kvr.SLACK_BLOCKS) * KB  # asked + slack, not a run of 32
    check_pool(pool, 32)


def test_concurrent_allocate_and_free_keep_the_accounting_exact():
    pool = DevicePool(256 * KB)
    regions = [pool.kv_region(KB, torch.uint8) for _ in range(4)]
    errors: list[BaseException] = []

    def work(region, seed: int) -> None:
        rng = random.Random(seed)
        held: list[list[int]] = []
        try:
            for _ in range(400):
                if held and rng.random() < 0.5:
                    region.free(held.pop(rng.randrange(len(held))))
                elif (got := region.allocate(rng.randint(1, 4))) is not None:
                    held.append(got)
                if rng.random() < 0.05:
                    pool.totals()  # reclaims every region's idle blocks meanwhile
            for blocks in held:
                region.free(blocks)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(r, i)) for i, r in enumerate(regions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    check_pool(pool, 0)
    for r in regions:
        r.close()
    assert not pool.arena.blocks()


def test_reserve_mode_still_takes_one_placement():
    pool = DevicePool(64 * KB)
    region = pool.kv_region(KB, torch.uint8, reserve_blocks=8)
    assert len(pool.arena.blocks()) == 1 and region.reserved_bytes == 8 * KB
    got = region.allocate(8)
    assert got is not None and region.allocate(1) is None
    region.free(got)
    region.close()
    assert not pool.arena.blocks()
