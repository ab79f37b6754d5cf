"""`LocalWorker`: a `Worker` of this process behind the async worker contract (`tangram.worker.handle`).

Each blocking call (a start's load, a stop, tokenizing a prompt) runs on the
event loop's default thread pool; the outputs of a request reach its sink from
the engine thread, as they do from a Ray stream in cluster mode.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tangram.engine import EngineConfig, EngineRates, RequestOutput, SamplingParams, StartCost
from tangram.engine.backend import Sink
from tangram.engine.migration import MigrationState
from tangram.store import CheckpointIndex, LoadStats
from tangram.worker.handle import PlacementState
from tangram.worker.worker import DeviceMap, Replica, Worker


async def _off_loop(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args, **kwargs))


class LocalWorker:
    """The async handle on a `Worker` of this process (`worker`: the device, its pool and instances)."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.name, self.device, self.node = worker.name, worker.device, worker.node

    async def start(self, deployment: str, checkpoint: Path, config: EngineConfig, arrival: float,
                    backend: str = "builtin") -> Replica:
        """`Worker.start` off the loop."""
        return await _off_loop(self.worker.start, deployment, checkpoint, config, arrival, backend)

    async def submit(self, replica: Replica, prompt, params: SamplingParams,
                     sink: Callable[[RequestOutput], None], *, arrival: float, chat: bool = False,
                     adapter: str | None = None) -> str:
        """`Replica.submit` off the loop (tokenizing a long prompt, binding an adapter is CPU work)."""
        return await _off_loop(replica.submit, prompt, params, sink, arrival=arrival, chat=chat, adapter=adapter)

    def abort(self, replica: Replica, request_id: str) -> None:
        """Stop a request (the engine only marks it: its next step frees its KV blocks)."""
        replica.abort(request_id)

    async def stop(self, replica: Replica) -> None:
        """`Worker.stop` off the loop."""
        await _off_loop(self.worker.stop, replica)

    async def warm(self, checkpoint: Path, engine: EngineConfig | None = None, backend: str = "builtin") -> float:
        """`Worker.warm` off the loop."""
        return await _off_loop(self.worker.warm, checkpoint, engine, backend)

    async def final_cost(self, replica: Replica) -> StartCost:
        """The start's cost once a background load is over."""
        return await _off_loop(replica.backend.final_cost)

    async def load_stats(self, replica: Replica) -> LoadStats | None:
        """What the start loaded (waits for the load, off the loop)."""
        return await _off_loop(replica.backend.load_stats)

    async def rates(self, replica: Replica) -> EngineRates:
        """`Worker.rates` (a read of counters: on the loop)."""
        return self.worker.rates(replica)

    async def freeable_bytes(self, replica: Replica) -> int:
        """`Worker.freeable_bytes` off the loop (it takes the pool's lock)."""
        return await _off_loop(self.worker.freeable_bytes, replica)

    async def placement_state(self, index: CheckpointIndex, request_prior_s: float = 0.05) -> PlacementState:
        """`Worker.placement_state` off the loop (it takes the pool's lock)."""
        return await _off_loop(self.worker.placement_state, index, request_prior_s)

    async def status(self) -> dict:
        """`Worker.status` off the loop."""
        return await _off_loop(self.worker.status)

    def last_status(self) -> dict:
        """`Worker.status` now (in-process: the pool's lock, briefly)."""
        return self.worker.status()

    def pool_map(self) -> DeviceMap:
        """`Worker.pool_map` (blocking briefly on the pool's lock)."""
        return self.worker.pool_map()

    # ------------------------------------------------------------------ live migration (engine/migration.py)

    async def migratable(self, replica: Replica) -> list[str]:
        """Ids of the requests of `replica` that can migrate now ([] when its backend cannot migrate)."""
        return await _off_loop(replica.migration.migratable) if replica.can_migrate else []

    async def snapshot(self, replica: Replica, request_id: str, offset: int) -> MigrationState:
        """A migration round: the request's generated ids after `offset`."""
        return await _off_loop(replica.migration.snapshot, request_id, offset)

    async def plant(self, replica: Replica, state: MigrationState, timeout_s: float) -> str:
        """Queue round 1 on `replica` as a held request; its id there, once prefilled."""
        return await _off_loop(replica.migration.plant, state, timeout_s)

    async def extend(self, replica: Replica, request_id: str, state: MigrationState, timeout_s: float) -> None:
        """Add a round's ids to a held request; returns once they are prefilled."""
        await _off_loop(replica.migration.extend, request_id, state, timeout_s)

    async def handover(self, replica: Replica, request_id: str, offset: int) -> tuple[MigrationState, Sink | None]:
        """Detach the request between steps: its final round and the client's sink (None: it had ended)."""
        return await _off_loop(replica.migrate_out, request_id, offset)

    async def resume(self, replica: Replica, request_id: str, state: MigrationState, sink: Sink) -> None:
        """Release a held request with its final round; it streams on to `sink`."""
        await _off_loop(replica.migrate_in, request_id, state, sink)

    async def drop(self, replica: Replica, request_id: str) -> None:
        """Forget a held request (a migration abandoned)."""
        await _off_loop(replica.migration.drop, request_id)
