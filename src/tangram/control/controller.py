"""The controller: deployments, request dispatch, scale-out, scale-to-zero. Runs on the server's event loop.

Per deployment, a request goes to the least-loaded ready instance under its target concurrency; otherwise a
new instance starts (up to `max_instances`) and the request waits for it; at the limit, the least-loaded
instance takes it (its engine queues). An instance idle for `keep_alive_s` is stopped: its weights go back to
the pool as retained, so the next start is a pool hit. A dead worker retires every instance it held.
A deployment whose weights plus least KV exceed every device pool is refused
at deploy (`control.fit`), and a start only goes to a device whose pool could
hold it. A start that finds its device's pool full of active bytes stops idle
instances there; if none is idle it waits, and after `drain_after_s` it
drains busy ones (one more per interval): they take no new requests and stop
once empty, so a steady stream to two models cannot starve a third.
Everything is event-driven: futures for waiters, `call_later` for keep-alive;
every worker call is awaited on its `WorkerHandle` (tangram.worker.handle).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from tangram.control.autoscale import drain_victim, idle_victim, least_loaded, pick_instance, should_scale_down
from tangram.control.deployments import Deployment
from tangram.control.events import Activity
from tangram.control.migrate import Migrator
from tangram.control.state import (DeploymentState as _State, DeploymentUnavailable, ReplicaState, UnknownDeployment,
                                   retire_failed)
from tangram.control.fit import DoesNotFit, check_fits, footprint
from tangram.scheduler.adapter import choose_scale_out, observe_start
from tangram.engine import RequestOutput, SamplingParams
from tangram.pool import PoolFullError
from tangram.resolve import resolve_model
from tangram.store import Checkpoint
from tangram.worker import LocalWorker, Worker, WorkerHandle

log = logging.getLogger(__name__)


class Controller:
    """Deployments over a set of workers (one per device, `WorkerHandle`s or this process's `Worker`s)."""

    def __init__(self, workers: list[WorkerHandle | Worker], policy: str = "tangram") -> None:
        if not workers:  # a `Worker` of this process is wrapped in its `LocalWorker`
            raise ValueError("a controller needs at least one worker")
        self.workers: list[WorkerHandle] = [LocalWorker(w) if isinstance(w, Worker) else w for w in workers]
        self.policy = policy
        self.start_timeout_s = 300.0  # how long a start waits for pool space held by running instances
        self.drain_after_s = 0.25  # a start waiting this long for pool space drains one busy instance (then more)
        self.room_recheck_s = 0.5  # bounds a start's wait for room freed where no event says (engine preemption)
        self._states: dict[str, _State] = {}
        self._room_waiters: dict[str, list[asyncio.Future]] = {}  # per worker: starts waiting for pool space
        self._capacities: dict[str, int] | None = None  # per worker: its pool's bytes (fixed once built)
        self.activity = Activity()  # events, starts and traffic, for the dashboard
        self.migrator = Migrator(self._states, self.workers, self._release, self._start_on, self.activity)

    async def deploy(self, spec: Deployment) -> dict:
        """Register (or replace the settings of) a deployment; a Hugging Face directory is converted now and,
        with templates on, every worker warms for the model (skeleton, tokenizer, operators) before it returns."""
        loop = asyncio.get_running_loop()
        path = await loop.run_in_executor(None, functools.partial(  # its copy in the engine's dtype, made once
            resolve_model, spec.checkpoint, dtype=spec.engine.dtype, device=self.workers[0].device))
        index = Checkpoint(path).index  # validates the checkpoint now, not at the first request
        need = await loop.run_in_executor(None, footprint, path, index, spec.engine, spec.backend)
        check_fits(spec.name, need, await self._pool_capacities())  # refused now, not after a start's timeout
        old = self._states.get(spec.name)
        if old is not None and old.checkpoint != path:
            await self.remove(spec.name)
            old = None
        if spec.engine.templates or spec.backend != "builtin":  # every worker warms for it before traffic
            await asyncio.gather(*(w.warm(path, spec.engine, spec.backend) for w in self.workers))
        if old is not None:
            old.spec, old.need = spec, need
        else:
            self._states[spec.name] = _State(spec, path, index, need)
        self.activity.record("deploy", f"{'updated' if old else 'deployed'} {spec.name} "
                             f"({index.total_bytes / 1e6:.1f} MB) from {path}", spec.name)
        for _ in range(spec.min_instances - len(self._states[spec.name].replicas)):
            self._start(self._states[spec.name], time.perf_counter())
        return self.describe(spec.name)

    async def remove(self, name: str) -> None:
        """Stop a deployment's instances and forget it; waiting requests fail."""
        state = self._get(name)
        state.removed = True
        del self._states[name]
        self.activity.record("remove", f"removed {name} ({len(state.replicas)} instance(s) stopped)", name)
        self.activity.forget(name)
        self._wake(state, DeploymentUnavailable(f"deployment {name!r} was removed"))
        await asyncio.gather(*(r.worker.stop(r.ref) for r in state.replicas))
        state.replicas.clear()

    def names(self) -> list[str]:
        """Deployment names."""
        return sorted(self._states)

    def describe(self, name: str) -> dict:
        """A deployment's settings and live state."""
        return self._get(name).describe()

    def spec(self, name: str) -> Deployment:
        """A deployment's settings."""
        return self._get(name).spec

    def status(self) -> dict:
        """Per device pool bytes and instances, as last known (a `/metrics` scrape never waits for a worker)."""
        return {"workers": [w.last_status() for w in self.workers],
                "deployments": {n: self.describe(n) for n in self.names()}}

    async def status_now(self) -> dict:
        """`status` with every worker asked now."""
        workers = await asyncio.gather(*(w.status() for w in self.workers))
        return {"workers": list(workers), "deployments": {n: self.describe(n) for n in self.names()}}

    async def _pool_capacities(self) -> dict[str, int]:
        """Each worker's pool capacity (asked once: a remote worker's status is a call)."""
        if self._capacities is None:
            status = await asyncio.gather(*(w.status() for w in self.workers))
            self._capacities = {w.name: st["capacity"] for w, st in zip(self.workers, status)}
        return self._capacities

    def _capacity(self, worker: WorkerHandle) -> float:
        return float("inf") if self._capacities is None else self._capacities.get(worker.name, float("inf"))

    def _get(self, name: str) -> _State:
        if name not in self._states:
            raise UnknownDeployment(name)
        return self._states[name]

    async def generate(self, name: str, prompt, params: SamplingParams, *, chat: bool = False,
                       adapter: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs (with `adapter`: a LoRA adapter's path); the first may wait for an instance.

        An instance whose weights failed to load is retired (no new requests,
        stopped once empty), and a request it failed before any output is
        retried once on another instance.
        """
        state = self._get(name)
        arrival = time.perf_counter()
        streamed = False
        self.activity.arrived(name)
        for attempt in range(2):
            replica = await self._acquire(state, arrival)
            schedule_s = time.perf_counter() - arrival
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
            finished = retry = False
            # tokenizing (and validating) a long prompt is CPU work: off the loop; shielded, so a cancel while
            # it runs still finds the request once it is queued, and aborts it (see `settle` below)
            submitted = asyncio.ensure_future(replica.worker.submit(
                replica.ref, prompt, params, lambda out: loop.call_soon_threadsafe(queue.put_nowait, out),
                arrival=arrival, chat=chat, adapter=adapter))
            try:
                await asyncio.shield(submitted)
                while not finished:
                    out = await queue.get()
                    finished = out.finished
                    if out.instance_failed:
                        retire_failed(self._states.values(), replica.route(submitted.result()), out)
                        retry = attempt == 0 and not streamed
                        if retry:
                            break
                    if out.stages is not None:  # waiting for an instance, less the start's own load and init
                        st = out.stages
                        st.schedule_s = schedule_s if st.start == "warm" else max(0.0, schedule_s - st.load_s
                                                                                   - st.init_s)
                        if not streamed:
                            self.activity.first_output(name, replica.id, st)
                    streamed = True
                    yield out
            finally:
                def settle(f: asyncio.Future, done: bool = finished, r: ReplicaState = replica) -> None:
                    r, rid = r.follow(f.result() if not f.cancelled() and f.exception() is None else None)
                    if not done and rid is not None:
                        r.worker.abort(r.ref, rid)  # the client went away: free its KV blocks
                    self._release(state, r)

                if submitted.done():
                    settle(submitted)
                else:  # cancelled while tokenizing: abort and release once the submit is through
                    submitted.add_done_callback(settle)
            if not retry:
                return

    async def _acquire(self, state: _State, arrival: float) -> ReplicaState:
        spec = state.spec
        while True:
            if state.removed:
                raise DeploymentUnavailable(f"deployment {spec.name!r} was removed")
            running = [r for r in state.replicas if not r.stopping]
            live = [r for r in running if not r.draining]  # a draining instance takes no new request
            i = pick_instance([r.inflight for r in live], spec.target_concurrency)
            if i is None and len(running) + state.starting < spec.max_instances:
                self._start(state, arrival)
            elif i is None and live:
                i = least_loaded([r.inflight for r in live])
            if i is not None:
                r = live[i]
                r.inflight += 1
                r.idle_since = None
                return r
            fut = asyncio.get_running_loop().create_future()
            state.waiters.append(fut)
            state.queued += 1
            try:
                await fut
            finally:
                state.queued -= 1

    def _release(self, state: _State, replica: ReplicaState) -> None:
        replica.inflight -= 1
        if replica.inflight == 0:
            replica.idle_since = time.perf_counter()
            if replica.draining and not replica.stopping:
                log.info("%s drained: stopping it to make room on %s", replica.id, replica.worker.name)
                self._stop(state, replica)
                return
            asyncio.get_running_loop().call_later(state.spec.keep_alive_s, self._maybe_stop, state, replica)
        self._room_changed(replica.worker)
        self.migrator.consolidate(state)  # scale-in by live migration, when on (control/migrate.py)

    def _start(self, state: _State, arrival: float) -> None:
        """Start an instance in the background on a device whose pool could hold it (DoesNotFit: none could)."""
        fits = [w for w in self.workers if state.need.fits(self._capacity(w))]
        if not fits:
            state.last_error = str(DoesNotFit(f"no device pool can hold {state.spec.name!r} ({state.need.total} "
                                              "bytes with its minimum KV)"))
            raise DeploymentUnavailable(state.last_error)
        state.starting += 1
        asyncio.get_running_loop().create_task(self._start_on(state, fits, arrival))

    async def _place(self, state: _State, fits: list[WorkerHandle]) -> WorkerHandle:
        """The worker to start on, among those that answer (a Ray actor restarting refuses calls), another than
        its instances' when it fits there (a single candidate is not asked: there is nothing to choose);
        recorded in `state.placing` (`_start_on` removes it)."""
        chosen = fits[0]
        if len(fits) > 1:
            states = await asyncio.gather(*(w.placement_state(state.index) for w in fits), return_exceptions=True)
            up = [(w, st) for w, st in zip(fits, states) if not isinstance(st, BaseException)]
            if not up:
                raise states[0]
            hosts = state.hosts()  # read after the await: no other start can place in between
            chosen = up[choose_scale_out([st for _, st in up], state.index.total_bytes,
                                         [w.name in hosts for w, _ in up], self.policy)][0]
        state.placing.append(chosen.name)
        return chosen

    async def _start_on(self, state: _State, fits: list[WorkerHandle], arrival: float) -> None:
        spec = state.spec
        loop = asyncio.get_running_loop()
        worker = fits[0]
        try:
            worker = await self._place(state, fits)
            try:
                replica = await self._start_with_room(state, worker, arrival)
            finally:  # up or failed; no await from here to the record of its replica
                state.placing.remove(worker.name)
        except Exception as exc:  # noqa: BLE001 - a bad checkpoint fails this deployment only
            log.exception("starting %s on %s failed", spec.name, worker.name)
            state.starting -= 1
            state.last_error = f"instance of {spec.name!r} failed to start: {exc}"
            self.activity.record("start-failed", state.last_error, spec.name, worker.name)
            if not state.replicas and not state.starting:
                self._wake(state, DeploymentUnavailable(state.last_error))
            return
        state.starting -= 1
        if state.removed:
            await worker.stop(replica.ref)
            return
        self.activity.started(spec.name, worker.name, replica.id, replica.cost)
        loop.create_task(self._count_start(state, replica))
        state.last_error = None
        state.replicas.append(replica)
        replica.idle_since = time.perf_counter()
        loop.call_later(spec.keep_alive_s, self._maybe_stop, state, replica)
        self._wake(state)

    async def _start_with_room(self, state: _State, worker: WorkerHandle, arrival: float) -> ReplicaState:
        """Start on `worker`; when its pool is full of active bytes, stop idle instances there (their weights
        become retained, so evictable), else wait for a request there to end (back-pressure), up to
        `start_timeout_s`."""
        spec = state.spec
        loop = asyncio.get_running_loop()
        began = time.perf_counter()
        deadline, drained = began + self.start_timeout_s, 0
        while True:
            changed = loop.create_future()  # made before the attempt, so no release after it is missed
            self._room_waiters.setdefault(worker.name, []).append(changed)
            try:
                ref = await worker.start(spec.name, state.checkpoint, spec.engine, arrival, spec.backend)
                return ReplicaState(worker=worker, ref=ref)
            except PoolFullError as full:
                if full.need > self._capacity(worker):  # more than the whole pool: waiting cannot help
                    raise DoesNotFit(f"{spec.name!r} needs {full.need} bytes at once on {worker.name}, whose "
                                     f"pool holds {self._capacity(worker)} bytes") from None
                here = [(s, r) for s in self._states.values() for r in s.replicas
                        if r.worker is worker and not r.stopping]
                i = idle_victim([None if r.inflight else r.idle_since for _, r in here])
                if i is not None:
                    owner, victim = here[i]
                    log.info("pool of %s is full: stopping idle %s to start %s", worker.name, victim.id, spec.name)
                    self.activity.record("stop", f"stopped idle {victim.id} to make room for {spec.name}",
                                         owner.spec.name, worker.name)
                    victim.stopping = True
                    owner.replicas.remove(victim)
                    await worker.stop(victim.ref)
                    continue
                now = time.perf_counter()
                if now > deadline:
                    raise
                if now - began >= self.drain_after_s * (drained + 1):
                    drained += 1  # one more drain (at most) per interval
                    await self._drain_one(state, worker, max(1, full.need - full.available))
                await asyncio.wait({changed}, timeout=self.room_recheck_s)
            finally:
                waiters = self._room_waiters.get(worker.name, [])
                if changed in waiters:
                    waiters.remove(changed)

    async def _drain_one(self, state: _State, worker: WorkerHandle, short: int) -> None:
        """Stop routing new requests to one busy instance of another deployment on `worker` whose stop gives
        bytes back, unless those already draining give back `short` bytes; so a start waiting for room there
        is not starved by instances that never go idle."""
        here = [(s, r) for s in self._states.values() for r in s.replicas if r.worker is worker and not r.stopping]
        frees = await asyncio.gather(*(worker.freeable_bytes(r.ref) for _, r in here))
        if sum(f for (_, r), f in zip(here, frees) if r.draining) >= short:
            return  # enough is on its way out: wait for it
        busy = [(s, r, f) for (s, r), f in zip(here, frees) if s is not state and not r.draining]
        i = drain_victim([r.inflight for _, r, _ in busy], [r.started_at for _, r, _ in busy], [f for *_, f in busy])
        if i is None:
            return
        owner, victim, freed = busy[i]
        log.info("%s has waited for room on %s: draining %s (%d in flight, %d bytes to give back)",
                 state.spec.name, worker.name, victim.id, victim.inflight, freed)
        victim.draining = True
        self.activity.record("drain", f"draining {victim.id} ({victim.inflight} in flight) to make room for "
                             f"{state.spec.name}", owner.spec.name, worker.name, freed)
        if not victim.inflight:
            self._stop(owner, victim)
        else:  # with migration on, its requests may move to a peer rather than run to their end (migrate.py)
            self.migrator.relieve(owner, victim)

    def _room_changed(self, worker: WorkerHandle) -> None:
        """A request on `worker` ended or an instance there stopped: starts waiting for its pool look again."""
        for fut in self._room_waiters.pop(worker.name, []):
            if not fut.done():
                fut.set_result(None)

    async def _count_start(self, state: _State, replica: ReplicaState) -> None:
        cost = await replica.worker.final_cost(replica.ref)  # a background (template) load settles it when it ends
        state.starts[cost.start] += 1
        state.bytes_loaded += cost.bytes_loaded
        state.bytes_reused += cost.bytes_reused
        self.activity.settled(replica.id, cost)
        observe_start(await replica.worker.load_stats(replica.ref))  # refine the tier bandwidths with this load

    def _wake(self, state: _State, error: Exception | None = None) -> None:
        waiters, state.waiters = state.waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_exception(error) if error else fut.set_result(None)

    def _maybe_stop(self, state: _State, replica: ReplicaState) -> None:
        live = [r for r in state.replicas if not r.stopping]
        if replica not in live or replica.inflight or replica.idle_since is None:
            return  # busy again: its next release re-arms the timer
        now = time.perf_counter()
        left = state.spec.keep_alive_s - (now - replica.idle_since)
        if left > 0:  # the timer's clock ran ahead of ours, or it was re-armed
            asyncio.get_running_loop().call_later(left + 1e-3, self._maybe_stop, state, replica)
            return
        if not should_scale_down(replica.idle_since, now, state.spec.keep_alive_s, len(live),
                                 state.spec.min_instances):
            return
        log.info("scaling %s to %d instance(s): %s idle", state.spec.name, len(live) - 1, replica.id)
        kind, what = ("scale-to-zero" if len(live) == 1 else "scale-down",
                      f"stopped {replica.id}, idle {now - replica.idle_since:.1f} s: {len(live) - 1} instance(s) left")
        self._stop(state, replica, lambda: self.activity.record(kind, what, state.spec.name, replica.worker.name))

    def _stop(self, state: _State, replica: ReplicaState, recorded: Callable[[], None] | None = None) -> None:
        """Stop `replica` in the background; once stopped (weights retained), `recorded` logs it, and starts waiting
        for room there and the deployment's waiting requests (a drained instance leaves them none) look again."""
        replica.stopping = True
        if replica in state.replicas:
            state.replicas.remove(replica)

        def stopped(_: object) -> None:
            if recorded is not None:
                recorded()
            self._room_changed(replica.worker)
            self._wake(state)

        asyncio.get_running_loop().create_task(replica.worker.stop(replica.ref)).add_done_callback(stopped)

    async def shutdown(self) -> None:
        """Stop every instance."""
        for name in list(self._states):
            await self.remove(name)
