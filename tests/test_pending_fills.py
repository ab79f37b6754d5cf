"""Background cache fills are forgotten as they complete: a running server (nothing calls wait_idle) keeps none."""

from __future__ import annotations

import threading
import time
import types

import pytest
import torch

from conftest import make_tensor
from tangram.store import HostCache
from tangram.store.cache import PendingFills
from tangram.store.hashing import hash_bytes


def settle(count, timeout: float = 30.0) -> int:
    """Poll `count()` until it is 0 (background work finishing), at most `timeout` s; return the last value."""
    deadline = time.monotonic() + timeout
    while (n := count()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return n


def test_host_cache_keeps_no_finished_fill():
    cache = HostCache(64 << 20, pin=False)
    for i in range(200):  # unverified fills: each is checked in the background
        t = make_tensor((256,), torch.uint8, seed=i)
        cache.fill([(hash_bytes(t), t)])
    assert settle(cache.pending_fills) == 0  # without wait_idle
    assert len(cache) == 200
    gate = threading.Event()
    cache._filler.submit(gate.wait, 30)  # hold the checker: fills stay pending meanwhile
    t = make_tensor((256,), torch.uint8, seed=999)
    cache.fill([(hash_bytes(t), t)])
    assert cache.pending_fills() == 1
    gate.set()
    cache.wait_idle()
    assert cache.pending_fills() == 0 and hash_bytes(t) in cache


def test_verified_fills_are_served_at_once_without_a_background_job():
    cache = HostCache(1 << 20, pin=False)
    t = make_tensor((4096,), torch.uint8, seed=1)
    cache.fill([(hash_bytes(t), t)], verified=True)
    assert cache.pending_fills() == 0 and torch.equal(cache.get(hash_bytes(t)), t)


def test_pending_fills_forgets_failed_jobs_too():
    from concurrent.futures import ThreadPoolExecutor

    pending = PendingFills()
    with ThreadPoolExecutor(2) as pool:
        for i in range(50):
            pending.add(pool.submit((lambda: None) if i % 2 else (lambda: 1 / 0)))
    assert settle(lambda: len(pending)) == 0


def test_node_cache_client_keeps_no_finished_fill(monkeypatch):
    pytest.importorskip("ray")
    from tangram.cluster import cache as node_cache

    class Remote:
        def __init__(self, fn):
            self.remote = fn

    added: dict[str, int] = {}
    actor = types.SimpleNamespace(missing=Remote(lambda keys: [k for k in keys if k not in added]),
                                  add=Remote(lambda key, refs, n: added.setdefault(key, n) is not None))
    fake_ray = types.SimpleNamespace(get=lambda x, timeout=None: x, put=lambda x: x)  # refs are the values here
    monkeypatch.setattr(node_cache, "ray", fake_ray)
    client = node_cache.NodeCacheClient(actor, 64 << 20)
    for i in range(100):
        t = make_tensor((512,), torch.uint8, seed=i)
        client.fill([(hash_bytes(t), t)])
    assert settle(client.pending_fills) == 0
    assert len(added) == 100 and all(k in client for k in added)
