"""Where a new instance starts, pure: the device holding most of the model, then the least busy one."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceView:
    """What placement knows of one device."""

    resident_bytes: int  # bytes of the model already in its pool
    instances: int  # instances running there
    free_bytes: int  # free + retained bytes of its pool


def place(devices: Sequence[DeviceView], model_bytes: int) -> int:
    """Index of the device to start on: most resident bytes, then fewest instances, then most room."""
    if not devices:
        raise ValueError("no devices")
    fits = [i for i, d in enumerate(devices) if d.free_bytes + d.resident_bytes >= model_bytes] or range(len(devices))
    return max(fits, key=lambda i: (devices[i].resident_bytes, -devices[i].instances, devices[i].free_bytes))
