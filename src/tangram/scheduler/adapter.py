"""The scheduler for the real controller: a view of this node's workers and the worker to start on.

One node (the embedded server), one device per `tangram.worker.Worker`:
- resident bytes: `worker.resident_bytes(index)` (tensors shared with other
  models count, by content identity);
- free / retained bytes: the pool's snapshot totals;
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
from tangram.scheduler.cost import Bandwidths, CostParams, Policy
from tangram.scheduler.view import ClusterView, DeviceState, brute_force
from tangram.store import LoadStats

if TYPE_CHECKING:
    from tangram.store import CheckpointIndex
    from tangram.worker import Replica, Worker

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


def worker_view(workers: Sequence[Worker], index: CheckpointIndex, *, request_prior_s: float = 0.05) -> ClusterView:
    """The scheduler's view of `workers` (local or remote, any nodes) for the model of checkpoint `index`."""
    devices, resident, cached = [], {}, {}
    for i, w in enumerate(workers):
        st = w.placement_state(index, request_prior_s)
        devices.append(DeviceState(st["node"], st["free"], st["retained"], st["queue_s"]))
        resident[i] = st["resident"]
        cached[st["node"]] = max(cached.get(st["node"], 0), st["cached"])  # one DRAM cache per node
    return ClusterView(devices, {MODEL: resident}, {MODEL: cached})


def choose_worker(workers: Sequence[Worker], index: CheckpointIndex, policy: Policy | str = Policy.TANGRAM, *,
                  bandwidths: BandwidthEstimator | Bandwidths | None = None, evict_weight: float = 0.5,
                  rng: random.Random | None = None) -> int:
    """Index into `workers` of the worker to start the checkpoint's model on.

    When it fits nowhere (every pool's active bytes too high), the worker with
    the most free + retained bytes: the start then waits there for space.
    """
    if not workers:
        raise ValueError("no workers")
    if bandwidths is None:
        bandwidths = shared_estimator()
    bw = bandwidths.bandwidths if isinstance(bandwidths, BandwidthEstimator) else bandwidths
    view = worker_view(workers, index)
    chosen = brute_force(view, MODEL, index.total_bytes, policy, CostParams(bw, evict_weight), rng or _rng)
    if chosen is None:
        chosen = max(range(len(workers)), key=lambda i: view.devices[i].free_bytes + view.devices[i].retained_bytes)
    log.debug("placement (%s): worker %d of %d", Policy(policy).value, chosen, len(workers))
    return chosen


def observe_start(replica: Replica, bandwidths: BandwidthEstimator | None = None) -> None:
    """Refine the tier bandwidths with what starting `replica` loaded (call after `Worker.start`)."""
    instance = getattr(replica, "instance", None)
    if instance is None:  # a remote replica: what its start reported
        cost = replica.cost
        if cost.start not in ("dram", "cold") or cost.load_s <= 0:
            return
        stats = LoadStats(bytes_from_disk=cost.bytes_loaded if cost.start == "cold" else 0,
                          bytes_from_cache=cost.bytes_loaded if cost.start == "dram" else 0, seconds=cost.load_s)
    else:
        stats = instance.binding.wait_loaded()
    if stats is not None:
        (bandwidths or shared_estimator()).observe(stats)
