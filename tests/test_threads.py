"""Which threads compute in parallel: one OpenMP thread by default under the `tangram` command, the
configured number in the threads that step models, and the user's OMP_NUM_THREADS respected."""

from __future__ import annotations

import socket
import threading

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
