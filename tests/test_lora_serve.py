"""Adapters through the HTTP API: deploy (admin API and config file), /v1/models with `parent`, requests that
name an adapter in `model` equal PEFT + transformers generate, alone and mixed with other adapters and the base;
bad adapters, wrong bases and unknown names fail clearly and affect nothing else."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import engine_model, tiny_config
from lora_util import make_adapter, peft_greedy
from serving import chat_model_dir, serving
from tangram.control import Deployment

pytest.importorskip("peft")
TOKENS = 10
# token ids: the Qwen2 tokenizer class transformers picks for a qwen2 directory does not split the tiny
# word-level vocabulary's text
PROMPTS = [[5, 17, 33, 9], [40, 41], [3, 200, 150, 90, 12, 11], [8, 9, 10]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora-serve")
    bases = {arch: chat_model_dir(tmp / arch, arch) for arch in ("llama", "qwen2")}
    models = {arch: engine_model(arch) for arch in bases}  # the same weights chat_model_dir saved
    adapters = {f"{arch}-a{i}": (arch, make_adapter(models[arch], tmp / f"{arch}-peft-{i}", seed=10 + i,
                                                     r=2 + 2 * i, alpha=8))
                for arch in bases for i in range(2)}
    deployments = [Deployment(name=arch, checkpoint=str(d), keep_alive_s=600) for arch, d in bases.items()]
    deployments.append(Deployment(name="llama-a0", adapter=str(adapters["llama-a0"][1]), base="llama"))  # config file
    with serving(deployments) as srv:
        for name, (arch, path) in adapters.items():
            if name != "llama-a0":
                r = admin(srv, "POST", "/admin/deployments", json={"name": name, "adapter": str(path), "base": arch})
                assert r.status_code == 200, r.text
        yield srv, bases, models, adapters, tmp


def admin(srv, method: str, path: str, **kw) -> httpx.Response:
    return httpx.request(method, srv.url + path, headers={"Authorization": "Bearer test-token"}, timeout=120, **kw)


def expected(setup, model: str, prompt: list[int]) -> str:
    _, bases, models, adapters, _ = setup
    arch, adapter = adapters[model] if model in adapters else (model, None)
    return AutoTokenizer.from_pretrained(bases[arch]).decode(peft_greedy(models[arch], adapter, prompt, TOKENS))


def test_models_lists_adapters_with_their_parent(setup):
    srv = setup[0]
    listed = httpx.get(srv.url + "/v1/models").json()["data"]
    assert {m["id"]: m["parent"] for m in listed} == {"llama": None, "qwen2": None, "llama-a0": "llama",
                                                       "llama-a1": "llama", "qwen2-a0": "qwen2", "qwen2-a1": "qwen2"}
    d = admin(srv, "GET", "/admin/deployments").json()["deployments"]
    a1 = next(x for x in d if x["name"] == "llama-a1")
    assert a1["parent"] == "llama" and a1["rank"] == 4 and a1["modules"] == 6


def test_adapter_requests_alone_equal_peft(setup):
    c = openai.OpenAI(base_url=setup[0].url + "/v1", api_key="unused", max_retries=0)
    for model in ("llama-a1", "qwen2-a0"):
        out = c.completions.create(model=model, prompt=PROMPTS[0], max_tokens=TOKENS, temperature=0)
        assert out.choices[0].text == expected(setup, model, PROMPTS[0])
        assert out.model == model
    base = c.completions.create(model="llama", prompt=PROMPTS[0], max_tokens=TOKENS, temperature=0)
    assert base.choices[0].text == expected(setup, "llama", PROMPTS[0]) != expected(setup, "llama-a1", PROMPTS[0])


def test_mixed_batch_of_adapters_and_bases_equals_peft(setup):
    srv = setup[0]
    jobs = [(m, p) for m in ("llama", "llama-a0", "llama-a1", "qwen2", "qwen2-a0", "qwen2-a1") for p in PROMPTS[:2]]

    async def run() -> list[str]:
        c = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        outs = await asyncio.gather(*(c.completions.create(model=m, prompt=p, max_tokens=TOKENS, temperature=0)
                                      for m, p in jobs))
        return [o.choices[0].text for o in outs]

    assert asyncio.run(run()) == [expected(setup, m, p) for m, p in jobs]


def test_bad_adapters_are_refused_at_deploy(setup):
    srv, _, models, _, tmp = setup
    r = admin(srv, "POST", "/admin/deployments", json={"name": "x", "adapter": str(tmp / "nowhere"), "base": "llama"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "adapter"
    r = admin(srv, "POST", "/admin/deployments", json={"name": "x", "adapter": str(tmp / "llama-peft-0"),
                                                        "base": "mistral"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "base" and "does not exist" in r.text
    config = tiny_config("llama")
    config.intermediate_size = 48
    other = make_adapter(AutoModelForCausalLM.from_config(config), tmp / "other-peft", seed=1, targets=["up_proj"])
    r = admin(srv, "POST", "/admin/deployments", json={"name": "x", "adapter": str(other), "base": "llama"})
    assert r.status_code == 400 and "another base model" in r.text
    dora = make_adapter(models["llama"], tmp / "dora-peft", seed=1, use_dora=True)
    r = admin(srv, "POST", "/admin/deployments", json={"name": "x", "adapter": str(dora), "base": "llama"})
    assert r.status_code == 400 and "DoRA" in r.text
    broken = make_adapter(models["llama"], tmp / "broken-peft", seed=1)
    (broken / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": "many"}))
    r = admin(srv, "POST", "/admin/deployments", json={"name": "x", "adapter": str(broken), "base": "llama"})
    assert r.status_code == 400 and "adapter config" in r.text
    r = admin(srv, "POST", "/admin/deployments", json={"name": "llama", "adapter": str(tmp / "llama-peft-0"),
                                                        "base": "qwen2"})
    assert r.status_code == 400 and "already deployed" in r.text
    assert "x" not in [m["id"] for m in httpx.get(srv.url + "/v1/models").json()["data"]]


def test_unknown_adapter_name_is_a_404_and_others_go_on(setup):
    c = openai.OpenAI(base_url=setup[0].url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.completions.create(model="llama-a9", prompt=PROMPTS[1], max_tokens=TOKENS, temperature=0)
    out = c.completions.create(model="qwen2-a1", prompt=PROMPTS[1], max_tokens=TOKENS, temperature=0)
    assert out.choices[0].text == expected(setup, "qwen2-a1", PROMPTS[1])


def test_removing_an_adapter_keeps_its_base(setup):
    srv, _, _, adapters, _ = setup
    r = admin(srv, "POST", "/admin/deployments", json={"name": "tmp-a", "adapter": str(adapters["qwen2-a0"][1]),
                                                        "base": "qwen2"})
    assert r.status_code == 200
    assert admin(srv, "DELETE", "/admin/deployments/tmp-a").status_code == 200
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="tmp-a", prompt=PROMPTS[1], max_tokens=2)
    assert c.completions.create(model="qwen2", prompt=PROMPTS[1], max_tokens=2).usage.completion_tokens == 2
