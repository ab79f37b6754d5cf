"""The controller's records of deployments and of their running instances, and the errors its callers see."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tangram.control.deployments import Deployment
from tangram.control.fit import Footprint
from tangram.engine import RequestOutput, StartCost
from tangram.store import CheckpointIndex
from tangram.worker import ReplicaRef, WorkerHandle

log = logging.getLogger(__name__)
__all__ = ["ControlState", "DeploymentState", "DeploymentUnavailable", "ReplicaState", "UnknownDeployment",
           "retire_failed"]


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
    moved: dict[str, tuple[ReplicaState, str]] = field(default_factory=dict)  # request id -> where it migrated

    def route(self, request_id: str) -> ReplicaState:
        """The instance a request of this instance runs on now (after live migrations), the route kept."""
        here, rid = self, request_id
        while rid in here.moved:
            here, rid = here.moved[rid]
        return here

    def follow(self, request_id: str | None) -> tuple[ReplicaState, str | None]:
        """Where a request of this instance runs now (after live migrations, possibly several): instance and id
        there; the route is forgotten (the request's stream asks once, at its end). None: it never started."""
        here, rid = self, request_id
        while rid is not None and rid in here.moved:
            here, rid = here.moved.pop(rid)
        return here, rid

    def retire(self, why: str | None) -> None:
        """It can serve nothing more (its weights failed to load, its worker died): no new requests, stopped once
        empty (the controller starts a replacement when needed)."""
        if not self.draining:
            log.warning("%s can serve nothing more (%s): replacing it", self.id, why)
            self.draining = True

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
    placing: list[str] = field(default_factory=list)  # workers where one of its starts is under way

    def describe(self) -> dict:
        """Its settings and live state (`Controller.describe`)."""
        return {**self.spec.model_dump(mode="json"), "resolved_checkpoint": str(self.checkpoint),
                "bytes": self.index.total_bytes, "pool_bytes_needed": self.need.total,
                "instances": len(self.replicas), "starting": self.starting, "queued": self.queued,
                "inflight": sum(r.inflight for r in self.replicas), "last_error": self.last_error,
                "starts": dict(self.starts), "bytes_loaded": self.bytes_loaded, "bytes_reused": self.bytes_reused}

    def hosts(self) -> set[str]:
        """The workers that run an instance of it, or where one is starting."""
        return {r.worker.name for r in self.replicas if not r.stopping} | set(self.placing)


def retire_failed(states: Iterable[DeploymentState], replica: ReplicaState, out: RequestOutput) -> None:
    """`replica` failed a request (`out`): retire it, and where its worker process died (`worker_failed`) every
    instance of every deployment on that worker, which went with the process (a restarted actor holds none)."""
    replica.retire(out.error)
    if out.worker_failed:
        for state in states:
            for r in state.replicas:
                if r.worker is replica.worker:
                    r.retire(out.error)
