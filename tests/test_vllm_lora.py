"""LoRA adapters on the vLLM backend: vLLM's own LoRA support, the adapter tensors from Tangram's pool.

Adapters are built by PEFT on a small Qwen2, converted by Tangram (the converted directory has no safetensors
for vLLM to read: its tensors can only come from the pool), and every output is checked against PEFT +
transformers `generate`, alone and in a batch that mixes adapters with base requests.
"""

from __future__ import annotations

import concurrent.futures
import os
import time

import pytest

from conftest import engine_model
from lora_util import LLAMA_TARGETS, make_adapter, peft_greedy
from tangram.engine.backend import start_backend
from tangram.engine.errors import RequestError
from tangram.engine.instance import EngineConfig
from tangram.pool import DevicePool, PoolConfig
from tangram.store import Checkpoint
from tangram.store.adapter import convert_adapter
from tangram.store.hashing import as_bytes, hash_bytes
from vllm_models import PROMPTS, checkpoint_pair, generate, tiny_qwen2, vllm_or_fail

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
N = 16
CFG = EngineConfig(dtype="float32", kv_cache_bytes=256 << 20, max_model_len=256, max_loras=2, max_lora_rank=8)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A Qwen2 base as a Tangram checkpoint, converted PEFT adapters of it (and one of another model), and
    PEFT's greedy continuations of PROMPTS for the base and each adapter; one shared-arena pool for the tests."""
    os.environ.setdefault("TANGRAM_VLLM_PYTHON", vllm_or_fail())
    root = tmp_path_factory.mktemp("vllm-lora")
    base = tiny_qwen2()
    _, ckpt = checkpoint_pair(base, root / "qwen")
    index = Checkpoint(ckpt).index
    peft = {"a1": make_adapter(base, root / "peft-a1", seed=1, r=4, alpha=8),
            "a2": make_adapter(base, root / "peft-a2", seed=2, r=8, alpha=16, targets=LLAMA_TARGETS,
                               use_rslora=True),
            "wide": make_adapter(base, root / "peft-wide", seed=3, r=16, alpha=16)}
    adapters = {name: root / f"{name}-ckpt" for name in peft}
    for name, path in peft.items():
        convert_adapter(path, adapters[name], index)
    other = engine_model("llama")  # other shapes (hidden size 32)
    other_base = checkpoint_pair(other, root / "llama")[1]
    adapters["other"] = root / "other-ckpt"
    convert_adapter(make_adapter(other, root / "peft-other", seed=4), adapters["other"], Checkpoint(other_base).index)
    refs = {name: [peft_greedy(base, peft.get(name), p, N) for p in PROMPTS] for name in ("base", "a1", "a2")}
    return {"base": ckpt, "adapters": {k: str(v) for k, v in adapters.items()}, "refs": refs,
            "peft": {k: str(v) for k, v in peft.items()},
            "pool": DevicePool(2 << 30, "cpu", PoolConfig(shared=True))}  # one pool: its parked shell serves both


def _active(pool: DevicePool) -> int:
    return pool.totals()["active"]


def _settles(pool: DevicePool, active: int, timeout: float = 30.0) -> bool:
    """Whether the pool's active bytes come back to `active` (an adapter's binding is released once the shell
    has dropped it, on the shell's reader thread)."""
    end = time.monotonic() + timeout
    while _active(pool) != active and time.monotonic() < end:
        time.sleep(0.05)
    return _active(pool) == active


def test_adapters_in_a_mixed_batch_equal_peft_and_come_from_the_pool(world):
    pool = world["pool"]
    backend = start_backend("vllm", Checkpoint(world["base"]), pool, CFG, name="qwen", arrival=0.0)
    adapters = world["adapters"]
    try:
        idle = _active(pool)
        jobs = [(name, i) for name in ("base", "a1", "a2") for i in range(len(PROMPTS))] * 2
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as ex:  # all in flight at once: mixed batches
            futs = [ex.submit(generate, backend, PROMPTS[i], N, **({} if name == "base" else
                              {"adapter": adapters[name]})) for name, i in jobs]
            got = [f.result().output_ids for f in futs]
        # base rows beside adapter rows included: vLLM's CPU ops gave them an adapter's update (fixed in the shell)
        assert got == [world["refs"][name][i] for name, i in jobs]
        assert world["refs"]["a1"] != world["refs"]["base"] != world["refs"]["a2"]
        assert backend.adapters.bound() == []  # the last request of each released it
        assert _settles(pool, idle)  # ... and the shell dropped it: its bytes are retained, not active
        out = generate(backend, PROMPTS[0], N, adapter=adapters["a1"])
        assert out.output_ids == world["refs"]["a1"][0]
        assert backend.adapters.last_bind.bytes_loaded == 0  # a pool hit: nothing read again
    finally:
        backend.stop()
    assert _settles(pool, 0)
    for name in ("a1", "a2"):  # vLLM changes its adapters' tensors in place: the pool's shared bytes must not move
        ckpt = Checkpoint(adapters[name])
        binding = pool.acquire(ckpt)
        try:
            assert binding.bytes_loaded == 0
            assert all(hash_bytes(as_bytes(t)) == ckpt.index.tensors[n].hash
                       for n, t in binding.tensors.items())
        finally:
            pool.release(binding)


def test_bad_adapters_fail_alone(world):
    pool = world["pool"]
    backend = start_backend("vllm", Checkpoint(world["base"]), pool, CFG, name="qwen", arrival=0.0)
    adapters = world["adapters"]
    try:
        with pytest.raises(RequestError, match="max_lora_rank 8"):
            generate(backend, PROMPTS[0], N, adapter=adapters["wide"])
        with pytest.raises(RequestError, match="cannot be used"):
            generate(backend, PROMPTS[0], N, adapter=adapters["other"])  # an adapter of another model
        with pytest.raises(RequestError, match="cannot be used"):
            generate(backend, PROMPTS[0], N, adapter=world["base"])  # not an adapter
        assert generate(backend, PROMPTS[1], N, adapter=adapters["a2"]).output_ids == world["refs"]["a2"][1]
        assert generate(backend, PROMPTS[1], N).output_ids == world["refs"]["base"][1]
    finally:
        backend.stop()


def test_served_over_the_api_equal_peft(world):
    import asyncio

    import httpx
    import openai
    from transformers import AutoTokenizer

    from serving import serving
    from tangram.control import Deployment

    admin = {"Authorization": "Bearer test-token"}
    base = Deployment(name="qwen", checkpoint=str(world["base"]), backend="vllm", engine=CFG, keep_alive_s=600)
    with serving([base], pool_bytes=2 << 30) as srv:
        for name in ("a1", "a2"):  # PEFT directories, converted at deploy
            r = httpx.post(srv.url + "/admin/deployments", headers=admin, timeout=120,
                           json={"name": f"qwen-{name}", "adapter": world["peft"][name], "base": "qwen"})
            assert r.status_code == 200, r.text
        r = httpx.post(srv.url + "/admin/deployments", headers=admin, timeout=120,
                       json={"name": "qwen-wide", "adapter": world["peft"]["wide"], "base": "qwen"})
        assert r.status_code == 400 and "max_lora_rank 8" in r.text  # rank 16: refused at deploy, not per request
        listed = {m["id"]: m["parent"] for m in httpx.get(srv.url + "/v1/models").json()["data"]}
        assert listed == {"qwen": None, "qwen-a1": "qwen", "qwen-a2": "qwen"}
        jobs = [(model, i) for model in ("qwen", "qwen-a1", "qwen-a2") for i in range(len(PROMPTS))]

        async def run() -> list[str]:
            c = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=300)
            outs = await asyncio.gather(*(c.completions.create(model=m, prompt=PROMPTS[i], max_tokens=N,
                                                               temperature=0, extra_body={"ignore_eos": True})
                                          for m, i in jobs))
            return [o.choices[0].text for o in outs]

        tok = AutoTokenizer.from_pretrained(world["base"])
        refs = {"qwen": "base", "qwen-a1": "a1", "qwen-a2": "a2"}
        want = [tok.decode(world["refs"][refs[m]][i], skip_special_tokens=True) for m, i in jobs]
        assert asyncio.run(run()) == want


FIX_CHECK = """
import json, torch
from vllm.lora.ops.torch_ops import lora_ops
from vllm.lora.punica_wrapper import punica_cpu
from tangram.vllm import lora
ops = {n: getattr(lora_ops, n) for n in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")}
faulty = not lora.skips_no_lora_rows(ops["bgmv_shrink"])
applied = lora.fix_no_lora_rows()
torch.manual_seed(0)
idx = torch.tensor([1, -1, 0, -1])
x, a, b = torch.randn(4, 8), torch.randn(2, 3, 8), torch.randn(2, 6, 3)
h, h0 = torch.zeros(4, 3), torch.zeros(4, 3)
lora_ops.bgmv_shrink(x, a, h, idx, 0.5)
ops["bgmv_shrink"](x, a, h0, idx.clamp(min=0), 0.5)
y, y0, base = torch.randn(4, 6), None, None
y0 = y.clone()
punica_cpu.bgmv_expand(h, b, y, idx, True)
z = torch.randn(4, 10)
z0 = z.clone()
lora_ops.sgmv_expand_slice(h, b, z, None, torch.tensor([1, 1, 1, 1]), idx, 4, 1, 4, 2, 6, True)
keep = idx >= 0
print(json.dumps({"faulty": faulty, "applied": applied,
                  "shrink_none_zero": bool((h[~keep] == 0).all()), "shrink_rows": bool(torch.equal(h[keep], h0[keep])),
                  "expand_none_unchanged": bool(torch.equal(y[~keep], y0[~keep])),
                  "expand_rows_changed": bool((y[keep] != y0[keep]).all(dim=1).all()),
                  "slice_none_unchanged": bool(torch.equal(z[~keep], z0[~keep])),
                  "slice_outside_unchanged": bool(torch.equal(z[:, :2], z0[:, :2]))}))
"""


def test_the_cpu_lora_ops_leave_rows_of_no_adapter_alone_once_fixed(tmp_path):
    import json
    import subprocess
    from pathlib import Path

    import tangram

    src = str(Path(tangram.__file__).resolve().parents[1])
    proc = subprocess.run([vllm_or_fail(), "-c", FIX_CHECK], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": src})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got.pop("applied") == got.pop("faulty")  # applied exactly where the installed ops have the fault
    assert all(got.values()), got
