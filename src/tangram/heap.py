"""Keep full passes of Python's cyclic garbage collector off the serving path.

A server process holds about half a million tracked objects once its imports are done (transformers, FastAPI,
torch's Python side), and a full (generation 2) collection walks all of them with the GIL held: 0.26 s on the
2-core VM, a stall of every thread. One such pass landed inside a cold start's load (a 269 MB load took 0.38 s
instead of 0.12 s) and can land inside any engine step. `freeze_startup_heap` collects once, at start-up, and
moves everything alive into the collector's permanent generation (`gc.freeze`), so later passes walk only what
was made after it (vLLM's engine core does the same after its start).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Iterator

log = logging.getLogger(__name__)


def freeze_startup_heap() -> float:
    """Collect, then freeze every object alive (never collected again, as the long-lived start-up state it is);
    returns the seconds it took. Call it once a process's start-up is over, before it serves."""
    t0 = time.perf_counter()
    gc.collect()
    gc.freeze()
    took = time.perf_counter() - t0
    log.debug("froze %d start-up objects out of the collector's passes in %.3f s", gc.get_freeze_count(), took)
    return took


def thaw_heap() -> None:
    """Hand the frozen objects back to the collector (a server that shuts down while its process lives on, as in
    tests: its pool and engines hold reference cycles that only the collector frees)."""
    gc.unfreeze()


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """`freeze_startup_heap` on entry, `thaw_heap` on exit (a benchmark's timed part, as a server runs it)."""
    freeze_startup_heap()
    try:
        yield
    finally:
        thaw_heap()
