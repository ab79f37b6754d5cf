"""Live migration between two logical CPU devices: migrated streams equal their unmigrated twins token by token,
counts add up on both sides, and injected faults lose nothing."""

from __future__ import annotations

import asyncio

import pytest

from migration_util import long_context_checkpoint, other_worker, stream, two_device_controller
from tangram.control.migrate import MigrationSettings
from tangram.engine import SamplingParams
from tangram.engine.migration import MigrationError

PROMPT = [5, 17, 33, 90, 12, 7, 200, 41]
GREEDY = SamplingParams(max_tokens=160, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=160, ignore_eos=True, temperature=0.9, top_p=0.95, seed=1234)


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


def counts_settled(ctl) -> None:
    for r in ctl._states["m"].replicas:  # noqa: SLF001 - a test reads the controller's records
        assert r.inflight == 0 and not r.moved
    for w in ctl.workers:
        assert all(rep.inflight == 0 for rep in w.worker.replicas.values())


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_migrated_stream_equals_its_unmigrated_twin(ckpt, params):
    async def body(ctl):
        twin = await stream(ctl, params, PROMPT)
        moved = await stream(ctl, params, PROMPT, move_after=20, to=other_worker(ctl))
        counts_settled(ctl)
        return twin, moved

    twin, moved = run(ckpt, body)
    assert [m["outcome"] for m in moved.moves] == ["moved"]
    assert moved.moves[0]["rounds"] >= 2 and moved.moves[0]["bytes_sent"] > 0
    assert moved.ids == twin.ids and len(moved.ids) == 160
    assert moved.text == twin.text and moved.finish == twin.finish == "length"


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
        twin = await stream(ctl, SEEDED, PROMPT)
        to = other_worker(ctl)
        await ctl.migrator._instance_on(ctl._states["m"], next(w for w in ctl.workers if w.name == to))  # noqa: SLF001
        await _break(ctl, method)(to)
        ctl.migrator.settings = MigrationSettings(threshold=0, max_rounds=3)  # every call is made
        moved = await stream(ctl, SEEDED, PROMPT, move_after=20, to=to)
        counts_settled(ctl)
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

        async def plant(*a, **k):
            await asyncio.sleep(0.5)
            return await real(*a, **k)

        slow.plant = plant
        ctl.migrator.settings = MigrationSettings(deadline_s=0.2)
        moved = await stream(ctl, GREEDY, PROMPT, move_after=20, to=to)
        await asyncio.sleep(0.6)  # the late plant lands, then is dropped
        held = [r for rep in slow.worker.replicas.values() for r in rep.backend.instance.engine.scheduler.requests()]
        counts_settled(ctl)
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
