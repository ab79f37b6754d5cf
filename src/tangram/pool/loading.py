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


def verified_load(loader: Loader, ckpt: Checkpoint, dests: Mapping[str, torch.Tensor]
                  ) -> Callable[[list[list[str]], Callable[[str], None]], LoadStats]:
    """The load of a pool's LoadJob: `dests` through `loader` in the job's groups, always verified (whatever the
    loader's default), so a tensor's ready event, which makes it shareable by its hash, means its bytes matched."""
    return lambda groups, landed: loader.load_into(ckpt, {n: dests[n] for g in groups for n in g}, order=groups,
                                                   landed=landed, verify=True)


class LoadFailed(RuntimeError):
    """A model's weights could not be loaded: the instance bound to them can serve nothing."""


def wait_for(events: Sequence[threading.Event], job: LoadJob | None) -> None:
    """Block until every event is set; raise LoadFailed if the load failed."""
    for e in events:
        e.wait()
    if job is not None and job.error is not None:
        raise LoadFailed(f"loading the model's weights failed: {job.error}") from job.error

