"""Start-up templates: recording, reuse, invalidation, first-use load order, execute-while-load exactness."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest
import torch

from conftest import engine_checkpoint, engine_model, reference_greedy
from tangram.engine import EngineConfig, Instance, OutputQueue, SamplingParams
from tangram.engine.batch import SeqWork, StepPlan
from tangram.pool import DevicePool
from tangram.store import Loader, read_index
from tangram.templates import load_template
from tangram.templates.template import template_path

PROMPT = [5, 17, 33, 9, 60, 7, 101]
GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)


class SlowLoader(Loader):
    """One reader thread; records the order in which tensors land and holds each landing `delay` s, so the
    load overlaps the forward."""

    def __init__(self, delay: float = 0.01) -> None:
        super().__init__(method="pread", threads=1)
        self.delay, self.landed = delay, []

    def load_into(self, ckpt, dests, *, landed=None, **kw):
        def slow(name: str) -> None:
            time.sleep(self.delay)
            self.landed.append(name)
            if landed is not None:
                landed(name)

        return super().load_into(ckpt, dests, landed=slow, **kw)


def in_template_order(loaded: list[str], t) -> bool:
    """Whether tensors landed group after group of the template (within a group, file order)."""
    group = {n: i for i, g in enumerate(t.groups) for n in g}
    ranks = [group[n] for n in loaded]
    return ranks == sorted(ranks)


@pytest.fixture()
def model_ckpt(tmp_path):
    model = engine_model("llama")
    return model, engine_checkpoint(model, tmp_path)


def run(ckpt, loader=None, **cfg):
    pool = DevicePool(64 << 20, loader=loader or Loader())
    with Instance(ckpt, pool, EngineConfig(block_tokens=4, **{"overlap": "on", **cfg})) as inst:
        out = inst.engine.generate([PROMPT], GREEDY)[0]
        return inst, out


def test_first_run_records_first_use_order(model_ckpt):
    model, ckpt = model_ckpt
    assert load_template(ckpt) is None
    _, out = run(ckpt)
    t = load_template(ckpt)
    assert t is not None and t.prefill_tokens == len(PROMPT) and t.architecture == "LlamaForCausalLM"
    order = t.order
    assert order[0] == "model.embed_tokens.weight" and order[-1] == "lm_head.weight"
    assert order.index("model.layers.0.self_attn.q_proj.weight") < order.index("model.layers.1.self_attn.q_proj.weight")
    assert order.index("model.layers.1.mlp.down_proj.weight") < order.index("model.norm.weight")
    index = read_index(ckpt)
    assert set(order) == set(index.tensors) | set(index.aliases) and len(order) == len(set(order))
    assert all(n.startswith("model.layers.0.") for n in t.groups[1])  # grouped by block
    assert out.output_ids == reference_greedy(model, PROMPT, 8)


def test_cold_start_with_template_loads_in_first_use_order_and_overlaps(model_ckpt):
    model, ckpt = model_ckpt
    run(ckpt)  # records
    t = load_template(ckpt)
    loader = SlowLoader(delay=0.01)
    arrival = time.perf_counter()  # the request arrives before its instance exists, as a cold start's does
    with Instance(ckpt, DevicePool(64 << 20, loader=loader), EngineConfig(block_tokens=4, overlap="on"),
                  arrival=arrival) as inst:
        sink = OutputQueue()
        inst.engine.add_request(PROMPT, GREEDY, sink=sink, arrival=arrival)
        inst.engine.run_until_idle()
        out = list(sink.q.queue)[-1]
    assert in_template_order(loader.landed, t)  # the template's order, group by group
    aliases = set(read_index(ckpt).aliases)  # equal tensors are stored once: nothing to load for them
    assert set(loader.landed) == set(t.order) - aliases
    st = out.stages
    assert st.start == "cold" and st.bytes_loaded > 0
    assert st.prefill_interval[0] < st.load_interval[1]  # the forward began before the last weights landed
    assert out.output_ids == reference_greedy(model, PROMPT, 8)  # token-identical


def test_execute_while_load_gives_identical_logits(model_ckpt):
    model, ckpt = model_ckpt
    run(ckpt)
    pool = DevicePool(64 << 20, loader=SlowLoader(delay=0.01))
    with Instance(ckpt, pool, EngineConfig(block_tokens=4, overlap="on")) as inst:
        runner = inst.engine.runner
        assert runner.waits is not None
        waits = runner.waits
        blocks = inst.kv.allocate(2)
        logits = runner.prefill(PROMPT, blocks)
        assert waits.waits > 0  # modules really waited for their weights
        waits.loading.wait(10)
        assert waits.loading.done()
        runner.run(StepPlan([SeqWork(None, len(PROMPT), [0], True, blocks)]))
        inst.kv.free(blocks)
        # hooks come off at the first forward after the load is over (the last weight can land while the
        # load job still books its stats, so that may be the forward after the first)
        assert runner.waits is None
    # no packed weights: an instance that loads while it runs cannot pack them (engine/prepack.py)
    with Instance(ckpt, DevicePool(64 << 20), EngineConfig(block_tokens=4, templates=False, prepack="off")) as plain:
        blocks = plain.kv.allocate(2)
        ref = plain.engine.runner.prefill(PROMPT, blocks)  # loaded first, then run
        plain.kv.free(blocks)
    assert torch.equal(logits, ref)


def test_template_is_invalidated_when_the_checkpoint_or_libraries_change(model_ckpt, tmp_path):
    _, ckpt = model_ckpt
    run(ckpt)
    path = template_path(ckpt)
    data = json.loads(path.read_text())
    data["libraries"]["torch"] = "0.0.1"
    path.write_text(json.dumps(data))
    assert load_template(ckpt) is None
    run(ckpt)  # re-recorded
    assert load_template(ckpt) is not None
    other = engine_checkpoint(engine_model("llama", seed=9), tmp_path / "other")
    path.replace(template_path(other))  # a template of another checkpoint version
    assert load_template(other) is None


def test_corrupted_template_is_ignored_with_a_warning(model_ckpt, caplog):
    model, ckpt = model_ckpt
    run(ckpt)
    template_path(ckpt).write_text('{"version": 1, "groups": [["model.norm.wei')
    with caplog.at_level(logging.WARNING):
        inst, out = run(ckpt)
    assert "ignoring the unreadable start-up template" in caplog.text
    assert inst.template is None and out.output_ids == reference_greedy(model, PROMPT, 8)
    assert load_template(ckpt) is not None  # recorded afresh


def test_a_version_1_template_is_re_recorded_without_a_warning(model_ckpt, caplog):
    _, ckpt = model_ckpt
    run(ckpt)
    path = template_path(ckpt)
    data = json.loads(path.read_text())
    data.update(version=1, ops=["mm"], workspace_bytes=64, hidden_shape=[1, 7, 64])  # what version 1 wrote
    path.write_text(json.dumps(data))
    with caplog.at_level(logging.INFO, logger="tangram.templates.template"):
        assert load_template(ckpt) is None
    assert "has version 1" in caplog.text and "unreadable" not in caplog.text
    run(ckpt)
    assert load_template(ckpt) is not None and json.loads(path.read_text())["version"] == 2


def test_templates_off_is_the_plain_start(model_ckpt):
    model, ckpt = model_ckpt
    run(ckpt)
    inst, out = run(ckpt, templates=False)
    assert inst.template is None and inst.binding.loading.done() and inst.engine.runner.waits is None
    assert out.output_ids == reference_greedy(model, PROMPT, 8)


def test_a_failing_background_load_fails_the_request_cleanly(model_ckpt):
    model, ckpt = model_ckpt
    run(ckpt)

    class Failing(SlowLoader):
        def load_into(self, ckpt, dests, *, landed=None, **kw):
            def failing(name: str) -> None:
                if len(self.landed) == 5:
                    raise OSError("disk went away")
                landed(name)

            return super().load_into(ckpt, dests, landed=failing, **kw)

    failed_in_forward = 0
    for delay in (0.0, 0.01):  # the load fails before the engine exists, or during the first forward
        pool = DevicePool(64 << 20, loader=Failing(delay))
        try:
            with Instance(ckpt, pool, EngineConfig(block_tokens=4, overlap="on")) as inst:
                out = inst.engine.generate([PROMPT], GREEDY)[0]
                assert out.finish_reason == "error" and "disk went away" in out.error and out.instance_failed
                later = inst.engine.generate([PROMPT], GREEDY)[0]  # the instance serves nothing more
                assert later.finish_reason == "error" and later.instance_failed
                failed_in_forward += 1
        except OSError as exc:  # the start itself failed: also clean
            assert "disk went away" in str(exc)
        snap = pool.snapshot()
        assert snap["totals"]["active"] == 0 and snap["kv_bytes"] == 0
    assert failed_in_forward >= 1
    # the kept skeleton carries no hook of the failed start: the next start of the model is right
    with Instance(ckpt, DevicePool(64 << 20), EngineConfig(block_tokens=4, overlap="on")) as inst:
        out = inst.engine.generate([PROMPT], GREEDY)[0]
    assert out.output_ids == reference_greedy(model, PROMPT, 8)


def test_overlap_auto_is_off_on_cpu_but_keeps_the_first_use_order(model_ckpt):
    model, ckpt = model_ckpt
    run(ckpt)
    t = load_template(ckpt)
    loader = SlowLoader(delay=0.0)
    inst, out = run(ckpt, loader=loader, overlap="auto")
    assert inst.template is not None and inst.engine.runner.waits is None  # loaded before the forward
    assert in_template_order(loader.landed, t) and len(loader.landed) > 3
    assert out.output_ids == reference_greedy(model, PROMPT, 8)
    assert EngineConfig().overlaps("cuda:0") and not EngineConfig().overlaps("cpu")


def test_a_worker_warms_for_an_expected_model_before_traffic(model_ckpt, tmp_path):
    import shutil

    from tangram.engine.skeleton import RUNTIME
    from tangram.worker import Worker

    model, ckpt = model_ckpt
    worker = Worker(0, "cpu", 64 << 20)
    assert worker.warm(ckpt) == 0.0  # no template yet: nothing to warm from
    run(ckpt)  # the first run records the template
    fresh = tmp_path / "copy"  # the same checkpoint at a path this process has never started
    shutil.copytree(ckpt, fresh)
    assert load_template(fresh) is not None and RUNTIME.skeletons(fresh) == []
    assert worker.warm(fresh) > 0
    kept = RUNTIME.skeletons(fresh)
    assert len(kept) == 1 and all(p.is_meta for p in kept[0].parameters())  # built, holding no memory
    replica = worker.start("m", fresh, EngineConfig(block_tokens=4), time.perf_counter())
    try:
        assert replica.backend.instance.model is kept[0]  # the first start only bound the tensors into it
        sink = OutputQueue()
        replica.submit(PROMPT, GREEDY, sink, arrival=time.perf_counter())
        while not (out := sink.q.get(timeout=60)).finished:
            pass
        assert out.output_ids == reference_greedy(model, PROMPT, 8)
    finally:
        worker.stop(replica)
    assert RUNTIME.skeletons(fresh) == kept


def variant_of(model, seed: int = 7):
    """A copy of `model` whose last block is redrawn: the rest is byte-identical, so a pool shares it."""
    import copy

    other = copy.deepcopy(model)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in other.model.layers[-1].parameters():
            p.normal_(0, 0.5)
    return other


def test_a_start_sharing_tensors_another_start_still_loads_waits_for_them(model_ckpt, tmp_path):
    """B binds tensors that A's background load has not landed yet: B's first forward must wait for them."""
    model, ckpt = model_ckpt
    other = variant_of(model)
    ckpt_b = engine_checkpoint(other, tmp_path / "b")
    run(ckpt)
    run(ckpt_b)
    pool = DevicePool(64 << 20, loader=SlowLoader(delay=0.03))
    cfg = EngineConfig(block_tokens=4, overlap="on")
    with Instance(ckpt, pool, cfg) as a, Instance(ckpt_b, pool, cfg) as b:
        assert 0 < b.binding.bytes_loaded < b.binding.bytes_reused  # B loads only its own block
        assert not a.binding.loading.done()  # A is still loading what B shares
        out_b = b.engine.generate([PROMPT], GREEDY)[0]
        out_a = a.engine.generate([PROMPT], GREEDY)[0]
    assert out_b.output_ids == reference_greedy(other, PROMPT, 8)
    assert out_a.output_ids == reference_greedy(model, PROMPT, 8)


def test_a_failed_load_of_shared_tensors_fails_the_other_start_cleanly(model_ckpt, tmp_path):
    model, ckpt = model_ckpt
    ckpt_b = engine_checkpoint(variant_of(model), tmp_path / "b")
    run(ckpt)
    run(ckpt_b)
    gate = threading.Event()

    class FailsLater(SlowLoader):
        def load_into(self, ckpt_, dests, *, landed=None, **kw):
            def failing(name: str) -> None:
                if name == "model.layers.0.mlp.down_proj.weight":  # A loads it; B shares it
                    assert gate.wait(30)
                    raise OSError("disk went away")
                landed(name)

            return super().load_into(ckpt_, dests, landed=failing, **kw)

    pool = DevicePool(64 << 20, loader=FailsLater(delay=0.0))
    cfg = EngineConfig(block_tokens=4, overlap="on")
    a = Instance(ckpt, pool, cfg)
    try:
        b = Instance(ckpt_b, pool, cfg)
    except Exception:
        gate.set()
        a.close()
        raise
    with b:
        assert not b.binding.loading.landed["model.layers.0.mlp.down_proj.weight"].is_set()
        gate.set()  # A's load fails while B waits for tensors it shares with A
        out = b.engine.generate([PROMPT], GREEDY)[0]
        assert out.finish_reason == "error" and "failed" in out.error
    a.close()
    snap = pool.snapshot()
    assert snap["totals"]["active"] == 0 and snap["kv_bytes"] == 0
