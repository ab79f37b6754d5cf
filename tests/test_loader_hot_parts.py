"""Buffered chunks that are verified are read and hashed in parts, each part hashed right after its copy."""

from __future__ import annotations

import threading

import pytest
import torch

from conftest import corrupt_copy, make_tensor
from tangram.store import HashMismatchError, Loader, read_index, save
from tangram.store import execute as store_execute
from tangram.store import io as store_io
from tangram.store import probe
from tangram.store import stages as store_stages
from tangram.store.format import ALIGNMENT
from tangram.store.hashing import hash_bytes
from tangram.store.landing import Aborted, Landing
from tangram.store.plan import Piece

A = ALIGNMENT


@pytest.fixture
def ckpt(tmp_path):
    """Large tensors spanning chunks and parts, small ones and padding between them."""
    state = {f"w{i}": make_tensor((19 * A + 5 * i,), torch.uint8, seed=i) for i in range(4)}
    state.update({f"b{i}": make_tensor((37 + 11 * i,), torch.float16, seed=10 + i) for i in range(5)})
    save(state, tmp_path / "c")
    for p in (tmp_path / "c").glob("data-*.bin"):
        store_io.populate_page_cache(p)  # auto reads cached chunks buffered
    return tmp_path / "c", state


@pytest.fixture
def parts(monkeypatch):
    """HOT_PART of one block; records the byte count of every buffered read (`sizes`) and the runs read in
    parts (`runs`)."""
    monkeypatch.setattr(store_execute, "HOT_PART", A)
    seen: dict[str, list[int]] = {"sizes": [], "runs": []}
    real_read, real_hashed = store_io.preadv_full, store_stages.read_hashed

    def spy(fd, views, offset, path, run):
        seen["sizes"].append(sum(len(v) for v in views))
        return real_read(fd, views, offset, path, run)

    def hashed(fd, run, path, tracker, part_bytes, done):
        seen["runs"].append(run.length)
        return real_hashed(fd, run, path, tracker, part_bytes, done)

    monkeypatch.setattr(store_io, "preadv_full", spy)
    monkeypatch.setattr(store_execute, "read_hashed", hashed)
    return seen


def _same_bytes(got: torch.Tensor, want: torch.Tensor) -> bool:
    return torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("method", ["pread", "auto"])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_parts_land_every_byte_verified(ckpt, parts, method, threads):
    path, state = ckpt
    landed: list[str] = []
    dests = {n: torch.empty(t.numel() * t.element_size(), dtype=torch.uint8) for n, t in state.items()}
    Loader(method=method, threads=threads, chunk_bytes=8 * A).load_into(path, dests, landed=landed.append)
    assert sorted(landed) == sorted(state)
    for n, t in state.items():
        assert _same_bytes(dests[n], t), n
    assert parts["runs"] and max(parts["sizes"]) <= A  # every chunk read in parts of at most HOT_PART bytes


def test_no_parts_without_verification(ckpt, parts):
    path, state = ckpt
    got = Loader(method="pread", threads=2, chunk_bytes=8 * A, verify=False).load(path)
    assert all(_same_bytes(got[n], t) for n, t in state.items())
    assert parts["runs"] == [] and max(parts["sizes"]) > A  # nothing to hash: one read per chunk


def test_a_mismatch_in_a_later_part_fails_the_load_and_is_never_reported(ckpt, parts, tmp_path):
    path, state = ckpt
    bad = tmp_path / "bad"
    data = corrupt_copy(path, bad, "w2", 13 * A + 5)  # inside w2's second chunk, a few parts in
    store_io.populate_page_cache(data)
    landed: list[str] = []
    dests = {n: torch.empty(t.numel() * t.element_size(), dtype=torch.uint8) for n, t in state.items()}
    with pytest.raises(HashMismatchError, match="'w2'"):
        Loader(method="pread", threads=2, chunk_bytes=8 * A).load_into(bad, dests, landed=landed.append)
    assert "w2" not in landed


def test_hold_waits_for_the_earlier_bytes_and_a_feed_passes_the_position_on():
    buf = make_tensor((3 * A,), torch.uint8, seed=3)
    piece = Piece("p", 0, 0, buf.numel(), buf, hash_bytes(buf))
    tracker = Landing([piece], lambda f: f"file{f}")
    assert tracker.ready(piece, 0) and not tracker.ready(piece, A)
    got: list[object] = []
    later = threading.Thread(target=lambda: got.append(tracker.hold(piece, A)))
    later.start()
    feed = tracker.hold(piece, 0)
    feed.update(buf[:A])
    assert tracker.release(piece, A) is None  # not whole yet
    later.join(10)
    assert not later.is_alive() and len(got) == 1 and got[0].at == A  # hashed up to A: the later part goes on
    assert tracker.ready(piece, A)
    got[0].update(buf[A:])
    assert tracker.release(piece, 2 * A) == []  # whole, digest matched: its (no) copy events


def test_hold_of_an_aborted_load_raises():
    buf = torch.zeros(2 * A, dtype=torch.uint8)
    piece = Piece("p", 0, 0, buf.numel(), buf, hash_bytes(buf))
    tracker = Landing([piece], lambda f: f"file{f}")
    tracker.abort()
    with pytest.raises(Aborted):
        tracker.hold(piece, A)
    unverified = Piece("q", 0, 0, 4, torch.zeros(4, dtype=torch.uint8))
    assert Landing([unverified], str).hold(unverified, 0) is None  # nothing to hash: no wait, no hasher


def test_probe_reads_are_verified_in_pieces(tmp_path):
    data = tmp_path / "data.bin"
    data.write_bytes(make_tensor((5 * A + 100,), torch.uint8, seed=7).numpy().tobytes())
    buf = store_io.host_buffer(5 * A)
    pieces = probe.probe_pieces(data, buf, piece_bytes=2 * A)
    raw = data.read_bytes()
    assert [(p.offset, p.nbytes) for p in pieces] == [(0, 2 * A), (2 * A, 2 * A), (4 * A, A)]
    assert all(p.hash == hash_bytes(raw[p.offset : p.offset + p.nbytes]) for p in pieces)
    cfg = store_execute.ReadConfig(store_io.ReadMethod.PREAD, 2, 2 * A)
    assert probe.read_gbps(data, buf, cfg, "warm", pieces) > 0
    wrong = [Piece(p.name, p.file, p.offset, p.nbytes, p.dest, "0" * 32) for p in pieces]
    with pytest.raises(HashMismatchError):  # the measured read does check the bytes
        probe.read_gbps(data, buf, cfg, "warm", wrong)


@pytest.mark.parametrize("threads", [2, 3])
def test_a_piece_split_over_chains_lands_whole(tmp_path, parts, threads):
    """A piece larger than a chain continues on other threads: a run that starts where another thread still
    holds the piece's hash is read whole first, then hashed in order; either way every byte is checked."""
    state = {"big": make_tensor((160 * A + 9,), torch.uint8, seed=1), "small": make_tensor((300,), torch.uint8)}
    save(state, tmp_path / "c")
    for p in (tmp_path / "c").glob("data-*.bin"):
        store_io.populate_page_cache(p)
    for _ in range(3):
        got = Loader(method="pread", threads=threads, chunk_bytes=8 * A).load(tmp_path / "c")
        assert all(_same_bytes(got[n], t) for n, t in state.items())
    assert parts["runs"]


@pytest.mark.parametrize("method", ["pread", "odirect", "auto"])
def test_a_piece_over_several_chains_is_reported_once_and_its_late_corruption_found(tmp_path, parts, method):
    state = {"big": make_tensor((200 * A + 3,), torch.uint8, seed=2), "tail": make_tensor((5 * A,), torch.uint8)}
    save(state, tmp_path / "c")
    if method == "odirect":
        from conftest import skip_if_no_odirect

        skip_if_no_odirect(method, next((tmp_path / "c").glob("data-*.bin")))
    for p in (tmp_path / "c").glob("data-*.bin"):
        store_io.populate_page_cache(p)
    landed: list[str] = []
    dests = {n: torch.empty(t.numel(), dtype=torch.uint8) for n, t in state.items()}
    Loader(method=method, threads=3, chunk_bytes=8 * A).load_into(tmp_path / "c", dests, landed=landed.append)
    assert sorted(landed) == ["big", "tail"]  # each once
    assert all(_same_bytes(dests[n], t) for n, t in state.items())
    index = read_index(tmp_path / "c")
    data = tmp_path / "c" / index.files[0].name
    raw = bytearray(data.read_bytes())
    raw[index.tensors["big"].offset + 190 * A] ^= 0x1  # in the last chain of `big`
    data.write_bytes(bytes(raw))
    landed.clear()
    with pytest.raises(HashMismatchError, match="'big'"):
        Loader(method=method, threads=3, chunk_bytes=8 * A).load_into(tmp_path / "c", dests, landed=landed.append)
    assert "big" not in landed
