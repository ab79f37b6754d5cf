"""The built-in engine as an `EngineBackend`: an `Instance` (pooled weights, skeleton, KV, `Engine`) stepped by
its `EngineLoop` thread."""

from __future__ import annotations

from tangram.engine import migration
from tangram.engine.backend import Sink
from tangram.engine.instance import EngineConfig, Instance
from tangram.engine.loop import EngineLoop
from tangram.engine.migration import MigrationState
from tangram.engine.prompt import Prompt
from tangram.engine.sampling import SamplingParams
from tangram.engine.stages import EngineRates, StartCost
from tangram.pool import DevicePool
from tangram.store import Checkpoint, LoadStats


class BuiltinBackend:
    """Tangram's own engine behind the backend contract (`tangram.engine.backend.EngineBackend`); its requests can
    migrate (`tangram.engine.migration.MigratableBackend`)."""

    def __init__(self, checkpoint: Checkpoint, pool: DevicePool, config: EngineConfig, *, name: str,
                 arrival: float) -> None:
        self.instance = Instance(checkpoint, pool, config, name=name, arrival=arrival)
        self.loop = EngineLoop(self.instance.engine, name=f"engine-{name}",
                               wait_for_space=pool.wait_for_space).start()

    @property
    def cost(self) -> StartCost:
        """What the start cost so far."""
        return self.instance.cost

    def submit(self, prompt: Prompt, params: SamplingParams, sink: Sink, *, arrival: float, chat: bool = False,
               adapter: str | None = None) -> str:
        """Tokenize, validate and queue a request on the engine (its LoRA adapter bound); its id."""
        return self.instance.engine.add_request(prompt, params, sink=sink, arrival=arrival, chat=chat,
                                                adapter=adapter).id

    def abort(self, request_id: str) -> None:
        """Stop a request; the engine frees its KV blocks at its next step."""
        self.instance.engine.abort(request_id)

    def health(self) -> str | None:
        """Why the engine can serve nothing more, or None."""
        return self.instance.engine.failed

    def final_cost(self) -> StartCost:
        """The start's cost once a background load is over."""
        self.instance.finalize_cost()
        return self.instance.cost

    def load_stats(self) -> LoadStats | None:
        """What the start's load read, from where (waits for the load)."""
        return self.instance.load_stats()

    def freeable_bytes(self) -> int:
        """Weights no other instance on the pool holds, plus the KV reservation."""
        return self.instance.freeable_bytes()

    def mean_prefill_s(self, prior: float) -> float:
        """Mean prefill seconds of the engine's finished requests (`prior` before the first)."""
        totals = self.instance.engine.totals
        return totals.prefill_s / totals.requests if totals.requests else prior

    def rates(self) -> EngineRates:
        """Step and prefill seconds its engine measured."""
        return self.instance.engine.totals.rates()

    def stop(self) -> None:
        """Stop the engine thread, then close the instance (weights released to the pool, retained)."""
        self.loop.stop()
        self.instance.close()

    # ------------------------------------------------------------------ live migration (engine/migration.py)

    def migratable(self) -> list[str]:
        """Ids of the running requests that can migrate now."""
        return migration.migratable(self.instance.engine)

    def snapshot(self, request_id: str, offset: int) -> MigrationState:
        """A migration round of `request_id`: its generated ids after `offset`."""
        return migration.snapshot(self.instance.engine, request_id, offset)

    def plant(self, state: MigrationState, timeout_s: float) -> str:
        """Queue round 1 as a held request; its id, once prefilled."""
        return migration.plant(self.instance.engine, state, timeout_s)

    def extend(self, request_id: str, state: MigrationState, timeout_s: float) -> None:
        """Add a round's ids to a held request; returns once they are prefilled."""
        migration.extend(self.instance.engine, request_id, state, timeout_s)

    def handover(self, request_id: str, offset: int) -> tuple[MigrationState, Sink | None]:
        """Detach the request between steps: its final round and its sink."""
        return migration.handover(self.instance.engine, request_id, offset)

    def resume(self, request_id: str, state: MigrationState, sink: Sink) -> None:
        """Release a held request with its final round; it streams on to `sink`."""
        migration.resume(self.instance.engine, request_id, state, sink)

    def drop(self, request_id: str) -> None:
        """Forget a held request (a migration abandoned)."""
        migration.drop(self.instance.engine, request_id)
