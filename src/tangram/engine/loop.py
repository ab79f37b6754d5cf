"""Runs an engine's steps on a background thread: event-driven, idle while there is no work."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from tangram.engine.engine import Engine
from tangram.threads import use_compute_threads

log = logging.getLogger(__name__)


class EngineLoop:
    """Steps `engine` whenever it has work; sleeps on its condition when idle and, when stalled for KV blocks,
    on `wait_for_space` (the pool's: woken by any KV free or model release; default: its KV allocator's)."""

    def __init__(self, engine: Engine, name: str = "engine",
                 wait_for_space: Callable[[float], object] | None = None) -> None:
        self.engine = engine
        self._wait_for_space = wait_for_space or engine.kv.wait_for_space
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> EngineLoop:
        """Start the thread."""
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop after the current step; requests still queued are aborted (their KV freed)."""
        with self.engine.work:
            self._stop = True
            self.engine.work.notify_all()
        self._thread.join(timeout)
        self.engine.shutdown()

    def _run(self) -> None:
        use_compute_threads()  # the one thread of this instance that computes in parallel (tangram/threads.py)
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
