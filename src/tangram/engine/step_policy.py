"""Step policy of the engine, pure: which waiting requests to admit, which running one to preempt.

Admission is FIFO (a request that does not fit blocks the ones behind it, so
no request starves), bounded by the batch size and a prefill token budget per
step (the admitted prompts are prefilled together, padded to the longest);
the first candidate is always tried so one long prompt still runs.
Preemption (when a running sequence needs a KV block and none is left) takes
the most recently admitted sequence, whose recompute is cheapest and which
has waited least.
"""

from __future__ import annotations

from collections.abc import Sequence


def admit(waiting_tokens: Sequence[int], running: int, max_batch: int, token_budget: int) -> int:
    """How many of the waiting requests (FIFO, by prompt tokens to prefill) to try to admit this step.

    They are prefilled in one forward padded to the longest prompt, so the budget
    counts admitted requests x longest prompt (padding costs compute too).
    """
    n, longest = 0, 0
    for tokens in waiting_tokens:
        if running + n >= max_batch:
            break
        if n > 0 and (n + 1) * max(longest, tokens) > token_budget:
            break
        n, longest = n + 1, max(longest, tokens)
    return n


def victim(running_order: Sequence[str]) -> str:
    """The running request to preempt: the most recently admitted."""
    if not running_order:
        raise ValueError("nothing running to preempt")
    return running_order[-1]


def blocks_short(cached_tokens: int, blocks_held: int, block_tokens: int, new_tokens: int = 1) -> int:
    """Blocks a sequence must gain before writing `new_tokens` more tokens of KV."""
    need = -(-(cached_tokens + new_tokens) // block_tokens)
    return max(0, need - blocks_held)
