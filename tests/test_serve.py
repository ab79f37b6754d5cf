"""The server on a loopback port through the official openai client: completions, chat, streaming, scaling."""

from __future__ import annotations

import asyncio
import time
from contextlib import contextmanager

import httpx
import openai
import pytest

from serving import chat_model_dir, serving
from tangram.control import Deployment


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return chat_model_dir(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def server(model_dir):
    with serving([Deployment(name="tiny", checkpoint=str(model_dir), keep_alive_s=600)]) as srv:
        yield srv


def client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)


def admin(srv, method: str, path: str, **kw) -> httpx.Response:
    return httpx.request(method, srv.url + path, headers={"Authorization": "Bearer test-token"}, timeout=60, **kw)


def test_models_lists_deployments(server):
    assert [m.id for m in client(server).models.list()] == ["tiny"]


def test_completions_stream_and_not_agree(server):
    c = client(server)
    whole = c.completions.create(model="tiny", prompt="w5 w17 w33", max_tokens=12, temperature=0)
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.prompt_tokens == 3 and whole.usage.completion_tokens == 12
    stages = whole.model_extra["tangram"]["stages"]
    assert stages["start"] in ("cold", "warm") and stages["ttft_s"] > 0
    chunks = list(c.completions.create(model="tiny", prompt="w5 w17 w33", max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == whole.choices[0].text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12
    finals = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals[-1].model_extra["tangram"]["stages"]["prefill_s"] > 0


def test_chat_stream_and_not_agree(server):
    c = client(server)
    msgs = [{"role": "system", "content": "w9"}, {"role": "user", "content": "w5 w17"}]
    whole = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0, stop=["w250"])
    assert whole.choices[0].message.role == "assistant"
    assert whole.usage.prompt_tokens == 3
    stream = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0, stop=["w250"],
                                       stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_two_hundred_concurrent_streams_all_complete(server):
    async def one(c: openai.AsyncOpenAI, i: int) -> tuple[str, str]:
        stream = await c.completions.create(model="tiny", prompt=f"w{5 + i % 7} w17", max_tokens=6, temperature=0,
                                            stream=True)
        text, reason = "", None
        async for ch in stream:
            text += ch.choices[0].text
            reason = ch.choices[0].finish_reason or reason
        return text, reason

    async def main():
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        return await asyncio.gather(*(one(c, i) for i in range(200)))

    results = asyncio.run(main())
    assert len(results) == 200 and all(r == "length" for _, r in results)
    by_prompt: dict[int, set[str]] = {}
    for i, (text, _) in enumerate(results):
        by_prompt.setdefault(i % 7, set()).add(text)
    assert all(len(v) == 1 for v in by_prompt.values())  # greedy: the same prompt gives the same text every time
    st = admin(server, "GET", "/admin/status").json()
    assert st["workers"][0]["kv_bytes"] == 0 and st["deployments"]["tiny"]["inflight"] == 0


def test_scale_to_zero_then_pool_hit_restart_loads_nothing(model_dir):
    dep = Deployment(name="blink", checkpoint=str(model_dir), keep_alive_s=0.3)
    with serving([dep]) as srv:
        c = client(srv)
        first = c.completions.create(model="blink", prompt="w5", max_tokens=2, temperature=0)
        assert first.model_extra["tangram"]["stages"]["start"] == "cold"
        deadline = time.monotonic() + 30
        while True:  # the deployment forgets the instance first; the worker once its stop has finished
            st = admin(srv, "GET", "/admin/status").json()
            if not st["deployments"]["blink"]["instances"] and not st["workers"][0]["instances"]:
                break
            assert time.monotonic() < deadline, "never scaled to zero"
            time.sleep(0.05)
        st = st["workers"][0]
        assert st["pool"]["retained"] > 0 and st["instances"] == []
        again = c.completions.create(model="blink", prompt="w5", max_tokens=2, temperature=0)
        stages = again.model_extra["tangram"]["stages"]
        assert stages["start"] == "pool-hit" and stages["bytes_loaded"] == 0 and stages["bytes_reused"] > 0
        assert again.choices[0].text == first.choices[0].text


def test_scale_out_under_concurrent_load(model_dir):
    dep = Deployment(name="wide", checkpoint=str(model_dir), keep_alive_s=600, max_instances=2,
                     target_concurrency=1)
    with serving([dep]) as srv:
        async def main():
            c = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
            return await asyncio.gather(*(c.completions.create(model="wide", prompt="w5 w6", max_tokens=40,
                                                                temperature=0, extra_body={"ignore_eos": True})
                                          for _ in range(6)))

        outs = asyncio.run(main())
        d = admin(srv, "GET", "/admin/status").json()["deployments"]["wide"]
    assert d["instances"] == 2 and sum(d["starts"].values()) == 2
    assert d["starts"]["pool-hit"] == 1  # the second instance re-bound the first one's tensors
    assert len({o.choices[0].text for o in outs}) == 1


def test_restart_goes_to_the_device_that_holds_the_model(model_dir, tmp_path):
    from serving import chat_model_dir

    other = chat_model_dir(tmp_path / "other", seed=5)
    deps = [Deployment(name="a", checkpoint=str(model_dir), keep_alive_s=0.5),
            Deployment(name="b", checkpoint=str(other), keep_alive_s=0.5)]
    with serving(deps, cpu_devices=2) as srv:
        c = client(srv)

        def where(name: str) -> str:  # from the start log: a 0.5 s keep-alive may have stopped it already
            starts = admin(srv, "GET", "/admin/pool-map").json()["starts"]
            return [s["worker"] for s in starts if s["deployment"] == name][-1]

        def gone() -> None:
            deadline = time.monotonic() + 30
            while any(w["instances"] for w in admin(srv, "GET", "/admin/status").json()["workers"]):
                assert time.monotonic() < deadline
                time.sleep(0.05)

        assert c.completions.create(model="a", prompt="w5", max_tokens=2).model_extra["tangram"]["stages"]["start"] == "cold"
        first = where("a")
        gone()
        c.completions.create(model="b", prompt="w5", max_tokens=2)
        b_at = where("b")
        gone()
        again = c.completions.create(model="a", prompt="w5", max_tokens=2).model_extra["tangram"]["stages"]
        assert where("a") == first and again["start"] == "pool-hit" and again["bytes_loaded"] == 0
        workers = [w["worker"] for w in admin(srv, "GET", "/admin/status").json()["workers"]]
    assert len(workers) == 2 and b_at in workers


@contextmanager
def two_models_room_for_one(model_dir, other_dir):
    """A server with deployments "a" and "b" and a pool with room for one of them at a time (and KV)."""
    deps = [Deployment(name="a", checkpoint=str(model_dir), keep_alive_s=600),
            Deployment(name="b", checkpoint=str(other_dir), keep_alive_s=600)]
    with serving(deps, pool_bytes=64 << 20) as probe:
        sizes = [d["bytes"] for d in admin(probe, "GET", "/admin/deployments").json()["deployments"]]
    with serving(deps, pool_bytes=int(max(sizes) * 1.6)) as srv:
        yield srv


def test_a_full_pool_stops_idle_instances_instead_of_failing(model_dir, tmp_path):
    from serving import chat_model_dir

    with two_models_room_for_one(model_dir, chat_model_dir(tmp_path / "other2", seed=6)) as srv:
        c = client(srv)
        assert c.completions.create(model="a", prompt="w5", max_tokens=2).usage.completion_tokens == 2
        b = c.completions.create(model="b", prompt="w5", max_tokens=2)  # a is idle: stopped to make room
        assert b.usage.completion_tokens == 2
        st = admin(srv, "GET", "/admin/status").json()["deployments"]
        assert st["a"]["instances"] == 0 and st["b"]["instances"] == 1
        assert c.completions.create(model="a", prompt="w5", max_tokens=2).usage.completion_tokens == 2


def test_a_start_waiting_for_room_drains_an_instance_that_never_goes_idle(model_dir, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from serving import chat_model_dir

    with two_models_room_for_one(model_dir, chat_model_dir(tmp_path / "other3", seed=7)) as srv:
        srv.controller.room_recheck_s = 60.0  # only the events (a drained instance stopping) may wake b's start
        c = client(srv)
        stream_done: list[float] = []

        def busy_a(n: int) -> list[str]:  # back-to-back requests from 3 threads: "a" is never idle for long
            reasons = [c.completions.create(model="a", prompt="w5 w6", max_tokens=32).choices[0].finish_reason
                       for _ in range(n)]
            stream_done.append(time.perf_counter())
            return reasons

        c.completions.create(model="a", prompt="w5", max_tokens=1)
        with ThreadPoolExecutor(3) as pool:
            streams = [pool.submit(busy_a, 40) for _ in range(3)]  # seconds of work, even on a fast engine
            time.sleep(0.3)
            b = c.completions.create(model="b", prompt="w5", max_tokens=2)
            b_done = time.perf_counter()
            reasons = [r for s in streams for r in s.result()]
        assert b.usage.completion_tokens == 2
        assert b_done < min(stream_done)  # b did not wait for "a"'s stream to end
        assert len(reasons) == 120 and set(reasons) <= {"length", "stop"}  # every request of "a" completed
        starts = admin(srv, "GET", "/admin/deployments").json()["deployments"]
        a = next(d for d in starts if d["name"] == "a")
        assert sum(a["starts"].values()) >= 2  # drained, stopped, and started again


def test_deploying_warms_every_worker_for_the_model_before_traffic(tmp_path):
    import shutil
    from pathlib import Path

    from serving import chat_model_dir
    from tangram.engine.skeleton import RUNTIME
    from tangram.templates import load_template

    src = chat_model_dir(tmp_path / "src", seed=8)
    with serving([Deployment(name="m", checkpoint=str(src))]) as srv:  # the first run records the template
        client(srv).completions.create(model="m", prompt="w5 w6", max_tokens=1)
        resolved = Path(admin(srv, "GET", "/admin/deployments").json()["deployments"][0]["resolved_checkpoint"])
    assert load_template(resolved) is not None
    fresh = tmp_path / "fresh"
    shutil.copytree(resolved, fresh)
    with serving([Deployment(name="m", checkpoint=str(fresh))]):
        kept = RUNTIME.skeletons(fresh)
        assert len(kept) == 1 and all(p.is_meta for p in kept[0].parameters())  # before any request


def test_an_instance_whose_weights_fail_to_load_is_replaced_and_the_request_retried(tmp_path, monkeypatch):
    from pathlib import Path

    from serving import chat_model_dir
    from tangram.engine import EngineConfig
    from tangram.serve import server as server_mod
    from tangram.store import Loader

    src = chat_model_dir(tmp_path / "src", seed=9)
    dep = Deployment(name="m", checkpoint=str(src), engine=EngineConfig(overlap="on"))
    with serving([dep]) as srv:  # the first run records the template
        client(srv).completions.create(model="m", prompt="w5 w6", max_tokens=1)
        resolved = admin(srv, "GET", "/admin/deployments").json()["deployments"][0]["resolved_checkpoint"]

    class FailsOnce(Loader):
        """The first load fails once the instance is up (its first forward then waits on missing weights)."""

        def __init__(self, **_) -> None:  # the server's loader (built with its pools: see `install`)
            super().__init__(method="pread", threads=1)
            self.worker, self.calls = None, 0

        def load_into(self, ckpt, dests, *, landed=None, **kw):
            self.calls += 1
            if self.calls > 1:
                return super().load_into(ckpt, dests, landed=landed, **kw)

            def failing(name: str) -> None:
                if "layers.1" in name:
                    deadline = time.monotonic() + 30
                    while not (self.worker and self.worker.replicas) and time.monotonic() < deadline:
                        time.sleep(0.005)
                    raise OSError("disk went away")
                landed(name)

            return super().load_into(ckpt, dests, landed=failing, **kw)

    dep = Deployment(name="m", checkpoint=str(Path(resolved)), engine=EngineConfig(overlap="on"))
    def install(kind: type[FailsOnce]) -> list[FailsOnce]:
        made: list[FailsOnce] = []
        monkeypatch.setattr(server_mod, "Loader", lambda **kw: made.append(kind(**kw)) or made[-1])
        return made

    made = install(FailsOnce)
    with serving([dep]) as srv:  # a fresh pool: the start loads from disk, in the background
        worker = srv.workers[0]
        loader = made[0]
        loader.worker = worker
        out = client(srv).completions.create(model="m", prompt="w5 w6", max_tokens=3)
        assert out.usage.completion_tokens == 3 and loader.calls == 2  # retried on a fresh instance
        st = admin(srv, "GET", "/admin/status").json()["deployments"]["m"]
        assert st["instances"] == 1  # the broken one was stopped
        assert client(srv).completions.create(model="m", prompt="w5", max_tokens=2).usage.completion_tokens == 2

    class AlwaysFails(FailsOnce):
        def load_into(self, ckpt, dests, *, landed=None, **kw):
            self.calls = 0
            return super().load_into(ckpt, dests, landed=landed, **kw)

    made = install(AlwaysFails)
    with serving([dep]) as srv:  # the retry fails too: a clear 503, and nothing left running
        worker = srv.workers[0]
        made[0].worker = worker
        with pytest.raises(openai.APIStatusError) as ei:
            client(srv).completions.create(model="m", prompt="w5 w6", max_tokens=3)
        assert ei.value.status_code == 503 and "disk went away" in ei.value.message
        deadline = time.monotonic() + 10
        while worker.replicas and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not worker.replicas and worker.pool.snapshot()["totals"]["active"] == 0


def test_a_start_on_the_only_device_asks_it_for_no_placement_state(model_dir, monkeypatch):
    from tangram.worker.worker import Worker

    def asked(*args, **kwargs):
        raise AssertionError("a single candidate device was asked for its placement state")

    monkeypatch.setattr(Worker, "placement_state", asked)
    with serving([Deployment(name="a", checkpoint=str(model_dir))]) as srv:  # one device: nothing to choose
        out = client(srv).completions.create(model="a", prompt="w5", max_tokens=2)
    assert out.usage.completion_tokens == 2 and out.model_extra["tangram"]["stages"]["start"] == "cold"
