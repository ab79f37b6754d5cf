"""`tangram migrate DEPLOYMENT --to DEVICE` over `POST /admin/migrate`: a running request moves between two
logical CPU devices and its answer is the unmigrated one; bad names get clear errors."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from typer.testing import CliRunner

from migration_util import long_context_checkpoint
from serving import serving
from tangram.cli import app
from tangram.control import Deployment
from tangram.engine import EngineConfig

BODY = {"model": "m", "prompt": [5, 17, 33, 90], "max_tokens": 400, "temperature": 0.8, "seed": 7,
        "ignore_eos": True}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return long_context_checkpoint(tmp_path_factory.mktemp("migrate-api"))


def test_the_migrate_command_moves_a_running_request_and_its_answer_is_unchanged(ckpt):
    spec = Deployment(name="m", checkpoint=str(ckpt), max_instances=2, keep_alive_s=600,
                      engine=EngineConfig(block_tokens=4))
    with serving([spec], cpu_devices=2) as srv:
        twin = httpx.post(srv.url + "/v1/completions", json=BODY, timeout=120).json()
        here = next(w.name for w in srv.workers if w.replicas)
        to = next(w.name for w in srv.workers if w.name != here)
        got: list[dict] = []
        sender = threading.Thread(target=lambda: got.append(
            httpx.post(srv.url + "/v1/completions", json=BODY, timeout=120).json()))
        sender.start()
        deadline = time.monotonic() + 30
        while not any(r.inflight for w in srv.workers for r in w.replicas.values()) and time.monotonic() < deadline:
            time.sleep(0.002)
        result = CliRunner().invoke(app, ["migrate", "m", "--to", to, "--url", srv.url, "--token", "test-token"])
        sender.join(120)
        assert result.exit_code == 0, result.output
        assert "moved 1 of 1" in result.output and "moved after" in result.output
        assert got[0]["choices"][0]["text"] == twin["choices"][0]["text"]
        assert got[0]["usage"] == twin["usage"]
        assert all(r.inflight == 0 for w in srv.workers for r in w.replicas.values())


def test_migrate_names_the_bad_parameter(ckpt):
    with serving([Deployment(name="m", checkpoint=str(ckpt))]) as srv:
        headers = {"Authorization": "Bearer test-token"}
        r = httpx.post(srv.url + "/admin/migrate", json={"deployment": "m", "to": "tpu#9"}, headers=headers)
        assert r.status_code == 400 and r.json()["error"]["param"] == "to" and "cpu#0" in r.json()["error"]["message"]
        r = httpx.post(srv.url + "/admin/migrate", json={"deployment": "nope", "to": "cpu#0"}, headers=headers)
        assert r.status_code == 404 and r.json()["error"]["param"] == "deployment"
        r = httpx.post(srv.url + "/admin/migrate", json={"deployment": "m"}, headers=headers)
        assert r.status_code == 400 and "to" in r.text
        assert httpx.post(srv.url + "/admin/migrate", json={"deployment": "m", "to": "cpu#0"}).status_code == 401
