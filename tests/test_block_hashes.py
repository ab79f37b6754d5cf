"""Block hashes: tensors larger than a block record each block's hash, and loads verify the blocks in parallel."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from conftest import corrupt_copy, make_tensor, skip_if_no_odirect
from tangram.store import CorruptCheckpointError, HashMismatchError, Loader, read_index, save
from tangram.store import io as store_io
from tangram.store.format import ALIGNMENT, INDEX_FILE
from tangram.store.hashing import block_hashes, hash_bytes
from tangram.store.landing import Landing
from tangram.store.plan import Piece

A = ALIGNMENT
BLOCK = 4 * A


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


@pytest.fixture
def ckpt(tmp_path):
    """A tensor of 40 blocks and a bit (not a whole number of blocks), one of exactly two, small ones."""
    state = {"big": make_tensor((160 * A + 9,), torch.uint8, seed=1), "two": make_tensor((2 * BLOCK,), torch.uint8, 2),
             "small": make_tensor((300,), torch.float16, seed=3), "one": make_tensor((BLOCK,), torch.uint8, seed=4)}
    save(state, tmp_path / "c", block_bytes=BLOCK)
    return tmp_path / "c", state


def test_the_writer_records_each_blocks_hash_for_tensors_of_more_than_one_block(ckpt):
    path, state = ckpt
    index = read_index(path)
    assert index.block_bytes == BLOCK
    big = _raw(state["big"])
    assert index.tensors["big"].blocks == [hash_bytes(big[at : at + BLOCK]) for at in range(0, big.numel(), BLOCK)]
    assert len(index.tensors["big"].blocks) == 41 and len(index.tensors["two"].blocks) == 2
    assert index.tensors["small"].blocks == [] and index.tensors["one"].blocks == []  # one block: the hash does it
    assert index.tensors["big"].hash == hash_bytes(big)  # the identity is still the hash of all the bytes
    assert block_hashes(big, BLOCK) == index.tensors["big"].blocks


def test_a_block_size_that_is_not_a_multiple_of_the_alignment_is_refused(tmp_path):
    with pytest.raises(ValueError, match="block_bytes"):
        save({"x": torch.zeros(4)}, tmp_path / "c", block_bytes=A + 1)


@pytest.mark.parametrize("change", ["count", "block_bytes"])
def test_an_index_with_inconsistent_blocks_is_refused(ckpt, change):
    path, _ = ckpt
    doc = json.loads((path / INDEX_FILE).read_text())
    if change == "count":
        doc["tensors"]["big"]["blocks"] = doc["tensors"]["big"]["blocks"][:-1]
    else:
        doc["block_bytes"] = A + 7
    (path / INDEX_FILE).write_text(json.dumps(doc))
    with pytest.raises(CorruptCheckpointError, match="block"):
        read_index(path)


@pytest.mark.parametrize("method", ["pread", "odirect", "auto", "mmap"])
@pytest.mark.parametrize(("threads", "chunk"), [(1, 8 * A), (3, 8 * A), (3, 6 * A), (4, 16 * A)])
def test_loads_verified_by_blocks_deliver_every_byte_once(ckpt, method, threads, chunk):
    """Chunks of whole blocks (8 and 16 x 4 KiB) and chunks that cut blocks (6): either way every byte lands."""
    path, state = ckpt
    skip_if_no_odirect(method, next(path.glob("data-*.bin")))
    for p in path.glob("data-*.bin"):
        store_io.populate_page_cache(p)
    landed: list[str] = []
    dests = {n: torch.empty(t.numel() * t.element_size(), dtype=torch.uint8) for n, t in state.items()}
    Loader(method=method, threads=threads, chunk_bytes=chunk).load_into(path, dests, landed=landed.append)
    assert sorted(landed) == sorted(state)
    assert all(torch.equal(dests[n], _raw(t)) for n, t in state.items())


@pytest.mark.parametrize("method", ["pread", "odirect", "auto"])
@pytest.mark.parametrize("block", [0, 17, 40])
def test_a_corrupt_block_fails_the_load_naming_the_tensor_and_its_bytes(ckpt, tmp_path, method, block):
    path, state = ckpt
    bad = corrupt_copy(path, tmp_path / "bad", "big", block * BLOCK + 5)
    skip_if_no_odirect(method, bad)
    landed: list[str] = []
    dests = {n: torch.empty(t.numel() * t.element_size(), dtype=torch.uint8) for n, t in state.items()}
    span = f"bytes {block * BLOCK}..{min((block + 1) * BLOCK, state['big'].numel())}"
    with pytest.raises(HashMismatchError, match=f"'big': {span} hash"):
        Loader(method=method, threads=3, chunk_bytes=8 * A).load_into(tmp_path / "bad", dests, landed=landed.append)
    assert "big" not in landed


def test_an_index_written_before_block_hashes_is_verified_by_the_identity_hash(ckpt, tmp_path):
    path, state = ckpt
    bad = corrupt_copy(path, tmp_path / "old", "big", 30 * BLOCK)
    doc = json.loads((tmp_path / "old" / INDEX_FILE).read_text())
    for entry in doc["tensors"].values():
        del entry["blocks"]
    del doc["block_bytes"]
    (tmp_path / "old" / INDEX_FILE).write_text(json.dumps(doc))
    assert read_index(tmp_path / "old").tensors["big"].blocks == []
    with pytest.raises(HashMismatchError, match="'big': content hash"):
        Loader(method="pread", threads=2, chunk_bytes=8 * A).load(tmp_path / "old")
    assert bad.exists()
    got = Loader(method="pread", threads=2, chunk_bytes=8 * A).load(path)  # the intact one, verified by blocks
    assert torch.equal(_raw(got["big"]), _raw(state["big"]))


def _blocked(nblocks: int, bad: int | None = None) -> tuple[torch.Tensor, Piece, Landing]:
    buf = make_tensor((nblocks * BLOCK,), torch.uint8, seed=9)
    hashes = [hash_bytes(buf[k * BLOCK : (k + 1) * BLOCK]) for k in range(nblocks)]
    if bad is not None:
        hashes[bad] = "0" * 32
    piece = Piece("p", 0, 0, buf.numel(), buf, "f" * 32, tuple(hashes), BLOCK)  # the identity is not what is checked
    return buf, piece, Landing([piece], lambda f: f"file{f}")


def test_a_part_that_starts_a_block_never_waits_for_earlier_blocks():
    buf, piece, tracker = _blocked(3)
    assert tracker.ready(piece, 2 * BLOCK) and tracker.ready(piece, BLOCK) and not tracker.ready(piece, BLOCK + A)
    assert tracker.arrived(piece, 2 * BLOCK, buf[2 * BLOCK :]) is None  # no wait: block 0 is not even read
    assert tracker.arrived(piece, BLOCK, buf[BLOCK : 2 * BLOCK]) is None
    assert tracker.incomplete() == ["p"]
    assert tracker.arrived(piece, 0, buf[:BLOCK]) == []  # whole, every block matched


def test_a_part_continuing_a_block_waits_for_its_earlier_bytes():
    buf, piece, tracker = _blocked(2)
    got: list[object] = []
    later = threading.Thread(target=lambda: got.append(tracker.arrived(piece, BLOCK + A, buf[BLOCK + A :])))
    later.start()
    later.join(0.2)
    assert later.is_alive()  # waits for bytes BLOCK..BLOCK+A
    assert tracker.arrived(piece, 0, buf[: BLOCK + A]) is None  # one part over a block boundary: both spans fed
    later.join(10)
    assert not later.is_alive() and got == [[]]
    assert tracker.incomplete() == []


def test_a_feed_over_several_blocks_checks_each_as_it_completes():
    buf, piece, tracker = _blocked(3, bad=1)
    with pytest.raises(HashMismatchError, match=f"bytes {BLOCK}..{2 * BLOCK}"):
        tracker.arrived(piece, 0, buf)
    assert tracker.incomplete() == ["p"]  # never counted whole
