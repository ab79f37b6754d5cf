"""How many CPU threads model compute uses, and which threads use them.

PyTorch's OpenMP runtime (libgomp) keeps a team of worker threads for every
thread that has run a parallel region, for as long as that thread lives. Once
the process holds more OpenMP threads than CPUs, libgomp stops spinning
between regions and every small op pays a futex wake-up: measured on the
2-core VM, a 16-row packed bf16 matmul took 42 us with one team and 82 us as
soon as another live thread had run one parallel op (48 us when that thread
ran with one thread). Serving makes many such threads (executor threads that
build instances, loader threads, the event loop), so the `tangram` command
starts with `OMP_NUM_THREADS=1` unless the user set it: every thread computes
on one thread by default, and only the threads that run model steps take
`compute_threads()` (`use_compute_threads`): the engine threads of `tangram
serve`, and the main thread of the other commands (`run`, `load`, `bench`).
Two processes that both compute on every CPU slow each other down far more
than by half (measured: a 16-row matmul 50 us alone, 6-12 ms with a second
such process running): on a shared machine set `TANGRAM_COMPUTE_THREADS`.

A stepping thread's team is bound to CPUs (`bind_team`, `on_team_cpus`) when
it computes on every CPU the process may use: its OpenMP workers to all but
one of them, the stepping thread itself to that one while a forward runs.
Unbound, Linux placed a worker that had slept (an instance idle for a
keep-alive) on the stepping thread's own CPU when it woke it, and the two
took turns on one CPU while the other stayed idle: measured on the 2-core VM,
a pool-hit start's first prefill spent 19-23 ms of its 60 ms runnable but not
running, and never the warm one right after it. vLLM's CPU backend binds its
OpenMP threads for the same reason. `TANGRAM_BIND_THREADS=0` turns it off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Collection, Iterator
from dataclasses import dataclass

ENV = "TANGRAM_COMPUTE_THREADS"
BIND_ENV = "TANGRAM_BIND_THREADS"
GRAIN = 32768  # elements per chunk of PyTorch's parallel loops (at::internal::GRAIN_SIZE)
log = logging.getLogger(__name__)
_local = threading.local()


def _cpus() -> int:
    return len(_allowed()) or os.cpu_count() or 1


def compute_threads() -> int:
    """Threads a model step runs on: `TANGRAM_COMPUTE_THREADS`, else the CPUs this process may use."""
    value = os.environ.get(ENV)
    return max(1, int(value)) if value else _cpus()


def single_threaded_by_default() -> None:
    """Make one OpenMP thread the process default (call before torch is imported); a user's
    `OMP_NUM_THREADS` wins, and then it is also the compute threads."""
    if "OMP_NUM_THREADS" in os.environ:
        os.environ.setdefault(ENV, os.environ["OMP_NUM_THREADS"])
        return
    os.environ.setdefault(ENV, str(compute_threads()))
    os.environ["OMP_NUM_THREADS"] = "1"


def use_compute_threads(slot: int | None = None) -> None:
    """Run this thread's torch ops on `compute_threads()` threads (the threads that step models). With a
    `slot` (the stepping thread's number), a new thread also binds its team to CPUs (`bind_team`)."""
    import torch

    n = compute_threads()
    team = team_cpus(_allowed(), n, slot) if slot is not None and _binding_wanted() else None
    if team is None:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        return
    bind_team(team)


@dataclass(frozen=True)
class TeamCPUs:
    """Where one stepping thread's compute team runs: the thread itself on `master` during a forward, its
    OpenMP workers on `workers`; `allowed` is every CPU the process may use (the thread's mask otherwise)."""

    master: int
    workers: frozenset[int]
    allowed: frozenset[int]


def team_cpus(allowed: Collection[int], threads: int, slot: int) -> TeamCPUs | None:
    """The CPUs of stepping thread `slot`'s team of `threads`, or None (no binding): only a team that spans
    every allowed CPU is bound (a smaller one shares the machine: it is left to the kernel's placement);
    masters take the CPUs in turn, so that concurrent engines start from different ones."""
    cpus = sorted(allowed)
    if threads < 2 or threads != len(cpus):
        return None
    master = cpus[slot % len(cpus)]
    return TeamCPUs(master, frozenset(cpus) - {master}, frozenset(cpus))


def bind_team(team: TeamCPUs) -> None:
    """Create this thread's OpenMP team on `team.workers` (new threads inherit their creator's CPU mask, so
    the team is made while this thread runs there); later forwards run inside `on_team_cpus`. Call it in a
    new thread, before it runs any parallel op. Falls back to no binding when the system refuses."""
    import torch

    torch.set_num_threads(len(team.allowed))
    try:
        os.sched_setaffinity(0, team.workers)
    except OSError as exc:
        log.debug("compute threads not bound to CPUs: %s", exc)
        return
    try:
        torch.empty(2 * GRAIN * len(team.allowed), dtype=torch.uint8).fill_(1)  # a parallel op: the team
    finally:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, team.allowed)
    _local.team = team


@contextlib.contextmanager
def on_team_cpus() -> Iterator[None]:
    """Run the block (a forward) with this thread on its team's master CPU; a no-op on a thread whose team
    is not bound."""
    team: TeamCPUs | None = getattr(_local, "team", None)
    if team is None:
        yield
        return
    try:
        os.sched_setaffinity(0, (team.master,))
    except OSError:
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError):  # the process's CPUs changed meanwhile: a forward never fails for it
            os.sched_setaffinity(0, team.allowed)


def _allowed() -> frozenset[int]:
    try:
        return frozenset(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return frozenset()


def _binding_wanted() -> bool:
    if os.environ.get(BIND_ENV, "1") in ("0", "false", "no", "off") or not hasattr(os, "sched_setaffinity"):
        return False
    import torch

    return "parallel backend: OpenMP" in torch.__config__.parallel_info()  # another backend's pool is process-wide
