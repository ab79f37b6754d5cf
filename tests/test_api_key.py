"""Inference API access control (vLLM's `--api-key`): a bearer key on every /v1/* route, through the openai client."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from serving import chat_model_dir, serving
from tangram.cli import app
from tangram.control import Deployment, ServeConfig
from tangram.serve.server import resolve_api_key

KEY = "sk-tangram-test-key"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return chat_model_dir(tmp_path_factory.mktemp("apikey") / "tiny")


@pytest.fixture(scope="module")
def server(model_dir):
    with serving([Deployment(name="tiny", checkpoint=str(model_dir), keep_alive_s=600)], api_key=KEY) as srv:
        yield srv


def client(srv, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=60)


def test_the_right_key_works(server):
    c = client(server, KEY)
    assert [m.id for m in c.models.list()] == ["tiny"]
    out = c.completions.create(model="tiny", prompt="w5 w17", max_tokens=3, temperature=0)
    assert out.usage.completion_tokens == 3
    chunks = list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "w5"}],
                                            max_tokens=3, temperature=0, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"


def test_a_wrong_key_is_an_authentication_error(server):
    c = client(server, "sk-wrong")
    with pytest.raises(openai.AuthenticationError) as exc:
        c.completions.create(model="tiny", prompt="w5", max_tokens=2)
    assert exc.value.status_code == 401 and exc.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "w5"}], max_tokens=2,
                                  stream=True)
    with pytest.raises(openai.AuthenticationError):
        c.models.list()


@pytest.mark.parametrize("headers", [{}, {"Authorization": f"Basic {KEY}"}, {"Authorization": "Bearer"},
                                     {"Authorization": f"Bearer {KEY}x"}, {"Authorization": "Bearer test-token"}])
def test_every_v1_route_needs_the_key(server, headers):
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                         ("GET", "/v1/no-such-route"), ("GET", "/v1")]:
        r = httpx.request(method, server.url + path, headers=headers, json={"model": "tiny", "prompt": "w5"},
                          timeout=30)
        assert r.status_code == 401, (method, path, r.text)
        error = r.json()["error"]
        assert error["type"] == "authentication_error" and error["message"]


def test_health_metrics_and_admin_stay_as_they_were(server):
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200
    assert httpx.get(server.url + "/admin/status", headers={"Authorization": f"Bearer {KEY}"}).status_code == 401
    assert httpx.get(server.url + "/admin/status", headers={"Authorization": "Bearer test-token"}).status_code == 200
    scheme = httpx.get(server.url + "/v1/models", headers={"Authorization": f"bearer {KEY}"})
    assert scheme.status_code == 200  # the auth scheme is case-insensitive


def test_the_key_comes_from_the_config_or_the_environment(monkeypatch):
    monkeypatch.delenv("TANGRAM_API_KEY", raising=False)
    assert resolve_api_key(ServeConfig()) is None
    assert resolve_api_key(ServeConfig(api_key="from-config")) == "from-config"
    monkeypatch.setenv("TANGRAM_API_KEY", "from-env")
    assert resolve_api_key(ServeConfig()) == "from-env"
    monkeypatch.setenv("TANGRAM_API_KEY", "has space")
    with pytest.raises(ValueError, match="whitespace"):
        resolve_api_key(ServeConfig())
    for bad in ("", "has space"):
        with pytest.raises(ValidationError):
            ServeConfig(api_key=bad)


def test_serve_ask_passes_the_key(model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("TANGRAM_API_KEY", raising=False)
    cfg = ServeConfig(port=0, pool_capacity=64 << 20, admin_token="test-token",
                      deployments=[Deployment(name="tiny", checkpoint=str(model_dir))])
    path = tmp_path / "serve.json"
    path.write_text(json.dumps(cfg.model_dump(mode="json")))
    result = CliRunner().invoke(app, ["serve", "--config", str(path), "--api-key", KEY, "--ask", "w5 w17", "--once"])
    assert result.exit_code == 0, result.output
    assert "API key required" in result.output and "time to first token" in result.output
    monkeypatch.setenv("TANGRAM_API_KEY", KEY)  # the environment's key is passed too
    result = CliRunner().invoke(app, ["serve", "--config", str(path), "--ask", "w5 w17", "--once"])
    assert result.exit_code == 0, result.output
