"""`RemoteWorker`: a `WorkerActor` behind the worker contract (`tangram.worker.handle.WorkerHandle`).

Every call is an actor call whose `ObjectRef` is awaited on the caller's
event loop (never a blocking `ray.get` there). `submit` awaits the stream's
first item (the engine's request id, or the `RequestError` of a bad prompt),
then a task pumps the rest of the Ray stream into the sink. `last_status`
answers from the last status the actor sent and asks for a newer one behind.

An actor that dies is restarted by Ray (`max_restarts`) with an empty pool:
a request it was streaming ends with an `instance_failed` error output (the
controller retires that instance and retries the request once if nothing was
streamed yet), and so does one sent to an instance the restart forgot.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.actor import ActorHandle
from ray.exceptions import RayActorError, RayTaskError

from tangram.cluster.actor import Moved
from tangram.engine import EngineConfig, EngineRates, RequestError, RequestOutput, SamplingParams, StartCost
from tangram.engine.migration import MigrationError, MigrationState
from tangram.scheduler.adapter import stats_from_cost
from tangram.store import CheckpointIndex, LoadStats
from tangram.worker import DeviceMap, PlacementState

log = logging.getLogger(__name__)
_pumps: set[asyncio.Task] = set()  # strong references to running stream pumps


@dataclass(frozen=True)
class RemoteReplica:
    """An instance running in a worker actor: its id there, deployment, and what its start cost."""

    id: str
    deployment: str
    cost: StartCost


def _failed(request_id: str, exc: BaseException | None) -> RequestOutput:
    reason = f"the worker actor failed: {exc}" if exc else "the worker actor ended the stream early"
    return RequestOutput(request_id, "", [], "", finished=True, finish_reason="error", error=reason,
                         instance_failed=True, worker_failed=isinstance(exc, RayActorError))


async def _pump(gen, request_id: str, sink: Callable[[RequestOutput], None],
                moved: asyncio.Future | None = None) -> None:
    """Feed a request's Ray stream into its sink; a `Moved` marker (it migrated) ends it silently, setting
    `moved` once every output before it reached the sink."""
    try:
        async for ref in gen:
            out = await ref
            if isinstance(out, Moved):
                if moved is not None and not moved.done():
                    moved.set_result(None)
                return
            sink(out)
            if out.finished:
                return
        sink(_failed(request_id, None))
    except Exception as exc:  # noqa: BLE001 - the request ends with an error, the server keeps serving
        log.warning("stream of %s failed: %s", request_id, exc)
        sink(_failed(request_id, exc))
    finally:
        if moved is not None and not moved.done():
            moved.set_exception(MigrationError(f"the stream of {request_id} ended without a handover"))
            moved.exception()  # retrieved: no warning when nobody waits for it


def _unwrapped(exc: RayTaskError) -> Exception:
    """The exception the actor raised (PoolFullError, a checkpoint error), not Ray's wrapper."""
    return exc.cause if isinstance(exc.cause, Exception) else exc


class RemoteWorker:
    """A `WorkerActor` (one device of one Ray node) as the controller's worker handle."""

    def __init__(self, actor: ActorHandle, index: int, device: str, node: int, ray_node: str,
                 capacity: int = 0) -> None:
        self.actor, self.index, self.device, self.node, self.ray_node = actor, index, device, node, ray_node
        self.capacity = capacity
        self._status = {"worker": self.name, "device": device, "capacity": capacity, "pool": {}, "kv_bytes": 0,
                        "instances": [], "node": node, "ray_node": ray_node}
        self._refresh: Future | None = None
        self._streams: dict[tuple[str, str], tuple[Callable[[RequestOutput], None], asyncio.Future]] = {}

    @property
    def name(self) -> str:
        """`cpu#2@node1`: device, cluster-wide worker index and node ordinal."""
        return f"{self.device}#{self.index}@node{self.node}"

    async def start(self, deployment: str, checkpoint: Path, config: EngineConfig, arrival: float,
                    backend: str = "builtin") -> RemoteReplica:
        """Start an instance on the actor (load + init there); the checkpoint path must exist there."""
        try:
            rid, cost = await self.actor.start.remote(deployment, str(checkpoint), config,
                                                      time.perf_counter() - arrival, backend)
        except RayTaskError as exc:
            raise _unwrapped(exc) from None
        return RemoteReplica(rid, deployment, cost)

    async def submit(self, replica: RemoteReplica, prompt, params: SamplingParams,
                     sink: Callable[[RequestOutput], None], *, arrival: float, chat: bool = False,
                     adapter: str | None = None) -> str:
        """Queue a request on the actor's engine; its outputs go to `sink`. Raises RequestError for a bad prompt."""
        gen = self.actor.generate.options(num_returns="streaming").remote(
            replica.id, prompt, params, time.perf_counter() - arrival, chat, adapter)
        try:
            first = await gen.__anext__()
            first = await first
        except (RayActorError, RayTaskError, StopAsyncIteration) as exc:  # died, or restarted without it
            rid = f"{replica.id}-lost-{time.monotonic_ns()}"
            log.warning("%s on %s cannot take requests: %s", replica.id, self.name, exc)
            sink(_failed(rid, exc if isinstance(exc, Exception) else None))
            return rid
        if isinstance(first, RequestError):
            raise first
        self._pump(gen, replica.id, first, sink)
        return first

    def _pump(self, gen, replica_id: str, request_id: str, sink: Callable[[RequestOutput], None]) -> None:
        """Pump a request's stream into `sink` in a task, known by (instance, request) until it ends."""
        key, moved = (replica_id, request_id), asyncio.get_running_loop().create_future()
        self._streams[key] = (sink, moved)
        task = asyncio.get_running_loop().create_task(_pump(gen, request_id, sink, moved))
        _pumps.add(task)
        task.add_done_callback(_pumps.discard)
        task.add_done_callback(lambda _: self._streams.pop(key, None))

    def abort(self, replica: RemoteReplica, request_id: str) -> None:
        """Stop a request on the actor (not waited for): its KV blocks are freed at the engine's next step."""
        self.actor.abort.remote(replica.id, request_id)

    async def stop(self, replica: RemoteReplica) -> None:
        """Stop the instance on the actor; its weights stay retained in the actor's pool."""
        try:
            await self.actor.stop.remote(replica.id)
        except RayActorError as exc:  # the actor died (or restarts): the instance went with its process
            log.warning("%s on %s is gone with its actor: %s", replica.id, self.name, exc)
            return
        log.info("stopped %s on %s", replica.id, self.name)

    async def warm(self, checkpoint: Path, engine: EngineConfig | None = None, backend: str = "builtin") -> float:
        """Warm the actor for a model expected there (see `Worker.warm`); the checkpoint must exist there."""
        return await self.actor.warm.remote(str(checkpoint), engine, backend)

    async def final_cost(self, replica: RemoteReplica) -> StartCost:
        """The start's cost once its load is over on the actor (what the start reported if the actor lost it)."""
        try:
            cost = await self.actor.final_cost.remote(replica.id)
        except RayActorError:
            cost = None
        return cost if cost is not None else replica.cost

    async def load_stats(self, replica: RemoteReplica) -> LoadStats | None:
        """The load figures the reported cost implies."""
        return stats_from_cost(replica.cost)

    async def rates(self, replica: RemoteReplica) -> EngineRates:
        """What the instance's engine on the actor measured of its speed."""
        return await self.actor.rates.remote(replica.id)

    async def freeable_bytes(self, replica: RemoteReplica) -> int:
        """Pool bytes that stopping the instance would give back on the actor (see `Worker.freeable_bytes`)."""
        return await self.actor.freeable_bytes.remote(replica.id)

    async def placement_state(self, index: CheckpointIndex, request_prior_s: float = 0.05) -> PlacementState:
        """What the scheduler needs of this device for the model of `index` (node = this node's ordinal)."""
        st = await self.actor.placement_state.remote(index, request_prior_s)
        return dataclasses.replace(st, node=self.node)

    def _named(self, st: dict) -> dict:
        return {**st, "worker": self.name, "node": self.node, "ray_node": self.ray_node}

    async def status(self) -> dict:
        """The actor's pool bytes per state, KV bytes and instances, with this worker's name and node."""
        self._status = self._named(await self.actor.status.remote())
        return self._status

    def last_status(self) -> dict:
        """The last status the actor sent; a newer one is asked for behind (one request at a time)."""
        if self._refresh is None or self._refresh.done():
            self._refresh = self.actor.status.remote().future()
            self._refresh.add_done_callback(self._refreshed)
        return self._status

    def _refreshed(self, fut: Future) -> None:
        if fut.exception() is None:
            self._status = self._named(fut.result())

    def pool_map(self) -> DeviceMap:
        """The actor's pool map (see `Worker.pool_map`), under this worker's cluster-wide name (blocking: the
        dashboard calls it on its own threads)."""
        return dataclasses.replace(ray.get(self.actor.pool_map.remote()), worker=self.name, node=self.node)

    # ------------------------------------------------------------------ live migration (engine/migration.py)

    async def _call(self, method: str, *args):
        try:
            return await getattr(self.actor, method).remote(*args)
        except RayTaskError as exc:
            raise _unwrapped(exc) from None

    async def migratable(self, replica: RemoteReplica) -> list[str]:
        """Ids of the requests of `replica` that can migrate now ([] when its backend cannot)."""
        return await self._call("migratable", replica.id)

    async def snapshot(self, replica: RemoteReplica, request_id: str, offset: int) -> MigrationState:
        """A migration round of a request on the actor."""
        return await self._call("snapshot", replica.id, request_id, offset)

    async def plant(self, replica: RemoteReplica, state: MigrationState, timeout_s: float) -> str:
        """Queue round 1 as a held request on the actor; its id there, once prefilled."""
        return await self._call("plant", replica.id, state, timeout_s)

    async def extend(self, replica: RemoteReplica, request_id: str, state: MigrationState, timeout_s: float) -> None:
        """Add a round's ids to a held request on the actor."""
        await self._call("extend", replica.id, request_id, state, timeout_s)

    async def handover(self, replica: RemoteReplica, request_id: str,
                       offset: int) -> tuple[MigrationState, Callable[[RequestOutput], None] | None]:
        """Detach a request on the actor: its final round and the client's sink here, once every output the
        source streamed before the handover has reached it (None: the request had ended)."""
        entry = self._streams.get((replica.id, request_id))
        state = await self._call("handover", replica.id, request_id, offset)
        if state.finished or entry is None:
            return state, None
        sink, moved = entry
        await asyncio.wait_for(asyncio.shield(moved), 30.0)
        return state, sink

    async def resume(self, replica: RemoteReplica, request_id: str, state: MigrationState,
                     sink: Callable[[RequestOutput], None]) -> None:
        """Release a held request on the actor; a new stream from there feeds `sink`."""
        gen = self.actor.resume.options(num_returns="streaming").remote(replica.id, request_id, state)
        try:
            first = await (await gen.__anext__())
        except (RayActorError, RayTaskError, StopAsyncIteration) as exc:
            raise MigrationError(f"{self.name} could not resume {request_id}: {exc}") from None
        if isinstance(first, Exception):
            raise first
        self._pump(gen, replica.id, request_id, sink)

    async def drop(self, replica: RemoteReplica, request_id: str) -> None:
        """Forget a held request on the actor."""
        await self._call("drop", replica.id, request_id)

    async def wait_cache_idle(self) -> None:
        """Return once the actor's background node-cache fills are done (tests, benchmarks)."""
        await self.actor.wait_cache_idle.remote()
