"""GET /admin/pool-map (the dashboard's data) and `tangram status --json`: the map's totals equal each pool's
snapshot, a deploy, a start, a scale-to-zero and an eviction show up, and nothing is served without the token."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from typer.testing import CliRunner

from serving import chat_model_dir, serving
from tangram.cli import app
from tangram.control import Deployment

HEADERS = {"Authorization": "Bearer test-token"}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dash")
    return chat_model_dir(root / "a"), chat_model_dir(root / "b", seed=5)


def pool_map(srv) -> dict:
    r = httpx.get(srv.url + "/admin/pool-map", headers=HEADERS, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def wait_for(srv, check, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = pool_map(srv)
        if check(m):
            return m
        assert time.monotonic() < deadline, json.dumps(m)[:3000]
        time.sleep(0.1)


def complete(srv, model: str) -> None:
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
    assert c.completions.create(model=model, prompt="w5 w6", max_tokens=2).usage.completion_tokens == 2


def test_the_pool_map_needs_the_admin_token_and_the_page_does_not(dirs):
    with serving([Deployment(name="a", checkpoint=str(dirs[0]))]) as srv:
        assert httpx.get(srv.url + "/admin/pool-map").status_code == 401
        bad = httpx.get(srv.url + "/admin/pool-map", headers={"Authorization": "Bearer wrong"})
        assert bad.status_code == 401 and bad.json()["error"]["type"] == "authentication_error"
        page = httpx.get(srv.url + "/dashboard")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "script-src 'self'" in page.headers["content-security-policy"]
        for name, kind in (("app.js", "javascript"), ("devices.js", "javascript"), ("style.css", "css"),
                           ("favicon.svg", "svg")):
            r = httpx.get(srv.url + "/dashboard/" + name)
            assert r.status_code == 200 and kind in r.headers["content-type"] and r.content
        assert httpx.get(srv.url + "/dashboard/../app.py").status_code == 404
        assert httpx.get(srv.url + "/dashboard/pool.py").status_code == 404


def test_totals_equal_each_pools_snapshot_and_a_start_and_scale_to_zero_show_up(dirs):
    with serving([Deployment(name="a", checkpoint=str(dirs[0]), keep_alive_s=0.5)], cpu_devices=2) as srv:
        m = pool_map(srv)
        assert [d["worker"] for d in m["devices"]] == ["cpu#0", "cpu#1"]
        assert [e["kind"] for e in m["events"]] == ["deploy"] and m["events"][0]["deployment"] == "a"
        complete(srv, "a")
        m = wait_for(srv, lambda m: any(e["kind"] == "scale-to-zero" for e in m["events"]))
        assert [e["kind"] for e in m["events"]] == ["deploy", "start", "scale-to-zero"]
        (start,) = m["starts"]
        assert start["deployment"] == "a" and start["start"] == "cold" and start["bytes_loaded"] > 0
        assert start["ttft_s"] > 0 and start["prefill_s"] > 0  # the first request that waited filled its stages
        dep = m["deployments"][0]
        assert dep["name"] == "a" and dep["instances"] == 0 and dep["ttft"]["cold"]["count"] == 1
        assert dep["requests_per_s"] > 0
        for dev, worker in zip(m["devices"], srv.workers):  # quiescent now: equal to the pool's own snapshot
            snap, arena = worker.pool.snapshot(), dev["arena"]
            assert arena["totals"] == snap["totals"] and arena["kv_bytes"] == snap["kv_bytes"]
            assert arena["capacity"] == snap["capacity"] and arena["fragmentation"] == snap["fragmentation"]
            for state in ("retained", "free"):
                assert sum(s["size"] for s in arena["segments"] if s["state"] == state) == snap["totals"][state]
            active = sum(s["size"] for s in arena["segments"] if s["state"] in ("active", "kv"))
            assert active == snap["totals"]["active"]
            assert arena["tensors"] == len(snap["tensors"])
        retained = [s for d in m["devices"] for s in d["arena"]["segments"] if s["state"] == "retained"]
        assert [s["models"] for s in retained] == [["a"]] and retained[0]["gain"] > 0
        complete(srv, "a")  # a pool-hit start: a second entry on the timeline
        m = wait_for(srv, lambda m: len(m["starts"]) == 2 and m["starts"][1]["ttft_s"] is not None)
        assert m["starts"][1]["start"] == "pool-hit" and m["starts"][1]["bytes_loaded"] == 0


def test_an_eviction_shows_what_was_evicted_for_whom_and_status_json_prints_the_same_map(dirs):
    deps = [Deployment(name="a", checkpoint=str(dirs[0]), keep_alive_s=0.3),
            Deployment(name="b", checkpoint=str(dirs[1]), keep_alive_s=0.3)]
    with serving(deps) as probe:
        size = max(d["bytes"] for d in probe.controller.status()["deployments"].values())
    with serving(deps, pool_bytes=int(size * 1.6)) as srv:  # room for one model (and its KV) at a time
        complete(srv, "a")
        wait_for(srv, lambda m: m["deployments"][0]["instances"] == 0)
        complete(srv, "b")  # a's retained tensors make room for b
        m = wait_for(srv, lambda m: any(e["kind"] == "evict" for e in m["events"]))
        ev = next(e for e in m["events"] if e["kind"] == "evict")
        assert ev["deployment"] == "b" and ev["worker"] == "cpu#0" and ev["bytes"] > 0
        assert " of a (" in ev["message"] and ev["message"].endswith("for b")
        (dev,) = m["devices"]
        assert dev["evictions"] and dev["evictions"][0]["for_model"] == "b" and "a" in dev["evictions"][0]["victims"]
        kinds = [e["kind"] for e in m["events"]]
        assert kinds.count("deploy") == 2 and kinds.count("start") == 2 and "scale-to-zero" in kinds
        assert kinds.index("evict") > kinds.index("scale-to-zero")  # in time order
        r = CliRunner().invoke(app, ["status", "--json"], env={"TANGRAM_URL": srv.url, "TANGRAM_ADMIN_TOKEN": "test-token"})
        assert r.exit_code == 0, r.output
        out = json.loads(r.stdout)
        assert set(out) == {"time", "devices", "deployments", "starts", "events"}
        assert [d["worker"] for d in out["devices"]] == ["cpu#0"]
        assert any(e["kind"] == "evict" for e in out["events"])
        denied = CliRunner().invoke(app, ["status", "--json"], env={"TANGRAM_URL": srv.url,
                                                                     "TANGRAM_ADMIN_TOKEN": "wrong"})
        assert denied.exit_code == 2 and "401" in denied.output
