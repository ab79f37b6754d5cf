"""Placing the worker actors on a Ray cluster: one per GPU, or `cpu_devices` per CPU-only node.

Each actor is pinned to its node with Ray's `NodeAffinitySchedulingStrategy`
(hard affinity), GPU actors with `num_gpus=1` so Ray assigns each its own GPU;
CPU actors reserve no CPU (`num_cpus=0`): a logical CPU device is a pool, not a
core. A node that offers neither CPU nor GPU resources (a head started with
`--num-cpus=0`) hosts no worker. With `host_cache_bytes`, every node with
workers gets one `NodeCache` actor that its workers share.

Nodes are numbered from 0: the driver's node first, then the others by address
and id; that ordinal is the `node` the scheduler sees.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import ray
from ray.actor import ActorHandle
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from tangram.cluster.actor import WorkerActor
from tangram.cluster.cache import NodeCache
from tangram.cluster.remote import RemoteWorker
from tangram.control import ServeConfig
from tangram.pool.capacity import CPU_DEFAULT_FRACTION, configured_capacity

log = logging.getLogger(__name__)
READY_TIMEOUT_S = 300.0


@dataclass
class NodeDevices:
    """The devices Tangram uses on one Ray node."""

    ray_node: str
    address: str
    gpus: int
    cpu_devices: int
    cpus: int = 0  # the node's CPU resource in Ray (0: unknown)

    @property
    def compute_threads(self) -> int | None:
        """Threads each CPU worker of the node steps models on: the node's CPUs split among its CPU devices, so
        workers that share a host (loopback nodes, several logical devices) do not oversubscribe its cores."""
        if self.gpus or self.cpus <= 0 or self.cpu_devices <= 0:
            return None
        return max(1, self.cpus // self.cpu_devices)

    @property
    def count(self) -> int:
        """Worker actors to place on this node."""
        return self.gpus or self.cpu_devices


def cluster_nodes(cpu_devices: int) -> list[NodeDevices]:
    """The alive nodes that can host workers, the driver's node first."""
    head = ray.get_runtime_context().get_node_id()
    alive = [n for n in ray.nodes() if n.get("Alive")]
    alive.sort(key=lambda n: (n["NodeID"] != head, n["NodeManagerAddress"], n["NodeID"]))
    nodes = []
    for n in alive:
        res = n.get("Resources", {})
        gpus = int(res.get("GPU", 0))
        if gpus or res.get("CPU", 0) > 0:
            nodes.append(NodeDevices(n["NodeID"], n["NodeManagerAddress"], gpus, 0 if gpus else cpu_devices,
                                     int(res.get("CPU", 0))))
    return nodes


def _capacity(config: ServeConfig, node: NodeDevices) -> int | float | None:
    """Each worker's capacity on `node`, resolved by the worker on its node (None: the default rule there)."""
    cap = configured_capacity(config.pool_capacity)
    if node.gpus or isinstance(cap, int) or node.cpu_devices == 1:
        return cap
    # logical CPU devices share the node's memory: a fraction is split; the default rule splits its fraction
    # (its fixed cap cannot be split without knowing the node's memory here)
    return (CPU_DEFAULT_FRACTION if cap is None else cap) / node.cpu_devices


@dataclass
class RayCluster:
    """The worker actors (and node caches) this server placed on a Ray cluster; `close` ends them."""

    workers: list[RemoteWorker]
    caches: dict[str, ActorHandle] = field(default_factory=dict)  # Ray node id -> its NodeCache
    started_ray: bool = False

    @classmethod
    def connect(cls, config: ServeConfig, address: str | None = None) -> RayCluster:
        """Join the Ray cluster at `address` (None or "": a local one, started if none runs) and place workers."""
        started = False
        if not ray.is_initialized():
            ray.init(address=address or None, logging_level=logging.WARNING)
            started = True
        try:
            return cls.place(config, started)
        except BaseException:
            if started:
                ray.shutdown()
            raise

    @classmethod
    def place(cls, config: ServeConfig, started_ray: bool = False) -> RayCluster:
        """One worker actor per device of every node, pinned to its node; waits until each is up."""
        nodes = cluster_nodes(config.cpu_devices)
        if not nodes:
            raise RuntimeError("the Ray cluster has no node with CPU or GPU resources for workers")
        caches: dict[str, ActorHandle] = {}
        pending = []
        for ordinal, node in enumerate(nodes):
            pin = NodeAffinitySchedulingStrategy(node.ray_node, soft=False)
            cache = None
            if config.host_cache_bytes:
                cache = NodeCache.options(scheduling_strategy=pin).remote(config.host_cache_bytes)
                caches[node.ray_node] = cache
            opts = {"scheduling_strategy": pin, "num_gpus": 1} if node.gpus else {"scheduling_strategy": pin}
            for _ in range(node.count):
                index = len(pending)
                actor = WorkerActor.options(**opts).remote(index, _capacity(config, node), ordinal, cache,
                                                           config.host_cache_bytes,
                                                           None if node.gpus else "cpu", config.pool,
                                                           node.compute_threads)
                pending.append((actor, index, ordinal, node))
        cluster = cls([], caches, started_ray)
        try:
            infos = ray.get([a.ready.remote() for a, *_ in pending], timeout=READY_TIMEOUT_S)
            for (actor, index, ordinal, node), info in zip(pending, infos):
                if info["ray_node"] != node.ray_node:
                    raise RuntimeError(f"worker {index} landed on node {info['ray_node']}, not {node.ray_node}")
                cluster.workers.append(RemoteWorker(actor, index, info["device"], ordinal, node.ray_node,
                                                    info["capacity"]))
        except BaseException:
            for actor, *_ in pending:
                ray.kill(actor)
            cluster.workers.clear()
            cluster.close()
            raise
        log.info("placed %d worker actor(s) on %d Ray node(s): %s", len(cluster.workers), len(nodes),
                 ", ".join(w.name for w in cluster.workers))
        return cluster

    def close(self) -> None:
        """End the worker and cache actors (their pools and cached bytes go with them); Ray too if we started it."""
        for w in self.workers:
            ray.kill(w.actor)
        for c in self.caches.values():
            ray.kill(c)
        self.workers, self.caches = [], {}
        if self.started_ray and ray.is_initialized():
            ray.shutdown()
        self.started_ray = False
