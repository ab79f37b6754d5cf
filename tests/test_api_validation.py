"""The HTTP API's input validation: bounded, strict parameters, OpenAI error objects for every failure, and a
keep-alive connection that stays usable after any of them."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from serving import chat_model_dir, serving
from tangram.control import Deployment

# prints a message's name before its content: whether `name` reaches the template shows in the prompt tokens
NAMED_TEMPLATE = ("{% for m in messages %}{% if m.name is defined %}{{ m.name }} {% endif %}"
                  "{{ m['content'] }} {% endfor %}")
STRICT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system messages') }}"
                   "{% endif %}{{ m['content'] }} {% endfor %}")


def with_template(directory, template: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    tok.chat_template = template
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("validation")
    plain = chat_model_dir(base / "plain")
    named = with_template(chat_model_dir(base / "named", seed=1), NAMED_TEMPLATE)
    strict = with_template(chat_model_dir(base / "strict", seed=2), STRICT_TEMPLATE)
    deps = [Deployment(name="tiny", checkpoint=str(plain), keep_alive_s=600),
            Deployment(name="named", checkpoint=str(named), keep_alive_s=600),
            Deployment(name="strict", checkpoint=str(strict), keep_alive_s=600)]
    with serving(deps) as srv:
        yield srv


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "code", "param"}, body
    return body["error"]


def post(http: httpx.Client, path: str, body: dict) -> httpx.Response:
    """POST `body` as ASCII JSON (a lone surrogate travels as its `\\ud800` escape, as any client sends it)."""
    return http.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})


def peer(r: httpx.Response) -> tuple:
    """The local address of the connection a response came on (the same one means it was kept alive)."""
    return r.extensions["network_stream"].get_extra_info("client_addr")


def good(http: httpx.Client) -> httpx.Response:
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": "w5", "max_tokens": 2})
    assert r.status_code == 200, r.text
    return r


COMPLETION = {"model": "tiny", "prompt": "w5", "max_tokens": 2}
BIG = 2**63


@pytest.mark.parametrize("extra,param", [
    ({"top_k": BIG}, "top_k"),
    ({"top_k": 2**31}, "top_k"),
    ({"top_k": -2}, "top_k"),
    ({"seed": 2**64}, "seed"),
    ({"seed": -1}, "seed"),
    ({"stop_token_ids": [-1]}, "stop_token_ids.0"),
    ({"stop_token_ids": [5, 2**31]}, "stop_token_ids.1"),
    ({"stop_token_ids": [BIG]}, "stop_token_ids.0"),
    ({"stop_token_ids": list(range(65))}, "stop_token_ids"),
    ({"max_tokens": 10**12}, "max_tokens"),
    ({"prompt": [5, 2**40]}, "prompt.1"),
    ({"stream": "yes"}, "stream"),
    ({"max_tokens": "4"}, "max_tokens"),
    ({"ignore_eos": "true"}, "ignore_eos"),
    ({"top_k": 2.5}, "top_k"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": False, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "a\ud800b"}, "prompt"),
    ({"stop": ["x\udfff"]}, "stop.0"),
])
def test_out_of_bounds_and_mistyped_parameters_are_400(http, extra, param):
    r = post(http, "/v1/completions", {**COMPLETION, **extra})
    err = error_of(r, 400)
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    assert peer(good(http)) == peer(r)  # the same connection serves the next request


@pytest.mark.parametrize("extra,param", [
    ({"max_completion_tokens": 10**12}, "max_completion_tokens"),
    ({"top_k": BIG, "max_tokens": 2}, "top_k"),  # the request that wedged a deployment
    ({"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]}, "messages.0.content.0.text"),
    ({"messages": [{"role": "user", "content": "w5", "name": ""}]}, "messages.0.name"),
])
def test_chat_parameters_are_bounded(http, extra, param):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], **extra}
    err = error_of(post(http, "/v1/chat/completions", body), 400)
    assert err["param"] == param, err


def test_a_lone_surrogate_and_a_huge_seed_answer_json_and_keep_the_connection(http):
    """The audit's requests, byte for byte: each got a plain-text 500 and the connection was reset."""
    raw = [b'{"model":"tiny","messages":[{"role":"user","content":"a\\ud800b"}],"max_tokens":2}',
           b'{"model":"tiny","messages":[{"role":"user","content":"Hi"}],"max_tokens":2,"temperature":1,'
           b'"seed":18446744073709551616}']
    first = None
    for body in raw:
        r = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        err = error_of(r, 400)
        assert err["param"] in ("messages.0.content", "seed"), err
        assert "connection" not in r.headers or r.headers["connection"] != "close"
        first = first or peer(r)
        assert peer(r) == first
        assert peer(good(http)) == first


def test_vllm_spellings_and_json_integers_are_accepted(http):
    for extra in ({"top_k": -1}, {"top_k": 0}, {"top_k": 2**31 - 1, "temperature": 1},
                  {"seed": 2**64 - 1, "temperature": 1}, {"temperature": 1, "top_p": 1},
                  {"stream": True, "stream_options": {"include_usage": True}}):
        r = http.post("/v1/completions", json={**COMPLETION, **extra})
        assert r.status_code == 200, (extra, r.text)
    c = openai.OpenAI(base_url=http.base_url.join("/v1").__str__(), api_key="x", max_retries=0)
    out = c.completions.create(model="tiny", prompt="w5", max_tokens=3, temperature=1, extra_body={"top_k": -1})
    assert out.usage.completion_tokens == 3


def test_unknown_routes_wrong_methods_and_unparsable_bodies_are_error_objects(http):
    err = error_of(http.get("/v1/nope"), 404)
    assert "unknown route" in err["message"] and "/v1/nope" in err["message"]
    error_of(http.post("/nowhere", json={}), 404)
    r = http.get("/v1/completions")
    err = error_of(r, 405)
    assert "GET" in err["message"] and "POST" in r.headers["allow"]
    error_of(http.delete("/v1/models"), 405)
    err = error_of(http.post("/v1/completions", content=b"{nope", headers={"content-type": "application/json"}), 400)
    assert "JSON" in err["message"]
    error_of(http.post("/v1/completions", content=b'{"model": "\xff\xfe"}',
                       headers={"content-type": "application/json"}), 400)
    error_of(http.post("/v1/completions", content=b"[1, 2]", headers={"content-type": "application/json"}), 400)
    good(http)


def test_an_unexpected_error_is_a_json_500_and_the_connection_stays(server, http, monkeypatch, caplog):
    def boom(*_a, **_k):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(server.controller, "generate", boom)
    with caplog.at_level("ERROR", logger="tangram.serve.errors"):
        r = http.post("/v1/completions", json=COMPLETION)
    err = error_of(r, 500)
    assert err["type"] == "server_error" and "RuntimeError" in err["message"]
    assert "injected failure" in caplog.text and "Traceback" in caplog.text  # logged with its traceback
    monkeypatch.undo()
    assert peer(good(http)) == peer(r)


def test_a_message_name_reaches_the_chat_template(http):
    def prompt_tokens(model: str, **msg) -> int:
        body = {"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": "w5 w6", **msg}]}
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens"]

    assert prompt_tokens("named", name="w9") == prompt_tokens("named") + 1  # the template printed the name
    assert prompt_tokens("tiny", name="w9") == prompt_tokens("tiny")  # a template without names ignores it


def test_messages_a_chat_template_rejects_are_400(http):
    body = {"model": "strict", "max_tokens": 1, "messages": [{"role": "system", "content": "w5"}]}
    r = http.post("/v1/chat/completions", json=body)
    err = error_of(r, 400)
    assert "no system messages" in err["message"] and err["param"] == "messages"
    body["messages"][0]["role"] = "user"
    ok = http.post("/v1/chat/completions", json=body)
    assert ok.status_code == 200 and peer(ok) == peer(r)
