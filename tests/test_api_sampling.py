"""The sampling breadth of the OpenAI API through the official client: penalties, min_p, logit_bias,
logprobs (chat and completions, whole and streamed), echo with prompt logprobs, n > 1 choices; values
against references from the tiny model's own logits."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from conftest import engine_model, reference_greedy
from serving import chat_model_dir, serving
from tangram.control import Deployment
from tangram.engine import SamplingParams
from test_engine_sampling import raw_logits, reference_processed_greedy

PROMPT = [5, 17, 33, 9, 60, 7, 101]
TEXT = " ".join(f"w{t}" for t in PROMPT)


@pytest.fixture(scope="module")
def model():
    return engine_model("llama", 0)  # the weights chat_model_dir saves


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = chat_model_dir(tmp_path_factory.mktemp("api") / "tiny")
    with serving([Deployment(name="tiny", checkpoint=str(d), keep_alive_s=600)]) as srv:
        yield srv


def client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)


def word(t: int) -> str:
    return {0: "<unk>", 1: "<s>", 2: "</s>"}.get(t, f"w{t}")


def test_penalties_and_bias_through_the_api_equal_the_reference(server, model):
    c = client(server)
    cases = [({"presence_penalty": 0.5, "frequency_penalty": 1.5}, SamplingParams(presence_penalty=0.5,
                                                                                     frequency_penalty=1.5)),
             ({"extra_body": {"repetition_penalty": 1.8}}, SamplingParams(repetition_penalty=1.8)),
             ({"logit_bias": {"203": -100, "111": 2.5}}, SamplingParams(logit_bias={203: -100.0, 111: 2.5}))]
    plain = reference_greedy(model, PROMPT, 12)
    for kw, p in cases:
        extra = kw.pop("extra_body", {})
        out = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, logprobs=0,
                                   extra_body={"ignore_eos": True, **extra}, **kw)
        want = reference_processed_greedy(model, PROMPT, p, 12)
        assert want != plain
        assert out.choices[0].logprobs.tokens == [word(t) for t in want]


def test_min_p_one_is_greedy_at_any_temperature(server, model):
    out = client(server).completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=2.0, seed=1,
                                            logprobs=0, extra_body={"min_p": 1.0, "ignore_eos": True})
    assert out.choices[0].logprobs.tokens == [word(t) for t in reference_greedy(model, PROMPT, 8)]


def test_chat_logprobs_whole_and_streamed(server, model):
    c = client(server)
    msgs = [{"role": "user", "content": "w5 w17"}]  # the template renders "w5 w17 ": ids 5, 17
    whole = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0, logprobs=True,
                                      top_logprobs=3, extra_body={"ignore_eos": True})
    content = whole.choices[0].logprobs.content
    ids = reference_greedy(model, [5, 17], 6)
    lp = torch.log_softmax(raw_logits(model, [5, 17] + ids), -1)[1:-1]
    assert [e.token for e in content] == [word(t) for t in ids]
    for j, e in enumerate(content):
        assert e.logprob == pytest.approx(lp[j, ids[j]].item(), abs=1e-4)
        assert e.bytes == list(e.token.encode())
        top = lp[j].topk(3)
        assert [t.token for t in e.top_logprobs] == [word(t) for t in top.indices.tolist()]
        assert [t.logprob for t in e.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
    chunks = list(c.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0,
                                            logprobs=True, top_logprobs=3, stream=True,
                                            extra_body={"ignore_eos": True}))
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]
    plain = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_and_text_offsets(server, model):
    c = client(server)
    out = c.completions.create(model="tiny", prompt=TEXT, max_tokens=5, temperature=0, logprobs=2,
                               extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    ids = reference_greedy(model, PROMPT, 5)
    ref = torch.log_softmax(raw_logits(model, PROMPT + ids), -1)[len(PROMPT) - 1:-1]
    assert lp.tokens == [word(t) for t in ids]
    assert lp.token_logprobs == pytest.approx([ref[j, t].item() for j, t in enumerate(ids)], abs=1e-4)
    assert all(len(top) in (2, 3) and lp.tokens[j] in top for j, top in enumerate(lp.top_logprobs))
    offsets = [sum(len(t) for t in lp.tokens[:j]) for j in range(len(ids))]
    assert lp.text_offset == offsets
    chunks = list(c.completions.create(model="tiny", prompt=TEXT, max_tokens=5, temperature=0, logprobs=2,
                                       stream=True, extra_body={"ignore_eos": True}))
    parts = [ch.choices[0].logprobs for ch in chunks if ch.choices and ch.choices[0].logprobs]
    assert [t for p in parts for t in p.tokens] == lp.tokens
    assert [o for p in parts for o in p.text_offset] == offsets


@pytest.mark.parametrize("max_tokens", [0, 1])
@pytest.mark.parametrize("prompt", [TEXT, PROMPT])
def test_echo_scores_the_prompt(server, model, max_tokens, prompt):
    """What evaluation harnesses send: echo, logprobs, max_tokens 0 or 1."""
    out = client(server).completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                            echo=True, logprobs=1)
    ch = out.choices[0]
    lp = ch.logprobs
    n = len(PROMPT)
    ref = torch.log_softmax(raw_logits(model, PROMPT), -1)
    assert lp.tokens[:n] == [word(t) for t in PROMPT]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:n] == pytest.approx([ref[j - 1, PROMPT[j]].item() for j in range(1, n)], abs=1e-4)
    assert len(lp.tokens) == n + max_tokens and out.usage.completion_tokens == max_tokens
    assert ch.text.startswith("w5 w17 w33 w9 w60 w7 w101")
    assert ch.finish_reason == "length"


def test_echo_streamed_starts_with_the_prompt(server):
    chunks = list(client(server).completions.create(model="tiny", prompt=TEXT, max_tokens=2, temperature=0,
                                                    echo=True, stream=True, extra_body={"ignore_eos": True}))
    texts = [ch.choices[0].text for ch in chunks if ch.choices]
    assert texts[0] == TEXT and len("".join(texts)) > len(TEXT)


def test_n_choices_whole_and_streamed(server, model):
    c = client(server)
    ref = reference_greedy(model, PROMPT, 5)
    whole = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0, n=3, logprobs=0,
                                 extra_body={"ignore_eos": True})
    assert [ch.index for ch in whole.choices] == [0, 1, 2]
    assert all(ch.logprobs.tokens == [word(t) for t in ref] for ch in whole.choices)
    assert whole.usage.completion_tokens == 15 and whole.usage.prompt_tokens == len(PROMPT)
    sampled = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=3, n=4,
                                   extra_body={"ignore_eos": True})
    assert len({ch.text for ch in sampled.choices}) > 1
    chunks = list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": TEXT}],
                                            max_tokens=8, temperature=1.0, seed=3, n=4, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    texts = {i: "" for i in range(4)}
    reasons = {}
    for ch in chunks:
        for choice in ch.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    assert reasons == {i: "length" for i in range(4)}
    assert chunks[-1].usage.completion_tokens == 32
    whole_chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": TEXT}],
                                           max_tokens=8, temperature=1.0, seed=3, n=4,
                                           extra_body={"ignore_eos": True})
    assert [ch.message.content for ch in whole_chat.choices] == [texts[i] for i in range(4)]


def test_logit_bias_outside_the_vocabulary_is_400_naming_it(server):
    r = httpx.post(server.url + "/v1/completions", timeout=60,
                   json={"model": "tiny", "prompt": "w5", "logit_bias": {"999": 1}})
    assert r.status_code == 400 and "logit_bias" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "w5"}],
                                               top_logprobs=2)
