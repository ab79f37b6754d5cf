"""The contracts between layers: the engine backend a worker drives, the worker handle the controller awaits."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from pydantic import ValidationError

from conftest import engine_checkpoint, engine_model
from tangram.cli_common import auto_device
from tangram.control import Controller, Deployment
from tangram.engine import EngineConfig, OutputQueue, SamplingParams
from tangram.engine.backend import EngineBackend, start_backend
from tangram.pool import DevicePool
from tangram.store import Checkpoint
from tangram.worker import LocalWorker, PlacementState, Worker, WorkerHandle


def test_a_deployment_names_a_known_backend_only(tmp_path):
    assert Deployment(name="m", checkpoint="demo").backend == "builtin"
    assert Deployment(name="m", checkpoint="demo", backend="vllm").backend == "vllm"
    with pytest.raises(ValidationError, match="backend"):
        Deployment(name="m", checkpoint="demo", backend="tensorrt")
    with pytest.raises(ValueError, match="unknown engine backend 'tensorrt': one of builtin, vllm"):
        start_backend("tensorrt", Checkpoint(engine_checkpoint(engine_model("qwen2"), tmp_path)),
                      DevicePool(64 << 20), EngineConfig(), name="m", arrival=time.perf_counter())


def test_a_vllm_deployment_in_the_config_makes_the_pools_shared():
    from tangram.control import ServeConfig

    assert ServeConfig().pool.shared is False
    assert ServeConfig(deployments=[Deployment(name="m", checkpoint="demo", backend="vllm")]).pool.shared is True
    assert ServeConfig.model_validate({"pool": {"shared": False}, "deployments": [
        {"name": "m", "checkpoint": "demo", "backend": "vllm"}]}).pool.shared is False  # said explicitly: kept


def test_the_builtin_engine_is_an_engine_backend(tmp_path):
    ckpt = engine_checkpoint(engine_model("qwen2"), tmp_path)
    worker = Worker(0, "cpu", 64 << 20)
    replica = worker.start("m", ckpt, EngineConfig(block_tokens=4), time.perf_counter())
    try:
        backend = replica.backend
        assert isinstance(backend, EngineBackend)
        assert backend.health() is None and backend.mean_prefill_s(0.125) == 0.125  # the prior: nothing served
        assert backend.freeable_bytes() > 0  # its weights are held by no other instance
        sink = OutputQueue()
        params = SamplingParams(max_tokens=3, ignore_eos=True)
        rid = replica.submit([5, 17, 33], params, sink, arrival=time.perf_counter())
        outs = [sink.get(timeout=60)]
        while not outs[-1].finished:
            outs.append(sink.get(timeout=60))
        assert outs[-1].request_id == rid and outs[-1].completion_tokens == 3
        assert backend.final_cost().start == "cold" and backend.load_stats().bytes_from_disk > 0
        assert backend.mean_prefill_s(0.125) != 0.125 and replica.inflight == 0
    finally:
        worker.stop(replica)
    assert worker.replicas == {} and worker.pool.snapshot()["totals"]["active"] == 0


def test_a_local_worker_is_a_worker_handle_and_reports_placement_typed(tmp_path):
    ckpt = engine_checkpoint(engine_model("qwen2"), tmp_path)
    handle = LocalWorker(Worker(0, "cpu", 64 << 20))
    assert isinstance(handle, WorkerHandle)

    async def main() -> PlacementState:
        return await handle.placement_state(Checkpoint(ckpt).index)

    st = asyncio.run(main())
    assert isinstance(st, PlacementState) and st.resident == 0 and st.free == 64 << 20 and st.queue_s == 0


class _Stuck:
    """A worker handle whose fresh status never comes (a remote worker that does not answer)."""

    name, device, node = "stuck#0", "cpu", 0

    async def status(self) -> dict:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    def last_status(self) -> dict:
        return {"worker": self.name, "pool": {"free": 1}, "kv_bytes": 0, "instances": []}


def test_the_controllers_status_for_metrics_never_waits_for_a_worker():
    async def main() -> None:
        ctl = Controller([_Stuck()])
        assert ctl.status()["workers"][0]["worker"] == "stuck#0"  # what /metrics reads: answered at once
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ctl.status_now(), 0.05)  # /admin/status asks the workers now

    asyncio.run(main())


def test_auto_device_is_cuda_when_present_else_cpu():
    assert auto_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert auto_device("cuda:1") == "cuda:1" and auto_device("cpu") == "cpu"
