"""Serving-rule policy functions the replays need beside `tangram.control.autoscale` (pure).

`idle_victim` is the rule the controller applies inline when a start finds its
pool full (`Controller._start_with_room`: stop the instance idle longest); it
is written here, in autoscale.py's style, so the replays of `bench kv` and the
simulator call it instead of re-implementing it, until it moves into
`control/autoscale.py` beside `drain_victim`.
"""

from __future__ import annotations

from collections.abc import Sequence


def idle_victim(idle_since: Sequence[float | None]) -> int | None:
    """Which idle instance to stop to make room for a start: the one idle longest (the smallest `idle_since`;
    None marks a busy instance); ties go to the lower index; None when no instance is idle."""
    idle = [i for i, t in enumerate(idle_since) if t is not None]
    if not idle:
        return None
    return min(idle, key=lambda i: idle_since[i])  # type: ignore[arg-type, return-value]
