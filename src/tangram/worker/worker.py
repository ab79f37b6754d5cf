"""A worker owns one device: its pool (weights and KV of every model on it) and the running instances.

Starting and stopping instances block (loads, model builds), so the
controller calls them from a thread pool; each running instance steps on its
own engine thread.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tangram.engine import EngineConfig, Instance, RequestOutput, SamplingParams, StartCost
from tangram.engine.loop import EngineLoop
from tangram.engine.dtype import compute_dtype
from tangram.engine.skeleton import RUNTIME
from tangram.pool import ArenaMap, DevicePool, Eviction, PoolConfig
from tangram.store import Checkpoint, CheckpointIndex, Loader
from tangram.templates import load_template, warm

log = logging.getLogger(__name__)
_ids = itertools.count()
EVICTIONS_KEPT = 64  # the last evictions a worker keeps for the pool map's event log


def local_devices(cpu_devices: int = 1) -> list[str]:
    """Every CUDA device, or `cpu_devices` logical CPU devices (each gets its own pool) without a GPU."""
    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu"] * cpu_devices


@dataclass(kw_only=True)
class ControlState:
    """What the controller keeps of a running instance, local or in a Ray worker actor."""

    inflight: int = 0
    idle_since: float | None = None
    stopping: bool = False
    draining: bool = False  # takes no new requests: stopped once idle, to make room for a waiting start
    started_at: float = field(default_factory=time.perf_counter)


@dataclass
class Replica(ControlState):
    """A running instance of a deployment on one worker, with its engine thread and request count."""

    id: str
    deployment: str
    worker: Worker
    instance: Instance
    loop: EngineLoop

    @property
    def cost(self) -> StartCost:
        """What starting this instance cost."""
        return self.instance.cost

    def final_cost(self) -> StartCost:
        """The start's cost once its load is over (waits for a background load)."""
        self.instance.finalize_cost()
        return self.instance.cost

    def submit(self, prompt, params: SamplingParams, sink: Callable[[RequestOutput], None], *, arrival: float,
               chat: bool = False) -> str:
        """Queue a request on this instance's engine; outputs go to `sink` (from the engine thread)."""
        return self.instance.engine.add_request(prompt, params, sink=sink, arrival=arrival, chat=chat).id

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks."""
        self.instance.engine.abort(request_id)

    def mean_prefill_s(self, prior: float) -> float:
        """Mean prefill seconds this instance measured (`prior` before its first request)."""
        totals = self.instance.engine.totals
        return totals.prefill_s / totals.requests if totals.requests else prior


@dataclass(frozen=True)
class InstanceInfo:
    """A running instance as the pool map shows it."""

    id: str
    deployment: str
    inflight: int


@dataclass(frozen=True)
class DeviceMap:
    """What the dashboard shows of one device: its arena map, the instances there and its last evictions."""

    worker: str
    device: str
    node: int
    arena: ArenaMap
    instances: list[InstanceInfo]
    evictions: list[Eviction]  # oldest first


class Worker:
    """Device `index` of this node: a device pool shared by every model placed here."""

    def __init__(self, index: int, device: str, capacity: int | float, loader: Loader | None = None,
                 node: int = 0, pool: PoolConfig | None = None) -> None:
        self.index, self.device, self.node = index, device, node
        self._evictions: collections.deque[Eviction] = collections.deque(maxlen=EVICTIONS_KEPT)
        self.pool = DevicePool(capacity, device, pool, loader=loader or Loader(), on_evict=self._evictions.append)
        self.replicas: dict[str, Replica] = {}
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        """`cpu#0`, `cuda:1#1`: device and worker index (several logical CPU devices share a type)."""
        return f"{self.device}#{self.index}"

    def start(self, deployment: str, checkpoint: Path, config: EngineConfig, arrival: float) -> Replica:
        """Start an instance (blocking: load + init) and its engine thread."""
        inst = Instance(Checkpoint(checkpoint), self.pool, config, name=deployment, arrival=arrival)
        rid = f"{deployment}-{next(_ids)}"
        replica = Replica(rid, deployment, self, inst, EngineLoop(inst.engine, name=f"engine-{rid}").start())
        with self._lock:
            self.replicas[rid] = replica
        return replica

    def warm(self, checkpoint: Path) -> float:
        """Warm this worker for a model expected on it, before traffic: its skeleton and tokenizer, and the
        operators its start-up template lists (nothing without a valid template). Seconds spent."""
        template = load_template(checkpoint)
        if template is None:
            return 0.0
        t0 = time.perf_counter()
        index = Checkpoint(checkpoint).index
        dtype = compute_dtype(e.torch_dtype for e in index.tensors.values())
        model = RUNTIME.prepare(checkpoint, self.device, dtype)
        warm(model.config, template, dtype, self.device)
        seconds = time.perf_counter() - t0
        log.info("warmed %s for %s in %.3f s", self.name, checkpoint, seconds)
        return seconds

    def stop(self, replica: Replica) -> None:
        """Stop the engine thread and release the weights to the pool (they stay retained)."""
        replica.loop.stop()
        replica.instance.close()
        with self._lock:
            self.replicas.pop(replica.id, None)
        log.info("stopped %s on %s", replica.id, self.name)

    def freeable_bytes(self, replica: Replica) -> int:
        """Pool bytes that stopping `replica` would give back: weights no other instance here holds, and its
        KV reservation."""
        inst = replica.instance
        return self.pool.exclusive_bytes(inst.binding) + inst.kv.reserved_bytes

    def resident_bytes(self, index: CheckpointIndex) -> int:
        """Bytes of a checkpoint's tensors already in this worker's pool."""
        return self.pool.resident_bytes(index)

    def placement_state(self, index: CheckpointIndex, request_prior_s: float = 0.05) -> dict:
        """What the scheduler needs of this device for the model of `index`."""
        totals = self.pool.snapshot()["totals"]
        with self._lock:
            replicas = list(self.replicas.values())
        cache = self.pool.loader.cache
        cached = 0
        if cache is not None:
            distinct = {e.hash: e.nbytes for e in index.tensors.values()}
            cached = sum(n for h, n in distinct.items() if h in cache)
        return {"node": self.node, "free": totals["free"], "retained": totals["retained"],
                "queue_s": sum(r.inflight * r.mean_prefill_s(request_prior_s) for r in replicas),
                "resident": self.pool.resident_bytes(index), "cached": cached}

    def pool_map(self) -> DeviceMap:
        """The pool as extents merged per model and state, the instances here and the last evictions (blocking
        briefly on the pool's lock: call it off the event loop)."""
        arena = self.pool.pool_map()
        with self._lock:
            instances = [InstanceInfo(r.id, r.deployment, r.inflight) for r in self.replicas.values()]
        return DeviceMap(self.name, self.device, self.node, arena, instances, list(self._evictions.copy()))

    def status(self) -> dict:
        """Pool bytes per state, KV bytes, and the instances here."""
        snap = self.pool.snapshot()
        with self._lock:
            instances = [{"id": r.id, "deployment": r.deployment, "inflight": r.inflight}
                         for r in self.replicas.values()]
        return {"worker": self.name, "device": self.device, "capacity": snap["capacity"], "pool": snap["totals"],
                "kv_bytes": snap["kv_bytes"], "instances": instances}
