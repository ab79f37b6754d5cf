"""The engine's scheduler with hand-made requests and a hand-made block pool (no model, no server), in the
style of vLLM's CPU scheduler tests: admission under the token budget, chunked prefill, decode first,
preemption of the newest, FIFO, seats, finishing, back-pressure."""

from __future__ import annotations

from types import SimpleNamespace

from tangram.engine.block_manager import BlockManager
from tangram.engine.request import Request, Status
from tangram.engine.sampling import SamplingParams
from tangram.engine.stages import Totals
from tangram.engine.step_scheduler import StepScheduler

BT = 4  # tokens per block


class Blocks:
    """A KV allocator of `n` blocks: all or none, like the real one."""

    def __init__(self, n: int) -> None:
        self.spec = SimpleNamespace(block_tokens=BT, blocks_for=lambda t: -(-t // BT))
        self.free_list = list(range(n))
        self.n = n

    def allocate(self, n: int):
        if n > len(self.free_list):
            return None
        out, self.free_list = self.free_list[:n], self.free_list[n:]
        return out

    def free(self, blocks):
        self.free_list.extend(blocks)

    @property
    def in_use(self) -> int:
        return self.n - len(self.free_list)


def make(blocks: int, *, max_batch: int = 8, budget: int = 16) -> tuple[StepScheduler, Blocks]:
    kv = Blocks(blocks)
    return StepScheduler(BlockManager(kv), max_batch=max_batch, max_step_tokens=budget, totals=Totals()), kv


def req(rid: str, prompt: int) -> Request:
    return Request(rid, list(range(1, prompt + 1)), SamplingParams(), 0.0, lambda out: None, None)


def run(plan, sched: StepScheduler, token: int = 7) -> None:
    """What the engine does after a forward: KV stored, a token appended to every sampled sequence."""
    for w in plan.work:
        sched.advance(w)
    for w in plan.sampled:
        w.request.append(token)


def shape(plan) -> list[tuple[str, int, int, bool]]:
    return [(w.request.id, w.start, len(w.tokens), w.sample) for w in plan.work]


def test_prompts_fill_the_budget_fifo_and_a_long_one_is_chunked():
    sched, kv = make(64, budget=16)
    for r in (req("a", 10), req("b", 10), req("c", 3)):
        sched.add(r)
    plan = sched.schedule()
    assert shape(plan) == [("a", 0, 10, True), ("b", 0, 6, False)]  # c waits: the budget is spent
    assert [r.id for r in sched.running] == ["a", "b"] and [r.id for r in sched.waiting] == ["c"]
    run(plan, sched)
    plan = sched.schedule()  # a decodes first, then b's rest, then c
    assert shape(plan) == [("a", 10, 1, True), ("b", 6, 4, True), ("c", 0, 3, True)]
    assert kv.in_use == 3 + 3 + 1  # blocks for the tokens they hold after this step


def test_decodes_come_first_and_use_the_budget():
    sched, _ = make(64, budget=4)
    for r in (req("a", 2), req("b", 2), req("c", 8)):
        sched.add(r)
    run(sched.schedule(), sched)  # a and b prefill (2 + 2)
    plan = sched.schedule()
    assert shape(plan) == [("a", 2, 1, True), ("b", 2, 1, True), ("c", 0, 2, False)]


def test_seats_bound_the_batch():
    sched, _ = make(64, max_batch=2, budget=64)
    for r in (req("a", 2), req("b", 2), req("c", 2)):
        sched.add(r)
    plan = sched.schedule()
    assert [w.request.id for w in plan.work] == ["a", "b"] and len(sched.waiting) == 1


def test_a_request_without_blocks_waits_and_blocks_the_ones_behind_it():
    sched, kv = make(3, budget=64)
    for r in (req("a", 8), req("b", 8), req("c", 1)):
        sched.add(r)
    plan = sched.schedule()
    assert shape(plan) == [("a", 0, 8, True)]  # b needs 2 blocks, 1 is left; c (1 token) must not jump it
    assert plan.stalled and sched.totals.kv_waits == 1 and kv.in_use == 2


def test_growth_preempts_the_newest_which_recomputes_first_in_line():
    sched, kv = make(4, budget=64)
    a, b = req("a", 4), req("b", 4)
    sched.add(a)
    sched.add(b)
    run(sched.schedule(), sched)  # each holds 4 tokens in 1 block; 2 blocks left
    run(sched.schedule(), sched)  # each grows into a second block: all 4 blocks used
    for _ in range(3):
        run(sched.schedule(), sched)  # tokens 6..8 fit in the second blocks
    assert a.cached == 8 and kv.in_use == 4
    plan = sched.schedule()  # a needs a third block: b (newest) is preempted, a decodes
    assert plan.preempted == [b] and shape(plan) == [("a", 8, 1, True)]
    assert b.status is Status.WAITING and b.cached == 0 and b.blocks == [] and sched.waiting[0] is b
    assert sched.totals.preemptions == 1
    run(plan, sched)
    sched.finish(a)
    plan = sched.schedule()  # b recomputes prompt + generated ids, then samples its next token
    assert shape(plan) == [("b", 0, len(b.ids), True)]


def test_a_sequence_that_is_its_own_victim_is_preempted_not_run():
    sched, _ = make(1, budget=64)
    a = req("a", 4)
    sched.add(a)
    run(sched.schedule(), sched)  # 4 tokens in the only block
    plan = sched.schedule()  # its 5th token needs a block no one can give
    assert plan.preempted == [a] and plan.work == [] and plan.stalled


def test_admission_takes_the_whole_prompts_blocks_so_chunks_never_wait():
    sched, kv = make(4, budget=8)
    a, b = req("a", 12), req("b", 8)
    sched.add(a)
    sched.add(b)
    plan = sched.schedule()
    assert shape(plan) == [("a", 0, 8, False)] and kv.in_use == 3  # all 12 prompt tokens' blocks, now
    run(plan, sched)
    plan = sched.schedule()  # the rest of a's prompt needs no new block; b's 2 blocks are not there
    assert shape(plan) == [("a", 8, 4, True)] and kv.in_use == 3
    assert plan.stalled and [r.id for r in sched.waiting] == ["b"] and b.blocks == []


def test_finish_frees_blocks_from_either_queue():
    sched, kv = make(8, budget=4)
    a, b = req("a", 4), req("b", 4)
    sched.add(a)
    sched.add(b)
    sched.schedule()
    assert a.status is Status.RUNNING and b.status is Status.WAITING
    sched.finish(a)
    sched.finish(b)
    assert kv.in_use == 0 and not sched.has_work()
    assert a.status is Status.FINISHED and b.status is Status.FINISHED
