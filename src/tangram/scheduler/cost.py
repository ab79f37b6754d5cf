"""The affinity cost model: estimated start-up seconds of model m on device d, pure.

    cost(m, d) = dram_bytes / bw_dram + disk_bytes / bw_disk      (bytes of m not resident on d)
               + queue_s(d)                                        (wait before d can start loading)
               + evict_bytes * evict_s_per_byte                    (retained bytes to evict beyond free)

The bytes of m missing from d's pool are split by the tier they come from:
up to the bytes of m in the host DRAM cache of d's node come from DRAM (the
cache is assumed to hold missing tensors first: an optimistic split when the
pool and the cache overlap), the rest from disk. A device whose free plus
retained bytes cannot take the missing bytes is infeasible (cost = inf).
Eviction costs `evict_weight` x a disk reload of the evicted bytes: what is
evicted now may have to be read again later.

Policies (for comparison, docs/design.md "Affinity score"):
- `tangram`: the full cost above.
- `sllm`: ServerlessLLM's estimate: the whole model from the tier of d's node
  (DRAM cache or disk) + queue wait; device-pool residency and eviction ignored.
- `least-loaded`: least queue wait (then most free bytes).
- `random`: uniformly among feasible devices (seeded).
Ties go to the device with more free bytes, then the lower index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

INF = math.inf


class Policy(str, Enum):
    """A placement policy of the scheduler."""

    TANGRAM = "tangram"
    SLLM = "sllm"
    LEAST_LOADED = "least-loaded"
    RANDOM = "random"


POLICIES = tuple(p.value for p in Policy)


@dataclass(frozen=True)
class Bandwidths:
    """Bytes per second of each tier a missing byte can come from (measured; see bandwidth.py).

    DRAM is clamped to be at least as fast as disk: a cached byte can always be
    read from disk instead, so a slower DRAM estimate is measurement noise.
    """

    dram: float
    disk: float

    def __post_init__(self) -> None:
        if self.dram <= 0 or self.disk <= 0:
            raise ValueError(f"bandwidths must be positive: {self}")
        if self.dram < self.disk:
            object.__setattr__(self, "dram", self.disk)


@dataclass(frozen=True)
class CostParams:
    """Tier bandwidths and the weight of eviction work (in disk-reload seconds per evicted byte)."""

    bandwidths: Bandwidths
    evict_weight: float = 0.5

    @property
    def evict_s_per_byte(self) -> float:
        """Seconds charged per retained byte that must be evicted."""
        return self.evict_weight / self.bandwidths.disk


def load_seconds(missing: int, cached: int, bw: Bandwidths) -> float:
    """Seconds to bring `missing` bytes in when up to `cached` of them sit in the node's DRAM cache."""
    if bw.dram == bw.disk:
        return missing / bw.disk
    dram = missing if cached >= missing else cached
    return dram / bw.dram + (missing - dram) / bw.disk


def start_cost(policy: Policy, nbytes: int, resident: int, cached: int, free: int, retained: int, queue_s: float,
               params: CostParams) -> float:
    """Estimated start-up seconds of a model of `nbytes` on one device (inf when it cannot fit).

    `resident`: bytes of the model already in the device's pool; `cached`: bytes
    of it in the node's DRAM cache; `free` / `retained`: the pool's free and
    retained bytes; `queue_s`: wait before the device can start. For
    `least-loaded` and `random` the cost is the queue wait alone.
    """
    missing = nbytes - resident if nbytes > resident else 0
    if missing > free + retained:
        return INF
    if policy is Policy.TANGRAM:
        evict = missing - free if missing > free else 0
        return load_seconds(missing, cached, params.bandwidths) + queue_s + evict * params.evict_s_per_byte
    if policy is Policy.SLLM:
        return load_seconds(nbytes, cached, params.bandwidths) + queue_s
    return queue_s
