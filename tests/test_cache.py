"""The host DRAM cache tier: byte-bounded LRU, content addressed, never serves wrong bytes."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import assert_state_equal, make_tensor
from tangram.store import Checkpoint, HashMismatchError, HostCache, Loader, read_index, save
from tangram.store.hashing import hash_bytes


def key_of(t: torch.Tensor) -> str:
    return hash_bytes(t.contiguous().reshape(-1).view(torch.uint8))


def blob(n: int, seed: int) -> torch.Tensor:
    return make_tensor((n,), torch.uint8, seed=seed)


def full_dests(index):
    return {n: torch.empty(e.nbytes, dtype=torch.uint8) for n, e in index.tensors.items()}


def test_capacity_and_lru_eviction_by_bytes():
    cache = HostCache(1000, pin=False)
    a, b, c = blob(400, 1), blob(400, 2), blob(400, 3)
    assert cache.put("a", a) and cache.put("b", b)
    assert cache.used_bytes == 800 and len(cache) == 2
    assert torch.equal(cache.get("a"), a)  # a is now the most recently used
    assert cache.put("c", c)
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.used_bytes == 800 and cache.evictions == 1
    small = blob(150, 4)
    assert cache.put("d", small)  # 950 bytes: fits without eviction
    assert cache.evictions == 1 and cache.used_bytes == 950
    assert cache.put("e", blob(300, 5))  # evicts the least recently used entry (a) and no more
    assert "a" not in cache and all(k in cache for k in "cde")
    assert cache.used_bytes == 850 and cache.evictions == 2
    cache.get("c")
    assert cache.put("f", blob(500, 6))  # d and e must go; c was just used and stays
    assert "d" not in cache and "e" not in cache and "c" in cache and "f" in cache
    assert cache.used_bytes == 900 and cache.evictions == 4
    assert cache.used_bytes <= cache.capacity_bytes


def test_entry_larger_than_capacity_refused():
    cache = HostCache(1000, pin=False)
    cache.put("a", blob(600, 1))
    assert cache.put("huge", blob(1001, 2)) is False
    assert "huge" not in cache and "a" in cache  # refused without evicting anything
    assert cache.used_bytes == 600 and cache.evictions == 0
    assert cache.put("exact", blob(1000, 3)) is True  # the capacity itself fits (evicting a)
    assert "exact" in cache and len(cache) == 1 and cache.used_bytes == 1000
    with pytest.raises(ValueError):
        HostCache(-1)


def test_put_copies_and_get_counts():
    cache = HostCache(1 << 20, pin=False)
    t = make_tensor((10, 10), torch.float32, seed=1)
    want = t.clone()
    cache.put("k", t)
    t.zero_()  # the cache holds its own copy
    got = cache.get("k")
    assert got.dtype == torch.uint8 and got.dim() == 1 and got.numel() == 400
    assert torch.equal(got, want.view(torch.uint8).reshape(-1))
    assert cache.get("missing") is None
    assert (cache.hits, cache.misses) == (1, 1)
    cache.discard("k")
    assert "k" not in cache and cache.used_bytes == 0
    cache.put("k2", blob(10, 1))
    cache.clear()
    assert len(cache) == 0 and cache.used_bytes == 0


def test_fill_verifies_hashes_before_serving():
    cache = HostCache(1 << 20, pin=False)
    good, bad = blob(5000, 1), blob(5000, 2)
    cache.fill([(key_of(good), good), (key_of(good) + "0", bad), ("not-its-hash", good.clone())])
    cache.wait_idle()
    assert key_of(good) in cache
    assert len(cache) == 1 and cache.used_bytes == 5000


def test_fill_copies_before_returning_so_a_reused_source_cannot_spoil_it():
    cache = HostCache(1 << 20, pin=False)
    t = blob(8192, 7)
    key, want = key_of(t), t.clone()
    gate = threading.Event()
    cache._filler.submit(gate.wait, 30)  # hold the background checker (a single thread) busy
    try:
        cache.fill([(key, t)])
        assert cache.get(key) is None  # not served before its hash is checked
        t[100] ^= 0xFF  # the pool reuses the destination right after the load
    finally:
        gate.set()
    cache.wait_idle()
    assert torch.equal(cache.get(key), want) and cache.used_bytes == 8192


def test_fill_behind_copies_later_and_leaves_out_a_source_changed_before_its_copy():
    cache = HostCache(1 << 20, pin=False)
    kept, reused = blob(8192, 8), blob(8192, 9)
    kept_key, reused_key, want = key_of(kept), key_of(reused), kept.clone()
    gate = threading.Event()
    cache._filler.submit(gate.wait, 30)  # hold the background thread: nothing is copied yet
    try:
        cache.fill_behind([(kept_key, kept), (reused_key, reused)])
        assert cache.get(kept_key) is None and cache.used_bytes == 0  # the caller did not wait for a copy
        reused[100] ^= 0xFF  # the pool reuses these bytes before the copy runs
    finally:
        gate.set()
    cache.wait_idle()
    assert torch.equal(cache.get(kept_key), want)
    assert reused_key not in cache and cache.used_bytes == 8192  # never served: its copy did not match


def test_a_load_does_not_wait_for_the_host_cache(tmp_path):
    save({"a": blob(5000, 1), "b": blob(7000, 2)}, tmp_path / "c")
    cache = HostCache(1 << 20, pin=False)
    gate = threading.Event()
    cache._filler.submit(gate.wait, 30)
    try:
        loaded = Loader(method="pread", cache=cache).load(tmp_path / "c")  # returns with the cache thread held
        assert len(cache) == 0 and torch.equal(loaded["a"], blob(5000, 1))
    finally:
        gate.set()
    cache.wait_idle()
    assert len(cache) == 2


def test_zero_capacity_caches_nothing(tmp_path):
    save({"a": blob(100, 1)}, tmp_path / "c")
    cache = HostCache(0, pin=False)
    loader = Loader(method="pread", cache=cache)
    loader.load(tmp_path / "c")
    cache.wait_idle()
    assert len(cache) == 0


@pytest.fixture
def two_ckpts(tmp_path):
    shared = make_tensor((3000,), torch.float32, seed=99)
    s1 = {f"a{i}": make_tensor((1000 + 100 * i,), torch.float32, seed=i) for i in range(5)} | {"shared": shared}
    s2 = {f"b{i}": make_tensor((1000 + 100 * i,), torch.float32, seed=50 + i) for i in range(5)} | {"common": shared}
    save(s1, tmp_path / "c1", max_shard_bytes=16 << 10)
    save(s2, tmp_path / "c2", max_shard_bytes=16 << 10)
    return (tmp_path / "c1", s1), (tmp_path / "c2", s2)


@pytest.mark.parametrize("method", ["pread", "mmap"])
def test_second_load_comes_from_cache(two_ckpts, method):
    (p1, s1), _ = two_ckpts
    index = read_index(p1)
    cache = HostCache(1 << 20, pin=False)
    loader = Loader(method=method, cache=cache, chunk_bytes=8192)
    d1 = full_dests(index)
    first = loader.load_into(p1, d1)
    assert first.bytes_from_disk == index.total_bytes and first.bytes_from_cache == 0
    assert cache.misses == len(index.tensors) and cache.hits == 0
    cache.wait_idle()
    assert len(cache) == len(index.tensors) and cache.used_bytes == index.total_bytes
    d2 = full_dests(index)
    second = loader.load_into(p1, d2)
    assert second.bytes_from_cache == index.total_bytes
    assert second.bytes_from_disk == 0 and second.reads == 0 and second.bytes_padding == 0
    assert cache.hits == len(index.tensors)
    for n in index.tensors:
        assert torch.equal(d2[n], s1[n].view(torch.uint8).reshape(-1)), n
    # the typed API too
    assert_state_equal(loader.load(p1), s1)


def test_partial_cache_hits(two_ckpts):
    (p1, s1), _ = two_ckpts
    cache = HostCache(1 << 20, pin=False)
    loader = Loader(method="pread", cache=cache)
    loader.load(p1, names=["a1", "a3"])
    cache.wait_idle()
    index = read_index(p1)
    dests = full_dests(index)
    stats = loader.load_into(p1, dests)
    assert stats.bytes_from_cache == index.tensors["a1"].nbytes + index.tensors["a3"].nbytes
    assert stats.bytes_from_disk == index.total_bytes - stats.bytes_from_cache
    for n in index.tensors:
        assert torch.equal(dests[n], s1[n].view(torch.uint8).reshape(-1)), n


def test_eviction_when_second_checkpoint_does_not_fit(two_ckpts):
    (p1, s1), (p2, s2) = two_ckpts
    i1, i2 = read_index(p1), read_index(p2)
    cache = HostCache(i1.total_bytes + 1000, pin=False)
    loader = Loader(method="pread", cache=cache)
    assert_state_equal(loader.load(p1), s1)
    cache.wait_idle()
    assert len(cache) == len(i1.tensors)
    assert_state_equal(loader.load(p2), s2)
    cache.wait_idle()
    assert cache.evictions > 0
    assert cache.used_bytes <= cache.capacity_bytes
    for n, e in i2.tensors.items():  # the most recent checkpoint is the one cached
        assert e.hash in cache, n
    again = loader.load_into(p1, full_dests(i1))
    assert again.bytes_from_disk > 0
    assert again.bytes_from_disk + again.bytes_from_cache == i1.total_bytes
    cache.wait_idle()
    assert_state_equal(loader.load(p1), s1)


def test_content_addressed_sharing(two_ckpts):
    (p1, s1), (p2, s2) = two_ckpts
    i1, i2 = read_index(p1), read_index(p2)
    assert i1.tensors["shared"].hash == i2.tensors["common"].hash
    cache = HostCache(1 << 20, pin=False)
    loader = Loader(method="pread", cache=cache)
    loader.load(p1)
    cache.wait_idle()
    stats = loader.load_into(p2, full_dests(i2))
    assert stats.bytes_from_cache == i2.tensors["common"].nbytes  # served from c1's entry
    cache.wait_idle()
    distinct = {e.hash: e.nbytes for e in [*i1.tensors.values(), *i2.tensors.values()]}
    assert len(distinct) == len(i1.tensors) + len(i2.tensors) - 1
    assert len(cache) == len(distinct) and cache.used_bytes == sum(distinct.values())


def test_corrupt_disk_bytes_never_enter_the_cache(two_ckpts):
    (p1, s1), _ = two_ckpts
    index = read_index(p1)
    e = index.tensors["a2"]
    data = p1 / index.files[e.file].name
    with open(data, "r+b") as fh:
        fh.seek(e.offset + 10)
        b = fh.read(1)[0]
        fh.seek(e.offset + 10)
        fh.write(bytes([b ^ 1]))
    cache = HostCache(1 << 20, pin=False)
    with pytest.raises(HashMismatchError, match="'a2'"):  # by default the loader checks while reading
        Loader(method="pread", cache=cache).load(p1)
    assert cache.pending_fills() == 0 and len(cache) == 0  # a failed load caches nothing
    Loader(method="pread", cache=cache, verify=False).load(p1)  # unchecked: the flipped byte is loaded...
    cache.wait_idle()
    assert e.hash not in cache  # ...but the cache re-hashes and refuses it
    assert len(cache) == len(index.tensors) - 1


def test_cache_hit_with_bad_destination(two_ckpts):
    (p1, _), _ = two_ckpts
    cache = HostCache(1 << 20, pin=False)
    loader = Loader(method="pread", cache=cache)
    loader.load(p1)
    cache.wait_idle()
    n = read_index(p1).tensors["a0"].nbytes
    with pytest.raises(ValueError, match="'a0'"):
        loader.load_into(p1, {"a0": torch.empty(n + 4, dtype=torch.uint8)})


def test_concurrent_loads_through_one_cache(two_ckpts):
    (p1, s1), (p2, s2) = two_ckpts
    cache = HostCache(1 << 20, pin=False)
    loader = Loader(method="pread", cache=cache, chunk_bytes=4096, threads=2)
    ckpts = [(Checkpoint(p1), s1), (Checkpoint(p2), s2)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: (i % 2, loader.load(ckpts[i % 2][0])), range(16)))
    for k, got in results:
        assert_state_equal(got, ckpts[k][1])
    cache.wait_idle()
    assert cache.hits + cache.misses == 16 * 6
    assert len(cache) == 11
