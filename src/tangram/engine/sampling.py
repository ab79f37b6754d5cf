"""Sampling parameters and batched next-token selection (greedy, temperature, top-k, top-p, min-p, seed;
logit bias and penalties through `penalties.py`).

Pure functions over a [batch, vocab] logits tensor with one parameter set per
row, so a continuous-batching engine can mix greedy and sampled requests in
one decode step.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tangram.engine import penalties

from tangram.engine.structured import StructuredOutput

# Bounds of the engine's contract: within them `sample()` never overflows a tensor and a seed always fits
# torch.Generator.manual_seed; the API validates the same bounds before a request reaches an engine.
MAX_TOKENS_LIMIT = 1_000_000
TOP_K_LIMIT = 2**31 - 1
SEED_LIMIT = 2**64  # exclusive
TOKEN_ID_LIMIT = 2**31  # exclusive; the engine also checks ids against the vocabulary
MAX_LOGPROBS = 20  # top logprobs per position at most (OpenAI's and vLLM's default limit)
MAX_N = 128  # sequences per request at most


class SamplingParams(BaseModel):
    """How to pick tokens for one request; invalid values raise pydantic.ValidationError with a clear message."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(16, ge=0, le=MAX_TOKENS_LIMIT,
                            description="tokens to generate at most (0 only with prompt_logprobs: score the prompt)")
    temperature: float = Field(0.0, ge=0.0, le=100.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus: smallest set with this probability mass")
    top_k: int = Field(0, ge=0, le=TOP_K_LIMIT, description="keep the k most likely tokens (0 = all)")
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT, description="per-request random seed (reproducible sampling)")
    stop: list[str] = Field(default_factory=list, max_length=16, description="stop strings (not returned)")
    stop_token_ids: list[int] = Field(default_factory=list, max_length=64)
    ignore_eos: bool = False
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="subtracted once from seen output tokens")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="subtracted per occurrence in the output")
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0,
                                      description="divides positive / multiplies negative logits of prompt and "
                                      "output tokens (1 = off)")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="drop tokens below min_p x the top token's probability")
    logit_bias: dict[int, float] = Field(default_factory=dict, max_length=4096,
                                         description="token id -> bias added to its logit, in [-100, 100]")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                 description="logprob of each sampled token and of the top k (None = off)")
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                        description="logprob of each prompt token and of the top k (None = off)")
    n: int = Field(1, ge=1, le=MAX_N, description="sequences sampled for the prompt (they share its KV blocks)")
    structured: StructuredOutput | None = Field(None, description="what the output must match (constrain.py)")

    @field_validator("stop")
    @classmethod
    def _non_empty_stops(cls, value: list[str]) -> list[str]:
        if any(s == "" for s in value):
            raise ValueError("stop strings must not be empty")
        return value

    @field_validator("stop_token_ids")
    @classmethod
    def _bounded_ids(cls, value: list[int]) -> list[int]:
        if any(not 0 <= t < TOKEN_ID_LIMIT for t in value):
            raise ValueError(f"stop token ids must be in [0, {TOKEN_ID_LIMIT})")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bounded_bias(cls, value: dict[int, float]) -> dict[int, float]:
        for tok, bias in value.items():
            if not 0 <= tok < TOKEN_ID_LIMIT:
                raise ValueError(f"logit_bias token ids must be in [0, {TOKEN_ID_LIMIT}) (got {tok})")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100] (token {tok}: {bias})")
        return value

    @model_validator(mode="after")
    def _zero_tokens_scores_the_prompt(self) -> SamplingParams:
        if self.max_tokens == 0 and self.prompt_logprobs is None:
            raise ValueError("max_tokens must be at least 1 (0 only when the prompt's logprobs are asked for)")
        return self

    def vocab_errors(self, vocab: int) -> str | None:
        """Why this request's token ids do not fit a vocabulary of `vocab` ids, or None."""
        bad = sorted(t for t in self.logit_bias if t >= vocab)
        if bad:
            return f"logit_bias: token id {bad[0]} is not in the vocabulary [0, {vocab})"
        return None

    @property
    def greedy(self) -> bool:
        """Whether tokens are chosen by argmax."""
        return self.temperature == 0.0


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A seeded generator for a sampled request with a seed, else None (the global RNG is used)."""
    if params.greedy or params.seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed)
    return gen


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k and top-p sets. `top_k` 0 means no limit."""
    vocab = logits.shape[-1]
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device).expand_as(sorted_logits)
    k = torch.where((top_k > 0) & (top_k < vocab), top_k, torch.full_like(top_k, vocab)).unsqueeze(-1)
    drop = ranks >= k
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of the tokens ranked above
    drop |= mass_before >= top_p.unsqueeze(-1)  # the most likely token always stays
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None] | None = None,
    histories: list[penalties.History] | None = None,
) -> torch.Tensor:
    """Next token per row of `logits` [batch, vocab] under each row's parameters; returns [batch] int64.

    Rows with a logit bias or penalties are processed first (greedy ones too; `histories[i]`: row i's
    prompt and output ids, needed only then); `logits` itself is never changed. Sampled rows draw by the
    exponential race: argmax(probs / E) with E ~ Exponential(1) per token picks token i with probability
    probs[i]. A row with a generator draws its noise from that generator only, so a seed reproduces its
    tokens whatever else shares the batch.
    """
    if logits.dim() != 2 or logits.shape[0] != len(params):
        raise ValueError(f"logits {tuple(logits.shape)} do not match {len(params)} parameter sets")
    # argmax over 16-bit logits runs a scalar loop on CPUs (5 ms for 32 x 49,152 bf16 here, 1 ms after an exact
    # upcast): compare in float32, which picks the same (first) maximum
    work = logits.float() if logits.element_size() < 4 else logits
    changed = [i for i, p in enumerate(params) if penalties.processed(p)]
    if changed:
        if histories is None:
            raise ValueError("penalized rows need their token histories")
        work = work.clone() if work is logits else work
        penalties.apply(work, changed, [params[i] for i in changed], [histories[i] for i in changed])
    out = torch.argmax(work, dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return out
    dev = logits.device
    idx = torch.tensor(rows, device=dev)
    temps = torch.tensor([params[i].temperature for i in rows], device=dev).unsqueeze(-1)
    sub = work.index_select(0, idx).float() / temps
    if any(params[i].min_p > 0.0 for i in rows):
        sub = penalties.min_p_filter(sub, torch.tensor([params[i].min_p for i in rows], device=dev))
    if any(params[i].top_k > 0 or params[i].top_p < 1.0 for i in rows):  # else no sort is needed
        top_k = torch.tensor([params[i].top_k for i in rows], device=dev)
        top_p = torch.tensor([params[i].top_p for i in rows], device=dev)
        sub = filter_logits(sub, top_k, top_p)
    probs = torch.softmax(sub, dim=-1)
    gens = [generators[i] if generators is not None else None for i in rows]
    noise = torch.empty_like(probs)
    if any(g is None for g in gens):
        noise.exponential_()  # one batched draw from the global RNG; seeded rows are overwritten below
    for j, gen in enumerate(gens):
        if gen is not None:
            noise[j].exponential_(generator=gen)
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)  # never 0 / 0 for a masked token
    out[idx] = probs.div_(noise).argmax(dim=-1)
    return out
