"""Live migration between two loopback Ray nodes (one worker actor each): migrated answers equal their unmigrated
twins, and injected faults (the destination actor killed mid-migration, the source killed after the handover, a
deadline passed) lose nothing."""

from __future__ import annotations

import os
import threading
import time

import httpx
import pytest

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported: keeps every listener on loopback
pytest.importorskip("ray")

import ray  # noqa: E402
from ray._private import ray_constants  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from migration_util import long_context_checkpoint  # noqa: E402
from tangram.control import Deployment, ServeConfig  # noqa: E402
from tangram.control.migrate import MigrationSettings  # noqa: E402
from tangram.engine import EngineConfig, EngineRates  # noqa: E402
from tangram.serve import Server  # noqa: E402

pytestmark = pytest.mark.ray
NODE = dict(num_cpus=1, object_store_memory=96 << 20, node_ip_address="127.0.0.1")
ADMIN = {"Authorization": "Bearer test-token"}
GREEDY = {"model": "m", "prompt": [5, 17, 33, 90], "max_tokens": 300, "ignore_eos": True, "temperature": 0}
SEEDED = {**GREEDY, "temperature": 0.8, "seed": 11}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ray_constants.ENABLE_RAY_CLUSTER = False
    cluster = Cluster(initialize_head=True, head_node_args=dict(include_dashboard=False, **NODE))
    cluster.add_node(**NODE)
    ray.init(address=cluster.address, logging_level="WARNING")
    ckpt = long_context_checkpoint(tmp_path_factory.mktemp("migrate-ray"))
    spec = Deployment(name="m", checkpoint=str(ckpt), max_instances=2, keep_alive_s=600,
                      engine=EngineConfig(block_tokens=4))
    cfg = ServeConfig(port=0, pool_capacity=64 << 20, admin_token="test-token", deployments=[spec])
    try:
        with Server(cfg, ray_address=cluster.address).running() as srv:
            yield srv
    finally:
        ray.shutdown()
        cluster.shutdown()


def complete(srv, body: dict) -> dict:
    return httpx.post(srv.url + "/v1/completions", json=body, timeout=180).json()


def status(srv) -> dict:
    """/admin/status once every worker actor answers (one killed by a test restarts meanwhile)."""
    deadline = time.monotonic() + 120
    while True:
        r = httpx.get(srv.url + "/admin/status", headers=ADMIN, timeout=60)
        if r.status_code == 200 or time.monotonic() > deadline:
            return r.json()
        time.sleep(0.2)


def busy_workers(srv) -> list[str]:
    return [w["worker"] for w in status(srv)["workers"] if any(i["inflight"] for i in w["instances"])]


def migrated(srv, body: dict, *, to_other: bool = True, after=None) -> tuple[dict, dict]:
    """Send `body`, migrate it once it runs (to the worker not running it), return (answer, migrate report)."""
    got: list[dict] = []
    sender = threading.Thread(target=lambda: got.append(complete(srv, body)))
    sender.start()
    deadline = time.monotonic() + 60
    while not (busy := busy_workers(srv)) and time.monotonic() < deadline:
        time.sleep(0.005)
    to = next(w.name for w in srv.workers if w.name not in busy)
    report = httpx.post(srv.url + "/admin/migrate", json={"deployment": "m", "to": to}, headers=ADMIN,
                        timeout=180).json()
    if after is not None:
        after(report)
    sender.join(180)
    return got[0], report


@pytest.mark.parametrize("body", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_request_moves_between_nodes_unchanged(server, body):
    twin = complete(server, body)
    got, report = migrated(server, body)
    assert [m["outcome"] for m in report["moves"]] == ["moved"], report
    assert got["choices"][0]["text"] == twin["choices"][0]["text"] and got["usage"] == twin["usage"]


def _handle(srv, name: str):
    return next(w for w in srv.workers if w.name == name)


def test_the_source_killed_after_the_handover_leaves_the_request_unaffected(server):
    twin = complete(server, GREEDY)

    def kill_source(report: dict) -> None:
        assert report["moved"] == 1, report
        ray.kill(next(w for w in server.workers if w.name != report["to"]).actor, no_restart=False)

    got, _ = migrated(server, GREEDY, after=kill_source)
    assert got["choices"][0]["text"] == twin["choices"][0]["text"]
    status(server)  # the killed actor is back before the next test


def test_a_migration_past_its_deadline_is_abandoned_cleanly(server):
    twin = complete(server, GREEDY)
    server.controller.migrator.settings = MigrationSettings(deadline_s=0.001)
    try:
        got, report = migrated(server, GREEDY)
    finally:
        server.controller.migrator.settings = MigrationSettings()
    assert [m["outcome"] for m in report["moves"]] == ["abandoned"] and "deadline" in report["moves"][0]["error"]
    assert got["choices"][0]["text"] == twin["choices"][0]["text"]


def test_an_actor_reports_what_its_engine_measured(server):
    """The wait-or-migrate estimate's speeds cross the Ray boundary (`WorkerHandle.rates`)."""
    import asyncio

    complete(server, GREEDY)
    replica = next(r for r in server.controller._states["m"].replicas)  # noqa: SLF001 - the controller's records
    rates = asyncio.run(replica.worker.rates(replica.ref))
    assert rates.step_s > 0 and rates.prefill_s_per_token > 0
    assert ray.get(replica.worker.actor.rates.remote("no-such-instance")) == EngineRates()


def test_the_destination_killed_mid_migration_loses_nothing(server):  # last: it leaves a restarted actor
    body = {**SEEDED, "max_tokens": 500}  # long enough for three full rounds
    twin = complete(server, body)
    complete(server, {**SEEDED, "max_tokens": 1})
    for w in server.workers:  # fault: the first extend finds the destination's actor killed
        real = w.extend

        async def killed(replica, *a, _w=w, _real=real, **k):
            ray.kill(_w.actor, no_restart=False)
            return await _real(replica, *a, **k)

        w.extend = killed
    server.controller.migrator.settings = MigrationSettings(threshold=0, max_rounds=3)
    try:
        got, report = migrated(server, body)
    finally:
        server.controller.migrator.settings = MigrationSettings()
        for w in server.workers:
            del w.extend
    assert [m["outcome"] for m in report["moves"]] == ["abandoned"], report
    assert got["choices"][0]["text"] == twin["choices"][0]["text"]
