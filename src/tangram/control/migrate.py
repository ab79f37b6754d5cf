"""Live migration, orchestrated by the controller: move running requests between instances of one deployment.

A move is multi-round and token-based (`tangram.engine.migration`): round 1
sends the prompt and the tokens so far to a held request on the destination,
which prefills them while the source decodes on; each next round sends the
tokens generated meanwhile; when at most `threshold` are left, the source
hands the request over between two steps and the destination streams on to
the same client sink. The controller's counts follow: the destination counts
the request in before it resumes, the source counts it out (and may drain or
stop) after; `ReplicaState.follow` tells the request's stream where it went,
so its release and an abort reach the right instance.

Faults: anything failing before the handover (the destination dies, a round
takes longer than `deadline_s`) abandons the move; the held request is dropped
and the source never stopped decoding. A destination that fails at the
handover gets the request put back on the source (its KV recomputed there):
no token is lost either way.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass

from pydantic import BaseModel, ConfigDict, Field

from tangram.control.events import Activity
from tangram.control.state import DeploymentState, ReplicaState, UnknownDeployment
from tangram.engine import RequestOutput
from tangram.engine.migration import MigrationState
from tangram.scheduler.adapter import start_seconds
from tangram.scheduler.migration import INF, Busy, Rates, consolidate, measured, migrate_s, room_plan, wait_s
from tangram.worker import WorkerHandle

log = logging.getLogger(__name__)

Release = Callable[[DeploymentState, ReplicaState], None]
StartOn = Callable[[DeploymentState, list[WorkerHandle], float], Awaitable[None]]


@dataclass(frozen=True)
class MigrationSettings:
    """How moves run: hand over at `threshold` tokens left, after at most `max_rounds`, within `deadline_s`."""

    threshold: int = 2
    max_rounds: int = 8
    deadline_s: float = 30.0
    step_timeout_s: float = 20.0  # one round's prefill on the destination
    auto: bool = False  # the controller migrates by itself: to make room for a start (when sooner), to scale in
    rates: Rates = Rates()  # priors of the wait-or-migrate estimate (scheduler/migration.py)


class MigrateRequest(BaseModel):
    """`POST /admin/migrate`: move the running requests of `deployment` to its instance on worker `to`."""

    model_config = ConfigDict(extra="forbid")

    deployment: str = Field(min_length=1)
    to: str = Field(min_length=1, description="a worker name as `tangram status` lists it (cpu#1, cuda:0#0@node1)")


@dataclass(frozen=True)
class MoveReport:
    """How one request's move went. `outcome`: moved, finished (it ended first), abandoned, returned (the
    destination failed at the handover: it continues on the source)."""

    request_id: str
    source: str
    destination: str
    outcome: str
    rounds: int
    tokens_sent: int
    bytes_sent: int
    seconds: float
    error: str | None = None


class Migrator:
    """Moves requests between the instances the controller keeps (`states`: its deployments by name)."""

    def __init__(self, states: dict[str, DeploymentState], workers: list[WorkerHandle], release: Release,
                 start_on: StartOn, activity: Activity, settings: MigrationSettings | None = None) -> None:
        self.states, self.workers, self.release, self.start_on = states, workers, release, start_on
        self.activity = activity
        self.settings = settings or MigrationSettings()
        self._consolidating: set[str] = set()  # deployments with a scale-in move under way
        self._abandoned: set[asyncio.Future] = set()  # plants still running when their move was given up

    async def migrate(self, name: str, to: str) -> dict:
        """Move every running request of deployment `name` that can move to its instance on worker `to` (one
        is started there if none runs). KeyError-like UnknownDeployment / ValueError for bad names."""
        state = self.states.get(name)
        if state is None:
            raise UnknownDeployment(name)
        worker = next((w for w in self.workers if w.name == to), None)
        if worker is None:
            raise ValueError(f"no worker {to!r}: one of {', '.join(w.name for w in self.workers)}")
        dst = await self._instance_on(state, worker)
        moves = []
        for src in [r for r in state.replicas if r is not dst and not r.stopping]:
            moves += [self.move(state, src, dst, rid) for rid in await src.worker.migratable(src.ref)]
        reports = await asyncio.gather(*moves)
        return {"deployment": name, "to": to, "instance": dst.id,
                "moved": sum(r.outcome == "moved" for r in reports), "moves": [asdict(r) for r in reports]}

    async def evacuate(self, state: DeploymentState, src: ReplicaState) -> list[MoveReport]:
        """Move the requests of `src` to the least-loaded other running instance of its deployment (none: [])."""
        peers = [r for r in state.replicas if r is not src and not r.stopping and not r.draining]
        if not peers:
            return []
        dst = min(peers, key=lambda r: r.inflight)
        ids = await src.worker.migratable(src.ref)
        return list(await asyncio.gather(*(self.move(state, src, dst, rid) for rid in ids)))

    def relieve(self, state: DeploymentState, victim: ReplicaState) -> None:
        """`victim` (of `state`) is draining to make room for a start: with `make_room` on, move its requests to a
        peer in the background when the estimate says that frees it sooner than waiting."""
        if self.settings.auto:
            asyncio.get_running_loop().create_task(self._relieve(state, victim))

    async def _relieve(self, state: DeploymentState, victim: ReplicaState) -> None:
        try:
            await self._relieve_now(state, victim)
        except Exception:  # noqa: BLE001 - the drain goes on as without migration
            log.warning("migrating off %s failed; it drains by waiting", victim.id, exc_info=True)

    async def _relieve_now(self, state: DeploymentState, victim: ReplicaState) -> None:
        ids = await victim.worker.migratable(victim.ref)
        if not ids:
            return
        rounds = await asyncio.gather(*(victim.worker.snapshot(victim.ref, rid, 0) for rid in ids),
                                      return_exceptions=True)
        live = [st for st in rounds if isinstance(st, MigrationState) and not st.finished and st.params]
        peers = [r for r in state.replicas if r is not victim and not r.stopping and not r.draining]
        worker, ready_s = (None, 0.0) if peers else await self._cheapest_start(state, victim.worker)
        busy = Busy(remaining_tokens=max((st.params.max_tokens - len(st.output_ids) for st in live), default=0),
                    context_tokens=sum(len(st.prompt_ids) + len(st.output_ids) for st in live),
                    can_migrate=len(live) == victim.inflight, dest_ready_s=ready_s)
        rates = await self._rates(victim, min(peers, key=lambda r: r.inflight) if peers else None)
        if room_plan([busy], rates) != ["migrate"]:
            log.info("draining %s by waiting: %.2f s, against %.2f s to migrate", victim.id, wait_s(busy, rates),
                     migrate_s(busy, rates))
            return
        log.info("migrating %d request(s) off draining %s instead of waiting (%.2f s, against %.2f s to wait; "
                 "destination ready in %.2f s)", len(live), victim.id, migrate_s(busy, rates), wait_s(busy, rates),
                 ready_s)
        if worker is not None:  # no running peer: start one where that is cheapest, then move there
            dst = await self._instance_on(state, worker)
            await asyncio.gather(*(self.move(state, victim, dst, st.request_id) for st in live))
        else:
            await self.evacuate(state, victim)

    async def _rates(self, source: ReplicaState, peer: ReplicaState | None) -> Rates:
        """The estimate's speeds: the source's measured step, the running peer's measured prefill (none, a
        destination still to start: the source's, the same model), each the prior until measured."""
        src = await source.worker.rates(source.ref)
        dst = await peer.worker.rates(peer.ref) if peer is not None else src
        return measured(self.settings.rates, src.step_s, dst.prefill_s_per_token or src.prefill_s_per_token)

    async def _cheapest_start(self, state: DeploymentState, avoid: WorkerHandle) -> tuple[WorkerHandle | None, float]:
        """The other worker where an instance of `state` starts soonest, and the estimate (INF: none fits now)."""
        others = [w for w in self.workers if w is not avoid]
        places = await asyncio.gather(*(w.placement_state(state.index) for w in others), return_exceptions=True)
        costs = [(start_seconds(st, state.index.total_bytes), w) for w, st in zip(others, places)
                 if not isinstance(st, BaseException)]
        seconds, worker = min(costs, key=lambda c: c[0], default=(INF, None))
        return (worker, seconds) if seconds < INF else (None, INF)

    def consolidate(self, state: DeploymentState) -> None:
        """Scale-in (with `auto` on): when the least-loaded instance's requests fit in the others under the target
        concurrency, drain it and move them now, rather than keep it until its longest request ends."""
        name = state.spec.name
        live = [r for r in state.replicas if not r.stopping and not r.draining]
        if not self.settings.auto or name in self._consolidating or len(live) <= max(1, state.spec.min_instances):
            return
        i = consolidate([r.inflight for r in live], state.spec.target_concurrency, [True] * len(live))
        if i is None:
            return
        victim = live[i]
        victim.draining = True  # takes no new request; stopped once its last one moved or ended
        self.activity.record("consolidate", f"scale-in: moving the {victim.inflight} request(s) of {victim.id} "
                             "to the other instances", name, victim.worker.name)
        self._consolidating.add(name)
        task = asyncio.get_running_loop().create_task(self.evacuate(state, victim))
        task.add_done_callback(lambda t: self._consolidated(name, t))

    def _consolidated(self, name: str, task: asyncio.Task) -> None:
        self._consolidating.discard(name)
        if not task.cancelled() and task.exception() is not None:  # the instance drains by waiting instead
            log.warning("scale-in by migration of %s failed: %s", name, task.exception())

    async def _instance_on(self, state: DeploymentState, worker: WorkerHandle) -> ReplicaState:
        live = [r for r in state.replicas if r.worker is worker and not r.stopping and not r.draining]
        if live:
            return live[0]
        state.starting += 1  # what the controller's own starts count (start_on counts it back)
        await self.start_on(state, [worker], time.perf_counter())
        live = [r for r in state.replicas if r.worker is worker and not r.stopping and not r.draining]
        if not live:
            raise RuntimeError(f"no instance of {state.spec.name!r} could start on {worker.name}: {state.last_error}")
        return live[0]

    async def move(self, state: DeploymentState, src: ReplicaState, dst: ReplicaState, request_id: str) -> MoveReport:
        """Move one request from `src` to `dst` (see the module docstring); never raises."""
        cfg, t0 = self.settings, time.perf_counter()
        sent = rounds = nbytes = 0
        dest_id: str | None = None
        whole: MigrationState | None = None  # everything sent, to put the request back on the source
        planting: asyncio.Future | None = None

        def report(outcome: str, error: str | None = None) -> MoveReport:
            rep = MoveReport(request_id, src.id, dst.id, outcome, rounds, sent, nbytes, time.perf_counter() - t0,
                             error)
            log.info("migration of %s %s -> %s: %s after %d round(s), %d tokens, %d bytes, %.3f s%s", request_id,
                     src.id, dst.id, outcome, rounds, sent, nbytes, rep.seconds, f" ({error})" if error else "")
            return rep

        async def rounds_until_handover() -> bool:
            nonlocal sent, rounds, nbytes, dest_id, whole, planting
            st = await src.worker.snapshot(src.ref, request_id, 0)
            if st.finished:
                return False
            nbytes += st.nbytes
            whole = st
            planting = asyncio.ensure_future(dst.worker.plant(dst.ref, st, cfg.step_timeout_s))
            planting.add_done_callback(functools.partial(self._late_plant, dst))
            dest_id = await asyncio.shield(planting)
            sent, rounds = len(st.output_ids), 1
            while rounds < cfg.max_rounds:
                st = await src.worker.snapshot(src.ref, request_id, sent)
                if st.finished:
                    return False
                if len(st.output_ids) <= cfg.threshold:
                    return True
                nbytes += st.nbytes
                await dst.worker.extend(dst.ref, dest_id, st, cfg.step_timeout_s)
                whole.output_ids += st.output_ids
                sent, rounds = sent + len(st.output_ids), rounds + 1
            return True

        try:
            if not await asyncio.wait_for(rounds_until_handover(), cfg.deadline_s):
                await self._drop(dst, dest_id)
                return report("finished")
        except Exception as exc:  # noqa: BLE001 - the source keeps the request: it never stopped decoding
            if dest_id is None and planting is not None:  # a plant cut off by the deadline
                if not planting.done():
                    self._abandoned.add(planting)  # still running: dropped when it lands
                elif not planting.cancelled() and planting.exception() is None:
                    dest_id = planting.result()
            await self._drop(dst, dest_id)
            why = "deadline passed" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
            return report("abandoned", why)
        assert dest_id is not None and whole is not None
        try:
            final, sink = await src.worker.handover(src.ref, request_id, sent)
        except Exception as exc:  # noqa: BLE001 - the source failed: its stream ends with the failure
            await self._drop(dst, dest_id)
            return report("abandoned", f"handover failed: {type(exc).__name__}: {exc}")
        rounds += 1
        nbytes += final.nbytes
        if sink is None:  # it ended between the last round and the handover
            await self._drop(dst, dest_id)
            return report("finished")
        sent += len(final.output_ids)
        src.moved[request_id] = (dst, dest_id)  # before it resumes: its end may come at once
        dst.inflight, dst.idle_since = dst.inflight + 1, None
        try:
            await dst.worker.resume(dst.ref, dest_id, final, sink)
        except Exception as exc:  # noqa: BLE001 - the destination failed after the handover: back to the source
            if src.moved.pop(request_id, None) is None:  # its client left meanwhile: the stream released dst
                self.release(state, src)
                await self._drop(dst, dest_id)
                return report("abandoned", f"the client left during the handover ({type(exc).__name__}: {exc})")
            self.release(state, dst)
            await self._drop(dst, dest_id)
            try:
                await self._put_back(src, whole, final, sink)
            except Exception as back:  # noqa: BLE001 - both ends failed: the stream ends with the error
                log.exception("could not put %s back on %s", request_id, src.id)
                sink(RequestOutput(request_id, "", [], "", True, "error", f"live migration failed: {exc}; put back "
                                   f"on the source: {back}"))
                return report("failed", f"{type(exc).__name__}: {exc}; {type(back).__name__}: {back}")
            return report("returned", f"{type(exc).__name__}: {exc}")
        self.release(state, src)  # counted out of the source: it may drain or stop now
        self.activity.record("migrate", f"moved {request_id} from {src.id} to {dst.id} ({rounds} rounds, "
                             f"{nbytes} bytes)", state.spec.name, dst.worker.name)
        return report("moved")

    def _late_plant(self, dst: ReplicaState, planting: asyncio.Future) -> None:
        """A plant that lands after its move was abandoned (the deadline passed while it ran) is dropped."""
        if planting not in self._abandoned:
            return
        self._abandoned.discard(planting)
        if not planting.cancelled() and planting.exception() is None:
            asyncio.get_running_loop().create_task(self._drop(dst, planting.result()))

    async def _put_back(self, src: ReplicaState, whole: MigrationState, final: MigrationState, sink) -> None:
        """Continue a handed-over request on its source again: its tokens prefilled anew, then the final round."""
        rid = await src.worker.plant(src.ref, whole, self.settings.step_timeout_s)
        await src.worker.resume(src.ref, rid, final, sink)

    async def _drop(self, dst: ReplicaState, dest_id: str | None) -> None:
        if dest_id is None:
            return
        try:
            await dst.worker.drop(dst.ref, dest_id)
        except Exception:  # noqa: BLE001 - a dead destination took its held request with it
            log.warning("could not drop held %s on %s", dest_id, dst.id, exc_info=True)
