"""What one engine step works on: the scheduler's plan, read by the model runner and the output processor."""

from __future__ import annotations

from dataclasses import dataclass, field

from tangram.engine.request import Request


@dataclass
class SeqWork:
    """One sequence's share of a step: run `tokens` (ids at positions `start`, `start + 1`, ...) whose KV goes
    to `blocks` (the sequence's block table); `sample`: this step produces the sequence's next token;
    `all_logits`: the runner returns the logits of every position it runs (prompt logprobs), not only the last."""

    request: Request | None  # None for a bare forward (ModelRunner.prefill)
    start: int
    tokens: list[int]
    sample: bool
    blocks: list[int]
    all_logits: bool = False

    @property
    def logit_rows(self) -> int:
        """Rows of logits the runner returns for this sequence: every position's, its last, or none."""
        return len(self.tokens) if self.all_logits else int(self.sample)

    @property
    def end(self) -> int:
        """Position after the last token this step runs (the KV the sequence holds afterwards)."""
        return self.start + len(self.tokens)


@dataclass
class StepPlan:
    """The sequences of one step (decodes first, then prompt chunks) and what scheduling it did."""

    work: list[SeqWork] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    stalled: bool = False  # something could not be admitted or grown for lack of KV blocks

    @property
    def num_tokens(self) -> int:
        """Tokens the step's forward runs."""
        return sum(len(w.tokens) for w in self.work)

    @property
    def sampled(self) -> list[SeqWork]:
        """The sequences whose next token this step samples, in plan order (the order of the logits rows)."""
        return [w for w in self.work if w.sample]
