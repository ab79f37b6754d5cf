"""One long-lived worker per device: its device pool and the model instances running on it."""

from tangram.worker.worker import Replica, Worker, local_devices

__all__ = ["Replica", "Worker", "local_devices"]
