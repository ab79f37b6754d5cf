"""Bytes verified once are not hashed again while their file is unchanged; any change, or reverify, hashes again."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from conftest import READ_METHODS, assert_state_equal, make_tensor, skip_if_no_odirect
from tangram.store.errors import HashMismatchError
from tangram.pool import DevicePool
from tangram.store import Checkpoint, Loader, read_index, save
from tangram.store import landing
from tangram.store.format import TensorEntry
from tangram.store.verified import FileStamp, Range, VerifiedRanges, reverify_default

LATER = 10**10  # a clock 10 s ahead: files written by the test count as settled


def settled() -> VerifiedRanges:
    """A memory whose clock says the test's fresh files changed long ago."""
    return VerifiedRanges(clock_ns=lambda: time.time_ns() + LATER)


def stamp(**kw: int) -> FileStamp:
    base = dict(dev=1, ino=2, size=100, mtime_ns=5, ctime_ns=5)
    return FileStamp(**{**base, **kw})


# ------------------------------------------------------------------ the policy, with hand-made stamps


def test_a_recorded_range_is_known_for_the_same_stamp_only():
    memo = VerifiedRanges(clock_ns=lambda: 10**12)
    r = Range(0, 64, "h")
    assert memo.record(stamp(), stamp(), [r])
    assert memo.known(stamp(), r)
    assert not memo.known(stamp(), Range(0, 64, "other"))  # another digest: another claim
    assert not memo.known(stamp(), Range(64, 64, "h"))
    for changed in (dict(size=101), dict(mtime_ns=6), dict(ctime_ns=6), dict(ino=3), dict(dev=9)):
        assert not memo.known(stamp(**changed), r), changed


def test_nothing_is_recorded_when_the_file_changed_during_the_load_or_too_recently():
    now = 10**12
    memo = VerifiedRanges(settle_s=1.0, clock_ns=lambda: now)
    r = Range(0, 8, "h")
    assert not memo.record(stamp(), stamp(ctime_ns=6), [r])  # written while it was read
    assert not memo.record(stamp(ctime_ns=now - 10**8), stamp(ctime_ns=now - 10**8), [r])  # 0.1 s ago: same tick
    assert len(memo) == 0
    assert memo.record(stamp(ctime_ns=now - 2 * 10**9), stamp(ctime_ns=now - 2 * 10**9), [r])
    assert len(memo) == 1


def test_a_new_stamp_replaces_the_files_old_ranges_and_forget_drops_all():
    memo = VerifiedRanges(clock_ns=lambda: 10**12)
    memo.record(stamp(), stamp(), [Range(0, 8, "a"), Range(8, 8, "b")])
    memo.record(stamp(mtime_ns=7, ctime_ns=7), stamp(mtime_ns=7, ctime_ns=7), [Range(0, 8, "c")])
    assert len(memo) == 1  # the old version's ranges went with it
    assert not memo.known(stamp(), Range(0, 8, "a"))
    memo.forget()
    assert len(memo) == 0


def test_reverify_default_follows_the_environment(monkeypatch):
    monkeypatch.delenv("TANGRAM_REVERIFY", raising=False)
    assert reverify_default() is False and Loader().reverify is False
    monkeypatch.setenv("TANGRAM_REVERIFY", "1")
    assert reverify_default() is True and Loader().reverify is True


# ------------------------------------------------------------------ the loader


@pytest.fixture
def ckpt(tmp_path):
    state = {f"w{i}": make_tensor((3000 + 517 * i,), torch.float32, seed=i) for i in range(6)}
    path = tmp_path / "ckpt"
    save(state, path, max_shard_bytes=40 << 10)
    return path, state


@pytest.fixture
def hashed(monkeypatch):
    """Bytes streamed through the landing's hash feeds."""
    seen = [0]
    real = landing.Feed.update

    def spy(self, data):
        seen[0] += data.numel() if isinstance(data, torch.Tensor) else len(data)
        return real(self, data)

    monkeypatch.setattr(landing.Feed, "update", spy)
    return seen


@pytest.mark.parametrize("method", READ_METHODS)
def test_a_second_load_of_an_unchanged_file_hashes_nothing(ckpt, hashed, method):
    path, state = ckpt
    index = read_index(path)
    skip_if_no_odirect(method, path / index.files[0].name)  # a data file: a directory never reads
    loader = Loader(method=method, threads=2, chunk_bytes=16 << 10, verified=settled())
    total = index.total_bytes
    assert_state_equal(loader.load(path), state)
    assert hashed[0] == total and loader.last_stats.bytes_known == 0
    hashed[0] = 0
    assert_state_equal(loader.load(path), state)  # every byte still checked equal, by the test
    assert hashed[0] == 0
    assert loader.last_stats.bytes_known == loader.last_stats.bytes_from_disk == total


def _loaded_once(path: Path, name: str) -> tuple[Loader, TensorEntry, Path]:
    """A loader that verified `path` once, tensor `name`'s index entry and its data file."""
    loader = Loader(method="pread", verified=settled())
    loader.load(path)
    index = read_index(path)
    entry = index.tensors[name]
    return loader, entry, path / index.files[entry.file].name


def test_a_write_to_the_file_is_hashed_again_and_caught(ckpt, hashed):
    path, _ = ckpt
    loader, entry, data = _loaded_once(path, "w3")
    with open(data, "r+b") as f:  # in place: same inode, same size, a new ctime
        f.seek(entry.offset + 5)
        byte = f.read(1)
        f.seek(entry.offset + 5)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(HashMismatchError, match="w3"):
        loader.load(path)


def test_restoring_the_mtime_does_not_hide_a_write(ckpt, hashed):
    path, _ = ckpt
    loader, entry, data = _loaded_once(path, "w1")
    st = os.stat(data)
    raw = bytearray(data.read_bytes())
    raw[entry.offset] ^= 0x01
    data.write_bytes(bytes(raw))
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back; ctime cannot be
    with pytest.raises(HashMismatchError, match="w1"):
        loader.load(path)


class _TrustsEverything(VerifiedRanges):
    """A memory that claims every range verified: shows what reverify guards against."""

    def known(self, stamp: FileStamp, rng: Range) -> bool:
        return True


def test_reverify_hashes_what_the_memory_claims_known(ckpt, tmp_path):
    path, _ = ckpt
    index = read_index(path)
    entry = index.tensors["w2"]
    data = path / index.files[entry.file].name
    raw = bytearray(data.read_bytes())
    raw[entry.offset + 9] ^= 0x10
    data.write_bytes(bytes(raw))
    trusting = _TrustsEverything()
    unchecked = Loader(method="pread", verified=trusting).load(path)  # the memory skips the hash
    assert not torch.equal(unchecked["w2"], make_tensor((3000 + 517 * 2,), torch.float32, seed=2))
    with pytest.raises(HashMismatchError, match="w2"):
        Loader(method="pread", verified=trusting, reverify=True).load(path)


def test_a_file_written_just_now_is_hashed_on_every_load(ckpt, hashed):
    path, _ = ckpt
    loader = Loader(method="pread", verified=VerifiedRanges(settle_s=3600.0))
    loader.load(path)
    hashed[0] = 0
    loader.load(path)
    assert hashed[0] == read_index(path).total_bytes


def test_the_pool_trusts_only_ranges_a_load_verified(ckpt, hashed):
    path, state = ckpt
    loader = Loader(method="pread", verified=settled())
    index = read_index(path)
    partial = {n: torch.empty(index.tensors[n].nbytes, dtype=torch.uint8) for n in ("w0", "w1")}
    loader.load_into(path, partial)  # two tensors verified; the others never read
    hashed[0] = 0
    pool = DevicePool(1 << 20, "cpu", loader=loader)
    binding = pool.acquire(Checkpoint(path))
    assert hashed[0] == sum(index.tensors[n].nbytes for n in index.tensors if n not in ("w0", "w1"))
    assert_state_equal({n: binding.tensors[n] for n in state}, state)
    pool.release(binding)
