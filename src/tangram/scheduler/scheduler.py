"""The indexed scheduler: the same decision as `view.brute_force`, without scanning every device.

A decision is a best-first search over a few sorted sources. Each source lists
devices in nondecreasing order of (a lower bound of the cost, -free bytes,
device), so a source is abandoned as soon as its next entry cannot beat the
best key found; every device is covered by at least one source whose bound
holds for it:

- `res_idle[m]` / `res_busy[m]`: devices holding bytes of m (class i), sorted
  by -resident bytes (bound (B - R) / bw_dram) or by busy-until (bound: queue);
- `cache_idle[m]` / `cache_busy[m]`: devices of nodes whose DRAM cache holds
  bytes of m (class ii), sorted by -cached bytes (bound: the load time from
  that split) or by busy-until (bound: queue + B / bw_dram);
- the global `idle` / `busy` lists: every device (class iii, nothing of m
  anywhere near), sorted by -free (bound: B / bw_disk + eviction work, both
  exact for class iii) or by busy-until (bound: queue + B / bw_disk).

Idle means busy-until <= now; devices move from the busy lists to the idle
ones as time passes (`now` never goes back). In a typical state a decision
evaluates a handful of devices: the best idle holder of m, the best idle
device of a node caching m, the emptiest idle device, and the bound checks of
the busy lists. Updates cost O(log n) searches plus list moves per list a
device is in (its models, its node's cached models).
"""

from __future__ import annotations

import random
from bisect import bisect_left, insort
from collections.abc import Sequence

from tangram.scheduler.cost import INF, CostParams, Policy, load_seconds, start_cost
from tangram.scheduler.view import ClusterView

_EMPTY: dict = {}


def _remove(lst: list, key: tuple) -> None:
    i = bisect_left(lst, key)
    if i == len(lst) or lst[i] != key:
        raise KeyError(f"scheduler index out of sync: {key} missing")
    del lst[i]


class Scheduler:
    """Affinity-aware placement over many devices; see the module docstring for the indexes.

    `nodes[d]` is the node of device d. Feed it state changes (`set_device`,
    `set_resident`, `set_cached`) and ask `decide(model, nbytes, now, policy)`.
    """

    def __init__(self, nodes: Sequence[int], params: CostParams, *, now: float = 0.0, seed: int = 0) -> None:
        self.params = params
        self.node_of = list(nodes)
        n = len(self.node_of)
        self.node_devs: dict[int, list[int]] = {}
        for d, node in enumerate(self.node_of):
            self.node_devs.setdefault(node, []).append(d)
        self.now = now
        self.busy_until = [now] * n
        self.free = [0] * n
        self.retained = [0] * n
        self._busy = [False] * n
        self.res: dict[str, dict[int, int]] = {}
        self.dev_res: list[dict[str, int]] = [{} for _ in range(n)]
        self.cache: dict[str, dict[int, int]] = {}
        self.node_cache: dict[int, dict[str, int]] = {node: {} for node in self.node_devs}
        self.idle: list[tuple] = [(0, d) for d in range(n)]
        self.busy: list[tuple] = []
        self.res_idle: dict[str, list[tuple]] = {}
        self.res_busy: dict[str, list[tuple]] = {}
        self.cache_idle: dict[str, list[tuple]] = {}
        self.cache_busy: dict[str, list[tuple]] = {}
        self.rng = random.Random(seed)
        self.evaluated = 0  # devices whose cost was computed (for the benchmark's report)

    @classmethod
    def from_view(cls, view: ClusterView, params: CostParams, *, now: float = 0.0, seed: int = 0) -> Scheduler:
        """A scheduler holding `view` at time `now` (queue waits become busy-until = now + queue)."""
        s = cls([dev.node for dev in view.devices], params, now=now, seed=seed)
        for d, dev in enumerate(view.devices):
            s.set_device(d, free=dev.free_bytes, retained=dev.retained_bytes, busy_until=now + dev.queue_s)
        for model, per in view.resident.items():
            for d, nbytes in per.items():
                s.set_resident(d, model, nbytes)
        for model, per in view.cached.items():
            for node, nbytes in per.items():
                s.set_cached(node, model, nbytes)
        return s

    # ------------------------------------------------------------------ index maintenance

    def _entries(self, d: int) -> list[tuple[list, tuple]]:
        """Every (list, key) device d sits in now."""
        negf = -self.free[d]
        if self._busy[d]:
            key = (self.busy_until[d], negf, d)
            out = [(self.busy, key)]
            out += [(self.res_busy[m], key) for m in self.dev_res[d]]
            out += [(self.cache_busy[m], key) for m in self.node_cache[self.node_of[d]]]
            return out
        out = [(self.idle, (negf, d))]
        out += [(self.res_idle[m], (-r, negf, d)) for m, r in self.dev_res[d].items()]
        out += [(self.cache_idle[m], (-c, negf, d)) for m, c in self.node_cache[self.node_of[d]].items()]
        return out

    def _unindex(self, d: int) -> None:
        for lst, key in self._entries(d):
            _remove(lst, key)

    def _index(self, d: int) -> None:
        for lst, key in self._entries(d):
            insort(lst, key)

    def set_device(self, d: int, *, free: int | None = None, retained: int | None = None,
                   busy_until: float | None = None) -> None:
        """Update device d's free / retained bytes and the time it can next start a load."""
        if retained is not None:
            self.retained[d] = retained  # not part of any sort key
        if free is None and busy_until is None:
            return
        self._unindex(d)
        if free is not None:
            self.free[d] = free
        if busy_until is not None:
            self.busy_until[d] = busy_until
        self._busy[d] = self.busy_until[d] > self.now
        self._index(d)

    def set_resident(self, d: int, model: str, nbytes: int) -> None:
        """Bytes of `model` in device d's pool now (0: none)."""
        old = self.dev_res[d].get(model, 0)
        if old == nbytes:
            return
        if old:
            key = (self.busy_until[d], -self.free[d], d) if self._busy[d] else (-old, -self.free[d], d)
            _remove((self.res_busy if self._busy[d] else self.res_idle)[model], key)
            del self.dev_res[d][model]
            del self.res[model][d]
        if nbytes > 0:
            self.dev_res[d][model] = nbytes
            self.res.setdefault(model, {})[d] = nbytes
            self.res_idle.setdefault(model, [])
            self.res_busy.setdefault(model, [])
            if self._busy[d]:
                insort(self.res_busy[model], (self.busy_until[d], -self.free[d], d))
            else:
                insort(self.res_idle[model], (-nbytes, -self.free[d], d))

    def set_cached(self, node: int, model: str, nbytes: int) -> None:
        """Bytes of `model` in the host DRAM cache of `node` now (0: none)."""
        old = self.node_cache.setdefault(node, {}).get(model, 0)
        if old == nbytes:
            return
        self.cache_idle.setdefault(model, [])
        self.cache_busy.setdefault(model, [])
        for d in self.node_devs.get(node, ()):
            if old:
                if self._busy[d]:
                    _remove(self.cache_busy[model], (self.busy_until[d], -self.free[d], d))
                else:
                    _remove(self.cache_idle[model], (-old, -self.free[d], d))
            if nbytes > 0:
                if self._busy[d]:
                    insort(self.cache_busy[model], (self.busy_until[d], -self.free[d], d))
                else:
                    insort(self.cache_idle[model], (-nbytes, -self.free[d], d))
        if nbytes > 0:
            self.node_cache[node][model] = nbytes
            self.cache.setdefault(model, {})[node] = nbytes
        else:
            del self.node_cache[node][model]
            del self.cache[model][node]

    def refresh(self, now: float) -> None:
        """Advance the clock to `now`: devices whose busy-until passed move to the idle lists."""
        if now < self.now:
            raise ValueError(f"scheduler time goes forward only ({now} < {self.now})")
        self.now = now
        busy = self.busy
        while busy and busy[0][0] <= now:
            d = busy[0][2]
            self._unindex(d)
            self._busy[d] = False
            self._index(d)

    # ------------------------------------------------------------------ decisions

    def queue_s(self, d: int) -> float:
        """Seconds device d waits before it can start a load, at the scheduler's time."""
        q = self.busy_until[d] - self.now
        return q if q > 0 else 0.0

    def estimate(self, model: str, nbytes: int, d: int, policy: Policy | str = Policy.TANGRAM) -> float:
        """The policy's estimated start-up seconds of `model` on device d now."""
        return start_cost(Policy(policy), nbytes, self.res.get(model, _EMPTY).get(d, 0),
                          self.cache.get(model, _EMPTY).get(self.node_of[d], 0), self.free[d], self.retained[d],
                          self.queue_s(d), self.params)

    def decide(self, model: str, nbytes: int, now: float, policy: Policy | str = Policy.TANGRAM) -> int | None:
        """The device to start `model` (`nbytes` in all) on at `now`, or None when it fits nowhere."""
        self.refresh(now)
        policy = Policy(policy)
        if policy is Policy.RANDOM:
            return self._random(model, nbytes)
        if policy is Policy.LEAST_LOADED:
            return self._least_loaded(model, nbytes)
        params = self.params
        bd, bk = params.bandwidths.dram, params.bandwidths.disk
        c = params.evict_s_per_byte
        res = self.res.get(model, _EMPTY)
        cache = self.cache.get(model, _EMPTY)
        free, ret, until, node_of = self.free, self.retained, self.busy_until, self.node_of
        best = (INF, 0, -1)
        tangram = policy is Policy.TANGRAM
        evaluated = 0

        def key(d: int) -> tuple:
            q = until[d] - now
            return (start_cost(policy, nbytes, res.get(d, 0), cache.get(node_of[d], 0), free[d], ret[d],
                               q if q > 0 else 0.0, params), -free[d], d)

        if tangram:
            for negr, negf, d in self.res_idle.get(model, ()):
                lb = (nbytes + negr) / bd
                if (lb, negf, d) >= best:
                    break
                evaluated += 1
                k = key(d)
                if k < best:
                    best = k
        for negc, negf, d in self.cache_idle.get(model, ()):
            if (load_seconds(nbytes, -negc, params.bandwidths), negf, d) >= best:
                break
            evaluated += 1
            k = key(d)
            if k < best:
                best = k
        base = nbytes / bk
        for negf, d in self.idle:
            over = nbytes + negf
            lb = base + over * c if tangram and over > 0 else base
            if (lb, negf, d) >= best:
                break
            evaluated += 1
            k = key(d)
            if k < best:
                best = k
        for lst, extra in ((self.res_busy.get(model, ()) if tangram else (), 0.0),
                           (self.cache_busy.get(model, ()), nbytes / bd), (self.busy, base)):
            for bu, negf, d in lst:
                if ((bu - now) + extra, negf, d) >= best:
                    break
                evaluated += 1
                k = key(d)
                if k < best:
                    best = k
        self.evaluated += evaluated
        return best[2] if best[0] < INF else None

    def _fits(self, model: str, nbytes: int, d: int) -> bool:
        missing = nbytes - self.res.get(model, _EMPTY).get(d, 0)
        return missing <= self.free[d] + self.retained[d]

    def _least_loaded(self, model: str, nbytes: int) -> int | None:
        for _, d in self.idle:
            if self._fits(model, nbytes, d):
                return d
        for _, _, d in self.busy:
            if self._fits(model, nbytes, d):
                return d
        return None

    def _random(self, model: str, nbytes: int) -> int | None:
        n = len(self.node_of)
        for _ in range(16):
            d = self.rng.randrange(n)
            if self._fits(model, nbytes, d):
                return d
        feasible = [d for d in range(n) if self._fits(model, nbytes, d)]
        return self.rng.choice(feasible) if feasible else None
