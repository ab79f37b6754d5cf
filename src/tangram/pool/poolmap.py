"""The pool map: a device's arena as a few byte ranges per model and state, for the dashboard.

`merge_extents` is pure and linear in the number of extents: adjacent extents
of the same state and the same models become one segment, so a pool of
100,000 tensors of a handful of models draws as a handful of segments, not
one element per tensor. KV cache blocks (active extents that hold no tensor)
are their own state, `kv`; the totals stay those of `DevicePool.snapshot()`
(active includes KV).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from tangram.pool.policy import Extent, State

SegmentState = Literal["active", "kv", "retained", "free"]


@dataclass(frozen=True, slots=True)
class Segment:
    """Contiguous bytes of one state and one set of models: [offset, offset + size)."""

    offset: int
    size: int
    state: SegmentState
    models: tuple[str, ...] = ()  # sorted; empty for KV blocks and free bytes
    tensors: int = 0  # tensors (or KV blocks) merged into it
    gain: float = 0.0  # summed retention gain (seconds of loading saved per second) of retained tensors


@dataclass(frozen=True)
class ArenaMap:
    """One pool's arena as segments, with its totals (equal to `DevicePool.snapshot()`'s)."""

    capacity: int
    policy: str
    totals: dict[str, int]  # bytes per state: active (KV included), retained, free
    kv_bytes: int  # the part of `active` held by KV cache blocks
    largest_free: int
    fragmentation: float  # 1 - largest free range / free bytes
    tensors: int  # resident tensors (active or retained)
    segments: list[Segment] = field(default_factory=list)


def _label(models: object) -> tuple[str, ...]:
    return tuple(sorted(models)) if models else ()  # type: ignore[call-overload]


def merge_extents(extents: Sequence[Extent], models_of: Callable[[str], Iterable[str]], *, capacity: int,
                  policy: str = "tangram") -> ArenaMap:
    """Merge `extents` (offset order, covering the arena) into segments per state and models.

    `models_of(key)` names the models that use a tensor. Two neighbours merge when
    they touch and have the same state and models; a retained segment's gain is
    the sum of its tensors' gains.
    """
    segments: list[Segment] = []
    totals = {s.value: 0 for s in State}
    kv = tensors = 0
    # the segment being grown: offset, size, state, the raw models of its first tensor, count, gain
    off = size = count = 0
    state: str | None = None
    raw: object = None
    gain = 0.0
    free, active, retained = State.FREE, State.ACTIVE, State.RETAINED
    for e in extents:
        st = e.state
        totals[st.value] += e.size
        if st is free:
            s, models = "free", None
        elif e.key is None:  # an active extent without a tensor is a KV cache block
            s, models = "kv", None
            kv += e.size
        else:
            s, models = ("active" if st is active else "retained"), models_of(e.key)
            tensors += 1
        if s == state and off + size == e.offset and (models == raw):  # same state and models: grow
            size += e.size
            if s != "free":
                count += 1
                if st is retained:
                    gain += e.gain
            continue
        if state is not None:
            segments.append(Segment(off, size, state, _label(raw), count, gain))  # type: ignore[arg-type]
        off, size, state, raw = e.offset, e.size, s, models
        count, gain = (0 if s == "free" else 1), (e.gain if st is retained else 0.0)
    if state is not None:
        segments.append(Segment(off, size, state, _label(raw), count, gain))  # type: ignore[arg-type]
    largest = max((g.size for g in segments if g.state == "free"), default=0)  # free segments are maximal
    frag = 0.0 if not totals["free"] else 1.0 - largest / totals["free"]  # as policy.fragmentation
    return ArenaMap(capacity, policy, totals, kv, largest, frag, tensors, segments)
