"""A generation request inside the engine, and the outputs it streams."""

from __future__ import annotations

import enum
import queue
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from tangram.engine.detok import TextStream
from tangram.engine.logprobs import TokenLogprob
from tangram.engine.sampling import SEED_LIMIT, SamplingParams, make_generator
from tangram.engine.stages import Stages

if TYPE_CHECKING:
    from tangram.engine.constrain import GrammarState
    from tangram.engine.lora_update import Adapter

FinishReason = Literal["stop", "length", "abort", "error"]


class Status(enum.Enum):
    """Where a request is in the engine."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestOutput:
    """One streamed update: new tokens and text since the last update; the last one has `finished` set."""

    request_id: str
    delta: str
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    stages: Stages | None = None
    output_ids: list[int] | None = None  # every generated id, on the final output only
    instance_failed: bool = False  # the instance can serve nothing more (its weights failed to load)
    worker_failed: bool = False  # its worker process died: none of the instances it held can serve
    # a request of n > 1 sequences: which sequence this output is of; `finished` is set on the last output of
    # the last sequence only, `finish_reason` on each sequence's last output; completion_tokens counts all
    index: int = 0
    logprobs: list[TokenLogprob] | None = None  # of `token_ids`, when the request asked for them
    prompt_logprobs: list[TokenLogprob] | None = None  # once (first output); entry 0 has logprob None
    prompt_text: str | None = None  # the decoded prompt, with its logprobs


@dataclass
class Request:
    """Engine-side state of one request. `cached` tokens of `ids` have their KV in `blocks` (its block table)."""

    id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float
    sink: Callable[[RequestOutput], None]
    text: TextStream
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)  # prompt and generated ids (kept, not rebuilt per step)
    blocks: list[int] = field(default_factory=list)
    cached: int = 0
    status: Status = Status.WAITING
    stages: Stages = field(default_factory=Stages)
    finish_reason: FinishReason | None = None
    prefill_began: float | None = None  # when its first prompt chunk ran
    first_token_at: float | None = None
    index: int = 0  # which of its request's n sequences
    group: SeqGroup | None = None  # the n > 1 sequences of one request
    forks: list[Request] = field(default_factory=list)  # the other n - 1 sequences, until the prompt is in
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)  # not streamed yet
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # by prompt position
    prompt_logprobs_sent: bool = False
    grammar: GrammarState | None = None  # its structured-output matcher, when it has a constraint
    adapter: Adapter | None = None  # the LoRA adapter its tokens run with (engine/lora_update.py), None: the base
    hold: bool = False  # migrating in: all its ids but the last are prefilled, nothing sampled until released

    def __post_init__(self) -> None:
        if not self.ids:
            self.ids = self.prompt_ids + self.output_ids

    def wants_prompt_logits(self) -> bool:
        """Whether the prompt chunks it runs must return every position's logits (prompt logprobs not done)."""
        return (self.params.prompt_logprobs is not None and self.index == 0 and not self.prompt_logprobs_sent
                and len(self.prompt_logprobs) < len(self.prompt_ids))

    def take_extras(self) -> dict:
        """The logprobs an output carries (those not streamed yet), as RequestOutput keyword arguments."""
        extras: dict = {"index": self.index}
        if self.params.logprobs is not None:
            extras["logprobs"], self.pending_logprobs = self.pending_logprobs, []
        if self.params.prompt_logprobs is not None and not self.prompt_logprobs_sent and self.index == 0:
            extras["prompt_logprobs"] = list(self.prompt_logprobs)
            extras["prompt_text"] = self.text.tokenizer.decode(self.prompt_ids)  # echo of a token-id prompt
            self.prompt_logprobs_sent = True
        return extras

    def todo(self) -> int:
        """Ids to run before its next token can be sampled (a held request never samples: one fewer)."""
        return len(self.ids) - self.cached - int(self.hold)

    def append(self, token: int) -> None:
        """Add a generated token."""
        self.output_ids.append(token)
        self.ids.append(token)


class SeqGroup:
    """The n sequences of one request (all with its id): one stream to the request's sink, finished once.

    Each sequence's outputs carry its `index`; a sequence's last output has its finish reason but is
    `finished` only when it is the last sequence to end; `completion_tokens` is the sum over sequences.
    """

    def __init__(self, n: int, sink: Callable[[RequestOutput], None]) -> None:
        self.live, self.sink = n, sink
        self.tokens = [0] * n

    def leave(self) -> bool:
        """A sequence ended; True when it was the last one."""
        self.live -= 1
        return self.live == 0

    def sink_of(self, index: int) -> Callable[[RequestOutput], None]:
        """The sink of sequence `index`."""
        def emit(out: RequestOutput) -> None:
            self.tokens[index] = out.completion_tokens
            out.index, out.completion_tokens = index, sum(self.tokens)
            if out.finished and self.live > 0:
                out.finished = False  # its finish_reason says this sequence ended; others still run
            self.sink(out)
        return emit


def fork_sequences(req: Request, device: torch.device,
                   grammar: Callable[[SamplingParams], GrammarState | None] | None = None) -> None:
    """Make `req` the first of its `params.n` sequences: the others wait in `req.forks` until its prompt is in
    KV, then share its blocks. Sequence i of a seeded request draws from seed + i; each has its own matcher
    from `grammar` (a structured output's state is per sequence)."""
    n = req.params.n
    group = SeqGroup(n, req.sink)
    req.group, req.sink = group, group.sink_of(0)
    for i in range(1, n):
        params = req.params
        if params.seed is not None:
            params = params.model_copy(update={"seed": (params.seed + i) % SEED_LIMIT})
        req.forks.append(Request(req.id, req.prompt_ids, params, req.arrival, group.sink_of(i),
                                 TextStream(req.text.tokenizer, list(params.stop)), make_generator(params, device),
                                 index=i, group=group, grammar=grammar(params) if grammar else None))


class OutputQueue:
    """A sink that collects outputs for a synchronous reader (`tangram run`, tests)."""

    def __init__(self) -> None:
        self.q: queue.Queue[RequestOutput] = queue.Queue()

    def __call__(self, out: RequestOutput) -> None:
        self.q.put(out)

    def get(self, timeout: float | None = None) -> RequestOutput:
        """Next output (blocks)."""
        return self.q.get(timeout=timeout)
