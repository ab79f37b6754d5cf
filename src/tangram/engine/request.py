"""A generation request inside the engine, and the outputs it streams."""

from __future__ import annotations

import enum
import queue
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from tangram.engine.detok import TextStream
from tangram.engine.sampling import SamplingParams
from tangram.engine.stages import Stages

if TYPE_CHECKING:
    from tangram.engine.lora import Adapter

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
    adapter: Adapter | None = None  # the LoRA adapter its tokens run with (engine/lora.py), None: the base

    def __post_init__(self) -> None:
        if not self.ids:
            self.ids = self.prompt_ids + self.output_ids

    def append(self, token: int) -> None:
        """Add a generated token."""
        self.output_ids.append(token)
        self.ids.append(token)


class OutputQueue:
    """A sink that collects outputs for a synchronous reader (`tangram run`, tests)."""

    def __init__(self) -> None:
        self.q: queue.Queue[RequestOutput] = queue.Queue()

    def __call__(self, out: RequestOutput) -> None:
        self.q.put(out)

    def get(self, timeout: float | None = None) -> RequestOutput:
        """Next output (blocks)."""
        return self.q.get(timeout=timeout)
