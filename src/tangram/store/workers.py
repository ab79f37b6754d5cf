"""Threads kept across loads: a load's reader and hashing threads are taken from here, not started and joined
per load.

A small load (a rank-16 adapter: 17.6 MB in 336 tensors, about 30 ms) started
and joined up to eight threads (four readers, four hashing threads); on the
2-core VM a thread's start and join cost 0.25-1 ms each, more while the load's
other threads hold the GIL. `KeptThreads.submit` never queues a job behind
another: it gets an idle kept thread at once or a new one, so the jobs of one
load run at the same time, as they did on their own threads (a reader may wait
for bytes another reader of the same load holds).
"""

from __future__ import annotations

import os
import queue
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

IDLE_NAME = "tangram-idle"  # a kept thread's name between jobs (a job runs under the name it was given)
KEEP = 16  # idle threads kept at most
IDLE_S = 30.0  # an idle thread ends after this long without a job

_Job = tuple[Callable[[], Any], Future, str]


class KeptThreads:
    """Runs each job on its own thread at once, reusing idle threads (at most `keep`, each for `idle_s`)."""

    def __init__(self, keep: int = KEEP, idle_s: float = IDLE_S) -> None:
        self.keep, self.idle_s = keep, idle_s
        self._lock = threading.Lock()
        self._idle: list[queue.SimpleQueue[_Job]] = []  # the job slot of each idle thread, last idle last
        _ALL.add(self)

    def submit(self, fn: Callable[[], Any], name: str) -> Future:
        """Run `fn()` now on a thread named `name` while it runs; its future."""
        future: Future = Future()
        job = (fn, future, name)
        with self._lock:
            slot = self._idle.pop() if self._idle else None
        if slot is None:  # a new thread: its first job goes through its slot too, never through Thread's args,
            slot = queue.SimpleQueue()  # which keep it (and all it refers to) alive as long as the thread runs
            threading.Thread(target=self._loop, args=(slot,), name=name, daemon=True).start()
        slot.put(job)
        return future

    def idle(self) -> int:
        """Idle threads kept now."""
        with self._lock:
            return len(self._idle)

    def _loop(self, slot: queue.SimpleQueue[_Job]) -> None:
        me = threading.current_thread()
        job: _Job | None = slot.get()
        while job is not None:
            fn, future, name = job
            me.name = name
            ran, result, error = future.set_running_or_notify_cancel(), None, None
            if ran:
                try:
                    result = fn()
                except BaseException as exc:  # the future carries it to whoever waits
                    error = exc
            me.name = IDLE_NAME
            with self._lock:  # idle before the waiter wakes: a load right after this one finds the thread
                kept = len(self._idle) < self.keep
                if kept:
                    self._idle.append(slot)
            if ran:
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(result)
            job = fn = future = result = error = None  # an idle thread holds nothing of its last job
            if not kept:
                return
            try:
                job = slot.get(timeout=self.idle_s)
            except queue.Empty:
                with self._lock:
                    if slot in self._idle:
                        self._idle.remove(slot)
                        return
                job = slot.get()  # taken from the idle list just as it timed out: its job is on the way

    def _forget(self) -> None:
        """In a forked child: the parent's threads are not there, so none is idle."""
        self._lock = threading.Lock()
        self._idle = []


def _forget_all() -> None:
    for kept in list(_ALL):
        kept._forget()


_ALL: weakref.WeakSet[KeptThreads] = weakref.WeakSet()  # one fork handler for every instance, none kept alive
os.register_at_fork(after_in_child=_forget_all)
KEPT = KeptThreads()
