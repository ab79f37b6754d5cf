"""Loading a binding's missing tensors group by group, in an order (a template's first-use order), optionally
on a thread so the first forward can start while later groups still load (execute-while-load)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from tangram.store import LoadStats


def ordered_groups(names: Sequence[str], order: Sequence[Sequence[str]] | None) -> list[list[str]]:
    """`names` split into the groups of `order` (those present, in that order), the rest as a last group."""
    if not order:
        return [list(names)] if names else []
    wanted, seen, groups = set(names), set(), []
    for group in order:
        g = [n for n in group if n in wanted and n not in seen]
        seen.update(g)
        if g:
            groups.append(g)
    rest = [n for n in names if n not in seen]
    if rest:
        groups.append(rest)
    return groups


class LoadJob:
    """Loads groups of tensors one after the other; each group's events are set as it lands.

    `run()` loads on the calling thread; `start()` on a new one. On failure every
    event is set and `error` holds the exception, so waiters wake and can raise.
    """

    def __init__(self, groups: list[list[str]], load_group: Callable[[list[str]], LoadStats | None],
                 events: dict[str, threading.Event], on_error: Callable[[BaseException], None],
                 on_done: Callable[[LoadStats], None] | None = None) -> None:
        self.groups, self._load_group, self.events, self._on_error = groups, load_group, events, on_error
        self._on_done = on_done
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.stats = LoadStats()
        self.began = self.ended = 0.0

    def run(self) -> None:
        """Load every group now."""
        self.began = time.perf_counter()
        try:
            for group in self.groups:
                s = self._load_group(group)
                if s is not None:
                    _add(self.stats, s)
                for name in group:
                    self.events[name].set()
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


def _add(total: LoadStats, s: LoadStats) -> None:
    total.tensors += s.tensors
    total.bytes_from_disk += s.bytes_from_disk
    total.bytes_from_cache += s.bytes_from_cache
    total.bytes_padding += s.bytes_padding
    total.reads += s.reads
    total.method, total.threads, total.chunk_bytes = s.method, s.threads, s.chunk_bytes


def wait_for(events: Sequence[threading.Event], job: LoadJob | None) -> None:
    """Block until every event is set; raise if the load failed."""
    for e in events:
        e.wait()
    if job is not None and job.error is not None:
        raise RuntimeError(f"loading the model's weights failed: {job.error}") from job.error

