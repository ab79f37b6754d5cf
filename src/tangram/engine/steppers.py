"""Threads that step engines, kept between instances: a new instance steps on a parked thread.

A thread that has run model forwards keeps its OpenMP team and its per-thread
caches; a pool-hit start on a fresh thread paid for building them in its first
forward (measured on SmolLM2: 38-48 ms on a new thread against 27-33 ms on one
that had run forwards before). Threads are daemons: a loop never keeps the
process alive.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable

from tangram.threads import use_compute_threads

log = logging.getLogger(__name__)


class _Stepper:
    """One parked daemon thread that runs the jobs it is given, one at a time."""

    def __init__(self, pool: Steppers, slot: int) -> None:
        self._pool, self._jobs, self.slot = pool, queue.SimpleQueue(), slot
        self.thread = threading.Thread(target=self._serve, name="engine", daemon=True)
        self.thread.start()

    def give(self, job: Callable[[], None], name: str, done: threading.Event) -> None:
        self._jobs.put((job, name, done))

    def _serve(self) -> None:
        use_compute_threads(self.slot)  # the threads that step models compute in parallel, bound to CPUs (threads.py)
        while True:
            job, name, done = self._jobs.get()
            threading.current_thread().name = name
            try:
                job()
            except BaseException:  # noqa: BLE001 - a job's failure must not kill the parked thread
                log.exception("%s ended with an error", name)
            finally:
                threading.current_thread().name = "engine (parked)"
                self._pool.park(self)
                done.set()


class Steppers:
    """Hands engine loops to parked threads, starting one only when none is idle. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[_Stepper] = []
        self._slots = itertools.count()

    def run(self, job: Callable[[], None], name: str) -> threading.Event:
        """Run `job` on a parked thread (or a new one); the event is set once it has returned."""
        done = threading.Event()
        with self._lock:
            stepper = self._idle.pop() if self._idle else None
        (stepper or _Stepper(self, next(self._slots))).give(job, name, done)
        return done

    def park(self, stepper: _Stepper) -> None:
        """Take a thread back whose job returned."""
        with self._lock:
            self._idle.append(stepper)

    def idle(self) -> int:
        """Parked threads."""
        with self._lock:
            return len(self._idle)


STEPPERS = Steppers()
