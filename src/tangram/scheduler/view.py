"""The scheduler's view of a cluster as plain data, and the reference decision: a scan over every device."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from tangram.scheduler.cost import INF, CostParams, Policy, start_cost


@dataclass
class DeviceState:
    """One device: its node, its pool's free and retained bytes, and the wait before it can start a load."""

    node: int
    free_bytes: int
    retained_bytes: int
    queue_s: float = 0.0


@dataclass
class ClusterView:
    """Devices (index = device id) and, per model, where its bytes already are.

    `resident[model][device]`: bytes of the model in that device's pool (active
    or retained; tensors shared with another model count). `cached[model][node]`:
    bytes of the model in that node's host DRAM cache. Both are bytes of the
    model's own tensors, so never more than its size (the indexed scheduler's
    sort orders rely on it).
    """

    devices: list[DeviceState]
    resident: dict[str, dict[int, int]] = field(default_factory=dict)
    cached: dict[str, dict[int, int]] = field(default_factory=dict)


def device_key(view: ClusterView, d: int, model: str, nbytes: int, policy: Policy,
               params: CostParams) -> tuple[float, int, int]:
    """(estimated seconds, -free bytes, device): the order every policy but `random` minimises."""
    dev = view.devices[d]
    resident = view.resident.get(model, {}).get(d, 0)
    cached = view.cached.get(model, {}).get(dev.node, 0)
    cost = start_cost(policy, nbytes, resident, cached, dev.free_bytes, dev.retained_bytes, dev.queue_s, params)
    return cost, -dev.free_bytes, d


def brute_force(view: ClusterView, model: str, nbytes: int, policy: Policy | str, params: CostParams,
                rng: random.Random | None = None) -> int | None:
    """The device to start `model` on, by scanning every device (None when it fits nowhere).

    Reference for the indexed `Scheduler` and the decision for small clusters
    (the embedded server's handful of devices).
    """
    policy = Policy(policy)
    keys = [device_key(view, d, model, nbytes, policy, params) for d in range(len(view.devices))]
    feasible = [k for k in keys if k[0] < INF]
    if not feasible:
        return None
    if policy is Policy.RANDOM:
        return (rng or random.Random(0)).choice(feasible)[2]
    return min(feasible)[2]
