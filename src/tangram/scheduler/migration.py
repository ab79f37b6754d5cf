"""When to migrate running requests instead of waiting for them, pure (ServerlessLLM's scheduler, issue 18).

A start of model M whose best device is held by busy instances of other
models can wait for them to finish (drain) or move their requests to devices
that already serve those models (live migration: the destination recomputes
the requests' KV from their tokens, `tangram.engine.migration`). Each busy
instance frees its bytes at

    wait_s    = remaining tokens of its longest request x seconds per decode step
    migrate_s = destination ready + context tokens x prefill seconds per token + handover

and the start begins once every instance it needs is out of the way: the
plan picks, per instance, the lower of the two, and the start time is the
largest of those plus the load. Scale-in consolidates the same way: when the
requests of the least-loaded instance fit in the others under their target,
moving them empties it now instead of after its longest request.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

INF = math.inf
Choice = Literal["wait", "migrate"]


@dataclass(frozen=True)
class Busy:
    """A busy instance of another model on the device a start needs room on."""

    remaining_tokens: int  # tokens its longest request still has to generate (max_tokens less generated)
    context_tokens: int  # tokens its requests hold now, summed (what the destination prefills)
    can_migrate: bool  # its backend migrates and every request of it can move
    dest_ready_s: float  # until a destination can take them: 0 for a running peer, a start's estimate, INF: none


@dataclass(frozen=True)
class Rates:
    """Measured or prior speeds of the engines involved."""

    decode_s: float = 0.03  # seconds per decode step at the source
    prefill_s_per_token: float = 0.001  # at the destination
    handover_s: float = 0.05  # the last round and the resume


def measured(prior: Rates, decode_s: float | None, prefill_s_per_token: float | None) -> Rates:
    """`prior` with what the engines measured in its place: the source's seconds per step, the destination's
    per prefilled token (None: not measured yet, the prior stays)."""
    return Rates(decode_s if decode_s else prior.decode_s,
                 prefill_s_per_token if prefill_s_per_token else prior.prefill_s_per_token, prior.handover_s)


def wait_s(b: Busy, rates: Rates) -> float:
    """Seconds until `b` is empty if left to finish."""
    return b.remaining_tokens * rates.decode_s


def migrate_s(b: Busy, rates: Rates) -> float:
    """Seconds until `b` is empty if its requests migrate (INF when they cannot)."""
    if not b.can_migrate or b.dest_ready_s == INF:
        return INF
    return b.dest_ready_s + b.context_tokens * rates.prefill_s_per_token + rates.handover_s


def room_plan(busy: Sequence[Busy], rates: Rates) -> list[Choice]:
    """Per busy instance, wait or migrate: whichever frees it sooner (ties wait: migration costs work)."""
    return ["migrate" if migrate_s(b, rates) < wait_s(b, rates) else "wait" for b in busy]


def start_s(load_s: float, busy: Sequence[Busy], rates: Rates, plan: Sequence[Choice] | None = None) -> float:
    """Estimated seconds until the start is done: room freed by every instance in `busy` (under `plan`, default
    the best), then the load."""
    plan = room_plan(busy, rates) if plan is None else plan
    room = max((migrate_s(b, rates) if c == "migrate" else wait_s(b, rates) for b, c in zip(busy, plan)),
               default=0.0)
    return room + load_s


def consolidate(loads: Sequence[int], target: int, movable: Sequence[bool]) -> int | None:
    """Scale-in: which instance to empty by migration into the others (the least-loaded movable one), when its
    requests fit in the others' spare room under `target` concurrency; None when nothing should move (an idle
    instance already scales in by its keep-alive)."""
    if len(loads) < 2 or min(loads) == 0:
        return None
    candidates = [i for i in range(len(loads)) if movable[i]]
    if not candidates:
        return None
    i = min(candidates, key=lambda k: (loads[k], k))
    spare = sum(max(0, target - loads[k]) for k in range(len(loads)) if k != i)
    return i if loads[i] <= spare else None
