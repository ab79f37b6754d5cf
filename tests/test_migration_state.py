"""What a migration carries and how a held request is scheduled, without an engine: the detokenizer's state resumes
to the same deltas, the state pickles, and a held request prefills all but its last id and never samples."""

from __future__ import annotations

import pickle

from test_detok import boundary_stops, mode, sequences, tokenizer  # noqa: F401 - fixtures
from test_step_scheduler import make, req, run, shape
from tangram.engine.detok import TextStream
from tangram.engine.migration import MigrationState
from tangram.engine.sampling import SamplingParams


def _deltas(stream: TextStream, ids: list[int]) -> list[str]:
    return [stream.push([i]) for i in ids] + [stream.flush()]


def test_a_resumed_text_stream_gives_the_deltas_the_original_would(tokenizer, mode):  # noqa: F811
    cases = [(ids, []) for ids in sequences(tokenizer, n=24)]
    stop_ids = list(tokenizer.encode("The quick brown fox jumps over the lazy dog, isn't it? 你好世界",
                                     add_special_tokens=False))
    cases += [(stop_ids, [stop]) for stop in boundary_stops(tokenizer, stop_ids)]
    for ids, stops in cases:
        for cut in sorted({1, len(ids) // 3, len(ids) // 2, len(ids) - 1}):
            whole = TextStream(tokenizer, stops)
            want = _deltas(whole, ids)
            first = TextStream(tokenizer, stops)
            head = [first.push([i]) for i in ids[:cut]]
            state = pickle.loads(pickle.dumps(first.export()))  # it crosses processes
            moved = TextStream.resume(tokenizer, stops, state)
            got = head + _deltas(moved, ids[cut:])
            assert got == want and moved.text == whole.text and moved.stopped == whole.stopped, (ids, cut, stops)


def test_a_migration_round_pickles_and_counts_its_bytes():
    state = MigrationState("req-1", 0, [4, 5], prompt_ids=[1, 2, 3], params=SamplingParams(seed=3, temperature=1.0),
                           age_s=0.5, generator=bytes(range(16)))
    back = pickle.loads(pickle.dumps(state))
    assert back == state and state.nbytes == len(pickle.dumps(state)) and state.nbytes > 16


def test_a_held_request_prefills_all_but_its_last_id_and_never_samples():
    sched, kv = make(64, budget=4)
    held = req("h", 6)
    held.output_ids, held.ids, held.hold = [7, 8], held.prompt_ids + [7, 8], True  # 8 ids: 7 to prefill
    sched.add(held)
    plan = sched.schedule()
    assert shape(plan) == [("h", 0, 4, False)]
    run(plan, sched)
    plan = sched.schedule()
    assert shape(plan) == [("h", 4, 3, False)]
    run(plan, sched)
    assert held.cached == 7 and held.todo() == 0 and held.output_ids == [7, 8]
    assert sched.schedule().work == [] and not sched.has_work()  # at rest: an idle engine sleeps
    other = req("r", 2)
    sched.add(other)
    assert sched.has_work() and [w.request.id for w in sched.schedule().work] == ["r"]
    held.hold = False  # released (the final round): it decodes its last id and samples
    plan = sched.schedule()
    assert ("h", 7, 1, True) in shape(plan)
