"""The choices of a response: text, logprobs and finish reason of each of a request's n sequences, in
OpenAI's shapes (chat: `logprobs.content[]`; completions: `tokens`, `token_logprobs`, `top_logprobs`,
`text_offset`), whole or streamed."""

from __future__ import annotations

from dataclasses import dataclass, field

from tangram.engine import RequestOutput
from tangram.engine.logprobs import TokenLogprob

LOGPROB_FLOOR = -9999.0  # what a -inf logprob is reported as (JSON has no infinity; vLLM does the same)


def _lp(value: float) -> float:
    return max(value, LOGPROB_FLOOR)


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))


def chat_entry(e: TokenLogprob, top: int) -> dict:
    """One `logprobs.content[]` item of a chat choice."""
    return {"token": e.token, "logprob": _lp(e.logprob), "bytes": _bytes(e.token),
            "top_logprobs": [{"token": c.token, "logprob": _lp(c.logprob), "bytes": _bytes(c.token)}
                             for c in e.top[:top]]}


def chat_logprobs(entries: list[TokenLogprob] | None, top: int) -> dict | None:
    """A chat choice's `logprobs` object (None when not asked for)."""
    return None if entries is None else {"content": [chat_entry(e, top) for e in entries]}


@dataclass
class TextLogprobs:
    """A completion choice's `logprobs` object, built as its tokens arrive (text offsets run on)."""

    offset: int = 0
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)

    def add(self, entries: list[TokenLogprob]) -> TextLogprobs:
        """Append entries (a prompt's first token has no logprob and no top tokens: null, as OpenAI's echo
        gives); returns just the appended part (a streamed chunk's)."""
        part = TextLogprobs(self.offset)
        for e in entries:
            if e.logprob is None:
                part._put(e.token, None, None)
            else:
                top = {c.token: _lp(c.logprob) for c in e.top}
                top.setdefault(e.token, _lp(e.logprob))  # vLLM's shape: the top k and the chosen token
                part._put(e.token, _lp(e.logprob), top)
        self.tokens += part.tokens
        self.token_logprobs += part.token_logprobs
        self.top_logprobs += part.top_logprobs
        self.text_offset += part.text_offset
        self.offset = part.offset
        return part

    def _put(self, token: str, logprob: float | None, top: dict[str, float] | None) -> None:
        self.tokens.append(token)
        self.token_logprobs.append(logprob)
        self.top_logprobs.append(top)
        self.text_offset.append(self.offset)
        self.offset += len(token)

    def body(self) -> dict:
        """The JSON object."""
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
                "text_offset": self.text_offset}


@dataclass
class Choice:
    """What one sequence produced so far."""

    text: str = ""
    entries: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


def collect(outs: list[RequestOutput], n: int) -> list[Choice]:
    """The n choices of a whole (not streamed) response from every output of its request."""
    choices = [Choice() for _ in range(n)]
    for out in outs:
        c = choices[out.index]
        c.text += out.delta
        c.entries += out.logprobs or []
        if out.finish_reason is not None:
            c.finish_reason = out.finish_reason
    return choices


def prompt_text(first: RequestOutput, prompt: str | list[int]) -> str:
    """The prompt as echoed: the text sent, or token ids decoded (the first output carries that text when
    echo asks for the prompt's logprobs)."""
    return prompt if isinstance(prompt, str) else first.prompt_text or ""
