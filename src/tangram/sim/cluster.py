"""A simulated cluster: nodes of devices, a pool per device, a host DRAM cache per node, the real scheduler.

Placement is `tangram.scheduler.Scheduler.decide` (the indexed scheduler, any
policy) fed with every change of the simulated state; pools are `SimPool`s
(the real pool policy functions over simulated byte ranges); each node's host
cache is an LRU of tensor keys filled by every load from disk, as the real
loader fills `HostCache`. A start costs overhead + bytes from DRAM / DRAM
bandwidth + bytes from disk / disk bandwidth + init; resident bytes cost
nothing.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

from tangram.defaults import RELOAD_BANDWIDTH
from tangram.scheduler import Bandwidths, CostParams, Policy, Scheduler
from tangram.sim.pool import SimPool, SimPoolFull
from tangram.sim.replay import SimInstance, Started
from tangram.sim.workload import Request, SimModel


@dataclass(frozen=True)
class ClusterSpec:
    """Shape and speeds of a simulated cluster."""

    nodes: int
    devices_per_node: int
    device_bytes: int
    dram_bytes: int  # host DRAM cache per node
    bandwidths: Bandwidths = field(default_factory=lambda: Bandwidths(8.6e9, 3.1e9))
    init_s: float = 0.3
    start_overhead_s: float = 0.0
    evict_weight: float = 0.5
    pool_policy: str = "tangram"
    reload_bandwidth: float = RELOAD_BANDWIDTH  # what DevicePool prices evicted bytes at (tangram.defaults)

    @property
    def devices(self) -> int:
        """Devices in all."""
        return self.nodes * self.devices_per_node


class SimCluster:
    """The simulator's backend for `replay`: placement by the scheduler, costs from the bandwidths."""

    def __init__(self, spec: ClusterSpec, models: list[SimModel], policy: Policy | str, *, seed: int = 0) -> None:
        self.spec = spec
        self.policy = Policy(policy)
        self.models = {m.name: m for m in models}
        self.key_models: dict[str, list[str]] = {}
        for m in models:
            for k in m.tensors:
                self.key_models.setdefault(k, []).append(m.name)
        nodes = [d // spec.devices_per_node for d in range(spec.devices)]
        self.node_of = nodes
        self.sched = Scheduler(nodes, CostParams(spec.bandwidths, spec.evict_weight), seed=seed)
        # retention gains priced as a worker's DevicePool prices them (its default reload bandwidth)
        self.pools = [SimPool(spec.device_bytes, policy=spec.pool_policy, reload_bandwidth=spec.reload_bandwidth)
                      for _ in range(spec.devices)]
        for d, pool in enumerate(self.pools):
            self.sched.set_device(d, free=pool.free, retained=0)
        self.caches: list[OrderedDict[str, int]] = [OrderedDict() for _ in range(spec.nodes)]
        self.cache_used = [0] * spec.nodes
        self.decide_s = 0.0
        self.decisions = 0
        self.failed_starts = 0

    # ------------------------------------------------------------------ state sync

    def _sync_resident(self, d: int, keys: list[str]) -> None:
        pool = self.pools[d]
        for name in {m for k in keys for m in self.key_models.get(k, ())}:
            resident = sum(s for k, s in self.models[name].tensors.items() if k in pool.tensors)
            self.sched.set_resident(d, name, resident)

    def _fill_cache(self, node: int, loaded: dict[str, int]) -> tuple[int, int]:
        """Bytes of `loaded` served by the node's cache, bytes read from disk; fills and trims the LRU."""
        cache, cap = self.caches[node], self.spec.dram_bytes
        dram = disk = 0
        changed: list[str] = []
        for k, s in loaded.items():
            if k in cache:
                cache.move_to_end(k)
                dram += s
            else:
                disk += s
                if s <= cap:
                    cache[k] = s
                    self.cache_used[node] += s
                    changed.append(k)
        while self.cache_used[node] > cap:
            k, s = cache.popitem(last=False)
            self.cache_used[node] -= s
            changed.append(k)
        for name in {m for k in changed for m in self.key_models.get(k, ())}:
            self.sched.set_cached(node, name, sum(s for k, s in self.models[name].tensors.items() if k in cache))
        return dram, disk

    # ------------------------------------------------------------------ Backend

    def place(self, model: str, now: float) -> int | None:
        """The scheduler's choice (timed: `decide_s`, `decisions`)."""
        t0 = time.perf_counter()
        d = self.sched.decide(model, self.models[model].nbytes, now, self.policy)
        self.decide_s += time.perf_counter() - t0
        self.decisions += 1
        return d

    def start(self, model: str, device: int, now: float) -> Started | None:
        """Acquire the model's tensors in the device pool; cost the missing bytes by tier."""
        m, pool = self.models[model], self.pools[device]
        try:
            loaded, evicted = pool.acquire(model, m.tensors, now)
        except SimPoolFull as exc:
            self.failed_starts += 1
            self._sync_resident(device, exc.evicted)
            self.sched.set_device(device, free=pool.free, retained=pool.retained)
            return None
        dram, disk = self._fill_cache(self.node_of[device], {k: m.tensors[k] for k in loaded})
        bw = self.spec.bandwidths
        seconds = self.spec.start_overhead_s + dram / bw.dram + disk / bw.disk + self.spec.init_s
        self.sched.set_device(device, free=pool.free, retained=pool.retained, busy_until=now + seconds)
        self._sync_resident(device, loaded + evicted)
        return Started(seconds, disk, dram, m.nbytes - dram - disk)

    def prefill(self, inst: SimInstance, request: Request) -> float:
        """The model's prefill time model."""
        return self.models[request.model].prefill_s(request.prompt_tokens)

    def stop(self, inst: SimInstance, now: float) -> None:
        """Release the weights: they stay retained."""
        pool = self.pools[inst.device]
        pool.release(self.models[inst.model].tensors)
        self.sched.set_device(inst.device, free=pool.free, retained=pool.retained)
