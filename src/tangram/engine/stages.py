"""The cold-start stage breakdown every request carries, and the engine's running totals."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

StartType = Literal["warm", "pool-hit", "dram", "cold"]


class StartCost(BaseModel):
    """What starting an instance cost: init (runtime, skeleton, tokenizer) and load (bytes into the pool)."""

    start: StartType = "cold"
    init_s: float = 0.0
    load_s: float = 0.0
    bytes_loaded: int = 0
    bytes_reused: int = 0
    load_begin: float = 0.0  # seconds since the request arrived, for overlap plots
    load_end: float = 0.0

    @classmethod
    def classify(cls, bytes_loaded: int, bytes_from_cache: int) -> StartType:
        """pool-hit: nothing loaded; dram: everything loaded came from the host cache; else cold."""
        if bytes_loaded == 0:
            return "pool-hit"
        return "dram" if bytes_from_cache >= bytes_loaded else "cold"


class Stages(BaseModel):
    """Where one request's time to first token went (seconds), and what its start loaded (bytes)."""

    start: StartType = "warm"
    queue_s: float = 0.0
    schedule_s: float = 0.0
    init_s: float = 0.0
    load_s: float = 0.0
    bytes_loaded: int = 0
    bytes_reused: int = 0
    kv_s: float = 0.0
    prefill_s: float = 0.0
    ttft_s: float = 0.0
    load_interval: tuple[float, float] | None = Field(None, description="load [begin, end], s since arrival")
    prefill_interval: tuple[float, float] | None = Field(None, description="prefill [begin, end], s since arrival")

    def charge_start(self, cost: StartCost) -> None:
        """Attribute an instance start to this request (it waited for it)."""
        self.start = cost.start
        self.init_s, self.load_s = cost.init_s, cost.load_s
        self.bytes_loaded, self.bytes_reused = cost.bytes_loaded, cost.bytes_reused
        self.load_interval = (cost.load_begin, cost.load_end)


class EngineRates(BaseModel):
    """What an engine measured of its own speed (None: not measured yet, or the backend does not say)."""

    step_s: float | None = None  # one engine step (a decode token for every running request)
    prefill_s_per_token: float | None = None  # forward seconds per token of steps that prefilled


class Totals(BaseModel):
    """Engine-wide sums over finished requests."""

    requests: int = 0
    starts: dict[str, int] = Field(default_factory=lambda: {"warm": 0, "pool-hit": 0, "dram": 0, "cold": 0})
    queue_s: float = 0.0
    init_s: float = 0.0
    load_s: float = 0.0
    kv_s: float = 0.0
    prefill_s: float = 0.0
    ttft_s: float = 0.0
    bytes_loaded: int = 0
    bytes_reused: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    decode_s: float = 0.0
    prefill_step_tokens: int = 0  # tokens of the steps that prefilled something (every row of those steps)
    prefill_step_s: float = 0.0  # and those steps' forward seconds
    preemptions: int = 0
    kv_waits: int = 0

    def rates(self) -> EngineRates:
        """Seconds per step and per prefilled token, as measured so far (None before any)."""
        return EngineRates(step_s=self.decode_s / self.decode_steps if self.decode_steps else None,
                           prefill_s_per_token=(self.prefill_step_s / self.prefill_step_tokens
                                                if self.prefill_step_tokens else None))

    def add(self, stages: Stages, prompt_tokens: int, generated: int) -> None:
        """Fold one finished request in."""
        self.requests += 1
        self.starts[stages.start] += 1
        for k in ("queue_s", "init_s", "load_s", "kv_s", "prefill_s", "ttft_s"):
            setattr(self, k, getattr(self, k) + getattr(stages, k))
        self.bytes_loaded += stages.bytes_loaded
        self.bytes_reused += stages.bytes_reused
        self.prompt_tokens += prompt_tokens
        self.generated_tokens += generated
