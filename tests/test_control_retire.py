"""A failed instance is retired; where its worker process died, every instance that worker held goes with it
(the controller's records, no server or Ray cluster)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tangram.control.state import ReplicaState, retire_failed
from tangram.engine import RequestOutput


def _replica(worker: object, name: str) -> ReplicaState:
    return ReplicaState(worker=worker, ref=SimpleNamespace(id=name))  # type: ignore[arg-type]


@pytest.mark.parametrize("worker_failed", [False, True])
def test_a_dead_worker_retires_every_instance_it_held_and_no_other(worker_failed):
    dead, alive = object(), object()
    a0, a1, b0 = _replica(dead, "a-0"), _replica(alive, "a-1"), _replica(dead, "b-0")
    states = [SimpleNamespace(replicas=[a0, a1]), SimpleNamespace(replicas=[b0])]
    out = RequestOutput("r", "", [], "", finished=True, finish_reason="error", error="gone", instance_failed=True,
                        worker_failed=worker_failed)
    retire_failed(states, a0, out)  # type: ignore[arg-type]
    assert a0.draining and not a1.draining
    assert b0.draining is worker_failed  # another deployment's instance on the same dead worker


def test_a_ray_actor_error_marks_the_worker_failed_and_an_early_end_does_not():
    from ray.exceptions import RayActorError

    from tangram.cluster.remote import _failed

    assert _failed("r", RayActorError()).worker_failed
    assert not _failed("r", None).worker_failed and _failed("r", None).instance_failed
    assert not _failed("r", ValueError("bad output")).worker_failed
