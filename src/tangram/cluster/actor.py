"""The Ray actor that hosts one `Worker` (one device) on a cluster node.

An async actor: blocking work (instance start and stop) runs on its thread
pool, so status, placement queries, aborts and every request stream proceed
while a model loads. Each request is a streaming generator method: the engine
thread's outputs cross to the actor's event loop through an asyncio queue and
leave as one Ray object each, in order.

An actor that dies (its process killed, its node lost) is restarted by Ray
(`max_restarts`) with a fresh `Worker` and an empty pool; the calls it was
serving fail, which the head's `RemoteWorker` turns into error outputs.

Times do not cross processes as `perf_counter` values: callers pass the age of
an arrival (seconds since), turned back into this process's clock here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.actor import ActorHandle

from tangram import threads
from tangram.cluster.cache import NodeCacheClient
from tangram.pool import PoolConfig
from tangram.engine import EngineConfig, EngineRates, RequestError, RequestOutput, SamplingParams, StartCost
from tangram.engine.migration import MigrationState
from tangram.heap import freeze_startup_heap
from tangram.store import CheckpointIndex, Loader
from tangram.worker import DeviceMap, PlacementState, Worker, local_devices

log = logging.getLogger(__name__)
MAX_RESTARTS = 3  # a worker actor that dies is restarted this many times at most


@dataclass(frozen=True)
class Moved:
    """The last item of a request's stream when the request migrated away (its outputs go on elsewhere)."""

    request_id: str


class _StreamSink:
    """A request's sink in this actor: outputs cross to the actor's event loop, into the request's Ray stream."""

    def __init__(self, actor: WorkerActor, replica_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.actor, self.replica_id, self.loop = actor, replica_id, loop
        self.queue: asyncio.Queue[RequestOutput | Moved] = asyncio.Queue()

    def __call__(self, out: RequestOutput) -> None:  # on the engine thread, before the replica counts it out
        if out.finished:
            self.actor.count_finished(self.replica_id, out.finish_reason or "stop")
        self.loop.call_soon_threadsafe(self.queue.put_nowait, out)

    def moved(self, request_id: str) -> None:
        """The request migrated: its stream ends here."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, Moved(request_id))

    async def items(self) -> AsyncIterator[RequestOutput | Moved]:
        """Outputs in order, up to the final one (or the migration marker)."""
        while True:
            out = await self.queue.get()
            yield out
            if isinstance(out, Moved) or out.finished:
                return


@ray.remote(num_cpus=0, max_restarts=MAX_RESTARTS)
class WorkerActor:
    """One device of a node: a `Worker` (pool, running instances) in its own Ray actor process."""

    def __init__(self, index: int, capacity: int | float, node: int, cache: ActorHandle | None = None,
                 cache_bytes: int = 0, device: str | None = None, pool: PoolConfig | None = None,
                 compute_threads: int | None = None) -> None:
        """`compute_threads`: the most threads a model step runs on here (the node's share of its Ray CPUs:
        actors that share a host's cores and each compute on all of them slow each other down many times over;
        `TANGRAM_COMPUTE_THREADS` may only lower it)."""
        if compute_threads is not None:
            os.environ[threads.ENV] = str(min(compute_threads, threads.compute_threads()))
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        # The only blocking ray.get calls here (node-cache reads and fills) run on the thread pool, never on
        # the event loop: Ray's one-time warning about blocking gets in async actors does not apply.
        os.environ["RAY_WARN_BLOCKING_GET_INSIDE_ASYNC"] = "0"
        device = device or local_devices()[0]  # with num_gpus=1 Ray makes the actor's GPU cuda:0
        self.cache = NodeCacheClient(cache, cache_bytes) if cache is not None else None
        self.worker = Worker(index, device, capacity, Loader(cache=self.cache), node=node, pool=pool)
        self.finished: dict[str, Counter[str]] = {}  # replica id -> finish reasons of its requests
        self._finished_lock = threading.Lock()  # counted on engine threads, read on the event loop
        freeze_startup_heap()

    def ready(self) -> dict:
        """Where this actor runs: Ray node id, process id, device, worker name, pool capacity, compute threads."""
        return {"ray_node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "device": self.worker.device, "name": self.worker.name, "capacity": self.worker.pool.capacity,
                "compute_threads": threads.compute_threads()}

    async def start(self, deployment: str, checkpoint: str, config: EngineConfig, age: float,
                    backend: str = "builtin") -> tuple[str, StartCost]:
        """Start an instance (load + init on the actor's thread pool); its id and what the start cost."""
        loop = asyncio.get_running_loop()
        replica = await loop.run_in_executor(None, self.worker.start, deployment, Path(checkpoint), config,
                                             time.perf_counter() - age, backend)
        self.finished[replica.id] = Counter()
        return replica.id, replica.cost

    async def warm(self, checkpoint: str, engine: EngineConfig | None = None, backend: str = "builtin") -> float:
        """`Worker.warm`: what a model expected here needs warm (see `Worker.warm`)."""
        return await asyncio.get_running_loop().run_in_executor(None, self.worker.warm, Path(checkpoint), engine,
                                                                backend)

    def rates(self, replica_id: str) -> EngineRates:
        """`Worker.rates` of an instance here (nothing measured if it is gone)."""
        replica = self.worker.replicas.get(replica_id)
        return self.worker.rates(replica) if replica is not None else EngineRates()

    def freeable_bytes(self, replica_id: str) -> int:
        """`Worker.freeable_bytes` of an instance here (0 if it is gone)."""
        replica = self.worker.replicas.get(replica_id)
        return self.worker.freeable_bytes(replica) if replica is not None else 0

    async def final_cost(self, replica_id: str) -> StartCost | None:
        """An instance's start cost once its (background) load is over; None if it is gone."""
        replica = self.worker.replicas.get(replica_id)
        if replica is None:
            return None
        return await asyncio.get_running_loop().run_in_executor(None, replica.backend.final_cost)

    async def stop(self, replica_id: str) -> None:
        """Stop an instance; its weights stay in the pool as retained."""
        replica = self.worker.replicas.get(replica_id)
        if replica is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.worker.stop, replica)
        self.finished.pop(replica_id, None)

    async def generate(self, replica_id: str, prompt, params: SamplingParams, age: float,
                       chat: bool, adapter: str | None = None) -> AsyncIterator[str | RequestError | RequestOutput]:
        """Stream one request: first its engine id (or the RequestError), then every RequestOutput (ending with
        a `Moved` marker instead when it migrates away)."""
        replica = self.worker.replicas[replica_id]
        sink = _StreamSink(self, replica_id, asyncio.get_running_loop())
        try:
            rid = replica.submit(prompt, params, sink, arrival=time.perf_counter() - age, chat=chat, adapter=adapter)
        except RequestError as exc:
            yield exc
            return
        yield rid
        async for out in sink.items():
            yield out

    def count_finished(self, replica_id: str, reason: str) -> None:
        """Count a request's end by reason (engine threads; read by `status`)."""
        with self._finished_lock:
            self.finished.setdefault(replica_id, Counter())[reason] += 1

    # ------------------------------------------------------------------ live migration (engine/migration.py)

    async def _off(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def migratable(self, replica_id: str) -> list[str]:
        """Ids of the requests of an instance here that can migrate now ([] if it cannot migrate or is gone)."""
        replica = self.worker.replicas.get(replica_id)
        return await self._off(replica.migration.migratable) if replica is not None and replica.can_migrate else []

    async def snapshot(self, replica_id: str, request_id: str, offset: int) -> MigrationState:
        """A migration round of a request here."""
        return await self._off(self.worker.replicas[replica_id].migration.snapshot, request_id, offset)

    async def plant(self, replica_id: str, state: MigrationState, timeout_s: float) -> str:
        """Queue round 1 as a held request here; its id, once prefilled."""
        return await self._off(self.worker.replicas[replica_id].migration.plant, state, timeout_s)

    async def extend(self, replica_id: str, request_id: str, state: MigrationState, timeout_s: float) -> None:
        """Add a round's ids to a held request here."""
        await self._off(self.worker.replicas[replica_id].migration.extend, request_id, state, timeout_s)

    async def handover(self, replica_id: str, request_id: str, offset: int) -> MigrationState:
        """Detach a request here: its final round; its stream ends with a `Moved` marker."""
        state, sink = await self._off(self.worker.replicas[replica_id].migrate_out, request_id, offset)
        if isinstance(sink, _StreamSink):
            sink.moved(request_id)
        return state

    async def resume(self, replica_id: str, request_id: str,
                     state: MigrationState) -> AsyncIterator[str | Exception | RequestOutput]:
        """Release a held request here with its final round and stream it: "ok" (or the exception), then its
        outputs."""
        sink = _StreamSink(self, replica_id, asyncio.get_running_loop())
        try:
            await self._off(self.worker.replicas[replica_id].migrate_in, request_id, state, sink)
        except Exception as exc:  # noqa: BLE001 - handed to the head, which puts the request back on its source
            yield exc
            return
        yield "ok"
        async for out in sink.items():
            yield out

    async def drop(self, replica_id: str, request_id: str) -> None:
        """Forget a held request here (a migration abandoned)."""
        replica = self.worker.replicas.get(replica_id)
        if replica is not None:
            await self._off(replica.migration.drop, request_id)

    def abort(self, replica_id: str, request_id: str) -> None:
        """Stop a request; the engine frees its KV blocks at its next step and ends its stream."""
        replica = self.worker.replicas.get(replica_id)
        if replica is not None:
            replica.abort(request_id)

    async def placement_state(self, index: CheckpointIndex, request_prior_s: float) -> PlacementState:
        """`Worker.placement_state`, with the node cache's keys fetched first."""
        if self.cache is not None:
            self.cache.refresh(await self.cache.cache.keys.remote())
        loop = asyncio.get_running_loop()  # the pool's lock: off the actor's event loop
        return await loop.run_in_executor(None, self.worker.placement_state, index, request_prior_s)

    async def status(self) -> dict:
        """`Worker.status`, each instance with the finish reasons of its requests, and the node cache's stats."""
        st = self.worker.status()
        for inst in st["instances"]:
            with self._finished_lock:
                inst["finished"] = dict(self.finished.get(inst["id"], {}))
        if self.cache is not None:
            st["host_cache"] = await self.cache.cache.stats.remote()
        return st

    async def pool_map(self) -> DeviceMap:
        """`Worker.pool_map` (the pool's lock is taken off the actor's event loop)."""
        return await asyncio.get_running_loop().run_in_executor(None, self.worker.pool_map)

    async def wait_cache_idle(self) -> None:
        """Return once this worker's background node-cache fills are done (tests, benchmarks)."""
        if self.cache is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.cache.wait_idle)
