"""Trace-driven simulator of Tangram's placement and pools at cluster scale (docs/benchmarks.md, "bench sim").

`workload.py` draws models (families sharing tensors) and bursty Zipf traces,
`pool.py` is a device pool as bookkeeping over the real pool policy functions,
`cluster.py` the simulated nodes and devices placed by the real scheduler,
`replay.py` the event loop shared with the small real run.
"""

from __future__ import annotations

from tangram.scheduler import Policy
from tangram.sim.cluster import ClusterSpec, SimCluster
from tangram.sim.replay import ReplayResult, replay
from tangram.sim.workload import ModelMix, Request, SimModel, TraceShape, make_models, make_trace


def simulate(spec: ClusterSpec, models: list[SimModel], trace: list[Request], policy: Policy | str, *,
             keep_alive_s: float, max_concurrency: int = 8, seed: int = 0) -> tuple[ReplayResult, SimCluster]:
    """Replay `trace` on a fresh simulated cluster placed by `policy`; the result and the cluster at the end."""
    cluster = SimCluster(spec, models, policy, seed=seed)
    decode = {m.name: m.decode_per_token_s for m in models}
    return replay(trace, cluster, keep_alive_s=keep_alive_s, max_concurrency=max_concurrency,
                  decode_s=decode), cluster


__all__ = ["ClusterSpec", "ModelMix", "ReplayResult", "Request", "SimCluster", "SimModel", "TraceShape",
           "make_models", "make_trace", "replay", "simulate"]
