"""Deployments that can never fit a pool are refused at once; instance limits are consistent."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
import torch
from pydantic import ValidationError

from serving import chat_model_dir, serving
from tangram.control import Controller, Deployment, DeploymentUnavailable, ServeConfig
from tangram.control import controller as controller_mod
from tangram.control.fit import DoesNotFit, Footprint, footprint, min_kv_bytes, weights_bytes
from tangram.engine import EngineConfig, SamplingParams
from tangram.kv import KVSpec
from tangram.resolve import resolve_model
from tangram.store import Checkpoint, Loader, save
from tangram.worker import Worker


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return chat_model_dir(tmp_path_factory.mktemp("fit") / "tiny")


@pytest.fixture(scope="module")
def need(model_dir) -> Footprint:
    path = resolve_model(str(model_dir))
    return footprint(path, Checkpoint(path).index, EngineConfig())


def admin(srv, method: str, path: str, **kw) -> httpx.Response:
    return httpx.request(method, srv.url + path, headers={"Authorization": "Bearer test-token"}, timeout=60, **kw)


# ---------------------------------------------------------------- the footprint, pure


def test_footprint_counts_aligned_distinct_tensors_and_the_least_kv(need):
    spec = KVSpec(layers=2, kv_heads=2, head_dim=8, dtype=torch.float32, block_tokens=16)
    assert min_kv_bytes(spec, EngineConfig(), context=128) == 4096  # elastic: one (aligned) block
    reserve = EngineConfig(kv_mode="reserve", max_batch=4)
    assert min_kv_bytes(spec, reserve, context=128) == spec.blocks_for(4 * 128) * 4096  # the whole reservation
    assert min_kv_bytes(spec, reserve.model_copy(update={"reserve_tokens": 32}), context=128) == 2 * 4096
    assert need.weights % 4096 == 0 and need.kv > 0 and need.total == need.weights + need.kv
    assert need.fits(need.total) and not need.fits(need.total - 1)


def test_shared_tensors_count_once(tmp_path):
    t = torch.zeros(1000)
    save({"a": t, "b": t.clone()}, tmp_path / "m")  # equal content: one pool extent
    assert weights_bytes(Checkpoint(tmp_path / "m").index) == 4096


# ---------------------------------------------------------------- through the controller


def test_the_controller_refuses_a_model_larger_than_every_pool(model_dir, need):
    async def main() -> None:
        worker = Worker(0, "cpu", need.weights // 2, Loader())
        ctl = Controller([worker])
        with pytest.raises(DoesNotFit) as ei:
            await ctl.deploy(Deployment(name="big", checkpoint=str(model_dir)))
        msg = str(ei.value)
        assert f"needs {need.total} bytes" in msg and f"weights {need.weights} + minimum KV {need.kv}" in msg
        assert f"cpu#0, holds {worker.pool.capacity} bytes" in msg and "--pool-capacity" in msg
        assert ctl.names() == []  # nothing registered
        await ctl.shutdown()

    asyncio.run(main())


def test_the_minimum_kv_counts_too(model_dir, need):
    async def main() -> None:
        ctl = Controller([Worker(0, "cpu", need.total + (1 << 20), Loader())])  # room for weights and a block
        await ctl.deploy(Deployment(name="ok", checkpoint=str(model_dir)))
        huge = EngineConfig(kv_mode="reserve", reserve_tokens=1 << 20)  # a reservation beyond the pool
        with pytest.raises(DoesNotFit, match="minimum KV"):
            await ctl.deploy(Deployment(name="ok", checkpoint=str(model_dir), engine=huge))
        assert ctl.describe("ok")["engine"]["kv_mode"] == "elastic"  # the refused update changed nothing
        await ctl.shutdown()

    asyncio.run(main())


async def _ask(ctl: Controller, name: str) -> int:
    """Completion tokens of one request through the controller."""
    async for out in ctl.generate(name, "w5 w6", SamplingParams(max_tokens=2)):
        if out.finished:
            assert out.error is None, out.error
            return out.completion_tokens
    raise AssertionError("no final output")


def test_a_start_goes_only_to_a_device_whose_pool_can_hold_it(model_dir, need, monkeypatch):
    monkeypatch.setattr(controller_mod, "choose_scale_out", lambda states, nbytes, hosting, policy: 0)  # the first

    async def main() -> None:
        small, big = Worker(0, "cpu", need.weights // 2, Loader()), Worker(1, "cpu", 64 << 20, Loader())
        ctl = Controller([small, big])
        ctl.start_timeout_s = 1e9  # a start that waited for room would never end here
        await ctl.deploy(Deployment(name="m", checkpoint=str(model_dir)))
        assert await asyncio.wait_for(_ask(ctl, "m"), 120) == 2
        assert not small.replicas and len(big.replicas) == 1
        await ctl.shutdown()

    asyncio.run(main())


def test_a_second_instance_goes_to_the_other_device_when_it_fits_there(model_dir):
    """Scale-out adds compute: two starts of one deployment at once (each placed before the other is up) land
    on two devices, not beside each other on the first one (where a re-bind would have been cheapest)."""
    async def main() -> list[str]:
        ctl = Controller([Worker(0, "cpu", 64 << 20, Loader()), Worker(1, "cpu", 64 << 20, Loader())])
        await ctl.deploy(Deployment(name="m", checkpoint=str(model_dir), max_instances=2, target_concurrency=1,
                                    keep_alive_s=600))
        tokens = await asyncio.wait_for(asyncio.gather(*(_ask(ctl, "m") for _ in range(4))), 120)
        assert tokens == [2, 2, 2, 2]
        state = ctl._states["m"]  # noqa: SLF001 - the controller's records
        for _ in range(600):  # the tiny first instance may serve all four before the second start is up
            if not state.placing and len(state.replicas) == 2:
                break
            await asyncio.sleep(0.05)
        where = sorted(r.worker.name for r in state.replicas)
        assert state.placing == []  # every start recorded its end
        await ctl.shutdown()
        return where

    assert asyncio.run(main()) == ["cpu#0", "cpu#1"]


def test_a_start_that_can_never_fit_its_pool_fails_at_once(model_dir, need, monkeypatch):
    # an estimate below the real need (say, a start converting weights to a wider dtype) must not wedge it either
    monkeypatch.setattr(controller_mod, "footprint", lambda path, index, engine, backend="builtin": Footprint(0, 0))

    async def main() -> None:
        ctl = Controller([Worker(0, "cpu", need.weights // 2, Loader())])
        ctl.start_timeout_s = 1e9
        await ctl.deploy(Deployment(name="m", checkpoint=str(model_dir)))
        with pytest.raises(DeploymentUnavailable, match="needs .* bytes at once on cpu#0"):
            await asyncio.wait_for(_ask(ctl, "m"), 120)
        assert "needs" in ctl.describe("m")["last_error"]
        await ctl.shutdown()

    asyncio.run(main())


# ---------------------------------------------------------------- through the admin API


def test_the_admin_api_answers_400_for_a_model_larger_than_the_pool(model_dir, need):
    small = need.weights // 2
    with serving([Deployment(name="tiny", checkpoint=str(model_dir))], pool_bytes=small) as srv:
        assert admin(srv, "GET", "/admin/deployments").json()["deployments"] == []  # refused at start-up too
        r = admin(srv, "POST", "/admin/deployments", json={"name": "big", "checkpoint": str(model_dir)})
        assert r.status_code == 400, r.text
        msg = r.json()["error"]["message"]
        assert f"needs {need.total} bytes" in msg and f"holds {srv.workers[0].pool.capacity} bytes" in msg
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=30)
        with pytest.raises(openai.NotFoundError):  # not deployed: no request waits for a start that cannot be
            c.completions.create(model="big", prompt="w5", max_tokens=1)


# ---------------------------------------------------------------- min_instances <= max_instances


def test_min_instances_above_max_instances_is_rejected(tmp_path):
    with pytest.raises(ValidationError, match=r"min_instances \(3\) must not exceed max_instances \(1\)"):
        Deployment(name="m", checkpoint="demo", min_instances=3, max_instances=1)
    assert Deployment(name="m", checkpoint="demo", min_instances=2, max_instances=2).min_instances == 2
    (tmp_path / "c.toml").write_text('[[deployments]]\nname = "m"\ncheckpoint = "demo"\nmin_instances = 3\n')
    with pytest.raises(ValidationError, match="must not exceed max_instances"):
        ServeConfig.from_file(tmp_path / "c.toml")


def test_the_admin_api_rejects_min_instances_above_max_instances(model_dir):
    with serving([Deployment(name="tiny", checkpoint=str(model_dir))]) as srv:
        r = admin(srv, "POST", "/admin/deployments",
                  json={"name": "x", "checkpoint": str(model_dir), "min_instances": 3, "max_instances": 1})
        assert r.status_code in (400, 422) and "must not exceed max_instances" in r.text, r.text
        assert [d["name"] for d in admin(srv, "GET", "/admin/deployments").json()["deployments"]] == ["tiny"]
        assert srv.workers[0].status()["instances"] == []  # nothing started for it
