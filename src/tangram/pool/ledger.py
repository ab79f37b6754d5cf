"""The arena ledger: which byte ranges of a pool are used by which key, and the one placement rule.

Pure bookkeeping over offsets (no buffer, no lock): the real `DevicePool` keeps
one under its arena and the simulator's `SimPool` uses one directly, so both
place, search windows and evict by the same code (`allocate`, `place_each`).
The policy functions themselves live in `tangram.pool.policy`.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from tangram.pool.policy import Extent, PoolPolicy, State, eviction_order, find_window
from tangram.store.format import align_up

__all__ = ["Holding", "Ledger", "LedgerFull", "Placement", "allocate", "place_each"]


@dataclass(frozen=True)
class Placement:
    """A used range of the arena: [offset, offset + size) holding `key`."""

    offset: int
    size: int
    key: str


@dataclass
class Holding:
    """How a placed tensor is used, as the policies see it: references, models, recency and frequency."""

    refs: int = 0
    models: set[str] = field(default_factory=set)
    last_used: float = 0.0
    uses: float = 0.0

    def pin(self, model: str, now: float) -> None:
        """One more reference, by `model`, at `now`."""
        self.refs += 1
        self.models.add(model)
        self.last_used = now
        self.uses += 1

    def unpin(self) -> None:
        """One reference fewer."""
        self.refs -= 1
        assert self.refs >= 0, "reference count went negative"


class LedgerFull(RuntimeError):
    """The sizes cannot be placed without touching active bytes; `evicted`: the keys evicted anyway."""

    def __init__(self, need: int, available: int, evicted: list[str], fragmented: bool) -> None:
        self.need, self.available, self.evicted, self.fragmented = need, available, evicted, fragmented
        super().__init__(f"need {need} bytes, only {available} " + ("free" if fragmented else "free or retained"))


class Ledger:
    """Used ranges of a fixed-capacity arena in offset order, with aligned sizes and first-fit search."""

    def __init__(self, capacity: int, alignment: int = 1) -> None:
        self.alignment = alignment
        self.capacity = capacity // alignment * alignment
        if self.capacity <= 0:
            raise ValueError(f"pool capacity {capacity} bytes holds no {alignment}-byte unit: must be larger")
        self._starts: list[int] = []  # sorted offsets of used ranges
        self._at: dict[int, Placement] = {}
        # the free ranges, kept as placements come and go, so that a search walks the gaps, not every placement
        # (an arena of thousands of adjacent KV blocks has a handful of gaps)
        self._gap_starts: list[int] = [0]
        self._gap_len: dict[int, int] = {0: self.capacity}
        self.used = 0

    def size_of(self, nbytes: int) -> int:
        """Bytes an allocation of `nbytes` occupies (aligned, at least one unit)."""
        return max(align_up(nbytes, self.alignment), self.alignment)

    def blocks(self) -> list[Placement]:
        """Used ranges in offset order."""
        return [self._at[s] for s in self._starts]

    def _gaps(self) -> Iterator[tuple[int, int]]:
        for s in self._gap_starts:
            yield s, self._gap_len[s]

    def gaps(self) -> list[tuple[int, int]]:
        """Free ranges (offset, size) in offset order."""
        return list(self._gaps())

    def first_fit(self, size: int) -> int | None:
        """Offset of the first free range of `size` bytes (stops at the first that fits)."""
        lengths = self._gap_len
        return next((off for off in self._gap_starts if lengths[off] >= size), None)

    def place(self, offset: int, size: int, key: str) -> Placement:
        """Mark [offset, offset + size) used by `key` (must be free and aligned)."""
        if offset % self.alignment or offset < 0 or offset + size > self.capacity:
            raise ValueError(f"bad placement {offset}+{size}")
        i = bisect.bisect_left(self._starts, offset)
        if offset in self._at or size < 0 or (not size and i > 0 and sum(self._extent(self._starts[i - 1])) > offset):
            raise ValueError(f"placement {offset}+{size} overlaps a used block")
        if size:
            self._take_gap(offset, size)
        p = Placement(offset, size, key)
        self._starts.insert(i, offset)
        self._at[offset] = p
        self.used += size
        return p

    def _extent(self, offset: int) -> tuple[int, int]:
        p = self._at[offset]
        return p.offset, p.size

    def _take_gap(self, offset: int, size: int) -> None:
        """Remove [offset, offset + size) from the gap holding it (ValueError when no gap holds it whole)."""
        starts, lengths = self._gap_starts, self._gap_len
        j = bisect.bisect_right(starts, offset) - 1
        if j < 0 or starts[j] + lengths[starts[j]] < offset + size:
            raise ValueError(f"placement {offset}+{size} overlaps a used block")
        gap = starts[j]
        end = gap + lengths.pop(gap)
        left, right = offset - gap, end - offset - size
        if left:
            lengths[gap] = left
        if right:
            lengths[offset + size] = right
            if left:
                starts.insert(j + 1, offset + size)
            else:
                starts[j] = offset + size
        elif not left:
            starts.pop(j)

    def free(self, offset: int) -> Placement:
        """Release the range starting at `offset`."""
        p = self._at.pop(offset)
        self._starts.pop(bisect.bisect_left(self._starts, offset))
        self.used -= p.size
        if p.size:
            self._add_gap(p.offset, p.offset + p.size)
        return p

    def _add_gap(self, start: int, end: int) -> None:
        """Make [start, end) free, merged with the gaps it touches."""
        starts, lengths = self._gap_starts, self._gap_len
        j = bisect.bisect_left(starts, start)
        merge_prev = j > 0 and starts[j - 1] + lengths[starts[j - 1]] == start
        merge_next = j < len(starts) and starts[j] == end
        if merge_next:
            end += lengths.pop(end)
        if merge_prev:
            lengths[starts[j - 1]] = end - starts[j - 1]
            if merge_next:
                starts.pop(j)
        else:
            lengths[start] = end - start
            if merge_next:
                starts[j] = start
            else:
                starts.insert(j, start)

    def extents(self, describe: Callable[[Placement], Extent]) -> list[Extent]:
        """The arena as the policies see it: free ranges and `describe(p)` of each used one, in offset order."""
        out = [Extent(off, size, State.FREE) for off, size in self._gaps()]
        out.extend(describe(p) for p in self.blocks())
        return sorted(out, key=lambda e: e.offset)


def allocate(ledger: Ledger, sizes: list[tuple[str, int]], extents: Callable[[], Sequence[Extent]],
             policy: PoolPolicy, evict: Callable[[str], bool]) -> dict[str, Placement]:
    """Place (key, size) pairs of one start: the placement rule of every pool.

    LedgerFull at once when the sizes exceed free + retained bytes. `tangram`:
    all together in the window `find_window` picks (least retained gain),
    evicting its retained extents; otherwise, or with no window, `place_each`.
    `extents()` describes the arena (called only when the free ranges do not
    settle it); `evict(key)` frees a retained key's range and says whether it did.
    """
    if not sizes:
        return {}
    total = sum(s for _, s in sizes)
    if policy is PoolPolicy.TANGRAM:
        # A free range that holds them all is the window find_window would pick (it evicts nothing, so it costs
        # 0, and the lowest such range wins the tie): found without describing every used extent, which on a
        # pool of thousands of retained tensors costs more than the load itself.
        off = ledger.first_fit(total)
        if off is not None:
            return _pack(ledger, sizes, off)
    ext = extents()
    available = sum(e.size for e in ext if e.state is not State.ACTIVE)
    if total > available:
        raise LedgerFull(total, available, [], fragmented=False)
    if policy is PoolPolicy.TANGRAM:
        window = find_window(ext, total, lambda e: e.gain)
        if window is not None:  # pack the missing tensors together
            for i in window.evict:
                evict(ext[i].key)  # type: ignore[arg-type]
            return _pack(ledger, sizes, window.offset)
    return place_each(ledger, sizes, lambda: ext, policy, evict)


def _pack(ledger: Ledger, sizes: list[tuple[str, int]], offset: int) -> dict[str, Placement]:
    """Place `sizes` one after the other from `offset` (a range known to be free)."""
    placed, pos = {}, offset
    for k, s in sizes:
        placed[k] = ledger.place(pos, s, k)
        pos += s
    return placed


def place_each(ledger: Ledger, sizes: list[tuple[str, int]], extents: Callable[[], Sequence[Extent]],
               policy: PoolPolicy, evict: Callable[[str], bool]) -> dict[str, Placement]:
    """Size by size (big ones first: less fragmentation), first fit, evicting in `eviction_order` until each fits.

    `extents()` (the arena before this call) is described only when something must be evicted: a first pass
    places without evicting and, if one size does not fit, is undone before the pass that evicts (which places
    the same sizes in the same ranges up to that one). On failure LedgerFull: what was placed is freed again,
    what was evicted stays evicted (listed in the error).
    """
    order = sorted(sizes, key=lambda ks: -ks[1])
    placed: dict[str, Placement] = {}
    for k, s in order:
        off = ledger.first_fit(s)
        if off is None:
            for p in placed.values():
                ledger.free(p.offset)
            break
        placed[k] = ledger.place(off, s, k)
    else:
        return placed
    placed = {}
    evicted: list[str] = []
    ext = extents()
    victims = [ext[i].key for i in eviction_order(ext, policy)]
    for k, s in order:
        off = ledger.first_fit(s)
        while off is None and victims:
            victim = victims.pop(0)
            if evict(victim):  # type: ignore[arg-type]
                evicted.append(victim)  # type: ignore[arg-type]
            off = ledger.first_fit(s)
        if off is None:
            free = ledger.capacity - ledger.used
            for p in placed.values():
                ledger.free(p.offset)
            raise LedgerFull(s, free, evicted, fragmented=True)
        placed[k] = ledger.place(off, s, k)
    return placed
