"""Bad input against the running server: OpenAI-style errors with the right status, never a 500, still serving."""

from __future__ import annotations

import shutil
import time

import httpx
import openai
import pytest
from typer.testing import CliRunner

from serving import chat_model_dir, serving
from tangram.cli import app
from tangram.control import Deployment


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("errors")
    return chat_model_dir(base / "a", seed=0), chat_model_dir(base / "b", "mistral", seed=1)


@pytest.fixture(scope="module")
def server(dirs):
    with serving([Deployment(name="tiny", checkpoint=str(dirs[0]), keep_alive_s=600)]) as srv:
        yield srv


def post(srv, path: str, **kw) -> httpx.Response:
    return httpx.post(srv.url + path, timeout=60, **kw)


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body["error"]) >= {"message", "type", "code", "param"}
    return body["error"]


@pytest.mark.parametrize("body,needle", [
    ({"prompt": "w5"}, "model"),
    ({"model": "tiny"}, "prompt"),
    ({"model": "tiny", "prompt": "w5", "temperature": 5}, "temperature"),
    ({"model": "tiny", "prompt": "w5", "top_p": 0}, "top_p"),
    ({"model": "tiny", "prompt": "w5", "max_tokens": 0}, "max_tokens"),
    ({"model": "tiny", "prompt": "w5", "n": 1000}, "n"),
    ({"model": "tiny", "prompt": "w5", "stop": ["", "x"]}, "stop"),
    ({"model": "tiny", "prompt": "w5", "logprobs": 30}, "logprobs"),
    ({"model": "tiny", "prompt": "w5", "presence_penalty": 2.5}, "presence_penalty"),
    ({"model": "tiny", "prompt": "w5", "repetition_penalty": 0}, "repetition_penalty"),
    ({"model": "tiny", "prompt": "w5", "min_p": 2}, "min_p"),
    ({"model": "tiny", "prompt": "w5", "logit_bias": {"x7": 1}}, "logit_bias"),
    ({"model": "tiny", "prompt": "w5", "logit_bias": {"7": 250}}, "logit_bias"),
    ({"model": "tiny", "prompt": "w5", "logit_bias": {"999": 1}}, "logit_bias"),
    ({"model": "tiny", "prompt": "w5", "suffix": "x"}, "suffix"),
    ({"model": "tiny", "prompt": "w5", "best_of": 2}, "best_of"),
    ({"model": "tiny", "prompt": "w5", "surprise": True}, "surprise"),
    ({"model": "tiny", "prompt": ""}, "empty"),
])
def test_invalid_completion_bodies_are_400(server, body, needle):
    err = error_of(post(server, "/v1/completions", json=body), 400)
    assert needle in err["message"] or needle == err["param"], err


def test_malformed_json_and_missing_messages(server):
    err = error_of(post(server, "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert "JSON" in err["message"]
    error_of(post(server, "/v1/chat/completions", json={"model": "tiny", "messages": []}), 400)
    error_of(post(server, "/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}), 400)


def test_unknown_model_is_404_and_openai_client_raises(server):
    err = error_of(post(server, "/v1/completions", json={"model": "nope", "prompt": "w5"}), 404)
    assert err["code"] == "model_not_found"
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="w5")


def test_prompt_longer_than_context_is_400(server):
    prompt = " ".join(f"w{5 + i % 200}" for i in range(80))  # the tiny model's context is 64
    err = error_of(post(server, "/v1/completions", json={"model": "tiny", "prompt": prompt, "stream": True}), 400)
    assert err["code"] == "context_length_exceeded" and "context is 64" in err["message"]


def test_disconnect_mid_stream_frees_kv_and_server_keeps_serving(server):
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"model": "tiny", "prompt": "w5 w6", "max_tokens": 50, "stream": True,
                            "ignore_eos": True, "temperature": 0}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 20
    while True:  # the engine notices the abort at its next step
        st = httpx.get(server.url + "/admin/status", headers={"Authorization": "Bearer test-token"}).json()
        if st["workers"][0]["kv_bytes"] == 0 and st["deployments"]["tiny"]["inflight"] == 0:
            break
        assert time.monotonic() < deadline, st
        time.sleep(0.05)
    ok = post(server, "/v1/completions", json={"model": "tiny", "prompt": "w5", "max_tokens": 2})
    assert ok.status_code == 200


def test_admin_needs_the_token(server):
    assert httpx.get(server.url + "/admin/status").status_code == 401
    r = httpx.get(server.url + "/admin/status", headers={"Authorization": "Bearer wrong"})
    assert error_of(r, 401)["type"] == "authentication_error"


def test_metrics_expose_the_series(server):
    post(server, "/v1/completions", json={"model": "tiny", "prompt": "w5", "max_tokens": 2})
    text = httpx.get(server.url + "/metrics").text
    for series in ("tangram_requests_total", "tangram_request_seconds_bucket", "tangram_ttft_seconds_bucket",
                   "tangram_bytes_loaded_total", "tangram_bytes_reused_total", "tangram_pool_bytes",
                   "tangram_queue_length", "tangram_instances", "tangram_kv_bytes", "tangram_instance_starts_total"):
        assert series in text, series
    assert 'tangram_pool_bytes{state="active",worker="cpu#0"}' in text
    assert 'tangram_requests_total{deployment="__unknown__",endpoint="completions",status="404"}' in text
    assert 'deployment="nope"' not in text  # an unknown model name is no label value
    assert 'start="cold"' in text or 'start="warm"' in text


def test_deploy_ls_status_rm_through_the_cli(server, dirs):
    runner = CliRunner()
    env = {"TANGRAM_URL": server.url, "TANGRAM_ADMIN_TOKEN": "test-token"}
    r = runner.invoke(app, ["deploy", "second", "--checkpoint", str(dirs[1]), "--keep-alive", "5"], env=env)
    assert r.exit_code == 0, r.output
    assert "deployed second" in r.output
    r = runner.invoke(app, ["ls"], env=env)
    assert r.exit_code == 0 and "second" in r.output and "tiny" in r.output
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    assert c.completions.create(model="second", prompt="w5", max_tokens=2).usage.completion_tokens == 2
    r = runner.invoke(app, ["status"], env=env)
    assert r.exit_code == 0 and "cpu#0" in r.output and "second" in r.output
    r = runner.invoke(app, ["rm", "second"], env=env)
    assert r.exit_code == 0
    assert [m.id for m in c.models.list()] == ["tiny"]
    bad = runner.invoke(app, ["deploy", "x", "--checkpoint", "/does/not/exist"], env=env)
    assert bad.exit_code == 2 and "no such model" in bad.output
    bad = runner.invoke(app, ["deploy", "x", "--checkpoint", str(dirs[1]), "--backend", "tensorrt"], env=env)
    assert bad.exit_code == 2 and "backend" in bad.output  # --backend reaches the server's validation
    denied = runner.invoke(app, ["ls"], env={**env, "TANGRAM_ADMIN_TOKEN": "wrong"})
    assert denied.exit_code == 2 and "401" in denied.output


def test_a_checkpoint_that_fails_to_load_fails_only_its_deployment(server, dirs, tmp_path):
    broken_src = shutil.copytree(dirs[1], tmp_path / "broken")
    headers = {"Authorization": "Bearer test-token"}
    r = httpx.post(server.url + "/admin/deployments", headers=headers, timeout=60,
                   json={"name": "broken", "checkpoint": str(broken_src)})
    assert r.status_code == 200, r.text
    converted = r.json()["resolved_checkpoint"]
    for f in __import__("pathlib").Path(converted).glob("*.bin"):
        f.write_bytes(f.read_bytes()[: 100])  # truncated after the deploy validated it
    err = error_of(post(server, "/v1/completions", json={"model": "broken", "prompt": "w5"}), 503)
    assert "failed to start" in err["message"]
    ok = post(server, "/v1/completions", json={"model": "tiny", "prompt": "w5", "max_tokens": 2})
    assert ok.status_code == 200
    httpx.delete(server.url + "/admin/deployments/broken", headers=headers)
