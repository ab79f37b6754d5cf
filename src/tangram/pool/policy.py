"""Retention and placement policies of the device pool: pure functions over hand-made arena states.

Vocabulary (docs/design.md): every byte of a pool is *active* (used by a running
instance), *retained* (an unreferenced parameter tensor kept for reuse) or
*free*. Only free and retained bytes can be handed out.

Policies:
- `tangram`: Partitioned-Gain Packing. The tensors a model is missing are
  placed together in one contiguous window; the window chosen is the one
  without active bytes whose retained tensors have the least total retention
  gain (expected reload seconds saved per second). See docs/pool.md.
- `lru`: evict least recently used retained tensors, one at a time, until the
  allocation fits.
- `lfu`: evict least frequently used retained tensors (size-blind), likewise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum


class State(str, Enum):
    """State of a range of pool bytes."""

    FREE = "free"
    RETAINED = "retained"
    ACTIVE = "active"


class PoolPolicy(str, Enum):
    """Eviction / placement policy of a pool."""

    TANGRAM = "tangram"
    LRU = "lru"
    LFU = "lfu"


@dataclass(frozen=True)
class Extent:
    """A contiguous range of the arena, as the policies see it."""

    offset: int
    size: int
    state: State
    key: str | None = None  # tensor identity for retained/active extents
    gain: float = 0.0  # retention gain (seconds saved per second) of a retained extent
    last_used: float = 0.0
    uses: float = 0.0

    @property
    def end(self) -> int:
        """First byte after the extent."""
        return self.offset + self.size


def decayed_rate(rate: float, last: float, now: float, half_life: float) -> float:
    """An exponentially decayed request rate `rate` measured at `last`, seen at `now`."""
    if now <= last:
        return rate
    return rate * math.pow(0.5, (now - last) / half_life)


def retention_gain(model_rates: Sequence[float], nbytes: int, bandwidth: float) -> float:
    """Expected load seconds saved per second by keeping a tensor resident.

    (sum of decayed request rates of the models that contain it) x (bytes /
    bandwidth of the tier it would be reloaded from).
    """
    if bandwidth <= 0:
        raise ValueError("bandwidth must be positive")
    return sum(model_rates) * nbytes / bandwidth


@dataclass(frozen=True)
class Window:
    """A contiguous range chosen for an allocation and the retained extents it evicts."""

    offset: int
    size: int
    evict: tuple[int, ...]  # indices into the extent list
    cost: float


def find_window(extents: Sequence[Extent], need: int, cost: Callable[[Extent], float]) -> Window | None:
    """The contiguous window of at least `need` bytes with no active byte and the least eviction cost.

    `extents` cover the arena in offset order. A window starts at an extent
    boundary and takes whole extents (a retained tensor is evicted whole); its
    cost is the sum of `cost` over the retained extents in it. Ties go to the
    window evicting fewer bytes, then the lower offset. O(n) with two pointers.
    """
    if need <= 0:
        return Window(extents[0].offset if extents else 0, 0, (), 0.0)
    span: tuple[int, int, int, float] | None = None
    best_key: tuple[float, int, int] | None = None
    n = len(extents)
    j = 0
    size = 0
    acc = 0.0
    evicted = 0
    for i in range(n):
        if extents[i].state is State.ACTIVE:
            j, size, acc, evicted = i + 1, 0, 0.0, 0
            continue
        if j < i:  # the window was reset past i
            j, size, acc, evicted = i, 0, 0.0, 0
        while size < need and j < n and extents[j].state is not State.ACTIVE:
            e = extents[j]
            size += e.size
            if e.state is State.RETAINED:
                acc += cost(e)
                evicted += e.size
            j += 1
        if size >= need:
            key = (acc, evicted, extents[i].offset)
            if best_key is None or key < best_key:
                best_key, span = key, (i, j, size, acc)  # the window's list is built once, for the winner
        # slide: drop extent i from the window
        e = extents[i]
        size -= e.size
        if e.state is State.RETAINED:
            acc -= cost(e)
            evicted -= e.size
    if span is None:
        return None
    i, j, size, acc = span
    return Window(extents[i].offset, size, tuple(k for k in range(i, j) if extents[k].state is State.RETAINED), acc)


def eviction_order(extents: Sequence[Extent], policy: PoolPolicy) -> list[int]:
    """Indices of retained extents in the order a policy evicts them (first = first victim)."""
    retained = [i for i, e in enumerate(extents) if e.state is State.RETAINED]
    if policy is PoolPolicy.LRU:
        return sorted(retained, key=lambda i: (extents[i].last_used, extents[i].offset))
    if policy is PoolPolicy.LFU:
        return sorted(retained, key=lambda i: (extents[i].uses, extents[i].last_used, extents[i].offset))
    # tangram: least gain per byte first
    return sorted(retained, key=lambda i: (extents[i].gain / max(extents[i].size, 1), extents[i].offset))


def fragmentation(extents: Sequence[Extent]) -> float:
    """1 - largest free block / total free bytes (0 when nothing or one block is free)."""
    free = [e.size for e in _merged_free(extents)]
    total = sum(free)
    return 0.0 if total == 0 else 1.0 - max(free) / total


def largest_free(extents: Sequence[Extent]) -> int:
    """Size of the largest contiguous free range."""
    return max((e.size for e in _merged_free(extents)), default=0)


def _merged_free(extents: Sequence[Extent]) -> list[Extent]:
    out: list[Extent] = []
    for e in extents:
        if e.state is not State.FREE:
            continue
        if out and out[-1].end == e.offset:
            out[-1] = Extent(out[-1].offset, out[-1].size + e.size, State.FREE)
        else:
            out.append(e)
    return out
