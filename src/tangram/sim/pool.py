"""A device pool as bookkeeping only (no buffer): the real pool's placement and eviction, over extents.

Same rules as `tangram.pool.DevicePool`, by the same code: tensors are shared
by key; an acquire pins the resident ones and places the missing ones through
the pool's own ledger (`tangram.pool.ledger`: `allocate`, window search and
eviction order, over a `Ledger` of byte ranges, gains from `retention_gain`
over `decayed_rate`d model rates). A release leaves the tensors retained. Only
the bytes are simulated: no buffer, no alignment, no loading.
"""

from __future__ import annotations

from dataclasses import dataclass

from tangram.defaults import RELOAD_BANDWIDTH
from tangram.pool.ledger import Holding, Ledger, LedgerFull, Placement, allocate
from tangram.pool.policy import Extent, PoolPolicy, State, decayed_rate, retention_gain


class SimPoolFull(RuntimeError):
    """The missing tensors cannot be placed without touching active bytes (`evicted`: what went anyway)."""

    def __init__(self, message: str, evicted: list[str] | None = None) -> None:
        super().__init__(message)
        self.evicted = evicted or []


@dataclass(kw_only=True)
class _Tensor(Holding):
    place: Placement

    @property
    def size(self) -> int:
        return self.place.size


class SimPool:
    """One simulated device pool of `capacity` bytes."""

    def __init__(self, capacity: int, *, policy: PoolPolicy | str = PoolPolicy.TANGRAM, half_life_s: float = 300.0,
                 reload_bandwidth: float = RELOAD_BANDWIDTH) -> None:
        self.ledger = Ledger(capacity)
        self.capacity = self.ledger.capacity
        self.policy = PoolPolicy(policy)
        self.half_life_s = half_life_s
        self.reload_bandwidth = reload_bandwidth
        self.tensors: dict[str, _Tensor] = {}
        self._rates: dict[str, list[float]] = {}  # model -> [decayed rate, last]
        self.active = 0

    @property
    def used(self) -> int:
        """Bytes held by tensors."""
        return self.ledger.used

    @property
    def free(self) -> int:
        """Bytes held by nothing."""
        return self.capacity - self.used

    @property
    def retained(self) -> int:
        """Bytes of unreferenced tensors kept for reuse."""
        return self.used - self.active

    def _evict(self, key: str) -> bool:
        t = self.tensors.get(key)
        if t is None or t.refs:
            return False
        del self.tensors[key]
        self.ledger.free(t.place.offset)
        return True

    def extents(self, now: float) -> list[Extent]:
        """The arena as the policies see it, in offset order, with each retained tensor's gain."""
        def describe(p: Placement) -> Extent:
            t = self.tensors[p.key]
            if t.refs:
                return Extent(p.offset, p.size, State.ACTIVE, p.key, 0.0, t.last_used, t.uses)
            rates = [decayed_rate(self._rates[m][0], self._rates[m][1], now, self.half_life_s) for m in t.models]
            return Extent(p.offset, p.size, State.RETAINED, p.key,
                          retention_gain(rates, p.size, self.reload_bandwidth), t.last_used, t.uses)
        return self.ledger.extents(describe)

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
            def evict(key: str) -> bool:
                if self._evict(key):
                    evicted.append(key)
                    return True
                return False
            try:
                placed = allocate(self.ledger, missing, lambda: self.extents(now), self.policy, evict)
            except LedgerFull as exc:
                for k in reused:
                    self._unpin(k)
                what = f"no room for {exc.need} B (fragmented)" if exc.fragmented else f"need {exc.need} B"
                raise SimPoolFull(what, evicted) from None
            for k, p in placed.items():
                self.tensors[k] = _Tensor(place=p)
            for k, _ in missing:
                self._pin(k, model, now)
        rate[0] = decayed_rate(rate[0], rate[1], now, self.half_life_s) + 1.0 / self.half_life_s
        rate[1] = now
        return [k for k, _ in missing], evicted

    def _pin(self, key: str, model: str, now: float) -> None:
        t = self.tensors[key]
        if t.refs == 0:
            self.active += t.size
        t.pin(model, now)

    def _unpin(self, key: str) -> None:
        t = self.tensors[key]
        t.unpin()
        if t.refs == 0:
            self.active -= t.size

    def release(self, tensors: dict[str, int]) -> None:
        """Drop one reference to each tensor; unreferenced ones stay retained."""
        for k in tensors:
            self._unpin(k)
