"""Threads kept across loads (store/workers.py) and the loader's use of them (execute.run_all, the hashing stage)."""

from __future__ import annotations

import gc
import multiprocessing
import threading
import time
import weakref

import pytest
import torch

from conftest import make_tensor
from tangram.store import Loader, save
from tangram.store.execute import run_all
from tangram.store.format import ALIGNMENT
from tangram.store.landing import Aborted
from tangram.store.workers import IDLE_NAME, KEPT, KeptThreads


def _until(cond, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def test_a_job_runs_under_its_name_and_the_thread_is_kept_for_the_next():
    kept = KeptThreads(keep=4, idle_s=30)
    first = kept.submit(lambda: (threading.current_thread().name, threading.get_ident()), "job-a")
    name, ident = first.result(5)
    assert name == "job-a"
    assert _until(lambda: kept.idle() == 1)
    second = kept.submit(lambda: (threading.current_thread().name, threading.get_ident()), "job-b")
    assert second.result(5) == ("job-b", ident)  # the same thread, under the new job's name
    assert _until(lambda: kept.idle() == 1)
    assert any(t.ident == ident and t.name == IDLE_NAME for t in threading.enumerate())


def test_an_idle_kept_thread_holds_nothing_of_the_jobs_it_ran():
    """Neither a new thread's first job nor a later one stays reachable from the idle thread: a load's closure
    refers to its destinations and host cache (a kept thread that held its first job pinned a 6 GB DRAM tier
    until it ended, and bench load ran out of memory)."""

    class Job:
        def __call__(self) -> int:
            return 1

    kept = KeptThreads(keep=2, idle_s=30)
    for _ in range(2):  # the first job of a new thread, then a job handed to the kept thread
        job = Job()
        gone = weakref.ref(job)
        assert kept.submit(job, "job").result(5) == 1
        assert _until(lambda: kept.idle() == 1)
        del job
        gc.collect()
        assert gone() is None


def test_an_error_reaches_the_future_and_the_thread_survives():
    kept = KeptThreads(keep=2, idle_s=30)

    def boom() -> None:
        raise ValueError("bad bytes")

    with pytest.raises(ValueError, match="bad bytes"):
        kept.submit(boom, "job").result(5)
    assert _until(lambda: kept.idle() == 1)
    assert kept.submit(lambda: 7, "job").result(5) == 7


def test_jobs_never_queue_behind_each_other():
    """Three jobs that each wait for the other two: they finish only if all three run at once, though one thread
    was idle (a reader may wait on bytes another reader of its load holds)."""
    kept = KeptThreads(keep=1, idle_s=30)
    kept.submit(lambda: None, "warm").result(5)
    assert _until(lambda: kept.idle() == 1)
    barrier = threading.Barrier(3, timeout=5)
    futures = [kept.submit(barrier.wait, f"job-{i}") for i in range(3)]
    assert sorted(f.result(10) for f in futures) == [0, 1, 2]
    assert _until(lambda: kept.idle() == 1)  # at most `keep` stay


def test_an_idle_thread_ends_after_its_idle_time():
    kept = KeptThreads(keep=4, idle_s=0.05)
    ident = kept.submit(threading.get_ident, "job").result(5)
    assert _until(lambda: kept.idle() == 0)
    assert _until(lambda: all(t.ident != ident for t in threading.enumerate()))
    assert kept.submit(lambda: 1, "job").result(5) == 1  # a new thread then


def _child_idle(out) -> None:
    out.put(KEPT.idle())
    out.put(KEPT.submit(lambda: 5, "child-job").result(5))


def test_a_forked_child_uses_none_of_the_parents_threads():
    KEPT.submit(lambda: None, "job").result(5)
    assert _until(lambda: KEPT.idle() >= 1)
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    p = ctx.Process(target=_child_idle, args=(out,))
    p.start()
    try:
        assert out.get(timeout=30) == 0 and out.get(timeout=30) == 5  # without the reset: a job for a dead thread
    finally:
        p.join(30)
    assert p.exitcode == 0


def test_run_all_starts_items_in_order_on_at_most_threads_threads():
    started, running, peak = [], [0], [0]
    lock = threading.Lock()

    def fn(i: int) -> None:
        with lock:
            started.append(i)
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.01)
        with lock:
            running[0] -= 1

    run_all(fn, list(range(12)), 3)
    assert sorted(started) == list(range(12)) and peak[0] <= 3
    assert started[:3] == sorted(started[:3]) and started.index(11) >= 9  # taken from the list in order


def test_run_all_stops_starting_items_after_an_error_and_prefers_it_to_aborted():
    started = []
    gate = threading.Event()

    def fn(i: int) -> None:
        started.append(i)
        if i == 0:
            gate.wait(5)
            raise Aborted()  # stopped because another failed
        if i == 1:
            try:
                raise OSError("read failed")
            finally:
                gate.set()
        time.sleep(0.01)

    with pytest.raises(OSError, match="read failed"):
        run_all(fn, list(range(50)), 2)
    assert len(started) < 50


def test_loads_reuse_the_kept_threads(tmp_path):
    state = {f"w{i}": make_tensor((24 * ALIGNMENT + 7 * i,), torch.uint8, seed=i) for i in range(6)}
    save(state, tmp_path / "c")
    loader = Loader(method="pread", threads=3, chunk_bytes=8 * ALIGNMENT)
    loader.load(tmp_path / "c")
    before = {t.ident for t in threading.enumerate()}
    for _ in range(5):
        got = loader.load(tmp_path / "c")
        assert all(torch.equal(got[n], t) for n, t in state.items())
    new = {t.ident for t in threading.enumerate()} - before
    assert not new  # five more loads started no thread
    assert not [t.name for t in threading.enumerate() if t.name.startswith("tangram-load")]
