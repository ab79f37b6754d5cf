"""One long-lived worker per device: its device pool and the model instances running on it."""

from tangram.worker.worker import DeviceMap, InstanceInfo, Replica, Worker, local_devices

__all__ = ["DeviceMap", "InstanceInfo", "Replica", "Worker", "local_devices"]
