"""The controller's records of deployments and of their running instances, and the errors its callers see."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

from tangram.control.deployments import Deployment
from tangram.control.fit import Footprint
from tangram.engine import StartCost
from tangram.store import CheckpointIndex
from tangram.worker import ReplicaRef, WorkerHandle

__all__ = ["ControlState", "DeploymentState", "DeploymentUnavailable", "ReplicaState", "UnknownDeployment"]


class UnknownDeployment(KeyError):
    """No deployment of that name."""


class DeploymentUnavailable(RuntimeError):
    """The deployment's instance could not start (e.g. its checkpoint fails to load)."""


@dataclass(kw_only=True)
class ControlState:
    """What the controller keeps of a running instance, local or in a Ray worker actor."""

    inflight: int = 0
    idle_since: float | None = None
    stopping: bool = False
    draining: bool = False  # takes no new requests: stopped once idle, to make room for a waiting start
    started_at: float = field(default_factory=time.perf_counter)


@dataclass(eq=False)
class ReplicaState(ControlState):
    """A running instance as the controller sees it: the worker handle it runs on and the worker's reference."""

    worker: WorkerHandle
    ref: ReplicaRef

    @property
    def id(self) -> str:
        """The instance's id (its worker's)."""
        return self.ref.id

    @property
    def cost(self) -> StartCost:
        """What its start cost, as its worker reported it."""
        return self.ref.cost


@dataclass
class DeploymentState:
    """What the controller keeps of one deployment: its spec, checkpoint, instances and waiters."""

    spec: Deployment
    checkpoint: Path
    index: CheckpointIndex  # read once, at deploy
    need: Footprint  # pool bytes an instance needs at least
    replicas: list[ReplicaState] = field(default_factory=list)
    starting: int = 0
    waiters: list[asyncio.Future] = field(default_factory=list)
    queued: int = 0
    last_error: str | None = None
    removed: bool = False
    bytes_loaded: int = 0
    bytes_reused: int = 0
    starts: dict[str, int] = field(default_factory=lambda: {"pool-hit": 0, "dram": 0, "cold": 0})
