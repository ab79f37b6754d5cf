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

from tangram.engine import EngineConfig, EngineRates, RequestOutput, SamplingParams, StartCost
from tangram.engine.backend import EngineBackend, prewarm_backend, start_backend, warm_engines
from tangram.engine.dtype import compute_dtype
from tangram.engine.migration import MigratableBackend, MigrationError, MigrationState
from tangram.engine.skeleton import RUNTIME
from tangram.pool import ArenaMap, DevicePool, Eviction, PoolConfig
from tangram.store import Checkpoint, CheckpointIndex, Loader
from tangram.paths import file_version
from tangram.store.format import INDEX_FILE
from tangram.templates import load_template, warm
from tangram.worker.handle import PlacementState

log = logging.getLogger(__name__)
_ids = itertools.count()
EVICTIONS_KEPT = 64  # the last evictions a worker keeps for the pool map's event log


def local_devices(cpu_devices: int = 1) -> list[str]:
    """Every CUDA device, or `cpu_devices` logical CPU devices (each gets its own pool) without a GPU."""
    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu"] * cpu_devices


@dataclass(eq=False)
class Replica:
    """A running instance of a deployment on one worker: its engine backend (`tangram.engine.backend`)."""

    id: str
    deployment: str
    backend: EngineBackend
    inflight: int = 0  # requests queued and not finished (the pool map and status show it)
    _count: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def cost(self) -> StartCost:
        """What starting this instance cost."""
        return self.backend.cost

    def submit(self, prompt, params: SamplingParams, sink: Callable[[RequestOutput], None], *, arrival: float,
               chat: bool = False, adapter: str | None = None) -> str:
        """Queue a request on this instance; outputs go to `sink` (from the backend's thread)."""
        self._add(1)
        try:
            return self.backend.submit(prompt, params, _Counted(sink, self), arrival=arrival, chat=chat,
                                       adapter=adapter)
        except BaseException:
            self._add(-1)
            raise

    def _add(self, n: int) -> None:
        with self._count:
            self.inflight += n

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks."""
        self.backend.abort(request_id)

    @property
    def can_migrate(self) -> bool:
        """Whether its backend can migrate requests."""
        return isinstance(self.backend, MigratableBackend)

    @property
    def migration(self) -> MigratableBackend:
        """Its backend's migration capability (MigrationError: this backend cannot migrate requests)."""
        if not self.can_migrate:
            raise MigrationError(f"{self.id}: its engine backend cannot migrate requests")
        return self.backend

    def migrate_out(self, request_id: str,
                    offset: int) -> tuple[MigrationState, Callable[[RequestOutput], None] | None]:
        """Hand a request over (detached between steps, counted out here): its final round and the client's
        sink (None: it had ended)."""
        state, sink = self.migration.handover(request_id, offset)
        if sink is None:
            return state, None
        self._add(-1)
        return state, sink.client if isinstance(sink, _Counted) else sink

    def migrate_in(self, request_id: str, state: MigrationState, sink: Callable[[RequestOutput], None]) -> None:
        """Release a held request with its final round: it streams on to `sink`, counted here."""
        self._add(1)
        try:
            self.migration.resume(request_id, state, _Counted(sink, self))
        except BaseException:
            self._add(-1)
            raise


class _Counted:
    """A request's sink on one replica: counts it out after its final output (after the client's sink, so whoever
    sees the replica idle has seen the request end); `client` is what a migration hands on."""

    def __init__(self, client: Callable[[RequestOutput], None], replica: Replica) -> None:
        self.client, self.replica = client, replica

    def __call__(self, out: RequestOutput) -> None:
        self.client(out)
        if out.finished:
            self.replica._add(-1)  # noqa: SLF001 - the replica's own counter, shared with this helper


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
        self._checkpoints: dict[Path, tuple[tuple[int, int, int], Checkpoint]] = {}  # by index file version

    @property
    def name(self) -> str:
        """`cpu#0`, `cuda:1#1`: device and worker index (several logical CPU devices share a type)."""
        return f"{self.device}#{self.index}"

    def start(self, deployment: str, checkpoint: Path, config: EngineConfig, arrival: float,
              backend: str = "builtin") -> Replica:
        """Start an instance with engine `backend` (blocking: load + init, then its engine runs)."""
        engine = start_backend(backend, self._checkpoint(checkpoint), self.pool, config, name=deployment,
                               arrival=arrival)
        replica = Replica(f"{deployment}-{next(_ids)}", deployment, engine)
        with self._lock:
            self.replicas[replica.id] = replica
        return replica

    def _checkpoint(self, path: Path) -> Checkpoint:
        """The checkpoint at `path`, its index parsed once per version of the index file (a restart parses none)."""
        stamp = file_version(Path(path) / INDEX_FILE)
        if stamp is None:
            return Checkpoint(path)  # it raises the clear error
        with self._lock:
            hit = self._checkpoints.get(Path(path))
        if hit is not None and hit[0] == stamp:
            return hit[1]
        ckpt = Checkpoint(path)
        with self._lock:
            self._checkpoints[Path(path)] = (stamp, ckpt)
        return ckpt

    def warm(self, checkpoint: Path, engine: EngineConfig | None = None, backend: str = "builtin") -> float:
        """Warm this worker for a model expected on it, before traffic. builtin: its skeleton and tokenizer, and
        the operators its start-up template lists (nothing without a valid template); another backend: what it
        keeps warm (vllm: an engine shell of the model's shape, built on a thread). Seconds spent here."""
        if backend != "builtin":
            return prewarm_backend(backend, Path(checkpoint), self.pool, engine or EngineConfig())
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
        """Stop the instance's engine and release its weights to the pool (they stay retained)."""
        replica.backend.stop()
        with self._lock:
            self.replicas.pop(replica.id, None)
        log.info("stopped %s on %s", replica.id, self.name)

    def rates(self, replica: Replica) -> EngineRates:
        """What `replica`'s engine measured of its speed."""
        return replica.backend.rates()

    def freeable_bytes(self, replica: Replica) -> int:
        """Pool bytes that stopping `replica` would give back: weights no other instance here holds, and its
        KV reservation."""
        return replica.backend.freeable_bytes()

    def placement_state(self, index: CheckpointIndex, request_prior_s: float = 0.05) -> PlacementState:
        """What the scheduler needs of this device for the model of `index`."""
        totals = self.pool.totals()
        with self._lock:
            replicas = list(self.replicas.values())
        cache = self.pool.loader.cache
        cached = 0
        if cache is not None:
            distinct = {e.hash: e.nbytes for e in index.tensors.values()}
            cached = sum(n for h, n in distinct.items() if h in cache)
        return PlacementState(node=self.node, free=totals["free"], retained=totals["retained"],
                              queue_s=sum(r.inflight * r.backend.mean_prefill_s(request_prior_s) for r in replicas),
                              resident=self.pool.resident_bytes(index), cached=cached)

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
                "kv_bytes": snap["kv_bytes"], "instances": instances, "warm_engines": warm_engines(self.pool)}
