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
"""

from __future__ import annotations

import os

ENV = "TANGRAM_COMPUTE_THREADS"


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


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


def use_compute_threads() -> None:
    """Run this thread's torch ops on `compute_threads()` threads (the threads that step models)."""
    import torch

    n = compute_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
