"""Step policy of the engine, pure: how a step's token budget is shared, whom to preempt, how many to run.

A step runs every running sequence's next token (decode) and fills what is
left of the per-step token budget with prompt chunks (chunked prefill):
first the sequences already part-way through their prompt, in admission
order, then waiting requests in FIFO order while a batch seat is free. A
request that does not fit blocks the ones behind it, so no request starves;
the first chunk of a step always gets at least one token, so one long prompt
still makes progress. Preemption (a running sequence needs a KV block and
none is left) takes the most recently admitted sequence: its recompute is
the cheapest and it has waited least.
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_BATCH_CAP = 256  # sequences one step runs at most when the batch size is derived from the KV that fits


def prefill_chunks(remaining: Sequence[int], budget: int, seats: int) -> list[int]:
    """Tokens to prefill this step for each candidate, in order (FIFO), within the step's token budget.

    `remaining`: prompt tokens each candidate still has to prefill; `budget`:
    tokens left in this step after the decodes; `seats`: how many candidates
    may start at all (batch seats). The list stops at the first candidate that
    gets nothing; the first one always gets at least one token.
    """
    out: list[int] = []
    for i, left in enumerate(remaining):
        if i >= seats or left <= 0:
            break
        take = min(left, budget) if out or budget > 0 else 1
        if take <= 0:
            break
        out.append(take)
        budget -= take
    return out


def victim(running_order: Sequence[str]) -> str:
    """The running request to preempt: the most recently admitted."""
    if not running_order:
        raise ValueError("nothing running to preempt")
    return running_order[-1]


def blocks_short(cached_tokens: int, blocks_held: int, block_tokens: int, new_tokens: int = 1) -> int:
    """Blocks a sequence must gain before writing `new_tokens` more tokens of KV."""
    need = -(-(cached_tokens + new_tokens) // block_tokens)
    return max(0, need - blocks_held)


def derived_max_batch(kv_blocks: int, cap: int = MAX_BATCH_CAP) -> int:
    """Batch size from the KV that fits: every running sequence holds at least one block, so at most
    `kv_blocks` sequences, and at most `cap`. Admission then waits for blocks and growth preempts, so
    sequences longer than the KV holds are handled without failing."""
    return max(1, min(cap, kv_blocks))
