"""Engine loops step on parked threads: a new instance's loop reuses the thread a stopped one used."""

from __future__ import annotations

import threading

from tangram.engine.steppers import Steppers


def test_a_finished_job_parks_its_thread_and_the_next_job_reuses_it():
    pool = Steppers()
    seen: list[int] = []
    pool.run(lambda: seen.append(threading.get_ident()), "a").wait(5)
    assert pool.idle() == 1
    pool.run(lambda: seen.append(threading.get_ident()), "b").wait(5)
    assert seen[0] == seen[1] and pool.idle() == 1


def test_busy_threads_are_not_shared_and_a_failing_job_still_parks():
    pool = Steppers()
    release, running = threading.Event(), threading.Event()
    names: list[str] = []

    def long_job() -> None:
        names.append(threading.current_thread().name)
        running.set()
        release.wait(5)

    first = pool.run(long_job, "engine-a")
    assert running.wait(5)
    second = pool.run(lambda: names.append(threading.current_thread().name), "engine-b")
    assert second.wait(5) and not first.is_set()  # the second job did not wait for the first's thread
    assert pool.idle() == 1 and names == ["engine-a", "engine-b"]
    release.set()
    assert first.wait(5) and pool.idle() == 2

    def boom() -> None:
        raise RuntimeError("step blew up")

    assert pool.run(boom, "engine-c").wait(5) and pool.idle() == 2
