"""LoRA in the engine: greedy output of every row of a mixed batch (4 adapters + base rows, chunked prefill)
equals PEFT's model + transformers generate; rows without an adapter stay as they were; adapters live in the
pool (retained after use, a re-bind when used again)."""

from __future__ import annotations

import pytest
import torch

from conftest import engine_checkpoint, engine_model, reference_greedy
from lora_util import LLAMA_TARGETS, make_adapter, peft_greedy
from tangram.engine import EngineConfig, Instance, OutputQueue, RequestError, SamplingParams
from tangram.engine.lora import WRAPPED
from tangram.engine.lora_update import Adapter, plan
from tangram.pool import DevicePool
from tangram.store import Checkpoint
from tangram.store.adapter import AdapterInfo, convert_adapter

pytest.importorskip("peft")

PROMPTS = [[5, 17, 33, 9, 60, 7, 101, 44, 45, 46, 47], [40, 41], [3, 200, 150, 90, 12, 11, 10, 9, 8, 77, 78, 79],
           [8, 9], [100, 101, 102, 103, 104, 105], [7, 7, 7, 60]]
TOKENS = 12
GREEDY = SamplingParams(max_tokens=TOKENS, ignore_eos=True)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, tmp_path_factory):
    """A base checkpoint, 4 converted adapters (different ranks, alphas, targets, rsLoRA) and PEFT's references."""
    arch = request.param
    tmp = tmp_path_factory.mktemp(f"lora-{arch}")
    base = engine_model(arch)
    ckpt = engine_checkpoint(base, tmp)
    index = Checkpoint(ckpt).index
    kinds = [dict(r=4, alpha=8), dict(r=8, alpha=4, targets=LLAMA_TARGETS), dict(r=2, alpha=16, targets=["o_proj"]),
             dict(r=4, alpha=4, use_rslora=True, targets=["k_proj", "up_proj", "gate_proj"]),
             dict(r=4, alpha=2), dict(r=4, alpha=8),  # 4, 5: adapter 0's targets and rank (a batched decode)
             dict(r=8, alpha=16, targets=LLAMA_TARGETS)]  # 6: adapter 1's (q/k/v and gate/up share x @ A)
    peft_dirs, adapters = [], []
    for i, kind in enumerate(kinds):
        src = make_adapter(base, tmp / f"peft-{i}", seed=100 + i, **kind)
        convert_adapter(src, tmp / f"adapter-{i}", index)
        peft_dirs.append(src)
        adapters.append(str(tmp / f"adapter-{i}"))
    return base, ckpt, peft_dirs, adapters


def start(ckpt, **cfg) -> Instance:
    return Instance(ckpt, DevicePool(64 << 20), EngineConfig(block_tokens=4, **cfg))


def submit(inst: Instance, rows: list, prompts: list, adapters: dict) -> list[OutputQueue]:
    """Queue one greedy request per row (its adapter, or the base for None); their sinks, in row order."""
    sinks = []
    for a, p in zip(rows, prompts):
        sink = OutputQueue()
        inst.engine.add_request(p, GREEDY, sink=sink, adapter=None if a is None else adapters[a])
        sinks.append(sink)
    return sinks


def finals(sinks: list[OutputQueue]) -> list[list[int]]:
    """The generated ids of each sink's final output."""
    return [list(s.q.queue)[-1].output_ids for s in sinks]


def test_converted_adapter_is_a_checkpoint_of_the_modules(setup):
    _, _, peft_dirs, adapters = setup
    info = AdapterInfo.of(Checkpoint(adapters[1]).index)
    assert info.r == 8 and info.scaling == 0.5 and len(info.modules) == 2 * 7  # 2 layers x 7 linear modules
    assert info.modules[0].startswith("model.layers.0.")
    rs = AdapterInfo.of(Checkpoint(adapters[3]).index)
    assert rs.scaling == pytest.approx(4 / 2)  # rsLoRA: alpha / sqrt(r)


def test_mixed_batch_matches_peft(setup):
    base, ckpt, peft_dirs, adapters = setup
    # rows: adapter 0..3, then base rows; two rows share adapter 0 (one slice and one gathered group)
    rows = [0, 1, 2, 3, None, 0]
    refs = [peft_greedy(base, None if a is None else peft_dirs[a], p, TOKENS) for a, p in zip(rows, PROMPTS)]
    base_refs = [reference_greedy(base, p, TOKENS) for p in PROMPTS]
    assert all(refs[i] != base_refs[i] for i, a in enumerate(rows) if a is not None), "an adapter changed nothing"
    # a small step budget: the prompts are prefilled in chunks beside the other rows' decodes
    with start(ckpt, max_step_tokens=7) as inst:
        sinks = submit(inst, rows, PROMPTS, adapters)
        assert sorted(inst.adapters.bound()) == sorted({f"adapter-{a}" for a in rows if a is not None})
        inst.engine.run_until_idle()
        got = finals(sinks)
        assert inst.adapters.bound() == []  # unbound once unused (retained in the pool)
        model = inst.model
        assert WRAPPED.wrapped(model)  # the hooks stay while the instance lives
    assert WRAPPED.wrapped(model) == []  # and go with it
    assert got == refs


def test_base_rows_unchanged_beside_adapters(setup):
    base, ckpt, _, adapters = setup
    with start(ckpt) as inst:
        alone = [o.output_ids for o in inst.engine.generate(PROMPTS[:3], GREEDY)]
        sinks = []
        for i, p in enumerate(PROMPTS[:3]):
            sink = OutputQueue()
            inst.engine.add_request(p, GREEDY, sink=sink)
            inst.engine.add_request(p, GREEDY, adapter=adapters[i])
            sinks.append(sink)
        inst.engine.run_until_idle()
        mixed = [list(s.q.queue)[-1].output_ids for s in sinks]
    assert mixed == alone == [reference_greedy(base, p, TOKENS) for p in PROMPTS[:3]]


def test_adapter_stays_retained_in_the_pool(setup):
    _, ckpt, _, adapters = setup
    with start(ckpt) as inst:
        pool = inst.pool
        inst.engine.generate([PROMPTS[0]], GREEDY)  # warm the instance
        first = inst.adapters.acquire(adapters[1], "a1")
        loaded = first.binding.bytes_loaded
        ptr = first.modules["model.layers.0.self_attn.q_proj"].a.data_ptr()
        inst.adapters.release(first)
        assert loaded > 0 and pool.resident_bytes(Checkpoint(adapters[1]).index) == loaded  # retained
        again = inst.adapters.acquire(adapters[1], "a1")
        assert again.binding.bytes_loaded == 0 and again.binding.bytes_reused == loaded  # a re-bind
        assert again.modules["model.layers.0.self_attn.q_proj"].a.data_ptr() == ptr
        arena = pool.arena.buffer.data_ptr()
        assert arena <= ptr < arena + pool.capacity  # a view of the pool's arena
        inst.adapters.release(again)


def test_bad_adapter_request_fails_alone(setup, tmp_path):
    _, ckpt, _, adapters = setup
    with start(ckpt) as inst:
        with pytest.raises(RequestError, match="LoRA adapter"):
            inst.engine.add_request(PROMPTS[0], GREEDY, adapter=str(tmp_path / "missing"))
        with pytest.raises(RequestError, match="LoRA adapter"):
            inst.engine.add_request(PROMPTS[0], GREEDY, adapter=str(ckpt))  # the base itself is no adapter
        out = inst.engine.generate([PROMPTS[1]], GREEDY)[0]
        assert out.finish_reason == "length" and inst.adapters.bound() == []


def test_adapter_dtype_follows_peft(setup):
    """A float32 adapter on a bfloat16 base computes as PEFT does: input cast to the adapter's dtype."""
    base, ckpt, peft_dirs, adapters = setup
    from tangram.resolve import with_dtype

    bf16 = with_dtype(ckpt, torch.bfloat16)
    prompt = PROMPTS[2]
    with start(bf16, dtype="bfloat16") as inst:
        got = inst.engine.generate([prompt], GREEDY)[0].output_ids
        sink = OutputQueue()
        inst.engine.add_request(prompt, GREEDY, sink=sink, adapter=adapters[0])
        inst.engine.run_until_idle()
        tuned = list(sink.q.queue)[-1].output_ids
    assert tuned != got  # the float32 update is applied to the bfloat16 rows


@pytest.mark.parametrize("rows", [[0, 4, 4, 5, None, 5, 5], [4, 0, 5, 4, 0], [1, 6, 6, None, 1, 6]])
def test_batched_decodes_match_peft(setup, rows):
    """Decodes of adapters with the same targets and rank run as one batch (two bmms per module), groups of
    different sizes padded, different scalings per group."""
    base, ckpt, peft_dirs, adapters = setup
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(rows))]
    a, b = (Adapter(n, n, s, {}, None) for n, s in (("a", 0.5), ("b", 2.0)))
    step = plan([(0, 1, a), (1, 2, b), (2, 3, b), (3, 9, None)], torch.device("cpu"))
    assert step.batched is not None and step.batched.width == 2 and step.batched.valid.tolist() == [0, 2, 3]
    assert step.batched.gather.tolist() == [0, 0, 1, 2] and step.batched.rows.tolist() == [0, 1, 2]
    refs = [peft_greedy(base, None if a is None else peft_dirs[a], p, TOKENS) for a, p in zip(rows, prompts)]
    with start(ckpt) as inst:
        sinks = submit(inst, rows, prompts, adapters)
        inst.engine.run_until_idle()
        got = finals(sinks)
    assert got == refs


def test_adjacent_groups_of_one_width_batch_on_their_slice():
    """Groups the runner made adjacent and of one size are batched in place: no gather, no scatter."""
    a, b = (Adapter(n, n, 1.0, {}, None) for n in "ab")
    full = plan([(0, 2, a), (2, 4, b)], torch.device("cpu"))
    assert full.batched.span == slice(0, 4) and full.batched.full and full.batched.gather is None
    assert full.adapters == (a, b) and [g.rows for g in full.groups] == [slice(0, 2), slice(2, 4)]
    part = plan([(0, 1, a), (1, 2, b), (2, 5, None)], torch.device("cpu"))
    assert part.batched.span == slice(0, 2) and not part.batched.full
    chunk = plan([(0, 40, a), (40, 80, b)], torch.device("cpu"))  # prompt chunks: two matmuls per group
    assert chunk.batched is None and len(chunk.groups) == 2


def test_runner_orders_a_step_by_adapter():
    """Each adapter's sequences are made adjacent (first-appearance order, the base's last, stable)."""
    from types import SimpleNamespace

    from tangram.engine.batch import SeqWork
    from tangram.engine.runner import by_adapter

    a, b = (Adapter(n, n, 1.0, {}, None) for n in "ab")
    work = [SeqWork(SimpleNamespace(adapter=x), 2, [i], True, [0]) for i, x in enumerate([a, None, b, a, None, b])]
    assert [work.index(w) for w in by_adapter(work)] == [0, 3, 2, 5, 1, 4]
    plain = [w for w in work if w.request.adapter is None]
    assert by_adapter(plain) is plain


def test_padded_path_matches_peft(setup, monkeypatch):
    """Models outside transformers' attention interface run padded forwards: adapters apply per padded row."""
    import tangram.engine.runner as runner

    base, ckpt, peft_dirs, adapters = setup
    monkeypatch.setattr(runner, "supports_packed", lambda model: False)
    rows = [0, 1, None, 4, 5]
    refs = [peft_greedy(base, None if a is None else peft_dirs[a], p, TOKENS) for a, p in zip(rows, PROMPTS)]
    with start(ckpt, prepack="off") as inst:
        assert not inst.engine.runner.packed
        sinks = submit(inst, rows, PROMPTS, adapters)
        inst.engine.run_until_idle()
        got = finals(sinks)
    assert got == refs


def test_concurrent_binds_of_one_adapter_share_one_binding(setup):
    from concurrent.futures import ThreadPoolExecutor

    _, ckpt, _, adapters = setup
    with start(ckpt) as inst:
        with ThreadPoolExecutor(4) as pool:
            bound = list(pool.map(lambda _: inst.adapters.acquire(adapters[1]), range(4)))
        assert all(b is bound[0] for b in bound) and bound[0].users == 4
        for b in bound:
            inst.adapters.release(b)
        assert inst.adapters.bound() == []
        index = Checkpoint(adapters[1]).index
        assert inst.pool.resident_bytes(index) == index.total_bytes  # loaded once, retained
