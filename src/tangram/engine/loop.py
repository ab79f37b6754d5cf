"""Runs an engine's steps on a background thread (a parked one when there is: `steppers.py`): event-driven,
idle while there is no work."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from tangram.engine.engine import Engine
from tangram.engine.steppers import STEPPERS

log = logging.getLogger(__name__)


class EngineLoop:
    """Steps `engine` whenever it has work; sleeps on its condition when idle and, when stalled for KV blocks,
    on `wait_for_space` (the pool's: woken by any KV free or model release; default: its KV allocator's)."""

    def __init__(self, engine: Engine, name: str = "engine",
                 wait_for_space: Callable[[float], object] | None = None) -> None:
        self.engine = engine
        self._wait_for_space = wait_for_space or engine.kv.wait_for_space
        self._stop = False
        self._name = name
        self._done: threading.Event | None = None

    def start(self) -> EngineLoop:
        """Start stepping, on a parked stepper thread or a new one."""
        self._done = STEPPERS.run(self._run, self._name)
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop after the current step; requests still queued are aborted (their KV freed)."""
        with self.engine.work:
            self._stop = True
            self.engine.work.notify_all()
        if self._done is not None:
            self._done.wait(timeout)
        self.engine.shutdown()

    def _run(self) -> None:
        eng = self.engine
        while True:
            with eng.work:
                while not self._stop and not eng.has_work():
                    eng.work.wait()
                if self._stop:
                    return
            try:
                progressed = eng.step_or_fail()  # a failing step fails its requests: never retried on them
            except Exception as exc:  # noqa: BLE001 - the thread outlives anything and never retries a failure
                log.exception("engine step failed")
                eng.fail_all(f"engine step failed: {exc}")
                progressed = True
            if not progressed and eng.stalled:
                self._wait_for_space(0.05)  # back-pressure: woken by any KV free or model release
