"""Tool-call parsing and the API's structured-output rules, pure (no server, no model)."""

from __future__ import annotations

import json

import jsonschema
import pytest
from pydantic import BaseModel

from tangram.serve.tools import (NamedToolChoice, ResponseFormat, Tool, ToolCallStream, constraint,
                                 split_tool_calls)

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
WEATHER = Tool.model_validate({"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}})
ADD = Tool.model_validate({"type": "function", "function": {"name": "add"}})


def test_a_whole_answer_splits_into_content_and_calls():
    content, calls = split_tool_calls("Let me check.\n" + CALL + "\n" + CALL.replace("Paris", "Oslo"))
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}),
                                                                  ("get_weather", {"city": "Oslo"})]
    assert calls[0].id != calls[1].id and calls[0].id.startswith("call_")
    only, one = split_tool_calls(CALL)
    assert only is None and [c.name for c in one] == ["get_weather"]


def test_text_without_calls_is_all_content():
    assert split_tool_calls("just text <tool") == ("just text <tool", [])
    assert split_tool_calls("  spaced  ") == ("  spaced  ", [])


def test_a_tag_around_no_call_object_stays_content():
    text = "<tool_call>\nnot json\n</tool_call>"
    assert split_tool_calls(text) == (text, [])


def test_an_unterminated_call_is_content():
    content, calls = split_tool_calls('<tool_call>\n{"name": "get_weather", "argu')
    assert calls == [] and content == '<tool_call>\n{"name": "get_weather", "argu'


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_streamed_deltas_give_the_whole_answer_whatever_the_split(step):
    text = "Sure." + "\n" + CALL + "\n" + CALL.replace("Paris", "Rome")
    stream, content, calls, fragments = ToolCallStream(), "", {}, 0
    pieces = [text[i:i + step] for i in range(0, len(text), step)]
    for k, piece in enumerate(pieces):
        delta, reason = stream.delta(piece, "stop" if k == len(pieces) - 1 else None)
        content += delta.get("content", "")
        for entry in delta.get("tool_calls", []):  # as a client accumulates them
            if "id" in entry:
                assert entry["index"] not in calls and entry["function"]["name"] == "get_weather"
                calls[entry["index"]] = {"id": entry["id"], "arguments": ""}
            calls[entry["index"]]["arguments"] += entry["function"]["arguments"]
            fragments += "id" not in entry
        assert "<tool" not in delta.get("content", "")
    assert reason == "tool_calls"
    assert content.strip() == "Sure."
    assert list(calls) == [0, 1]
    assert [c["arguments"] for c in calls.values()] == ['{"city": "Paris"}', '{"city": "Rome"}']
    assert [c.arguments for c in split_tool_calls(text)[1]] == ['{"city": "Paris"}', '{"city": "Rome"}']
    if step <= 3:  # short deltas stream each call's arguments in pieces, as OpenAI does
        assert fragments > 2 * len(calls)


def test_a_call_written_in_another_order_comes_whole_at_its_end():
    text = '<tool_call>\n{"arguments": {"x": 1}, "name": "f"}\n</tool_call>'
    stream = ToolCallStream()
    first, _ = stream.delta(text[:-3], None)
    assert first == {}
    last, reason = stream.delta(text[-3:], "stop")
    assert last["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"x": 1}'} and reason == "tool_calls"


def test_a_stream_without_calls_keeps_its_finish_reason_and_text():
    stream = ToolCallStream()
    first, _ = stream.delta("hello <tool", None)
    assert first["content"] == "hello "
    last, reason = stream.delta(" x ", "length")
    assert first["content"] + last["content"] == "hello <tool x " and reason == "length"


def test_forcing_choices_build_a_call_schema_and_bad_combinations_are_named():
    named = constraint(None, [WEATHER, ADD], NamedToolChoice.model_validate(
        {"type": "function", "function": {"name": "add"}}))
    assert named.kind == "tool_calls" and not named.multiple
    assert json.loads(named.schema_text)["properties"]["name"] == {"const": "add"}
    required = constraint(None, [WEATHER, ADD], "required", parallel_tool_calls=False)
    names = [s["properties"]["name"]["const"] for s in json.loads(required.schema_text)["anyOf"]]
    assert names == ["get_weather", "add"] and required.multiple is False
    assert constraint(None, [WEATHER], "auto") is None and constraint(None, [WEATHER], "none") is None
    fmt = ResponseFormat.model_validate({"type": "json_schema",
                                         "json_schema": {"name": "x", "schema": {"type": "object"}}})
    assert constraint(fmt, [WEATHER], "auto").kind == "json_schema"
    assert constraint(ResponseFormat(type="text"), None, None) is None
    with pytest.raises(ValueError, match="^tool_choice: forcing"):
        constraint(None, None, "required")
    with pytest.raises(ValueError, match="^tool_choice: no tool named 'nope'"):
        constraint(None, [WEATHER], NamedToolChoice.model_validate({"type": "function", "function": {"name": "nope"}}))
    with pytest.raises(ValueError, match="^response_format: cannot be combined"):
        constraint(fmt, [WEATHER], "required")
    with pytest.raises(ValueError, match="^response_format: type json_schema needs"):
        constraint(ResponseFormat(type="json_schema"), None, None)


def test_references_of_nested_models_point_into_the_call_schema():
    class City(BaseModel):
        name: str

    class Trip(BaseModel):
        start: City
        end: City

    tool = Tool.model_validate({"type": "function",
                                "function": {"name": "trip", "parameters": Trip.model_json_schema()}})
    for tools, at in (([tool], "#"), ([WEATHER, tool], "#/anyOf/1")):
        schema = json.loads(constraint(None, tools, "required").schema_text)
        args = (schema["anyOf"][1] if len(tools) > 1 else schema)["properties"]["arguments"]
        assert args["properties"]["start"]["$ref"] == f"{at}/properties/arguments/$defs/City"
        jsonschema.validate({"name": "trip", "arguments": {"start": {"name": "a"}, "end": {"name": "b"}}}, schema)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"name": "trip", "arguments": {"start": {"name": 1}, "end": {"name": "b"}}}, schema)
