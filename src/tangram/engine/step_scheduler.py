"""The engine's scheduler: waiting and running queues, block tables, admission under a token budget,
preemption and finishing. `schedule()` plans one step (`StepPlan`); the rules are `step_policy`'s.

A running sequence holds KV for `request.cached` of its ids. Each step it runs
the ids it has no KV for yet: one (its last sampled token) when decoding, a
chunk of its prompt while prefilling, all of its ids after a preemption
(recompute). Decodes come first; prompt chunks fill the rest of the step's
token budget (`step_policy.prefill_chunks`). Admission takes the blocks of a
request's whole prompt at once, so a half-prefilled prompt never waits for
memory (two of them can never hold each other's blocks), and decoding
sequences grow block by block, preempting the newest when the pool is dry.
The n sequences of one request prefill its prompt once: the first runs it,
the others then share its full blocks and copy its partly filled last one
(`BlockManager.fork`).
"""

from __future__ import annotations

import logging
from collections import deque

from tangram.engine.batch import SeqWork, StepPlan
from tangram.engine.block_manager import BlockManager
from tangram.engine.request import Request, Status
from tangram.engine.stages import Totals
from tangram.engine.step_policy import prefill_chunks, victim

log = logging.getLogger(__name__)


class StepScheduler:
    """Owns the requests of one engine between their arrival and their end. Used on the engine thread only."""

    def __init__(self, blocks: BlockManager, *, max_batch: int, max_step_tokens: int, totals: Totals) -> None:
        self.blocks = blocks
        self.max_batch, self.max_step_tokens = max_batch, max_step_tokens
        self.totals = totals
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order

    def add(self, req: Request) -> None:
        """Queue a new request (FIFO)."""
        self.waiting.append(req)

    def has_work(self) -> bool:
        """Whether any request is waiting or running."""
        return any(not r.hold or r.todo() > 0 for r in (*self.waiting, *self.running))  # a held one may rest

    def requests(self) -> list[Request]:
        """Every request the scheduler holds, waiting ones first."""
        return [*self.waiting, *self.running]

    # ------------------------------------------------------------------ planning

    def schedule(self) -> StepPlan:
        """Plan one step: every decode that can get its KV block, then prompt chunks within the budget."""
        plan = StepPlan()
        decodes: list[Request] = []
        for req in list(self.running):
            if req.status is not Status.RUNNING or req.hold or len(req.ids) - req.cached != 1:
                continue  # preempted meanwhile, still prefilling (handled below), or held (migrating in)
            if self._make_room(req, req.cached + 1, plan):
                decodes.append(req)
        plan.work = [SeqWork(r, r.cached, [r.ids[-1]], True, r.blocks) for r in decodes if r.status is Status.RUNNING]
        budget = self.max_step_tokens - len(plan.work)
        partial = [r for r in self.running if r.status is Status.RUNNING and len(r.ids) - r.cached > 1]
        seats = self.max_batch - len(self.running)
        candidates = partial + [r for r in self.waiting if r.todo() > 0]
        chunks = prefill_chunks([r.todo() for r in candidates], budget,
                                len(partial) + max(0, seats))
        for req, n in zip(candidates, chunks):
            if req.status is Status.WAITING:  # admission takes the blocks of every id it has: chunks never grow
                if not self.blocks.grow(req, len(req.ids)):
                    plan.stalled = True  # it waits for blocks, and so do the ones behind it (FIFO)
                    self.totals.kv_waits += 1
                    break
                self.waiting.remove(req)
                req.status = Status.RUNNING
                self.running.append(req)
            end = req.cached + n
            plan.work.append(SeqWork(req, req.cached, req.ids[req.cached:end], end == len(req.ids), req.blocks,
                                     req.wants_prompt_logits()))
        return plan

    def _make_room(self, req: Request, tokens: int, plan: StepPlan) -> bool:
        """Grow `req` to `tokens` tokens of KV, preempting the newest running sequences while the pool has no
        block; False when `req` itself was preempted."""
        while not self.blocks.grow(req, tokens):
            plan.stalled = True
            target = next(r for r in self.running if r.id == victim([r.id for r in self.running]))
            self.preempt(target)
            plan.preempted.append(target)
            if target is req:
                return False
        return True

    def preempt(self, req: Request) -> None:
        """Free a running request's KV and put it first in line; it recomputes its ids when readmitted."""
        self.blocks.free(req)
        req.cached, req.status = 0, Status.WAITING
        self.running.remove(req)
        self.waiting.appendleft(req)
        self.totals.preemptions += 1
        log.debug("preempted %s (recomputed when blocks come back)", req.id)

    # ------------------------------------------------------------------ after the forward

    def advance(self, work: SeqWork) -> None:
        """Record that `work`'s tokens now have their KV stored; once a prompt of n > 1 sequences is in, the
        others share its blocks (they sample their first token from its logits, this step)."""
        req = work.request
        req.cached = work.end
        if req.forks and work.sample:
            for seq in req.forks:
                self._fork(req, seq)

    def _fork(self, parent: Request, seq: Request) -> None:
        if self.blocks.fork(parent, seq):
            seq.cached, seq.status = parent.cached, Status.RUNNING
            self.running.append(seq)
        else:  # no block for its copy of the prompt's last block: it recomputes the prompt when admitted
            self.waiting.appendleft(seq)
            self.totals.kv_waits += 1

    def finish(self, req: Request) -> None:
        """Drop a request from the queues and free its KV (idempotent)."""
        self.blocks.free(req)
        if req.status is Status.RUNNING:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status = Status.FINISHED
