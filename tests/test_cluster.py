"""Cluster mode on a local Ray cluster on loopback: two logical nodes, worker actors, the openai client.

One module-scoped Ray cluster (two nodes, 127.0.0.1 only) and one server in
cluster mode on it: two logical CPU devices per node (four worker actors) and a
host DRAM cache per node (a `NodeCache` actor each).
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import httpx
import openai
import pytest

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported: keeps every listener on loopback
pytest.importorskip("ray")

import ray  # noqa: E402
from ray._private import ray_constants  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from conftest import save_hf_dir  # noqa: E402
from tangram.control import Deployment, ServeConfig  # noqa: E402
from tangram.engine import RequestOutput, SamplingParams  # noqa: E402
from tangram.serve import Server  # noqa: E402

pytestmark = pytest.mark.ray
NODE = dict(num_cpus=1, object_store_memory=96 << 20, node_ip_address="127.0.0.1")


def llama_dir(directory, hidden: int, context: int = 64, seed: int = 0):
    """A tiny llama (random weights, word-level tokenizer). Models of different widths share no tensor."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                         initializer_range=0.5)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = None
    return save_hf_dir(model, directory)


@pytest.fixture(scope="module")
def ray_cluster():
    ray_constants.ENABLE_RAY_CLUSTER = False  # in case something imported Ray before the variable was set
    cluster = Cluster(initialize_head=True, head_node_args=dict(include_dashboard=False, **NODE))
    cluster.add_node(**NODE)
    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    models = {"a": llama_dir(root / "a", 32), "b": llama_dir(root / "b", 48), "c": llama_dir(root / "c", 24),
              "long": llama_dir(root / "long", 16, context=4096)}
    deps = [Deployment(name=n, checkpoint=str(d), keep_alive_s=600 if n == "long" else 0.5) for n, d in models.items()]
    cfg = ServeConfig(port=0, pool_capacity=128 << 20, admin_token="test-token", deployments=deps, cpu_devices=2,
                      host_cache_bytes=32 << 20)
    with Server(cfg, ray_address=ray_cluster.address).running() as srv:
        yield srv


def client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def status(srv) -> dict:
    return httpx.get(srv.url + "/admin/status", headers={"Authorization": "Bearer test-token"}, timeout=60).json()


def holder(srv, name: str) -> dict:
    """The status entry of the worker running `name`."""
    return next(w for w in status(srv)["workers"] for i in w["instances"] if i["deployment"] == name)


def started_on(srv, name: str) -> dict:
    """The status entry of the worker that `name`'s last start went to: read from the start log, since an
    instance with a short keep-alive may already have stopped when its status is asked for."""
    starts = httpx.get(srv.url + "/admin/pool-map", headers={"Authorization": "Bearer test-token"},
                       timeout=60).json()["starts"]
    worker = [s["worker"] for s in starts if s["deployment"] == name][-1]
    return next(w for w in status(srv)["workers"] if w["worker"] == worker)


def instance_of(worker: dict, name: str) -> dict:
    """The status entry of `name`'s instance on a worker (another deployment's may share the worker)."""
    return next(i for i in worker["instances"] if i["deployment"] == name)


def wait_instances(srv, name: str, n: int) -> None:
    deadline = time.monotonic() + 30
    while status(srv)["deployments"][name]["instances"] != n:
        assert time.monotonic() < deadline, f"{name} never reached {n} instance(s)"
        time.sleep(0.05)


def test_workers_are_actors_on_both_nodes(server):
    workers = status(server)["workers"]
    assert [w["node"] for w in workers] == [0, 0, 1, 1]
    assert len({w["ray_node"] for w in workers}) == 2
    infos = ray.get([w.actor.ready.remote() for w in server.workers])
    assert [i["ray_node"] for i in infos] == [w["ray_node"] for w in workers]
    assert len({i["pid"] for i in infos} | {os.getpid()}) == 5  # four actor processes besides the head
    assert [i["compute_threads"] for i in infos] == [1] * 4  # one Ray CPU per node, two devices: one thread each


def test_cpu_workers_split_their_nodes_cpus_between_them():
    from tangram.cluster.placement import NodeDevices

    def threads(gpus: int, devices: int, cpus: int) -> int | None:
        return NodeDevices("n", "127.0.0.1", gpus, devices, cpus).compute_threads

    assert threads(0, 1, 16) == 16 and threads(0, 2, 16) == 8 and threads(0, 3, 16) == 5
    assert threads(0, 4, 2) == 1  # never none
    assert threads(1, 0, 16) is None and threads(0, 1, 0) is None  # GPU workers, or no CPU figure: unchanged


def test_restart_goes_to_the_node_and_device_that_hold_the_model(server):
    c = client(server)
    placed, outs = {}, {}
    for name in ("b", "c", "a"):  # each cold start goes to the emptiest device: b, c fill node 0, a lands on node 1
        out = c.completions.create(model=name, prompt="w5 w6", max_tokens=4, temperature=0)
        assert out.model_extra["tangram"]["stages"]["start"] == "cold"
        placed[name], outs[name] = started_on(server, name), out
        wait_instances(server, name, 0)
    assert [placed[n]["worker"] for n in ("b", "c", "a")] == ["cpu#0@node0", "cpu#1@node0", "cpu#2@node1"]
    a_at = placed["a"]
    st = {w["worker"]: w for w in status(server)["workers"]}
    assert st[a_at["worker"]]["pool"]["retained"] > 0 and not st[a_at["worker"]]["instances"]
    assert st["cpu#3@node1"]["pool"]["free"] > st[a_at["worker"]]["pool"]["free"]  # emptier, yet not chosen:

    again = c.completions.create(model="a", prompt="w5 w6", max_tokens=4, temperature=0)
    stages = again.model_extra["tangram"]["stages"]
    now = started_on(server, "a")
    assert (now["worker"], now["node"], now["ray_node"]) == (a_at["worker"], 1, a_at["ray_node"])
    assert stages["start"] == "pool-hit" and stages["bytes_loaded"] == 0 and stages["bytes_reused"] > 0
    assert again.choices[0].text == outs["a"].choices[0].text
    streamed = c.completions.create(model="a", prompt="w5 w6", max_tokens=4, temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == outs["a"].choices[0].text


def test_a_device_of_the_same_node_starts_from_the_node_dram_cache(server):
    """Workers of one node share its cache: a start on the other device of the node loads from DRAM."""
    c = client(server)
    c.completions.create(model="b", prompt="w5", max_tokens=2)  # b is loaded (its first start cached it)
    holder_w = next(w for w in server.workers if w.name == started_on(server, "b")["worker"])
    for w in server.workers:
        asyncio.run(w.wait_cache_idle())
    checkpoint = server.controller.describe("b")["resolved_checkpoint"]
    engine = server.controller._get("b").spec.engine
    sibling = next(w for w in server.workers if w.node == holder_w.node and w is not holder_w)
    elsewhere = next(w for w in server.workers
                     if w.node != holder_w.node and not asyncio.run(w.status())["instances"])
    st = {w["worker"]: w for w in status(server)["workers"]}
    assert st[sibling.name]["host_cache"]["used"] > 0

    async def start_and_ask(worker, expected: str) -> None:
        arrival = time.perf_counter()  # a request that waited for this start, as the controller does it
        replica = await worker.start("b-copy", checkpoint, engine, arrival)
        try:  # the worker handle straight, no HTTP: outputs come back through the Ray stream
            outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
            await worker.submit(replica, "w5", SamplingParams(max_tokens=3), outputs.put_nowait, arrival=arrival)
            first = await asyncio.wait_for(outputs.get(), 60)
            rest = [await asyncio.wait_for(outputs.get(), 60)]
            while not rest[-1].finished:
                rest.append(await asyncio.wait_for(outputs.get(), 60))
            assert first.stages.start == expected and first.stages.bytes_loaded > 0
            assert rest[-1].completion_tokens == 3 and rest[-1].finish_reason == "length"
        finally:
            await worker.stop(replica)

    for worker, expected in ((sibling, "dram"), (elsewhere, "cold")):
        asyncio.run(start_and_ask(worker, expected))


def test_client_disconnect_aborts_on_the_actor_and_frees_kv(server):
    body = {"model": "long", "prompt": "w5 w6", "max_tokens": 4000, "stream": True, "ignore_eos": True,
            "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        busy = holder(server, "long")
        assert busy["kv_bytes"] > 0 and instance_of(busy, "long")["inflight"] == 1
    deadline = time.monotonic() + 20
    while True:  # the engine on the actor notices the abort at its next step
        w = holder(server, "long")
        if w["kv_bytes"] == 0 and instance_of(w, "long")["inflight"] == 0:
            break
        assert time.monotonic() < deadline, w
        time.sleep(0.05)
    assert instance_of(w, "long")["finished"] == {"abort": 1}  # aborted, not run to its 4000 tokens
    assert status(server)["deployments"]["long"]["inflight"] == 0
    ok = client(server).completions.create(model="long", prompt="w5", max_tokens=3, temperature=0)
    assert ok.choices[0].finish_reason == "length"


def ready(actor) -> dict:
    """The actor's `ready()`, once it answers (a restarting actor refuses calls for a moment)."""
    deadline = time.monotonic() + 120
    while True:
        try:
            return ray.get(actor.ready.remote(), timeout=60)
        except ray.exceptions.RayActorError:
            assert time.monotonic() < deadline, "the actor was not restarted"
            time.sleep(0.2)


def test_an_actor_killed_mid_stream_fails_its_request_and_is_restarted(server):
    """Last in this module: it kills a worker actor. Ray restarts it (empty pool); the request it streamed
    ends with a clear error, the other workers keep their instances, and the deployment serves again."""
    c = client(server)
    c.completions.create(model="a", prompt="w5", max_tokens=2)
    body = {"model": "long", "prompt": "w5 w6", "max_tokens": 4000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # streaming: it has output, so it is not retried
        victim = holder(server, "long")["worker"]
        pids = {w.name: ray.get(w.actor.ready.remote(), timeout=60)["pid"] for w in server.workers}
        actor = next(w for w in server.workers if w.name == victim).actor
        ray.kill(actor, no_restart=False)
        rest = [line for line in lines if line.startswith("data: {")]
    final = json.loads(rest[-1].removeprefix("data: "))
    assert final["choices"][0]["finish_reason"] is None  # not a normal end: the error is in the extension
    assert "the worker actor failed" in rest[-1]
    after = {w.name: ready(w.actor)["pid"] for w in server.workers}
    assert after[victim] != pids[victim]  # restarted by Ray, in a new process
    assert {n: p for n, p in after.items() if n != victim} == {n: p for n, p in pids.items() if n != victim}
    assert len(status(server)["workers"]) == len(server.workers)  # the other workers are untouched
    again = c.completions.create(model="long", prompt="w5", max_tokens=3)  # the broken instance is replaced
    assert again.choices[0].finish_reason == "length"
    # a request sent to an instance whose actor just died has no output yet: it is retried once, elsewhere
    holder_name = holder(server, "long")["worker"]
    ray.kill(next(w for w in server.workers if w.name == holder_name).actor, no_restart=False)
    retried = c.completions.create(model="long", prompt="w5", max_tokens=3)
    assert retried.choices[0].finish_reason == "length" and retried.usage.completion_tokens == 3
