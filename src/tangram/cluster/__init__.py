"""Cluster mode on Ray: one worker actor per device, placed by Ray; API and controller on the head.

Needs the optional dependency `ray` (`pip install tangram-llm[cluster]`).
"""

from tangram.cluster.actor import WorkerActor
from tangram.cluster.cache import NodeCache, NodeCacheClient
from tangram.cluster.placement import RayCluster, cluster_nodes
from tangram.cluster.remote import RemoteReplica, RemoteWorker

__all__ = ["NodeCache", "NodeCacheClient", "RayCluster", "RemoteReplica", "RemoteWorker", "WorkerActor",
           "cluster_nodes"]
