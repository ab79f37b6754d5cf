"""Autoscaling policy, pure: how many instances a deployment wants and which one takes a request."""

from __future__ import annotations

import math
from collections.abc import Sequence


def desired_instances(demand: int, target: int, min_instances: int, max_instances: int) -> int:
    """Instances for `demand` requests (in flight + queued) at `target` requests each, within the limits."""
    want = math.ceil(demand / target) if demand > 0 else 0
    return max(min_instances, min(max_instances, want))


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
