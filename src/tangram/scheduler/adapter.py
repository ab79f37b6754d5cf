"""The scheduler for the real controller: a view of this node's workers and the worker to start on.

Each device reports a `tangram.worker.PlacementState` (the controller awaits
them from its worker handles, local or Ray actors; `choose_worker` asks
`Worker.placement_state` of workers in this process directly):
- resident bytes: the pool's `resident_bytes(index)` (tensors shared with
  other models count, by content identity);
- free / retained bytes: the pool's totals;
- DRAM-cached bytes: the model's distinct tensors present in the loader's host
  cache tier (`Loader.cache`, shared by the node's workers), when there is one;
- queue wait: the in-flight requests of the worker's replicas, each charged
  the mean prefill seconds its engine measured so far (`request_prior_s` until
  it has finished a request).
With a handful of devices the exact scan (`brute_force`) is the decision.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tangram.scheduler.bandwidth import BandwidthEstimator
from tangram.scheduler.cost import Bandwidths, CostParams, Policy, start_cost
from tangram.scheduler.view import ClusterView, DeviceState, brute_force
from tangram.store import LoadStats

if TYPE_CHECKING:
    from tangram.engine import StartCost
    from tangram.store import CheckpointIndex
    from tangram.worker import PlacementState, Worker

log = logging.getLogger(__name__)

MODEL = "model"
_estimator: BandwidthEstimator | None = None
_lock = threading.Lock()
_rng = random.Random(0)


def shared_estimator() -> BandwidthEstimator:
    """This process's tier bandwidths, measured on first use (probe cache, else a short measurement)."""
    global _estimator
    with _lock:
        if _estimator is None:
            _estimator = BandwidthEstimator.at_start()
        return _estimator


def placement_view(states: Sequence[PlacementState]) -> ClusterView:
    """The scheduler's view of devices (local or remote, any nodes) from their placement states for one model."""
    devices, resident, cached = [], {}, {}
    for i, st in enumerate(states):
        devices.append(DeviceState(st.node, st.free, st.retained, st.queue_s))
        resident[i] = st.resident
        cached[st.node] = max(cached.get(st.node, 0), st.cached)  # one DRAM cache per node
    return ClusterView(devices, {MODEL: resident}, {MODEL: cached})


def worker_view(workers: Sequence[Worker], index: CheckpointIndex, *, request_prior_s: float = 0.05) -> ClusterView:
    """The scheduler's view of `workers` of this process for the model of checkpoint `index`."""
    return placement_view([w.placement_state(index, request_prior_s) for w in workers])


def _params(bandwidths: BandwidthEstimator | Bandwidths | None, evict_weight: float) -> CostParams:
    """The cost model's parameters: given bandwidths, or this process's measured ones."""
    bw = bandwidths if bandwidths is not None else shared_estimator()
    return CostParams(bw.bandwidths if isinstance(bw, BandwidthEstimator) else bw, evict_weight)


def choose_placement(states: Sequence[PlacementState], model_bytes: int, policy: Policy | str = Policy.TANGRAM, *,
                     bandwidths: BandwidthEstimator | Bandwidths | None = None, evict_weight: float = 0.5,
                     rng: random.Random | None = None) -> int:
    """Index into `states` of the device to start a model of `model_bytes` on.

    When it fits nowhere (every pool's active bytes too high), the device with
    the most free + retained bytes: the start then waits there for space.
    """
    if not states:
        raise ValueError("no workers")
    view = placement_view(states)
    chosen = brute_force(view, MODEL, model_bytes, policy, _params(bandwidths, evict_weight), rng or _rng)
    if chosen is None:
        chosen = max(range(len(states)), key=lambda i: view.devices[i].free_bytes + view.devices[i].retained_bytes)
    log.debug("placement (%s): worker %d of %d", Policy(policy).value, chosen, len(states))
    return chosen


def choose_scale_out(states: Sequence[PlacementState], model_bytes: int, hosting: Sequence[bool],
                     policy: Policy | str = Policy.TANGRAM, *, bandwidths: BandwidthEstimator | Bandwidths | None = None,
                     evict_weight: float = 0.5, rng: random.Random | None = None) -> int:
    """`choose_placement` for a model some of whose instances run (or start) on the devices marked `hosting`:
    among the other devices when it fits on one of them without stopping busy instances (a further instance on
    a device that hosts one shares that device's compute; elsewhere it adds its own), else over all."""
    others = [i for i, h in enumerate(hosting) if not h]
    if others and len(others) < len(states):
        view = placement_view([states[i] for i in others])
        j = brute_force(view, MODEL, model_bytes, policy, _params(bandwidths, evict_weight), rng or _rng)
        if j is not None:
            return others[j]
    return choose_placement(states, model_bytes, policy, bandwidths=bandwidths, evict_weight=evict_weight, rng=rng)


def start_seconds(state: PlacementState, model_bytes: int, *,
                  bandwidths: BandwidthEstimator | Bandwidths | None = None, evict_weight: float = 0.5) -> float:
    """Estimated seconds to start a model of `model_bytes` on the device of `state` (Tangram's cost model; inf
    when it cannot fit there without stopping busy instances)."""
    return start_cost(Policy.TANGRAM, model_bytes, state.resident, state.cached, state.free, state.retained,
                      state.queue_s, _params(bandwidths, evict_weight))


def choose_worker(workers: Sequence[Worker], index: CheckpointIndex, policy: Policy | str = Policy.TANGRAM, *,
                  bandwidths: BandwidthEstimator | Bandwidths | None = None, evict_weight: float = 0.5,
                  rng: random.Random | None = None) -> int:
    """Index into `workers` (of this process) of the worker to start the checkpoint's model on
    (`choose_placement` over their placement states)."""
    if not workers:
        raise ValueError("no workers")
    states = [w.placement_state(index) for w in workers]
    return choose_placement(states, index.total_bytes, policy, bandwidths=bandwidths, evict_weight=evict_weight,
                            rng=rng)


def stats_from_cost(cost: StartCost) -> LoadStats | None:
    """The load figures a start's reported cost implies (a remote start reports no `LoadStats`); None when it
    read nothing from disk or DRAM."""
    if cost.start not in ("dram", "cold") or cost.load_s <= 0:
        return None
    return LoadStats(bytes_from_disk=cost.bytes_loaded if cost.start == "cold" else 0,
                     bytes_from_cache=cost.bytes_loaded if cost.start == "dram" else 0, seconds=cost.load_s)


def observe_start(start: LoadStats | None | object, bandwidths: BandwidthEstimator | None = None) -> None:
    """Refine the tier bandwidths with what a start loaded: its `LoadStats`, or anything with the `cost` it
    reported (`stats_from_cost`)."""
    stats = start if start is None or isinstance(start, LoadStats) else stats_from_cost(start.cost)
    if stats is not None:
        (bandwidths or shared_estimator()).observe(stats)
