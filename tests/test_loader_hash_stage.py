"""The hashing stage: chunks read from the disk are hashed off the reader thread, which reads on at once."""

from __future__ import annotations

import threading

import pytest
import torch

from conftest import corrupt_copy, make_tensor, skip_if_no_odirect
from tangram.store import HashMismatchError, Loader, read_index, save
from tangram.store import io as store_io
from tangram.store import landing as store_landing
from tangram.store.format import ALIGNMENT

A = ALIGNMENT


@pytest.fixture
def ckpt(tmp_path):
    state = {f"w{i}": make_tensor((24 * A + 7 * i,), torch.uint8, seed=i) for i in range(4)}
    save(state, tmp_path / "c")
    skip_if_no_odirect("odirect", tmp_path / "c" / read_index(tmp_path / "c").files[0].name)
    return tmp_path / "c", state


def _hash_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("tangram-hash")]


@pytest.mark.parametrize("method", ["odirect", "auto"])
def test_the_reader_reads_the_next_chunk_while_the_previous_one_is_hashed(ckpt, monkeypatch, method):
    path, state = ckpt
    for p in path.glob("data-*.bin"):
        store_io.evict_from_page_cache(p)  # auto reads uncached chunks with O_DIRECT
    second_read = threading.Event()
    reads, hashed_on = [], []
    real_read, real_arrived = store_io.read_direct, store_landing.Landing.arrived

    def read_direct(fd, run, bounce, p, need=None, **kw):
        reads.append(run.offset)
        if len(reads) == 2:
            second_read.set()
        return real_read(fd, run, bounce, p, need, **kw)

    def arrived(self, piece, start, data, event=None):
        hashed_on.append(threading.current_thread().name)
        if len(hashed_on) == 1:  # hold the first chunk's hash until the reader has issued its next read
            assert second_read.wait(10), "the reader waited for the hash before reading on"
        return real_arrived(self, piece, start, data, event)

    monkeypatch.setattr(store_io, "read_direct", read_direct)
    monkeypatch.setattr(store_landing.Landing, "arrived", arrived)
    landed: list[str] = []
    dests = {n: torch.empty(t.nbytes, dtype=torch.uint8) for n, t in state.items()}
    Loader(method=method, threads=1, chunk_bytes=8 * A).load_into(path, dests, landed=landed.append)
    assert len(reads) > 2 and second_read.is_set()
    assert all(name.startswith("tangram-hash") for name in hashed_on)
    assert sorted(landed) == sorted(state)
    assert all(torch.equal(dests[n], t) for n, t in state.items())


def test_page_cache_chunks_are_hashed_on_the_reader(ckpt, monkeypatch):
    path, state = ckpt
    hashed_on = []
    real_arrived = store_landing.Landing.arrived

    def arrived(self, piece, start, data, event=None):
        hashed_on.append(threading.current_thread().name)
        return real_arrived(self, piece, start, data, event)

    monkeypatch.setattr(store_landing.Landing, "arrived", arrived)
    got = Loader(method="pread", threads=2, chunk_bytes=8 * A).load(path)
    assert all(torch.equal(got[n], t) for n, t in state.items())
    assert hashed_on and not any(name.startswith("tangram-hash") for name in hashed_on)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_mismatch_found_by_the_hashing_stage_fails_the_load_and_is_never_reported(ckpt, tmp_path, threads):
    path, state = ckpt
    bad = tmp_path / "bad"
    corrupt_copy(path, bad, "w2", 17 * A + 3)  # a later chunk of w2
    landed: list[str] = []
    dests = {n: torch.empty(t.nbytes, dtype=torch.uint8) for n, t in state.items()}
    with pytest.raises(HashMismatchError, match="'w2'"):
        Loader(method="odirect", threads=threads, chunk_bytes=8 * A).load_into(bad, dests, landed=landed.append)
    assert "w2" not in landed
    assert _hash_threads() == []  # the stage is shut down before the error comes out


def test_a_failing_read_behind_queued_hashes_raises_its_own_error(ckpt, monkeypatch):
    path, state = ckpt
    real_read = store_io.read_direct
    calls = []

    def read_direct(fd, run, bounce, p, need=None, **kw):
        calls.append(run.offset)
        if len(calls) == 3:
            raise OSError("disk went away")
        return real_read(fd, run, bounce, p, need, **kw)

    monkeypatch.setattr(store_io, "read_direct", read_direct)
    dests = {n: torch.empty(t.nbytes, dtype=torch.uint8) for n, t in state.items()}
    with pytest.raises(OSError, match="disk went away"):
        Loader(method="odirect", threads=2, chunk_bytes=8 * A).load_into(path, dests)
    assert _hash_threads() == []


def test_bounce_buffers_are_kept_across_loads(ckpt, monkeypatch):
    from tangram.store import execute as store_execute
    from tangram.store.stages import BouncePool

    path, state = ckpt
    monkeypatch.setattr(store_execute, "_BOUNCES", BouncePool())
    made = []
    real = store_io.host_buffer

    def host_buffer(nbytes, **kw):
        made.append(nbytes)
        return real(nbytes, **kw)

    monkeypatch.setattr(store_io, "host_buffer", host_buffer)
    loader = Loader(method="odirect", threads=2, chunk_bytes=8 * A)
    for _ in range(3):
        got = loader.load(path)
        assert all(torch.equal(got[n], t) for n, t in state.items())
    bounces = [n for n in made if n == 8 * A + A]
    assert 1 <= len(bounces) <= 2  # one per reader thread, on the first load only


def test_the_bounce_pool_keeps_at_most_its_limit_and_hands_out_big_enough_buffers():
    from tangram.store.stages import BouncePool

    pool = BouncePool(keep=2)
    bufs = [pool.take(n) for n in (A, 2 * A, 3 * A)]
    for b in bufs:
        pool.give(b)
    assert pool.take(2 * A).numel() >= 2 * A
    assert pool.take(2 * A).numel() >= 2 * A
    assert pool.take(A) is not None  # the pool was empty: a new one
