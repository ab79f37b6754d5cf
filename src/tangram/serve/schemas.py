"""OpenAI-compatible request bodies, their mapping to sampling parameters, and response bodies."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from tangram.engine import RequestOutput, SamplingParams
from tangram.engine.sampling import MAX_LOGPROBS, MAX_N, MAX_TOKENS_LIMIT, SEED_LIMIT, TOKEN_ID_LIMIT, TOP_K_LIMIT
from tangram.serve.choices import Choice, TextLogprobs, chat_logprobs
from tangram.engine.structured import StructuredOutput
from tangram.serve.tools import MessageToolCall, ResponseFormat, Tool, ToolChoice, constraint

DEFAULT_CHAT_MAX_TOKENS = 512


def _valid_unicode(value: str) -> str:
    # JSON may spell a lone surrogate ("\ud800"); no tokenizer or UTF-8 encoder can take it
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"not valid Unicode: a lone surrogate at character {exc.start}") from None
    return value


Text = Annotated[str, AfterValidator(_valid_unicode)]
TokenId = Annotated[int, Field(ge=0, lt=TOKEN_ID_LIMIT)]


class _Strict(BaseModel):
    # strict: "stream": "yes" or "max_tokens": "4" are errors, not coerced (a JSON integer still fits a float)
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class TextPart(_Strict):
    """A text part of a message's content."""

    type: Literal["text"]
    text: Text


class ChatMessage(_Strict):
    """One chat message; an assistant message may carry `tool_calls` (then `content` may be null), a `tool`
    message answers the call named by `tool_call_id`."""

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = Field(None, min_length=1)
    tool_calls: list[MessageToolCall] | None = Field(None, max_length=128)
    tool_call_id: Text | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _content_or_calls(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content (only an assistant message with tool_calls "
                             "may have none)")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages have tool_calls")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs tool_call_id")
        for call in self.tool_calls or []:
            call.function.arguments_object()  # ValueError: not an object
        return self

    def text(self) -> str:
        """The content as one string."""
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def template_message(self) -> dict:
        """The message as the chat template sees it (`developer` is a system message; `name`, `tool_calls` with
        their arguments as objects, and `tool_call_id` when given)."""
        msg: dict = {"role": self.role if self.role != "developer" else "system", "content": self.text()}
        if self.name is not None:
            msg["name"] = self.name
        if self.tool_calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": c.function.arguments_object()}} for c in self.tool_calls]
        if self.tool_call_id is not None:
            msg["tool_call_id"] = self.tool_call_id
        return msg


class StreamOptions(_Strict):
    """`stream_options` of the OpenAI API."""

    include_usage: bool = False


class SamplingFields(_Strict):
    """Fields both completion endpoints share: model, sampling, streaming, stops."""

    model: Text = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=TOP_K_LIMIT, description="extension; 0 or -1 (vLLM): no limit")
    n: int = Field(1, ge=1, le=MAX_N, description="choices (sequences sharing the prompt's KV blocks)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=100, description="extension (vLLM); 1 = off")
    min_p: float | None = Field(None, ge=0, le=1, description="extension (vLLM)")
    logit_bias: dict[str, float] | None = Field(None, max_length=4096, description="token id -> bias in [-100, 100]")
    user: Text | None = None
    ignore_eos: bool = Field(False, description="extension")
    stop_token_ids: list[TokenId] | None = Field(None, max_length=64, description="extension")
    response_format: ResponseFormat | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else value
        if stops is not None and (len(stops) > 4 or any(s == "" for s in stops)):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value):
        if value is None:
            return None
        out: dict[int, float] = {}
        for key, bias in value.items():
            if not key.isascii() or not key.isdigit() or int(key) >= TOKEN_ID_LIMIT:
                raise ValueError(f"keys must be token ids (integers in [0, {TOKEN_ID_LIMIT})), got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"values must be in [-100, 100] (token {key}: {bias})")
            out[int(key)] = float(bias)
        return out

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, value, info: ValidationInfo):
        if value is not None and info.data.get("stream") is not True:  # as OpenAI does
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    def constraint(self) -> StructuredOutput | None:
        """What the output must match (ValueError naming the parameter for what cannot be served)."""
        return constraint(self.response_format, None, None)

    def sampling(self, max_tokens: int, **extra) -> SamplingParams:
        """Engine sampling parameters (raises pydantic.ValidationError on bad combinations); `extra`: the
        endpoint's own (logprobs)."""
        return SamplingParams(max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
                              top_p=1.0 if self.top_p is None else self.top_p,
                              top_k=max(self.top_k or 0, 0),  # -1 (vLLM) and 0: no limit
                              seed=self.seed, stop=list(self.stop or []),
                              stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos,
                              presence_penalty=self.presence_penalty or 0.0,
                              frequency_penalty=self.frequency_penalty or 0.0,
                              repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
                              min_p=self.min_p or 0.0, logit_bias=dict(self.logit_bias or {}), n=self.n, **extra)


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, value, info: ValidationInfo):
        if value is not None and info.data.get("logprobs") is not True:  # as OpenAI does
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    def constraint(self) -> StructuredOutput | None:
        """What the output must match: `response_format`, or the tool call a `tool_choice` forces."""
        return constraint(self.response_format, self.tools, self.tool_choice, self.parallel_tool_calls)

    def limit(self) -> int:
        """Tokens to generate at most."""
        return self.max_completion_tokens or self.max_tokens or DEFAULT_CHAT_MAX_TOKENS

    def engine_params(self) -> SamplingParams:
        """Engine sampling parameters of this chat request."""
        return self.sampling(self.limit(), logprobs=(self.top_logprobs or 0) if self.logprobs else None)


class CompletionRequest(SamplingFields):
    """POST /v1/completions (one prompt: a string, a one-string list, or token ids)."""

    prompt: Text | list[Text] | list[TokenId]
    max_tokens: int = Field(16, ge=0, le=MAX_TOKENS_LIMIT, description="0 only with echo (score the prompt)")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: None = None

    @model_validator(mode="after")
    def _zero_needs_echo(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens must be at least 1 unless echo is true")
        return self

    def engine_params(self) -> SamplingParams:
        """Engine sampling parameters: with echo, the prompt's logprobs too (its token texts, for id prompts)."""
        return self.sampling(self.max_tokens, logprobs=self.logprobs,
                             prompt_logprobs=(self.logprobs or 0) if self.echo else None)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list) and value and isinstance(value[0], str):
            if len(value) != 1:
                raise ValueError("only one prompt per request (n=1)")
            value = value[0]
        if isinstance(value, (str, list)) and len(value) == 0:
            raise ValueError("the prompt is empty")
        return value


def new_id(prefix: str) -> str:
    """An OpenAI-style object id."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(out: RequestOutput) -> dict[str, int]:
    """The usage object."""
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens}


def extension(out: RequestOutput) -> dict[str, Any]:
    """The `tangram` extension field: the cold-start stage breakdown of this request (and its error, if it
    failed after its first output, which a stream can only say here)."""
    ext: dict[str, Any] = {"stages": out.stages.model_dump(mode="json") if out.stages else None}
    if out.error:
        ext["error"] = out.error
    return ext


def finish(out: RequestOutput) -> str | None:
    """OpenAI finish reason."""
    return reason_of(out.finish_reason)


def reason_of(reason: str | None) -> str | None:
    """OpenAI finish reason of an engine finish reason."""
    return {"stop": "stop", "length": "length", "abort": "stop"}.get(reason or "", None)


def chat_body(rid: str, model: str, choices: list[Choice], final: RequestOutput, top: int | None) -> dict:
    """A whole chat completion; `top`: top logprobs per token (None: no logprobs)."""
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                         "logprobs": None if top is None else chat_logprobs(c.entries, top),
                         "finish_reason": reason_of(c.finish_reason)} for i, c in enumerate(choices)],
            "usage": usage(final), "tangram": extension(final)}


def chat_chunk(rid: str, model: str, created: int, delta: dict, reason: str | None = None, *, index: int = 0,
               logprobs: dict | None = None, **extra) -> dict:
    """One streamed chat chunk (of choice `index`)."""
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}], **extra}


def completion_chunk(rid: str, model: str, created: int, text: str, reason: str | None = None, *, index: int = 0,
                     logprobs: dict | None = None, **extra) -> dict:
    """A streamed text completion chunk (of choice `index`)."""
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}], **extra}


def completion_body(rid: str, model: str, created: int, choices: list[tuple[str, TextLogprobs | None, str | None]],
                    final: RequestOutput) -> dict:
    """A whole text completion: (text, logprobs, engine finish reason) per choice."""
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": i, "text": text, "logprobs": None if lp is None else lp.body(),
                         "finish_reason": reason_of(reason)} for i, (text, lp, reason) in enumerate(choices)],
            "usage": usage(final), "tangram": extension(final)}


class TokenizeRequest(_Strict):
    """POST /tokenize: a prompt (`add_special_tokens` default true) or chat messages rendered through the
    model's chat template (`add_generation_prompt` default true, `add_special_tokens` default false)."""

    model: Text = Field(min_length=1)
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(_Strict):
    """POST /detokenize."""

    model: Text = Field(min_length=1)
    tokens: list[TokenId] = Field(max_length=1_000_000)
