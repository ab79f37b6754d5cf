"""Prometheus metrics through a running server: bounded labels, every response counted, counters that never go
backwards when a deployment goes away, and the latency histograms vLLM users expect."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving import chat_model_dir, serving
from tangram.control import Deployment
from tangram.serve.metrics import UNKNOWN, _Banked, endpoint_of

ADMIN = {"Authorization": "Bearer test-token"}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("metrics")
    return chat_model_dir(base / "a"), chat_model_dir(base / "b", seed=3)


@pytest.fixture(scope="module")
def server(dirs):
    with serving([Deployment(name="tiny", checkpoint=str(dirs[0]), keep_alive_s=600)]) as srv:
        yield srv


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def scrape(http: httpx.Client) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics: (sample name, sorted labels) -> value."""
    out = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def requests(samples: dict, deployment: str, endpoint: str, status: int) -> float:
    return value(samples, "tangram_requests_total", deployment=deployment, endpoint=endpoint, status=str(status))


def test_unknown_model_names_share_one_label(http):
    before = scrape(http)
    for name in ("nope-1", "nope-2", "x" * 200):
        assert http.post("/v1/completions", json={"model": name, "prompt": "w5"}).status_code == 404
    after = scrape(http)
    assert requests(after, UNKNOWN, "completions", 404) - requests(before, UNKNOWN, "completions", 404) == 3
    assert not any(dict(labels).get("deployment", "").startswith(("nope", "xxx")) for _, labels in after)


def test_validation_errors_and_500s_are_counted(server, http, monkeypatch):
    before = scrape(http)
    assert http.post("/v1/completions", json={"model": "tiny", "prompt": "w5", "top_k": 2**63}).status_code == 400
    assert http.post("/v1/completions", json={"model": "tiny", "prompt": "w5", "stream": "yes"}).status_code == 400
    assert http.post("/v1/chat/completions", json={"model": "tiny", "messages": []}).status_code == 400
    assert http.post("/v1/chat/completions", json={"model": "zzz", "messages": []}).status_code == 400
    assert http.post("/v1/chat/completions", content=b"{x", headers={"content-type": "application/json"}
                     ).status_code == 400
    monkeypatch.setattr(server.controller, "generate", lambda *a, **k: 1 / 0)
    assert http.post("/v1/completions", json={"model": "tiny", "prompt": "w5"}).status_code == 500
    monkeypatch.undo()
    after = scrape(http)

    def delta(*key) -> float:
        return requests(after, *key) - requests(before, *key)

    assert delta("tiny", "completions", 400) == 2
    assert delta("tiny", "chat", 400) == 1
    assert delta(UNKNOWN, "chat", 400) == 2  # an unknown model, and a body that is not JSON
    assert delta("tiny", "completions", 500) == 1


def test_routes_are_a_bounded_label(http):
    before = scrape(http)
    for i in range(5):
        assert http.get(f"/v1/random-{i}").status_code == 404
    assert http.get("/v1/completions").status_code == 405
    after = scrape(http)
    assert requests(after, "", "other", 404) - requests(before, "", "other", 404) == 5
    assert requests(after, UNKNOWN, "completions", 405) - requests(before, UNKNOWN, "completions", 405) == 1
    endpoints = {dict(labels)["endpoint"] for name, labels in after if name == "tangram_requests_total"}
    assert endpoints <= {"chat", "completions", "models", "health", "metrics", "admin", "other"}


def test_prompt_tokens_time_per_output_token_and_queue_histograms(http):
    before = scrape(http)
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": "w5 w6 w7", "max_tokens": 5,
                                           "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 3
    with http.stream("POST", "/v1/completions", json={"model": "tiny", "prompt": "w5 w6", "max_tokens": 4,
                                                      "stream": True, "ignore_eos": True}) as s:
        assert s.read().endswith(b"data: [DONE]\n\n")
    after = scrape(http)

    def delta(name: str) -> float:
        return value(after, name, deployment="tiny") - value(before, name, deployment="tiny")

    assert delta("tangram_prompt_tokens_count") == 2 and delta("tangram_prompt_tokens_sum") == 5
    assert delta("tangram_time_per_output_token_seconds_count") == 2
    assert delta("tangram_time_per_output_token_seconds_sum") > 0
    assert delta("tangram_queue_seconds_count") == 2 and delta("tangram_queue_seconds_sum") >= 0
    assert delta("tangram_generated_tokens_total") == 9
    assert delta("tangram_request_seconds_count") == 2
    assert requests(after, "tiny", "completions", 200) - requests(before, "tiny", "completions", 200) == 2


def test_counters_of_a_removed_deployment_are_kept(http, dirs):
    r = http.post("/admin/deployments", headers=ADMIN, json={"name": "second", "checkpoint": str(dirs[1])})
    assert r.status_code == 200, r.text
    assert http.post("/v1/completions", json={"model": "second", "prompt": "w5", "max_tokens": 2}).status_code == 200

    def starts(samples: dict) -> float:
        return sum(v for (name, labels), v in samples.items()
                   if name == "tangram_instance_starts_total" and ("deployment", "second") in labels)

    deadline = time.monotonic() + 30
    while not starts(live := scrape(http)):  # a start's cost is booked once its load is over
        assert time.monotonic() < deadline
        time.sleep(0.05)
    loaded = value(live, "tangram_bytes_loaded_total", deployment="second")
    assert loaded > 0 and value(live, "tangram_instance_starts_total", deployment="second", start="cold") == 1
    assert http.delete("/admin/deployments/second", headers=ADMIN).status_code == 200
    gone = scrape(http)
    assert value(gone, "tangram_bytes_loaded_total", deployment="second") == loaded
    assert starts(gone) == 1
    assert requests(gone, "second", "completions", 200) == 1
    assert value(gone, "tangram_instances", deployment="second") == 0  # a gauge may go
    # deployed again, it starts from its pool-held weights: the counters go on from where they were
    r = http.post("/admin/deployments", headers=ADMIN, json={"name": "second", "checkpoint": str(dirs[1])})
    assert r.status_code == 200
    assert http.post("/v1/completions", json={"model": "second", "prompt": "w5", "max_tokens": 2}).status_code == 200
    deadline = time.monotonic() + 30
    while starts(again := scrape(http)) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert value(again, "tangram_bytes_loaded_total", deployment="second") >= loaded
    assert value(again, "tangram_instance_starts_total", deployment="second", start="cold") == 1
    assert requests(again, "second", "completions", 200) == 2
    http.delete("/admin/deployments/second", headers=ADMIN)


def test_banked_counters_never_go_backwards():
    bank = _Banked()
    key = ("tangram_bytes_loaded", "d")
    assert bank.value(key, 10) == 10
    assert bank.value(key, 4) == 14  # the source restarted at 0 and counted 4 since
    bank.retire("d")
    assert list(bank.kept("tangram_bytes_loaded", set())) == [(key, 14)]
    assert bank.value(key, 1) == 15
    assert list(bank.kept("tangram_bytes_loaded", {key})) == []


def test_endpoint_labels():
    assert endpoint_of("/v1/chat/completions") == "chat" and endpoint_of("/v1/completions") == "completions"
    assert endpoint_of("/admin/deployments/x") == "admin" and endpoint_of("/v1/anything") == "other"
