"""Affinity-aware scheduling: where to start an instance of a model (docs/design.md, "Affinity score").

`cost.py` is the cost model (pure), `view.py` the plain-data cluster view and
the reference scan, `scheduler.py` the indexed scheduler for thousands of
devices, `bandwidth.py` the measured tier bandwidths, `adapter.py` the bridge
to the controller's workers.
"""

from tangram.scheduler.bandwidth import BandwidthEstimator
from tangram.scheduler.cost import POLICIES, Bandwidths, CostParams, Policy, load_seconds, start_cost
from tangram.scheduler.scheduler import Scheduler
from tangram.scheduler.view import ClusterView, DeviceState, brute_force

__all__ = ["POLICIES", "BandwidthEstimator", "Bandwidths", "ClusterView", "CostParams", "DeviceState", "Policy",
           "Scheduler", "brute_force", "load_seconds", "start_cost"]
