"""Which threads compute in parallel: one OpenMP thread by default under the `tangram` command, the
configured number in the threads that step models, and the user's OMP_NUM_THREADS respected."""

from __future__ import annotations

import socket
import threading

import pytest
import torch

from tangram import threads
from tangram.serve.server import bind_socket


def test_single_threaded_by_default_keeps_a_users_setting(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(threads.ENV, raising=False)
    threads.single_threaded_by_default()
    import os

    assert os.environ["OMP_NUM_THREADS"] == "1" and int(os.environ[threads.ENV]) >= 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.delenv(threads.ENV)
    threads.single_threaded_by_default()
    assert os.environ["OMP_NUM_THREADS"] == "3" and threads.compute_threads() == 3


def test_compute_threads_apply_to_the_calling_thread_only(monkeypatch):
    monkeypatch.setenv(threads.ENV, "1")
    seen: list[int] = []

    def step_thread() -> None:
        threads.use_compute_threads()
        seen.append(torch.get_num_threads())

    t = threading.Thread(target=step_thread)
    t.start()
    t.join()
    assert seen == [1]
    monkeypatch.setenv(threads.ENV, "0")
    assert threads.compute_threads() == 1  # never fewer than one


def test_the_listening_socket_is_tcp_so_streamed_chunks_are_not_held_by_nagle():
    sock = bind_socket("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP  # asyncio sets TCP_NODELAY on what it accepts from such sockets
    finally:
        sock.close()


def test_a_team_is_bound_only_when_it_spans_every_allowed_cpu():
    team = threads.team_cpus({0, 1, 2, 3}, 4, slot=0)
    assert team == threads.TeamCPUs(0, frozenset({1, 2, 3}), frozenset({0, 1, 2, 3}))
    assert threads.team_cpus({4, 6}, 2, slot=3).master == 6  # masters take the CPUs in turn
    assert threads.team_cpus({0, 1, 2, 3}, 2, slot=0) is None  # a smaller team shares the machine: left alone
    assert threads.team_cpus({0, 1}, 1, slot=0) is None and threads.team_cpus({0}, 1, slot=0) is None


def test_a_stepping_threads_workers_run_on_the_other_cpus_and_its_forward_on_its_own(monkeypatch):
    import os

    allowed = frozenset(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("binding needs two CPUs")
    monkeypatch.setenv(threads.ENV, str(len(allowed)))
    monkeypatch.delenv(threads.BIND_ENV, raising=False)
    seen: dict[str, object] = {}

    def step_thread() -> None:
        before = set(os.listdir("/proc/self/task"))
        threads.use_compute_threads(slot=1)
        new = set(os.listdir("/proc/self/task")) - before
        masks = set()
        for t in new:
            try:
                masks.add(frozenset(os.sched_getaffinity(int(t))))
            except OSError:  # a short-lived thread of another test ended meanwhile
                pass
        seen["team"] = masks - {allowed}  # another test's thread started meanwhile has the full mask
        seen["between"] = frozenset(os.sched_getaffinity(0))
        with threads.on_team_cpus():
            seen["forward"] = frozenset(os.sched_getaffinity(0))
            torch.ones(1 << 16).sum()
        seen["after"] = frozenset(os.sched_getaffinity(0))

    t = threading.Thread(target=step_thread)
    t.start()
    t.join()
    master = sorted(allowed)[1]
    assert seen["team"] == {allowed - {master}}  # the OpenMP workers (made for this thread) avoid its CPU
    assert seen["between"] == seen["after"] == allowed and seen["forward"] == {master}
    with threads.on_team_cpus():  # a thread whose team is not bound: nothing changes
        assert frozenset(os.sched_getaffinity(0)) == allowed


def test_a_system_that_refuses_cpu_masks_leaves_the_team_unbound_with_its_threads(monkeypatch):
    import os

    allowed = frozenset(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("binding needs two CPUs")

    def refuse(pid, mask):
        raise OSError(22, "Invalid argument")

    monkeypatch.setenv(threads.ENV, str(len(allowed)))
    monkeypatch.setattr(os, "sched_setaffinity", refuse)
    seen: list[object] = []

    def step_thread() -> None:
        threads.use_compute_threads(slot=0)
        seen.append(torch.get_num_threads())
        with threads.on_team_cpus():  # unbound: a no-op, and nothing raises
            seen.append(frozenset(os.sched_getaffinity(0)))

    t = threading.Thread(target=step_thread)
    t.start()
    t.join()
    assert seen == [len(allowed), allowed]
