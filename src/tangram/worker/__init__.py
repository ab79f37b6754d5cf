"""One long-lived worker per device: its device pool and the model instances running on it."""

from tangram.worker.handle import PlacementState, ReplicaRef, WorkerHandle
from tangram.worker.local import LocalWorker
from tangram.worker.worker import DeviceMap, InstanceInfo, Replica, Worker, local_devices

__all__ = ["DeviceMap", "InstanceInfo", "LocalWorker", "PlacementState", "Replica", "ReplicaRef", "Worker",
           "WorkerHandle", "local_devices"]
