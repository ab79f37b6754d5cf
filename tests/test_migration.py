"""Live migration between two logical CPU devices: migrated streams equal their unmigrated twins token by token,
counts add up on both sides, and injected faults lose nothing."""

from __future__ import annotations

import asyncio

import pytest

from migration_util import (BUSY_STEP_S, Stream, long_context_checkpoint, other_worker, slow_steps, stream,
                            two_device_controller)
from tangram.control.migrate import MigrationSettings
from tangram.engine import SamplingParams
from tangram.engine.migration import MigrationError

PROMPT = [5, 17, 33, 90, 12, 7, 200, 41]
GREEDY = SamplingParams(max_tokens=160, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=160, ignore_eos=True, temperature=0.9, top_p=0.95, seed=1234)
LONG = SEEDED.model_copy(update={"max_tokens": 480})  # long enough for three full rounds before its end


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return long_context_checkpoint(tmp_path_factory.mktemp("migrate"))


def run(ckpt, body):
    async def main():
        ctl, spec = two_device_controller(ckpt)
        await ctl.deploy(spec)
        try:
            return await body(ctl)
        finally:
            await ctl.shutdown()

    return asyncio.run(main())


async def counts_settled(ctl) -> None:
    for r in ctl._states["m"].replicas:  # noqa: SLF001 - a test reads the controller's records
        assert r.inflight == 0 and not r.moved
    for _ in range(200):  # a worker counts a request out just after its sink got the last output
        if all(rep.inflight == 0 for w in ctl.workers for rep in w.worker.replicas.values()):
            return
        await asyncio.sleep(0.005)
    raise AssertionError({rep.id: rep.inflight for w in ctl.workers for rep in w.worker.replicas.values()})


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_migrated_stream_equals_its_unmigrated_twin(ckpt, params):
    async def body(ctl):
        twin = await stream(ctl, params, PROMPT)
        moved = await stream(ctl, params, PROMPT, move_after=20, to=other_worker(ctl))
        await counts_settled(ctl)
        return twin, moved

    twin, moved = run(ckpt, body)
    assert [m["outcome"] for m in moved.moves] == ["moved"]
    assert moved.moves[0]["rounds"] >= 2 and moved.moves[0]["bytes_sent"] > 0
    assert moved.ids == twin.ids and len(moved.ids) == 160
    assert moved.text == twin.text and moved.finish == twin.finish == "length"
    assert moved.ttft_s > 0  # the final output reports the stages of its start at the source


def test_a_stop_string_after_the_move_still_stops_the_stream(ckpt):
    async def body(ctl):
        twin = await stream(ctl, GREEDY, PROMPT)
        at = next(i for i in range(len(twin.text) * 3 // 4, len(twin.text)) if twin.text.find(twin.text[i:i + 7]) == i)
        stop = twin.text[at:at + 7]  # text only the destination produces
        params = GREEDY.model_copy(update={"stop": [stop]})
        return await stream(ctl, params, PROMPT), await stream(ctl, params, PROMPT, move_after=20,
                                                               to=other_worker(ctl)), stop

    twin, moved, stop = run(ckpt, body)
    assert moved.moves[0]["outcome"] == "moved" and twin.finish == moved.finish == "stop"
    assert moved.text == twin.text and stop not in moved.text and moved.ids == twin.ids


def _break(ctl, method: str, where: str = "dst"):
    """Make one worker's migration call `method` fail (the destination's unless `where` is "src")."""
    async def body(to: str):
        workers = {w.name: w for w in ctl.workers}
        target = workers[to] if where == "dst" else next(w for n, w in workers.items() if n != to)

        async def boom(*_a, **_k):
            raise MigrationError(f"injected: {method} failed")

        setattr(target, method, boom)
    return body


@pytest.mark.parametrize("method,outcome", [("plant", "abandoned"), ("extend", "abandoned"),
                                            ("resume", "returned")])
def test_a_destination_failing_mid_migration_loses_nothing(ckpt, method, outcome):
    async def body(ctl):
        twin = await stream(ctl, LONG, PROMPT)
        to = other_worker(ctl)
        await ctl.migrator._instance_on(ctl._states["m"], next(w for w in ctl.workers if w.name == to))  # noqa: SLF001
        await _break(ctl, method)(to)
        slow_steps(ctl._states["m"].replicas[0], BUSY_STEP_S)  # noqa: SLF001 - the source
        ctl.migrator.settings = MigrationSettings(threshold=0, max_rounds=3)  # every call is made
        moved = await stream(ctl, LONG, PROMPT, move_after=20, to=to)
        await counts_settled(ctl)
        return twin, moved

    twin, moved = run(ckpt, body)
    assert [m["outcome"] for m in moved.moves] == [outcome]
    assert moved.ids == twin.ids and moved.text == twin.text and moved.finish == "length"


def test_a_migration_past_its_deadline_is_abandoned_cleanly(ckpt):
    async def body(ctl):
        twin = await stream(ctl, GREEDY, PROMPT)
        to = other_worker(ctl)
        await ctl.migrator._instance_on(ctl._states["m"], next(w for w in ctl.workers if w.name == to))  # noqa: SLF001
        slow = next(w for w in ctl.workers if w.name == to)
        real = slow.plant

        async def plant(*a, **k):  # it lands (held on the destination) but answers after the deadline
            rid = await real(*a, **k)
            await asyncio.sleep(0.5)
            return rid

        slow.plant = plant
        ctl.migrator.settings = MigrationSettings(deadline_s=0.2)
        moved = await stream(ctl, GREEDY, PROMPT, move_after=20, to=to)
        await asyncio.sleep(0.8)  # the late plant answers, then is dropped
        held = [r for rep in slow.worker.replicas.values() for r in rep.backend.instance.engine.scheduler.requests()]
        await counts_settled(ctl)
        return twin, moved, held

    twin, moved, held = run(ckpt, body)
    assert moved.moves[0]["outcome"] == "abandoned" and "deadline" in moved.moves[0]["error"]
    assert moved.ids == twin.ids and held == []


def test_the_source_failing_after_the_handover_leaves_the_request_unaffected(ckpt):
    async def body(ctl):
        twin = await stream(ctl, SEEDED, PROMPT)
        state = ctl._states["m"]  # noqa: SLF001
        src = state.replicas[0]
        seen = []
        stopped = None
        async for out in ctl.generate("m", PROMPT, SEEDED):
            seen += out.token_ids
            if len(seen) >= 20 and stopped is None:
                report = await ctl.migrator.migrate("m", to=other_worker(ctl))
                assert report["moved"] == 1
                stopped = asyncio.ensure_future(src.worker.stop(src.ref))  # the source goes away
        await stopped
        return twin, seen

    twin, seen = run(ckpt, body)
    assert seen == twin.ids


async def _two_instances(ctl):
    await stream(ctl, SamplingParams(max_tokens=1), PROMPT)  # the first instance starts (on one worker)
    state = ctl._states["m"]  # noqa: SLF001 - a test reads the controller's records
    to = next(w for w in ctl.workers if w.name == other_worker(ctl))
    await ctl.migrator._instance_on(state, to)  # noqa: SLF001 - the second, on the other worker
    return state


def test_scale_in_consolidates_by_migration_and_the_streams_are_unchanged(ckpt):
    long_a, long_b = SEEDED, GREEDY.model_copy(update={"max_tokens": 200})
    short = SamplingParams(max_tokens=8, ignore_eos=True)

    async def body(ctl):
        twins = [await stream(ctl, p, PROMPT) for p in (long_a, long_b)]
        state = await _two_instances(ctl)
        first = state.replicas[0]
        ctl.migrator.settings = MigrationSettings(auto=True)
        a = asyncio.ensure_future(stream(ctl, long_a, PROMPT))  # on the first instance
        await asyncio.sleep(0)
        b = asyncio.ensure_future(stream(ctl, long_b, PROMPT))  # on the second
        await asyncio.sleep(0)
        c = await stream(ctl, short, PROMPT)  # on the first again; its end leaves 1 + 1: one instance is enough
        got = [await a, await b]
        await asyncio.sleep(0.2)  # the emptied instance stops
        return twins, got, c, first.stopping and first not in state.replicas, len(state.replicas)

    twins, got, c, stopped, left = run(ckpt, body)
    assert c.finish == "length" and [g.ids for g in got] == [t.ids for t in twins]
    assert stopped and left == 1  # emptied by migration, then stopped


def test_a_draining_instance_is_relieved_by_migration_when_that_is_sooner(ckpt):
    async def body(ctl):
        twin = await stream(ctl, SEEDED, PROMPT)
        state = await _two_instances(ctl)
        victim = state.replicas[0]
        ctl.migrator.settings = MigrationSettings(auto=True)
        task = asyncio.ensure_future(stream(ctl, SEEDED, PROMPT))
        while victim.inflight == 0:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.02)
        victim.draining = True  # what the controller's drain does for a start waiting for room
        ctl.migrator.relieve(state, victim)
        got = await task
        await asyncio.sleep(0.2)
        return twin, got, victim.stopping and victim not in state.replicas

    twin, got, stopped = run(ckpt, body)
    assert got.ids == twin.ids and stopped  # moved off, then stopped: room made early


def test_a_destination_failing_after_the_move_retires_the_destination_not_the_source(ckpt):
    async def body(ctl):
        await stream(ctl, SEEDED, PROMPT)
        state = ctl._states["m"]  # noqa: SLF001 - a test reads the controller's records
        src = state.replicas[0]
        to = other_worker(ctl)
        # both sides busy: the move lands mid-stream, and the destination cannot finish the stream in the moment
        # between the move's end and the injected fault on a loaded machine
        dst = await ctl.migrator._instance_on(state, next(w for w in ctl.workers if w.name == to))  # noqa: SLF001
        slow_steps(src, BUSY_STEP_S)
        slow_steps(dst, BUSY_STEP_S)
        seen = Stream()
        async for out in ctl.generate("m", PROMPT, LONG):
            seen.ids += out.token_ids
            if out.finished:
                seen.finish, seen.error = out.finish_reason, out.error
            if len(seen.ids) == 20:
                report = await ctl.migrator.migrate("m", to=to)
                assert report["instance"] == dst.id and report["moved"] == 1
                dst.ref.backend.instance.engine.failed = "injected: its weights went bad"
        return seen, src.draining, dst.draining

    seen, src_retired, dst_retired = run(ckpt, body)
    assert seen.finish == "error" and "injected" in seen.error
    assert dst_retired and not src_retired


def test_a_draining_instance_without_a_peer_moves_to_an_instance_started_where_it_is_cheapest(ckpt):
    async def body(ctl):
        # long: waiting out the stream (priced at the victim's rate before it slowed) must clearly cost more than
        # a start elsewhere, even on a loaded machine where that start's estimate is longer
        twin = await stream(ctl, LONG, PROMPT)
        state = ctl._states["m"]  # noqa: SLF001 - a test reads the controller's records
        victim = state.replicas[0]
        ctl.migrator.settings = MigrationSettings(auto=True)
        task = asyncio.ensure_future(stream(ctl, LONG, PROMPT))
        while victim.inflight == 0:
            await asyncio.sleep(0.001)
        slow_steps(victim, BUSY_STEP_S)
        victim.draining = True  # what the controller's drain does for a start waiting for room
        ctl.migrator.relieve(state, victim)
        got = await task
        await asyncio.sleep(0.2)
        return twin, got, victim.stopping, [r.worker.name for r in state.replicas], victim.worker.name

    twin, got, stopped, left, old = run(ckpt, body)
    assert got.ids == twin.ids and stopped and len(left) == 1 and left[0] != old  # moved to a new instance
