"""The vLLM engine backend on Tangram's pool, against plain vLLM (its CPU build, run by its own interpreter).

One module-wide set of models and one plain-vLLM reference run (one process, one engine per model) keep the
vLLM start-ups few: each backend start below either spawns one shell or re-binds a warm one.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from tangram.engine.backend import start_backend
from tangram.engine.errors import RequestError
from tangram.engine.instance import EngineConfig
from tangram.engine.request import OutputQueue
from tangram.engine.sampling import SamplingParams
from tangram.engine.structured import StructuredOutput
from tangram.pool import DevicePool, PoolConfig
from tangram.store import Checkpoint
from tangram.vllm.shells import shell_key
from tangram.vllm.backend import engine_args
from vllm_models import PROMPTS, checkpoint_pair, fine_tune, generate, plain_vllm, tiny_qwen2, vllm_or_fail

import torch

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
N = 24
CFG = EngineConfig(dtype="float32", kv_cache_bytes=256 << 20, max_model_len=256)


@pytest.fixture(scope="module")
def world(tmp_path_factory, demo_checkpoint):
    """SmolLM2 (float32), a small Qwen2 and a fine-tune of it: HF directories, Tangram checkpoints, and plain
    vLLM's greedy continuations of PROMPTS for each."""
    python = vllm_or_fail()
    os.environ.setdefault("TANGRAM_VLLM_PYTHON", python)
    root = tmp_path_factory.mktemp("vllm-world")
    smol = demo_checkpoint(torch.float32)
    models = {"smol": (smol.parent / f"{smol.name}-hf", smol)}
    base = tiny_qwen2()
    models["qwen"] = checkpoint_pair(base, root / "qwen")
    models["tuned"] = checkpoint_pair(fine_tune(base), root / "tuned")
    jobs = [{"model": str(hf), "dtype": "float32", "prompts": PROMPTS, "max_tokens": N, "max_model_len": 256}
            for hf, _ in models.values()]
    refs = dict(zip(models, plain_vllm(python, jobs, root)))
    return {"models": models, "refs": refs}


def shared_pool(nbytes: int = 3 << 30) -> DevicePool:
    return DevicePool(nbytes, "cpu", PoolConfig(shared=True))


def test_greedy_equals_plain_vllm_and_a_pool_hit_rebinds_the_warm_shell(world):
    pool = shared_pool()
    for name in ("smol", "qwen"):
        ckpt = Checkpoint(world["models"][name][1])
        first = start_backend("vllm", ckpt, pool, CFG, name=name, arrival=0.0)
        pid = first.shell.proc.pid
        try:
            got = [generate(first, p, N).output_ids for p in PROMPTS]
            assert first.cost.start == "cold" and first.cost.bytes_loaded > 0
            with pytest.raises(RequestError, match="max_loras"):  # an engine built without LoRA serves no adapter
                generate(first, PROMPTS[0], N, adapter=str(ckpt.path))
        finally:
            first.stop()
        assert got == world["refs"][name], name
        again = start_backend("vllm", ckpt, pool, CFG, name=name, arrival=0.0)
        try:
            assert again.shell.proc.pid == pid  # the parked shell: no new vLLM process
            assert again.cost.start == "pool-hit" and again.cost.bytes_loaded == 0
            assert again.bind_s == 0.0  # it still held these very weights (same content keys): nothing copied
            assert [generate(again, p, N).output_ids for p in PROMPTS] == world["refs"][name]
            if name == "smol":
                _sampling_breadth(again, world["refs"][name][0])
        finally:
            again.stop()


def _sampling_breadth(backend, greedy: list[int]) -> None:
    """Stop strings, n seeded samples with logprobs, and a request vLLM rejects, on a running backend."""
    cut = greedy.index(198)  # SmolLM2's "\n"
    out = generate(backend, PROMPTS[0], N, stop=["\n"])
    assert out.finish_reason == "stop" and out.output_ids[:cut] == greedy[:cut] and "\n" not in out.text
    seqs = {}
    q = OutputQueue()
    backend.submit(PROMPTS[1], SamplingParams(max_tokens=6, temperature=1.0, seed=7, n=2, logprobs=2,
                                              ignore_eos=True), q, arrival=0.0)
    while True:
        o = q.get(timeout=120)
        seqs.setdefault(o.index, []).extend(o.logprobs or [])
        if o.finished:
            break
    assert sorted(seqs) == [0, 1] and all(len(v) == 6 for v in seqs.values())
    assert all(lp.logprob <= 0 and len(lp.top) == 2 for v in seqs.values() for lp in v)
    assert o.completion_tokens == 12
    with pytest.raises(RequestError, match="context"):
        backend.submit(list(range(3, 300)), SamplingParams(max_tokens=4), OutputQueue(), arrival=0.0)
    schema = {"type": "string", "enum": ["yes", "no"]}  # vLLM's structured outputs, from Tangram's parameters
    q = OutputQueue()
    backend.submit([{"role": "user", "content": "Is the sky blue?"}], SamplingParams(
        max_tokens=8, structured=StructuredOutput.json_schema(schema)), q, arrival=0.0)
    while not (answer := q.get(timeout=120)).finished:
        pass
    assert json.loads(answer.text) in ("yes", "no") and answer.finish_reason == "stop"


def test_a_fine_tune_shares_tensors_and_the_shell_and_serves_its_own_weights(world):
    pool = shared_pool()
    qwen, tuned = (Checkpoint(world["models"][k][1]) for k in ("qwen", "tuned"))
    assert shell_key(qwen.path, engine_args(qwen.path, CFG), "cpu") == shell_key(tuned.path, engine_args(
        tuned.path, CFG), "cpu")
    a = start_backend("vllm", qwen, pool, CFG, name="qwen", arrival=0.0)
    pid = a.shell.proc.pid
    assert [generate(a, p, N).output_ids for p in PROMPTS] == world["refs"]["qwen"]
    a.stop()
    b = start_backend("vllm", tuned, pool, CFG, name="tuned", arrival=0.0)
    try:
        changed = sum(t.nbytes for n, t in tuned.index.tensors.items() if n.startswith("model.layers.1.mlp."))
        assert b.shell.proc.pid == pid and b.bind_s > 0  # one kind of shell for the family, re-bound
        assert b.cost.bytes_loaded == changed  # only the fine-tuned tensors were read; the rest is shared
        assert b.cost.bytes_reused == tuned.index.total_bytes - changed
        got = [generate(b, p, N).output_ids for p in PROMPTS]
        assert got == world["refs"]["tuned"]  # its own weights, not the base's left in the shell
        charged = pool.snapshot()["kv_bytes"]  # vLLM's KV and its copy of the weights, active while it runs
        assert charged >= CFG.kv_cache_bytes + tuned.index.total_bytes
        assert got != world["refs"]["qwen"]
        union = {e.key: e.nbytes for ix in (qwen.index, tuned.index) for e in ix.tensors.values()}
        totals = pool.totals()
        held = totals["retained"] + totals["active"] - pool.snapshot()["kv_bytes"]
        assert held == sum(pool.arena.size_of(n) for n in union.values())  # each shared tensor once
        assert held < qwen.index.total_bytes + tuned.index.total_bytes
    finally:
        b.stop()
    assert pool.snapshot()["kv_bytes"] == 0  # released with the instance


def test_a_private_arena_is_staged_through_shared_memory(world):
    pool = DevicePool(1 << 30, "cpu", PoolConfig(shared=False))
    ckpt = Checkpoint(world["models"]["qwen"][1])
    be = start_backend("vllm", ckpt, pool, CFG, name="qwen", arrival=0.0)
    try:
        assert pool.arena.share_path is None
        assert [generate(be, p, N).output_ids for p in PROMPTS] == world["refs"]["qwen"]
    finally:
        be.stop()


def _shell_pid(srv, deployment: str) -> int:
    return next(r.backend.shell.proc.pid for w in srv.workers for r in list(w.replicas.values())
                if r.deployment == deployment)


def test_served_over_the_api_and_a_killed_engine_fails_only_its_own_requests(world, tmp_path):
    import openai
    from transformers import AutoTokenizer

    from tangram.control import Deployment
    from serving import chat_model_dir, serving

    smol = world["models"]["smol"][1]
    deps = [Deployment(name="smol", checkpoint=str(smol), backend="vllm", engine=CFG, keep_alive_s=600),
            Deployment(name="tiny", checkpoint=str(chat_model_dir(tmp_path / "tiny")), keep_alive_s=600)]
    with serving(deps, pool_bytes=3 << 30) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        greedy = {"max_tokens": N, "temperature": 0, "extra_body": {"ignore_eos": True}}
        first = c.completions.create(model="smol", prompt=PROMPTS[0], **greedy)
        assert first.model_extra["tangram"]["stages"]["start"] == "cold"
        want = AutoTokenizer.from_pretrained(smol).decode(world["refs"]["smol"][0], skip_special_tokens=True)
        assert first.choices[0].text == want  # vLLM skips special tokens in text, as plain vLLM does
        assert first.usage.completion_tokens == N
        tiny = c.completions.create(model="tiny", prompt="w5 w6", max_tokens=8, temperature=0).choices[0].text
        pid = _shell_pid(srv, "smol")
        chunks = []
        for chunk in c.completions.create(model="smol", prompt="Tell me a long story.", max_tokens=200,
                                          temperature=0, stream=True, extra_body={"ignore_eos": True}):
            chunks.append(chunk)
            if len(chunks) == 3:
                os.kill(pid, signal.SIGKILL)  # the vLLM engine process dies mid-stream
        assert chunks[-1].model_extra["tangram"]["error"]  # the stream says why it ended early
        assert sum(1 for ch in chunks if ch.choices and ch.choices[0].text) < 200
        # the other deployment never noticed
        assert c.completions.create(model="tiny", prompt="w5 w6", max_tokens=8, temperature=0).choices[0].text == tiny
        again = c.completions.create(model="smol", prompt=PROMPTS[0], **greedy)  # a new engine, from the pool
        assert again.choices[0].text == first.choices[0].text
        stages = again.model_extra["tangram"]["stages"]
        assert stages["start"] == "pool-hit" and stages["bytes_loaded"] == 0
        assert _shell_pid(srv, "smol") != pid
