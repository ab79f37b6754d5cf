"""The engine on its background thread: requests from many threads, back-pressure across two instances."""

from __future__ import annotations

import threading

from conftest import engine_checkpoint, engine_model, reference_greedy
from tangram.engine import EngineConfig, Instance, OutputQueue, SamplingParams
from tangram.engine.loop import EngineLoop
from tangram.pool import DevicePool

PROMPTS = [[5, 17, 33, 9], [40, 41, 42, 43, 44, 45], [3, 200]]


def test_concurrent_submitters_all_complete_in_order(tmp_path):
    model = engine_model("qwen2")
    ckpt = engine_checkpoint(model, tmp_path)
    with Instance(ckpt, DevicePool(64 << 20), EngineConfig(block_tokens=4, max_batch=4)) as inst:
        loop = EngineLoop(inst.engine).start()
        results: dict[int, list] = {}

        def client(i: int) -> None:
            sink = OutputQueue()
            inst.engine.add_request(PROMPTS[i % 3], SamplingParams(max_tokens=10, ignore_eos=True), sink=sink)
            outs = []
            while not outs or not outs[-1].finished:
                outs.append(sink.get(timeout=60))
            results[i] = outs

        threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        loop.stop()
        assert inst.kv.in_use == 0
    assert sorted(results) == list(range(12))
    for i, outs in results.items():
        assert sum((o.token_ids for o in outs), []) == reference_greedy(model, PROMPTS[i % 3], 10)


def test_two_instances_share_a_small_pool_and_wait_for_each_other(tmp_path):
    a_model, b_model = engine_model("llama", seed=1), engine_model("llama", seed=2)
    a_ckpt = engine_checkpoint(a_model, tmp_path / "a")
    b_ckpt = engine_checkpoint(b_model, tmp_path / "b")
    probe = DevicePool(64 << 20)
    with Instance(a_ckpt, probe, EngineConfig(block_tokens=4)) as i:
        weights, block = probe.footprint(i.binding), i.kv.block_size
    pool = DevicePool(2 * weights + 12 * block)  # both models' weights, room for few KV blocks
    cfg = EngineConfig(block_tokens=4)
    with Instance(a_ckpt, pool, cfg, name="a") as a, Instance(b_ckpt, pool, cfg, name="b") as b:
        loops = [EngineLoop(a.engine).start(), EngineLoop(b.engine).start()]
        sinks = []
        for k in range(6):
            inst = a if k % 2 == 0 else b
            sink = OutputQueue()
            inst.engine.add_request(PROMPTS[k % 3], SamplingParams(max_tokens=24, ignore_eos=True), sink=sink)
            sinks.append((k, sink))
        finals = {}
        for k, sink in sinks:
            out = sink.get(timeout=60)
            while not out.finished:
                out = sink.get(timeout=60)
            finals[k] = out
        for lp in loops:
            lp.stop()
        waits = a.engine.totals.kv_waits + b.engine.totals.kv_waits
        waits += a.engine.totals.preemptions + b.engine.totals.preemptions
    assert waits > 0  # the pool really was too small for everything at once
    for k, out in finals.items():
        ref_model = a_model if k % 2 == 0 else b_model
        assert out.finish_reason == "length"
        assert out.output_ids == reference_greedy(ref_model, PROMPTS[k % 3], 24)
    assert pool.snapshot()["kv_bytes"] == 0
