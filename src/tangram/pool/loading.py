"""Loading a binding's missing tensors in an order (a template's first-use order), optionally on a thread so
the first forward can start while later tensors still load (execute-while-load)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence

import torch

from tangram.store import Checkpoint, Loader, LoadStats


class LoadJob:
    """Loads groups of tensors, group after group on all reader threads; each tensor's event is set as it lands.

    `load(groups, landed)` does the I/O and calls `landed(name)` per tensor (a
    loader that cannot leaves the events to the end of the job). `run()` loads
    on the calling thread; `start()` on a new one. On failure every event is set
    and `error` holds the exception, so waiters wake and can raise.
    """

    def __init__(self, groups: list[list[str]],
                 load: Callable[[list[list[str]], Callable[[str], None]], LoadStats | None],
                 events: dict[str, threading.Event], on_error: Callable[[BaseException], None],
                 on_done: Callable[[LoadStats], None] | None = None) -> None:
        self.groups, self._load, self.events, self._on_error = groups, load, events, on_error
        self._on_done = on_done
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.stats = LoadStats()
        self.began = self.ended = 0.0

    def run(self) -> None:
        """Load every group now."""
        self.began = time.perf_counter()
        try:
            if self.groups:
                stats = self._load(self.groups, lambda name: self.events[name].set())
                if stats is not None:
                    self.stats = stats
            for e in self.events.values():
                e.set()
        except BaseException as exc:  # noqa: BLE001 - reported through `error` and the callback
            self.error = exc
            self._on_error(exc)
            for e in self.events.values():
                e.set()
        finally:
            self.ended = time.perf_counter()
            self.stats.seconds = self.ended - self.began
            if self.error is None and self._on_done is not None:
                self._on_done(self.stats)
            self.done.set()

    def start(self) -> LoadJob:
        """Load on a background thread."""
        threading.Thread(target=self.run, name="pool-load", daemon=True).start()
        return self

    @property
    def seconds(self) -> float:
        """Wall time of the load (so far)."""
        return (self.ended or time.perf_counter()) - self.began


def verified_load(loader: Loader, ckpt: Checkpoint, dests: Mapping[str, torch.Tensor], *, through_bounce: bool = False
                  ) -> Callable[[list[list[str]], Callable[[str], None]], LoadStats]:
    """The load of a pool's LoadJob: `dests` through `loader` in the job's groups, always verified (whatever the
    loader's default), so a tensor's ready event, which makes it shareable by its hash, means its bytes matched.
    `through_bounce`: the arena's memory takes direct reads slowly (`Loader.load_into`)."""
    return lambda groups, landed: loader.load_into(ckpt, {n: dests[n] for g in groups for n in g}, order=groups,
                                                   landed=landed, verify=True, through_bounce=through_bounce)


class LoadFailed(RuntimeError):
    """A model's weights could not be loaded: the instance bound to them can serve nothing."""


class LoadHandle:
    """What one acquire loads, as its caller sees it: per-tensor landed events, completion, failure, timing.

    `landed[name]` is set once tensor `name` (an alias included) is in place, whether this acquire or another
    one sharing it loaded it. `done()` / `wait()`: this acquire's own load is over (at once for a pool hit).
    `error`: why this load failed; `failed()`: this load or a concurrent load of a shared tensor failed.
    """

    def __init__(self, job: LoadJob, landed: Mapping[str, threading.Event],
                 shared_failed: Callable[[], bool] = lambda: False) -> None:
        self._job, self.landed, self._shared_failed = job, landed, shared_failed
        self._own = {id(e) for e in job.events.values()}
        self._stats: LoadStats | None = None

    def _finished(self, stats: LoadStats) -> None:
        self._stats = stats

    @property
    def stats(self) -> LoadStats | None:
        """What the load did once it is over (None before, when nothing was loaded, or when it failed)."""
        return self._stats

    def done(self) -> bool:
        """Whether this acquire's load is over (landed or failed)."""
        return self._job.done.is_set()

    def wait(self, timeout: float | None = None) -> LoadStats | None:
        """Block until this acquire's load is over; its stats (None: nothing was loaded, or it failed)."""
        self._job.done.wait(timeout)
        return self._stats

    @property
    def error(self) -> BaseException | None:
        """The exception this acquire's load failed with, if it did."""
        return self._job.error

    def failed(self) -> bool:
        """Whether this load, or another acquire's load of a tensor bound here, has failed."""
        return self.error is not None or self._shared_failed()

    def all_landed(self) -> bool:
        """Whether every tensor bound here is in place."""
        return all(e.is_set() for e in self.landed.values())

    def own(self, event: threading.Event) -> bool:
        """Whether `event` is one this acquire's load sets (not another acquire's, of a shared tensor)."""
        return id(event) in self._own

    def span(self) -> tuple[float, float]:
        """perf_counter() times (began, ended) of the load (0 for a time not reached yet)."""
        return self._job.began, self._job.ended

    def check(self, events: Sequence[threading.Event]) -> None:
        """Block until every event is set; raise LoadFailed if this acquire's load failed."""
        for e in events:
            e.wait()
        if self.error is not None:
            raise LoadFailed(f"loading the model's weights failed: {self.error}") from self.error

