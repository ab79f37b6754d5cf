"""A device pool as bookkeeping only (no buffer): the real pool's placement and eviction, over extents.

Same rules as `tangram.pool.DevicePool`: tensors are shared by key; an acquire
pins the resident ones and places the missing ones. With the `tangram` policy
the missing tensors go together into the window `find_window` picks (least
retained gain, gains from `retention_gain` over `decayed_rate`d model rates);
otherwise, or when no window exists, tensor by tensor first fit, evicting in
`eviction_order`. A release leaves the tensors retained. The policy functions
are the real ones from `tangram.pool.policy`; only the byte ranges are simulated.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass, field

from tangram.defaults import RELOAD_BANDWIDTH
from tangram.pool.policy import Extent, Policy, State, decayed_rate, eviction_order, find_window, retention_gain


class SimPoolFull(RuntimeError):
    """The missing tensors cannot be placed without touching active bytes (`evicted`: what went anyway)."""

    def __init__(self, message: str, evicted: list[str] | None = None) -> None:
        super().__init__(message)
        self.evicted = evicted or []


@dataclass
class _Tensor:
    offset: int
    size: int
    refs: int = 0
    models: set[str] = field(default_factory=set)
    last_used: float = 0.0
    uses: float = 0.0


class SimPool:
    """One simulated device pool of `capacity` bytes."""

    def __init__(self, capacity: int, *, policy: Policy | str = Policy.TANGRAM, half_life_s: float = 300.0,
                 reload_bandwidth: float = RELOAD_BANDWIDTH) -> None:
        self.capacity = capacity
        self.policy = Policy(policy)
        self.half_life_s = half_life_s
        self.reload_bandwidth = reload_bandwidth
        self.tensors: dict[str, _Tensor] = {}
        self._offsets: list[int] = []  # sorted offsets of placed tensors
        self._at: dict[int, str] = {}  # offset -> key
        self._rates: dict[str, list[float]] = {}  # model -> [decayed rate, last]
        self.active = 0
        self.used = 0

    @property
    def free(self) -> int:
        """Bytes held by nothing."""
        return self.capacity - self.used

    @property
    def retained(self) -> int:
        """Bytes of unreferenced tensors kept for reuse."""
        return self.used - self.active

    # ------------------------------------------------------------------ arena bookkeeping

    def _place(self, key: str, offset: int, size: int) -> _Tensor:
        t = _Tensor(offset, size)
        self.tensors[key] = t
        insort(self._offsets, offset)
        self._at[offset] = key
        self.used += size
        return t

    def _evict(self, key: str) -> None:
        t = self.tensors.pop(key)
        assert t.refs == 0, "never evict active bytes"
        del self._offsets[bisect_left(self._offsets, t.offset)]
        del self._at[t.offset]
        self.used -= t.size

    def _gaps(self) -> list[tuple[int, int]]:
        out, pos = [], 0
        for off in self._offsets:
            if off > pos:
                out.append((pos, off - pos))
            pos = off + self.tensors[self._at[off]].size
        if pos < self.capacity:
            out.append((pos, self.capacity - pos))
        return out

    def extents(self, now: float) -> list[Extent]:
        """The arena as the policies see it, in offset order, with each retained tensor's gain."""
        out = [Extent(off, size, State.FREE) for off, size in self._gaps()]
        for off in self._offsets:
            key = self._at[off]
            t = self.tensors[key]
            if t.refs:
                out.append(Extent(off, t.size, State.ACTIVE, key, 0.0, t.last_used, t.uses))
            else:
                rates = [decayed_rate(self._rates[m][0], self._rates[m][1], now, self.half_life_s) for m in t.models]
                out.append(Extent(off, t.size, State.RETAINED, key, retention_gain(rates, t.size,
                                                                                   self.reload_bandwidth),
                                  t.last_used, t.uses))
        out.sort(key=lambda e: e.offset)
        return out

    # ------------------------------------------------------------------ acquire / release

    def acquire(self, model: str, tensors: dict[str, int], now: float) -> tuple[list[str], list[str]]:
        """Pin `model`'s tensors, placing the missing ones; returns (keys loaded, keys evicted)."""
        missing = [(k, s) for k, s in tensors.items() if k not in self.tensors]
        reused = [k for k in tensors if k in self.tensors]
        rate = self._rates.setdefault(model, [0.0, now])
        for k in reused:  # pinned first, as the real pool does: eviction never takes what this start reuses
            self._pin(k, model, now)
        evicted: list[str] = []
        if missing:
            need = sum(s for _, s in missing)
            extents = self.extents(now)
            try:
                if need > sum(e.size for e in extents if e.state is not State.ACTIVE):
                    raise SimPoolFull(f"need {need} B")
                evicted = self._allocate(missing, need, extents)
            except SimPoolFull:
                for k in reused:
                    self._unpin(k)
                raise
            for k, _ in missing:
                self._pin(k, model, now)
        rate[0] = decayed_rate(rate[0], rate[1], now, self.half_life_s) + 1.0 / self.half_life_s
        rate[1] = now
        return [k for k, _ in missing], evicted

    def _pin(self, key: str, model: str, now: float) -> None:
        t = self.tensors[key]
        if t.refs == 0:
            self.active += t.size
        t.refs += 1
        t.models.add(model)
        t.last_used = now
        t.uses += 1

    def _unpin(self, key: str) -> None:
        t = self.tensors[key]
        t.refs -= 1
        assert t.refs >= 0
        if t.refs == 0:
            self.active -= t.size

    def _allocate(self, missing: list[tuple[str, int]], need: int, extents: list[Extent]) -> list[str]:
        if self.policy is Policy.TANGRAM:
            window = find_window(extents, need, lambda e: e.gain)
            if window is not None:
                evicted = [extents[i].key for i in window.evict]
                for k in evicted:
                    self._evict(k)  # type: ignore[arg-type]
                pos = window.offset
                for k, s in missing:
                    self._place(k, pos, s)
                    pos += s
                return evicted  # type: ignore[return-value]
        victims = [extents[i].key for i in eviction_order(extents, self.policy)]
        evicted, placed = [], []
        for k, s in sorted(missing, key=lambda ks: -ks[1]):
            off = self._first_fit(s)
            while off is None and victims:
                v = victims.pop(0)
                if v in self.tensors and self.tensors[v].refs == 0:
                    self._evict(v)
                    evicted.append(v)
                off = self._first_fit(s)
            if off is None:
                for p in placed:
                    self._evict(p)
                raise SimPoolFull(f"no room for {s} B (fragmented)", evicted)
            self._place(k, off, s)
            placed.append(k)
        return evicted

    def _first_fit(self, size: int) -> int | None:
        return next((off for off, gap in self._gaps() if gap >= size), None)

    def release(self, tensors: dict[str, int]) -> None:
        """Drop one reference to each tensor; unreferenced ones stay retained."""
        for k in tensors:
            self._unpin(k)
