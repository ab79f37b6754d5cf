"""Typed handles on the head for worker actors: the narrow worker / replica interface the controller uses.

`RemoteWorker` and `RemoteReplica` stand in for `tangram.worker.Worker` and
`Replica`: the controller and the scheduler adapter call the same methods and
read the same fields (duck typing), and every call is a Ray actor call on a
typed `WorkerActor` handle. The controller's bookkeeping (`inflight`,
`idle_since`, `stopping`) lives here, on the head.

Blocking calls (`start`, `stop`) run on the controller's thread pool; `status`
and `placement_state` are one actor round trip each. `submit` waits for one
round trip (the engine validates the prompt and answers its request id, or the
`RequestError`), then an asyncio task (a thread outside an event loop) pumps the
rest of the Ray stream into `sink`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.actor import ActorHandle
from ray.exceptions import RayTaskError

from tangram.engine import EngineConfig, RequestOutput, SamplingParams, StartCost
from tangram.store import CheckpointIndex
from tangram.worker.worker import ControlState, DeviceMap

log = logging.getLogger(__name__)
_pumps: set[asyncio.Task] = set()  # strong references to running stream pumps


@dataclass(eq=False)
class RemoteReplica(ControlState):
    """An instance running in a worker actor, as the controller sees it."""

    id: str
    deployment: str
    worker: RemoteWorker
    cost: StartCost

    def submit(self, prompt, params: SamplingParams, sink: Callable[[RequestOutput], None], *, arrival: float,
               chat: bool = False) -> str:
        """Queue a request on the actor's engine; its outputs go to `sink`. Raises RequestError for a bad prompt."""
        gen = self.worker.actor.generate.options(num_returns="streaming").remote(
            self.id, prompt, params, time.perf_counter() - arrival, chat)
        first = ray.get(next(gen))
        if isinstance(first, Exception):
            raise first
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            threading.Thread(target=_pump_blocking, args=(gen, first, sink), name=f"stream-{first}",
                             daemon=True).start()
        else:
            task = loop.create_task(_pump(gen, first, sink))
            _pumps.add(task)
            task.add_done_callback(_pumps.discard)
        return first

    def abort(self, request_id: str) -> None:
        """Stop a request on the actor (does not wait): its KV blocks are freed at the engine's next step."""
        self.worker.actor.abort.remote(self.id, request_id)


def _failed(request_id: str, exc: BaseException | None) -> RequestOutput:
    reason = f"the worker actor failed: {exc}" if exc else "the worker actor ended the stream early"
    return RequestOutput(request_id, "", [], "", finished=True, finish_reason="error", error=reason)


async def _pump(gen, request_id: str, sink: Callable[[RequestOutput], None]) -> None:
    try:
        async for ref in gen:
            out = await ref
            sink(out)
            if out.finished:
                return
        sink(_failed(request_id, None))
    except Exception as exc:  # noqa: BLE001 - the request ends with an error, the server keeps serving
        log.warning("stream of %s failed", request_id, exc_info=True)
        sink(_failed(request_id, exc))


def _pump_blocking(gen, request_id: str, sink: Callable[[RequestOutput], None]) -> None:
    try:
        for ref in gen:
            out = ray.get(ref)
            sink(out)
            if out.finished:
                return
        sink(_failed(request_id, None))
    except Exception as exc:  # noqa: BLE001 - as in _pump
        log.warning("stream of %s failed", request_id, exc_info=True)
        sink(_failed(request_id, exc))


class RemotePool:
    """The part of a worker's `DevicePool` the controller uses, on the actor."""

    def __init__(self, actor: ActorHandle) -> None:
        self.actor = actor

    def wait_for_space(self, timeout: float) -> bool:
        """Block until the actor's pool sees a release or a KV free (or `timeout` s); True if woken by one."""
        return ray.get(self.actor.wait_for_space.remote(timeout))


def _unwrapped(exc: RayTaskError) -> Exception:
    """The exception the actor raised (PoolFullError, a checkpoint error), not Ray's wrapper."""
    return exc.cause if isinstance(exc.cause, Exception) else exc


class RemoteWorker:
    """A `WorkerActor` (one device of one Ray node) behind the worker interface of the controller."""

    def __init__(self, actor: ActorHandle, index: int, device: str, node: int, ray_node: str) -> None:
        self.actor, self.index, self.device, self.node, self.ray_node = actor, index, device, node, ray_node
        self.pool = RemotePool(actor)
        self.replicas: dict[str, RemoteReplica] = {}
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        """`cpu#2@node1`: device, cluster-wide worker index and node ordinal."""
        return f"{self.device}#{self.index}@node{self.node}"

    def start(self, deployment: str, checkpoint: Path, config: EngineConfig, arrival: float) -> RemoteReplica:
        """Start an instance on the actor (blocking: load + init there); the checkpoint path must exist there."""
        try:
            rid, cost = ray.get(self.actor.start.remote(deployment, str(checkpoint), config,
                                                        time.perf_counter() - arrival))
        except RayTaskError as exc:
            raise _unwrapped(exc) from None
        replica = RemoteReplica(rid, deployment, self, cost)
        with self._lock:
            self.replicas[rid] = replica
        return replica

    def warm(self, checkpoint: Path) -> float:
        """Warm the actor for a model expected there (see `Worker.warm`); the checkpoint must exist there."""
        return ray.get(self.actor.warm.remote(str(checkpoint)))

    def freeable_bytes(self, replica: RemoteReplica) -> int:
        """Pool bytes that stopping the instance would give back on the actor (see `Worker.freeable_bytes`)."""
        return ray.get(self.actor.freeable_bytes.remote(replica.id))

    def stop(self, replica: RemoteReplica) -> None:
        """Stop the instance on the actor (blocking); its weights stay retained in the actor's pool."""
        ray.get(self.actor.stop.remote(replica.id))
        with self._lock:
            self.replicas.pop(replica.id, None)
        log.info("stopped %s on %s", replica.id, self.name)

    def placement_state(self, index: CheckpointIndex, request_prior_s: float = 0.05) -> dict:
        """What the scheduler needs of this device for the model of `index` (node = this node's ordinal)."""
        return {**ray.get(self.actor.placement_state.remote(index, request_prior_s)), "node": self.node}

    def status(self) -> dict:
        """The actor's pool bytes per state, KV bytes and instances, with this worker's name and node."""
        st = ray.get(self.actor.status.remote())
        return {**st, "worker": self.name, "node": self.node, "ray_node": self.ray_node}

    def pool_map(self) -> DeviceMap:
        """The actor's pool map (see `Worker.pool_map`), under this worker's cluster-wide name."""
        return dataclasses.replace(ray.get(self.actor.pool_map.remote()), worker=self.name, node=self.node)

    def wait_cache_idle(self) -> None:
        """Block until the actor's background node-cache fills are done (tests, benchmarks)."""
        ray.get(self.actor.wait_cache_idle.remote())
