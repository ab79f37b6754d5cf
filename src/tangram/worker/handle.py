"""The worker contract the controller uses, one for a worker in this process and one in a Ray actor.

Every call that can wait (a load, a stop, a round trip to an actor) is a
coroutine: the controller awaits it on its event loop, which nothing blocks.
`abort` only sends (a local engine takes it under its lock, an actor call is
not waited for); `last_status` answers at once from what is known (the
`/metrics` scrape reads it); `pool_map` blocks (the dashboard calls it on its
own threads).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from tangram.engine import EngineConfig, EngineRates, SamplingParams, StartCost
    from tangram.engine.backend import Sink
    from tangram.store import CheckpointIndex, LoadStats
    from tangram.worker.worker import DeviceMap


@dataclass(frozen=True)
class PlacementState:
    """What the scheduler needs of one device for one model (`tangram.scheduler.adapter`)."""

    node: int  # the node ordinal (one DRAM cache tier per node)
    free: int  # pool bytes free
    retained: int  # pool bytes held by no instance (evictable)
    queue_s: float  # estimated seconds of the requests in flight there
    resident: int  # bytes of the model's tensors already in the pool (shared tensors count)
    cached: int  # bytes of the model's distinct tensors in the node's DRAM cache tier


@runtime_checkable
class ReplicaRef(Protocol):
    """A started instance as its worker names it: its id, deployment and what its start cost."""

    id: str
    deployment: str

    @property
    def cost(self) -> StartCost:
        """What the start cost (before a background load settles it: see `WorkerHandle.final_cost`)."""
        ...


@runtime_checkable
class WorkerHandle(Protocol):
    """One device (its pool and instances), local or a Ray actor, as the controller drives it."""

    name: str
    device: str
    node: int

    async def start(self, deployment: str, checkpoint: Path, config: EngineConfig, arrival: float,
                    backend: str = "builtin") -> ReplicaRef:
        """Start an instance (load + init); raises `PoolFullError` when the pool has no room now."""
        ...

    async def submit(self, replica: ReplicaRef, prompt, params: SamplingParams,
                     sink: Sink, *, arrival: float, chat: bool = False, adapter: str | None = None) -> str:
        """Queue a request on `replica` (tokenized there; `adapter`: a LoRA adapter checkpoint path); its id. Outputs reach `sink` from another thread;
        a worker that dies mid-request sends a last output with `instance_failed` set."""
        ...

    def abort(self, replica: ReplicaRef, request_id: str) -> None:
        """Stop a request (does not wait); its stream ends with a finished output."""
        ...

    async def stop(self, replica: ReplicaRef) -> None:
        """Stop an instance; its weights stay retained in the pool."""
        ...

    async def warm(self, checkpoint: Path, engine: EngineConfig | None = None, backend: str = "builtin") -> float:
        """Warm this device for a model expected on it (builtin: skeleton, tokenizer, template operators; vllm:
        an engine shell of its shape, built behind); seconds."""
        ...

    async def final_cost(self, replica: ReplicaRef) -> StartCost:
        """The start's cost once its load is over (a background load settles type and bytes when it ends)."""
        ...

    async def load_stats(self, replica: ReplicaRef) -> LoadStats | None:
        """What the start loaded, from where, in how long (for the scheduler's bandwidth estimate)."""
        ...

    async def rates(self, replica: ReplicaRef) -> EngineRates:
        """What the instance's engine measured of its speed (`EngineRates()` once it is gone)."""
        ...

    async def freeable_bytes(self, replica: ReplicaRef) -> int:
        """Pool bytes that stopping `replica` would give back (0 once it is gone)."""
        ...

    async def placement_state(self, index: CheckpointIndex, request_prior_s: float = 0.05) -> PlacementState:
        """This device as the scheduler sees it for the model of `index`."""
        ...

    async def status(self) -> dict:
        """Pool capacity and bytes per state, KV bytes, and the instances here (fresh)."""
        ...

    def last_status(self) -> dict:
        """`status` without waiting: a local worker's now, a remote one's last known (refreshed behind)."""
        ...

    def pool_map(self) -> DeviceMap:
        """The pool map of this device (blocking: call it off the event loop)."""
        ...


__all__ = ["PlacementState", "ReplicaRef", "WorkerHandle"]
