"""What a request's output must match (structured output): a JSON schema, any JSON object, or tool calls.

A plain value that travels with `SamplingParams` from the API to the engine (and across processes); the
engine compiles it into a grammar (`constrain.py`). Tool calls use the Hermes / Qwen2.5 convention: each call
is `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"


class StructuredOutput(BaseModel):
    """The constraint of one request. `schema_text`: the JSON schema as text (its cache key), for
    `json_schema` and `tool_calls` (there: the schema of one call object); `multiple`: one or more calls."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["json_object", "json_schema", "tool_calls"]
    schema_text: str | None = Field(None, max_length=1 << 20)
    multiple: bool = False

    @classmethod
    def json_schema(cls, schema: dict) -> StructuredOutput:
        """Output that is one JSON value valid against `schema`."""
        return cls(kind="json_schema", schema_text=json.dumps(schema))

    @classmethod
    def tool_calls(cls, call_schema: dict, *, multiple: bool) -> StructuredOutput:
        """Output that is one (or, with `multiple`, one or more) tool calls whose objects match `call_schema`."""
        return cls(kind="tool_calls", schema_text=json.dumps(call_schema), multiple=multiple)
