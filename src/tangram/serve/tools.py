"""Structured output and tools in the OpenAI API: `response_format`, `tools` / `tool_choice`, tool-call parsing.

Request side: the bodies' pydantic models, and `constraint()`, which turns a request's `response_format` or a
forcing `tool_choice` (`required`, a named function) into the engine's `StructuredOutput`. Response side:
`ToolCallStream`, which splits generated text into content and the Hermes / Qwen2.5 tool calls
(`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`) as they complete, for whole answers and streams.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tangram.engine.structured import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, StructuredOutput


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class JsonSchemaFormat(_Body):
    """`response_format.json_schema`."""

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    """`response_format`: `text` (no constraint), `json_object` (any JSON object) or `json_schema`."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def constraint(self) -> StructuredOutput | None:
        """The engine's constraint (None for `text`)."""
        if self.type == "json_object":
            return StructuredOutput(kind="json_object")
        if self.type == "json_schema":
            if self.json_schema is None:
                raise ValueError("response_format: type json_schema needs a json_schema object")
            return StructuredOutput.json_schema(self.json_schema.schema_)
        return None


class FunctionDef(_Body):
    """A tool's function: its name and the JSON schema of its arguments."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    """One entry of `tools` (only functions exist)."""

    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Body):
    """The function a named `tool_choice` forces."""

    name: str = Field(min_length=1)


class NamedToolChoice(_Body):
    """`tool_choice: {"type": "function", "function": {"name": ...}}`."""

    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class CalledFunction(_Body):
    """The function of a tool call in an assistant message: `arguments` is JSON text of an object."""

    name: str = Field(min_length=1)
    arguments: str

    def arguments_object(self) -> dict[str, Any]:
        """The arguments as an object (what chat templates render); ValueError when they are not one."""
        try:
            value = json.loads(self.arguments)
        except ValueError:
            raise ValueError("tool call arguments must be JSON text of an object") from None
        if not isinstance(value, dict):
            raise ValueError("tool call arguments must be JSON text of an object")
        return value


class MessageToolCall(_Body):
    """A tool call of an assistant message (as a client sends back the calls it was given)."""

    id: str = Field(min_length=1)
    type: Literal["function"]
    function: CalledFunction


def call_schema(tool: Tool, at: str = "#") -> dict[str, Any]:
    """The JSON schema of one call object of `tool`: `{"name": <its name>, "arguments": <its parameters>}`.
    `at`: where the call schema will sit (a JSON pointer), for the references of the parameters."""
    params = _moved(tool.function.parameters or {"type": "object"}, f"{at}/properties/arguments")
    return {"type": "object", "properties": {"name": {"const": tool.function.name}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False}


def _moved(schema: Any, to: str) -> Any:
    """`schema` with its local `$ref`s (`#...`, as pydantic writes them for nested models: `#/$defs/X`) rewritten
    for the schema sitting at JSON pointer `to` instead of at a document's root."""
    if isinstance(schema, list):
        return [_moved(v, to) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _moved(v, to) for k, v in schema.items()}
    ref = out.get("$ref")
    if isinstance(ref, str) and ref.startswith("#"):
        out["$ref"] = to + ref[1:]
    return out


def constraint(response_format: ResponseFormat | None, tools: list[Tool] | None, tool_choice: ToolChoice | None,
               parallel_tool_calls: bool = True) -> StructuredOutput | None:
    """What the output must match, from a request's structured-output and tool fields (ValueError naming the
    parameter for a combination that cannot be served)."""
    forced = tool_choice == "required" or isinstance(tool_choice, NamedToolChoice)
    if forced and not tools:
        raise ValueError("tool_choice: forcing a tool call needs tools")
    if forced and response_format is not None and response_format.type != "text":
        raise ValueError("response_format: cannot be combined with a tool_choice that forces a tool call")
    if isinstance(tool_choice, NamedToolChoice):
        named = [t for t in tools or [] if t.function.name == tool_choice.function.name]
        if not named:
            raise ValueError(f"tool_choice: no tool named {tool_choice.function.name!r} in tools")
        return StructuredOutput.tool_calls(call_schema(named[0]), multiple=False)
    if tool_choice == "required":
        many = len(tools or []) > 1
        schemas = [call_schema(t, f"#/anyOf/{i}" if many else "#") for i, t in enumerate(tools or [])]
        return StructuredOutput.tool_calls({"anyOf": schemas} if many else schemas[0], multiple=parallel_tool_calls)
    return response_format.constraint() if response_format is not None else None


@dataclass
class ToolCall:
    """A parsed tool call."""

    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def body(self, index: int | None = None) -> dict[str, Any]:
        """The call as OpenAI writes it (with `index` in a stream's delta)."""
        out: dict[str, Any] = {"id": self.id, "type": "function",
                               "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


def parse_call(text: str) -> ToolCall | None:
    """The call in the text between the tags, or None when it is not a call object."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    args = value.get("arguments", value.get("parameters", {}))
    return ToolCall(value["name"], args if isinstance(args, str) else json.dumps(args))


def _unquoted(text: str) -> str:
    """A JSON string's content unescaped (as it is, if its escapes are not JSON's)."""
    try:
        return json.loads(f'"{text}"')
    except ValueError:
        return text


def _held(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that could begin `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


# a call's opening as a model writes it (and as the tool-call grammar forces it): the name, then the arguments
_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
_TAIL = re.compile(r"\s*\}?\s*$")  # what may still close the call object after its arguments


class ToolCallStream:
    """Splits generated text, fed in deltas, into content and tool calls, as OpenAI streams them: a call's id
    and name once its opening is generated, then its arguments' text in pieces. Text that could still begin a
    tag is held back; blank content around calls is dropped; a tag around no call object stays content."""

    def __init__(self) -> None:
        self.calls: list[ToolCall] = []
        self._buf = ""
        self._blank = ""  # whitespace content held until something that is not whitespace follows
        self._inside = False
        self._open: ToolCall | None = None  # the call whose arguments are streaming
        self._args_at = 0  # where its arguments begin in the buffer

    def feed(self, delta: str) -> tuple[str, list[dict[str, Any]]]:
        """Content to send now and the `tool_calls` delta entries (OpenAI's shape, with `index`) of `delta`."""
        self._buf += delta
        content, entries = "", []
        while True:
            if not self._inside:
                i = self._buf.find(TOOL_CALL_OPEN)
                if i < 0:
                    keep = _held(self._buf, TOOL_CALL_OPEN)
                    content += self._buf[:len(self._buf) - keep]
                    self._buf = self._buf[len(self._buf) - keep:]
                    break
                content += self._buf[:i]
                self._buf, self._inside = self._buf[i + len(TOOL_CALL_OPEN):], True
                continue
            j = self._buf.find(TOOL_CALL_CLOSE)
            body = self._buf if j < 0 else self._buf[:j]
            if self._open is None and (m := _HEADER.match(body)) is not None:
                self._open, self._args_at = ToolCall(_unquoted(m.group(1)), ""), m.end()
                self.calls.append(self._open)
                entries.append({"index": len(self.calls) - 1, "id": self._open.id, "type": "function",
                                "function": {"name": self._open.name, "arguments": ""}})
            if j < 0:
                if self._open is not None:  # stream the arguments but what may be the call's end
                    entries += self._arguments(body[:len(body) - _held(body, TOOL_CALL_CLOSE)])
                break
            self._buf, self._inside = self._buf[j + len(TOOL_CALL_CLOSE):], False
            if self._open is not None:
                entries += self._arguments(body)
                self._open = None
            elif (call := parse_call(body)) is not None:  # a call written in another order: whole, at its end
                self.calls.append(call)
                entries.append(call.body(len(self.calls) - 1))
            else:
                content += TOOL_CALL_OPEN + body + TOOL_CALL_CLOSE
        return self._content(content), entries

    def _arguments(self, body: str) -> list[dict[str, Any]]:
        """The open call's arguments text so far (`body`: the call's text), as a delta entry of what is new."""
        assert self._open is not None
        args = body[self._args_at:].lstrip()  # the blank after "arguments": may come in a later delta
        args = args[:_TAIL.search(args).start()]
        if len(args) <= len(self._open.arguments):
            return []
        new, self._open.arguments = args[len(self._open.arguments):], args
        return [{"index": self.calls.index(self._open), "function": {"arguments": new}}]

    def finish(self) -> str:
        """Content left at the end: held text, and an unterminated call (cut by max_tokens) unless it is one whose
        arguments were streaming."""
        rest = "" if self._open is not None else (TOOL_CALL_OPEN if self._inside else "") + self._buf
        self._buf, self._inside, self._open = "", False, None
        return self._content(rest, final=True)

    def delta(self, text: str, reason: str | None, final: bool | None = None) -> tuple[dict[str, Any], str | None]:
        """A stream chunk's delta for the new `text` (and, at the `final` one, by default the one with a `reason`,
        what was held back), and its finish reason: `tool_calls` when the answer made calls and stopped."""
        content, entries = self.feed(text)
        if reason is not None if final is None else final:
            content += self.finish()
        delta: dict[str, Any] = {"content": content} if content else {}
        if entries:
            delta["tool_calls"] = entries
        return delta, "tool_calls" if reason == "stop" and self.calls else reason

    def _content(self, text: str, final: bool = False) -> str:
        text, self._blank = self._blank + text, ""
        if text.strip() or (final and not self.calls):
            return text
        if not final:
            self._blank = text
        return ""


def split_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """A whole answer's content (None when it is only tool calls) and its calls."""
    stream = ToolCallStream()
    content = stream.feed(text)[0] + stream.finish()
    if stream.calls:
        return content.strip() or None, stream.calls
    return content, []


def answer_with_calls(choice: dict[str, Any], text: str) -> None:
    """Rewrite a whole chat answer's choice for the tool calls in `text`: content, `tool_calls`, finish reason."""
    content, calls = split_tool_calls(text)
    if calls:
        choice["message"].update(content=content, tool_calls=[c.body() for c in calls])
        if choice["finish_reason"] == "stop":
            choice["finish_reason"] = "tool_calls"
