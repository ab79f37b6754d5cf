"""vLLM's utility endpoints: GET /v1/models/{id}, POST /tokenize and /detokenize, GET /version; tokenizing
agrees with what the engine counts and runs off the event loop."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

import tangram
from serving import chat_model_dir, serving
from tangram.control import Deployment
from tangram.serve import extras


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = chat_model_dir(tmp_path_factory.mktemp("extras") / "tiny")
    with serving([Deployment(name="tiny", checkpoint=str(d), keep_alive_s=600)]) as srv:
        yield srv


def post(srv, path: str, body: dict) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, timeout=60)


def test_one_model(server):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    m = c.models.retrieve("tiny")
    assert m.id == "tiny" and m.object == "model" and m.model_extra["max_model_len"] == 64
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("nope")
    assert httpx.get(server.url + "/v1/models/nope", timeout=10).json()["error"]["code"] == "model_not_found"


def test_tokenize_counts_what_the_engine_counts(server):
    got = post(server, "/tokenize", {"model": "tiny", "prompt": "w5 w17 w33", "return_token_strs": True}).json()
    assert got == {"count": 3, "max_model_len": 64, "tokens": [5, 17, 33], "token_strs": ["w5", "w17", "w33"]}
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    msgs = [{"role": "system", "content": "w9"}, {"role": "user", "content": "w5 w17"}]
    chat = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=1)
    tok = post(server, "/tokenize", {"model": "tiny", "messages": msgs}).json()
    assert tok["count"] == chat.usage.prompt_tokens == 3 and tok["tokens"] == [9, 5, 17] and tok["token_strs"] is None


def test_detokenize_and_version(server):
    assert post(server, "/detokenize", {"model": "tiny", "tokens": [5, 17]}).json() == {"prompt": "w5 w17"}
    assert httpx.get(server.url + "/version", timeout=10).json() == {"version": tangram.__version__}


@pytest.mark.parametrize("path,body,needle", [
    ("/tokenize", {"model": "tiny"}, "exactly one"),
    ("/tokenize", {"model": "tiny", "prompt": "w5", "messages": [{"role": "user", "content": "w5"}]}, "exactly one"),
    ("/tokenize", {"model": "tiny", "prompt": "w5", "surprise": 1}, "surprise"),
    ("/detokenize", {"model": "tiny", "tokens": [5, 9999]}, "tokens"),
    ("/detokenize", {"model": "tiny", "tokens": [-1]}, "tokens"),
])
def test_bad_bodies_are_400(server, path, body, needle):
    r = post(server, path, body)
    assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
    assert post(server, path, {**body, "model": "nope"}).status_code in (400, 404)


def test_tokenizing_runs_off_the_event_loop(server, monkeypatch):
    entered, release = threading.Event(), threading.Event()
    real = extras.tokenize

    def gated(tokenizer, body):
        entered.set()
        release.wait(30)
        return real(tokenizer, body)

    monkeypatch.setattr(extras, "tokenize", gated)
    out: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: out.append(post(server, "/tokenize", {"model": "tiny", "prompt": "w5"})))
    sender.start()
    try:
        assert entered.wait(30)
        assert httpx.get(server.url + "/health", timeout=10).json() == {"status": "ok"}  # the loop is free
    finally:
        release.set()
        sender.join(30)
    assert out[0].json()["tokens"] == [5]


def test_an_idle_connection_outlives_the_clients_pool_expiry(server):
    """httpx (and the openai client) retire a pooled connection after 5 s idle: the server keeps it longer, so
    the client always closes first and never sends a request on a connection the server is closing."""
    from tangram.serve.server import HTTP_KEEP_ALIVE_S

    assert HTTP_KEEP_ALIVE_S > httpx.Limits().keepalive_expiry
    ports = []
    with httpx.Client(limits=httpx.Limits(keepalive_expiry=60)) as c:
        for _ in range(2):
            r = c.get(server.url + "/v1/models")
            assert r.status_code == 200
            ports.append(r.extensions["network_stream"].get_extra_info("client_addr")[1])
            threading.Event().wait(6.0)  # idle past uvicorn's default 5 s keep-alive
        assert c.get(server.url + "/v1/models").status_code == 200
    assert ports[0] == ports[1]  # the same connection: the server had not closed it
