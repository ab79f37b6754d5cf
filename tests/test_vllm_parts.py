"""The vllm backend's pure parts, without vLLM: parameter mapping, shell keys, the warm-shell pool, tied groups."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from tangram.engine.errors import RequestError
from tangram.engine.sampling import SamplingParams
from tangram.engine.structured import StructuredOutput
from tangram.vllm.params import vllm_sampling
from tangram.vllm.shells import ShellPool, shell_key


def test_sampling_parameters_map_to_vllms():
    kw = vllm_sampling(SamplingParams(max_tokens=9, temperature=0.7, top_p=0.9, top_k=0, min_p=0.1, seed=3,
                                      stop=["\n"], stop_token_ids=[7], presence_penalty=0.5, frequency_penalty=-0.5,
                                      repetition_penalty=1.2, logit_bias={5: -100.0}, logprobs=2, n=2))
    assert kw == {"n": 2, "max_tokens": 9, "temperature": 0.7, "top_p": 0.9, "top_k": -1, "min_p": 0.1, "seed": 3,
                  "stop": ["\n"], "stop_token_ids": [7], "ignore_eos": False, "presence_penalty": 0.5,
                  "frequency_penalty": -0.5, "repetition_penalty": 1.2, "logprobs": 2, "logit_bias": {5: -100.0}}
    assert vllm_sampling(SamplingParams(top_k=40))["top_k"] == 40
    assert "logit_bias" not in vllm_sampling(SamplingParams())


def test_structured_output_maps_and_what_the_backend_cannot_serve_is_a_request_error():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert vllm_sampling(SamplingParams(structured=StructuredOutput.json_schema(schema)))["structured_outputs"] == {
        "json": schema}
    assert vllm_sampling(SamplingParams(structured=StructuredOutput(kind="json_object")))["structured_outputs"] == {
        "json_object": True}
    with pytest.raises(RequestError, match="tool_choice"):
        vllm_sampling(SamplingParams(structured=StructuredOutput.tool_calls(schema, multiple=False)))
    with pytest.raises(RequestError, match="prompt logprobs"):
        vllm_sampling(SamplingParams(prompt_logprobs=1))


def _model_dir(root: Path, name: str, hidden: int = 64, tokenizer: str = "tok") -> Path:
    d = root / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
                                               "_name_or_path": name, "transformers_version": "5"}))
    (d / "tokenizer.json").write_text(tokenizer)
    return d


def test_a_shell_key_is_the_shape_tokenizer_engine_and_device_not_the_name(tmp_path):
    args = {"dtype": "float32", "kv_cache_memory_bytes": 1 << 28}
    base = shell_key(_model_dir(tmp_path, "base"), {**args, "model": "a"}, "cpu")
    assert shell_key(_model_dir(tmp_path, "tuned"), {**args, "model": "b"}, "cpu") == base  # a fine-tune
    assert shell_key(_model_dir(tmp_path, "wider", hidden=128), args, "cpu") != base
    assert shell_key(_model_dir(tmp_path, "othertok", tokenizer="x"), args, "cpu") != base
    assert shell_key(_model_dir(tmp_path, "bf16"), {**args, "dtype": "bfloat16"}, "cpu") != base
    assert shell_key(_model_dir(tmp_path, "gpu"), args, "cuda:0") != base


class FakeShell:
    """What ShellPool uses of a shell: its key, liveness, stop and kill."""

    def __init__(self, key: str, alive: bool = True) -> None:
        self.key, self._alive, self.stopped = key, alive, False
        self.proc = type("P", (), {"pid": id(self)})()

    def alive(self) -> bool:
        return self._alive and not self.stopped

    def stop(self) -> None:
        self.stopped = True

    def kill(self) -> None:
        self.stopped = True


def test_the_warm_shell_pool_keeps_one_per_key_and_two_in_all_and_never_hands_out_a_dead_one():
    pool = ShellPool(per_key=1, total=2)
    a1, a2, b, c = FakeShell("a"), FakeShell("a"), FakeShell("b"), FakeShell("c")
    pool.park(a1)
    pool.park(a2)
    assert a1.stopped and not a2.stopped  # the older of a key goes
    pool.park(b)
    pool.park(c)
    assert a2.stopped and pool.parked() == 2  # over the total: the oldest goes
    assert pool.take("a") is None and pool.take("b") is b and pool.take("b") is None
    dead = FakeShell("d", alive=False)
    pool.park(dead)
    assert dead.stopped and pool.take("d") is None
    pool.close()
    assert c.stopped and pool.parked() == 0


def test_a_start_waits_for_the_shell_being_pre_warmed_instead_of_building_a_second():
    pool = ShellPool()
    gate, built = threading.Event(), []

    def build() -> FakeShell:
        gate.wait(10)
        built.append(FakeShell("k"))
        return built[-1]

    assert pool.prewarm("k", build) is True
    assert pool.prewarm("k", build) is False  # one build per key at a time
    threading.Timer(0.05, gate.set).start()
    got = pool.take("k")
    assert got is built[0] and len(built) == 1
    assert pool.prewarm("k", build) is False  # its shell serves an instance: no second vLLM process beside it
    pool.done("k")
    assert pool.prewarm("k", lambda: (_ for _ in ()).throw(RuntimeError("no vLLM"))) is True
    assert pool.take("k") is None  # a failed pre-warm leaves nothing; the start spawns its own
    pool.serving("k")  # that start's new shell serves
    assert pool.prewarm("k", build) is False


def test_tied_groups_find_the_modules_sharing_one_weight():
    from tangram.vllm.weights import tied_groups

    embed, head, other = torch.nn.Embedding(8, 4), torch.nn.Linear(4, 8, bias=False), torch.nn.Linear(4, 4)
    head.weight = embed.weight
    model = torch.nn.ModuleDict({"embed": embed, "head": head, "other": other})
    groups = tied_groups(model)
    assert len(groups) == 1 and groups[0][0] is embed and groups[0][1] == [head]


def test_an_adapter_on_a_vllm_base_needs_lora_on_and_a_rank_it_takes():
    from tangram.control import Deployment
    from tangram.control.adapters import engine_refusal
    from tangram.engine.instance import EngineConfig
    from tangram.store.adapter import AdapterInfo
    from tangram.vllm.backend import engine_args

    info = AdapterInfo(r=16, alpha=32, scaling=2.0, modules=["model.layers.0.self_attn.q_proj"])
    off = Deployment(name="b", checkpoint="demo", backend="vllm")
    on = Deployment(name="b", checkpoint="demo", backend="vllm", engine=EngineConfig(max_loras=4, max_lora_rank=16))
    assert "max_loras" in engine_refusal(off, info)
    assert engine_refusal(on, info) is None
    assert "max_lora_rank 8" in engine_refusal(on.model_copy(update={"engine": EngineConfig(max_loras=4,
                                                                                            max_lora_rank=8)}), info)
    assert engine_refusal(Deployment(name="b", checkpoint="demo"), info) is None  # the built-in engine: any rank
    args = engine_args(Path("m"), on.engine)
    assert (args["enable_lora"], args["max_loras"], args["max_lora_rank"]) == (True, 4, 16)
    assert "enable_lora" not in engine_args(Path("m"), off.engine)
