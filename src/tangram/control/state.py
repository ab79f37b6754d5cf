"""The controller's record of a deployment, and the errors its callers see."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from tangram.control.deployments import Deployment
from tangram.control.fit import Footprint
from tangram.store import CheckpointIndex
from tangram.worker import Replica

__all__ = ["DeploymentState", "DeploymentUnavailable", "UnknownDeployment"]


class UnknownDeployment(KeyError):
    """No deployment of that name."""


class DeploymentUnavailable(RuntimeError):
    """The deployment's instance could not start (e.g. its checkpoint fails to load)."""


@dataclass
class DeploymentState:
    """What the controller keeps of one deployment: its spec, checkpoint, instances and waiters."""

    spec: Deployment
    checkpoint: Path
    index: CheckpointIndex  # read once, at deploy
    need: Footprint  # pool bytes an instance needs at least
    replicas: list[Replica] = field(default_factory=list)
    starting: int = 0
    waiters: list[asyncio.Future] = field(default_factory=list)
    queued: int = 0
    last_error: str | None = None
    removed: bool = False
    bytes_loaded: int = 0
    bytes_reused: int = 0
    starts: dict[str, int] = field(default_factory=lambda: {"pool-hit": 0, "dram": 0, "cold": 0})
