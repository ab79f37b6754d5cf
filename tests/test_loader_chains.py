"""Read chains: a piece larger than a chunk is read by one thread in order, so its hash never waits."""

from __future__ import annotations

import threading

import pytest
import torch

from conftest import make_tensor
from tangram.store import Loader, save
from tangram.store import landing as store_landing
from tangram.store.errors import HashMismatchError
from tangram.store.execute import ReadConfig, _tasks
from tangram.store.format import ALIGNMENT
from tangram.store.io import ReadMethod
from tangram.store.plan import Piece, continues, plan_reads, task_chains

A = ALIGNMENT


def piece(name: str, offset: int, nbytes: int) -> Piece:
    return Piece(name, 0, offset, nbytes, torch.empty(nbytes, dtype=torch.uint8))


def test_piece_cuts_start_a_piece_that_does_not_fit_in_a_new_chunk():
    pieces = [piece("a", 0, 3 * A), piece("b", 3 * A, 2 * A), piece("c", 5 * A, A)]
    plain = plan_reads(pieces, chunk_bytes=4 * A)
    assert [r.length for r in plain] == [4 * A, 2 * A]  # b straddles two chunks
    cut = plan_reads(pieces, chunk_bytes=4 * A, piece_cuts=True)
    assert [(r.offset, r.length) for r in cut] == [(0, 3 * A), (3 * A, 3 * A)]  # b starts the second chunk whole
    assert not any(continues(r) for r in cut)


def test_piece_cuts_split_only_pieces_larger_than_a_chunk():
    pieces = [piece("small", 0, A), piece("big", A, 9 * A), piece("after", 10 * A, A)]
    runs = plan_reads(pieces, chunk_bytes=4 * A, piece_cuts=True)
    assert [(r.offset, r.length) for r in runs] == [(0, A), (A, 4 * A), (5 * A, 4 * A), (9 * A, 2 * A)]
    assert [continues(r) for r in runs] == [False, False, True, True]
    assert [[r.offset for r in c] for c in task_chains(runs)] == [[0], [A, 5 * A, 9 * A]]
    assert [[r.offset for r in c] for c in task_chains(runs, max_bytes=8 * A)] == [[0], [A, 5 * A], [9 * A]]


def test_tasks_keep_copies_alone_and_bound_chains():
    runs = plan_reads([piece("big", 0, 64 * A)], chunk_bytes=4 * A, piece_cuts=True)
    tasks = _tasks(runs, ReadConfig(ReadMethod.PREAD, 2, 4 * A))
    assert all(isinstance(t, list) for t in tasks)
    assert [len(t) for t in tasks] == [4, 4, 4, 4]  # a quarter of the bytes (1/(2 x threads)) per chain
    assert [r for t in tasks for r in t] == runs  # plan order kept


@pytest.mark.parametrize("method", ["pread", "auto"])
def test_multi_chunk_tensors_never_wait_for_another_thread(tmp_path, monkeypatch, method):
    state = {f"w{i}": make_tensor((40 * A + 123,), torch.uint8, seed=i) for i in range(6)}
    save(state, tmp_path / "c")
    waits = []

    class Spy(threading.Condition):
        def wait(self, timeout=None):  # noqa: D102 - a hash waiting for another thread's earlier part
            waits.append(1)
            return super().wait(timeout)

    real_init = store_landing.Landing.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self._cond = Spy()

    monkeypatch.setattr(store_landing.Landing, "__init__", init)
    got = Loader(method=method, threads=2, chunk_bytes=8 * A).load(tmp_path / "c")
    assert all(torch.equal(got[n], state[n]) for n in state)
    assert waits == []


def test_corrupt_later_chunk_of_a_chained_tensor_is_caught(tmp_path):
    state = {"big": make_tensor((40 * A,), torch.uint8, seed=3), "small": make_tensor((100,), torch.uint8, seed=4)}
    save(state, tmp_path / "c")
    data = next((tmp_path / "c").glob("data-*.bin"))
    raw = bytearray(data.read_bytes())
    raw[30 * A + 7] ^= 0xFF  # inside the 4th 8-block chunk of "big" (it is stored first)
    data.write_bytes(bytes(raw))
    with pytest.raises(HashMismatchError, match="big"):
        Loader(method="pread", threads=2, chunk_bytes=8 * A).load(tmp_path / "c")
