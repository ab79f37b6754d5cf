"""Serving rules, pure: which instance takes a request, when one scales down, which one makes room.

The controller applies them; the replays of `bench kv` and the simulator call the same functions.
"""

from __future__ import annotations

from collections.abc import Sequence


def pick_instance(loads: Sequence[int], target: int) -> int | None:
    """Index of the least-loaded instance with room under `target`, else None (scale out, or queue)."""
    best = min(range(len(loads)), key=lambda i: loads[i], default=None)
    if best is None or loads[best] >= target:
        return None
    return best


def least_loaded(loads: Sequence[int]) -> int:
    """Index of the least-loaded instance (when no instance can be added, the engine queues the request)."""
    return min(range(len(loads)), key=lambda i: loads[i])


def should_scale_down(idle_since: float | None, now: float, keep_alive_s: float, instances: int,
                      min_instances: int) -> bool:
    """Whether an idle instance has outlived its keep-alive and the deployment may shrink."""
    return idle_since is not None and now - idle_since >= keep_alive_s and instances > min_instances


def drain_victim(inflight: Sequence[int], started_at: Sequence[float], frees: Sequence[int]) -> int | None:
    """Which busy instance to drain for a start that has waited too long for pool space: among those whose
    stop would give bytes back (`frees`), the one with the fewest requests in flight (it empties soonest),
    then the one giving back most, then the longest-running; None if no stop would help."""
    helpful = [i for i in range(len(inflight)) if frees[i] > 0]
    if not helpful:
        return None
    return min(helpful, key=lambda i: (inflight[i], -frees[i], started_at[i]))


def idle_victim(idle_since: Sequence[float | None]) -> int | None:
    """Which idle instance to stop to make room for a start: the one idle longest (the smallest `idle_since`;
    None marks a busy instance); ties go to the lower index; None when no instance is idle."""
    idle = [i for i, t in enumerate(idle_since) if t is not None]
    if not idle:
        return None
    return min(idle, key=lambda i: idle_since[i])  # type: ignore[arg-type, return-value]
