"""The compute dtype: the rule per device, the converted copy (made once, verified), and the settings that pick it."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import engine_checkpoint, engine_model, save_hf_dir
from tangram.engine import EngineConfig, Instance, SamplingParams
from tangram.engine import dtype as dtype_rule
from tangram.engine.dtype import choose_dtype, default_compute_dtype, fast_bf16_in
from tangram.engine.errors import EngineError
from tangram.pool import DevicePool
from tangram.resolve import dtype_copy_path, resolve_model, with_dtype
from tangram.store import HashMismatchError, Loader, read_index

X86_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
X86_AMX = "flags\t\t: fpu avx512f amx_tile amx_bf16 amx_int8\n"
X86_PLAIN = "flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


def test_fast_bf16_is_read_from_the_cpu_flags():
    assert fast_bf16_in(X86_BF16) and fast_bf16_in(X86_AMX) and fast_bf16_in(ARM_BF16)
    assert not fast_bf16_in(X86_PLAIN) and not fast_bf16_in("") and not fast_bf16_in("model name\t: bf16 cpu\n")


@pytest.mark.parametrize("fast, cpu", [(True, torch.bfloat16), (False, torch.float32)])
def test_the_rule_per_device(fast, cpu, monkeypatch):
    monkeypatch.setattr(dtype_rule, "cpu_has_fast_bf16", lambda: fast)
    assert default_compute_dtype("cpu") == cpu
    for stored in (torch.float16, torch.bfloat16):  # a 16-bit checkpoint on a CPU: its fastest dtype
        assert choose_dtype("auto", stored, "cpu") == cpu
    assert choose_dtype("auto", torch.float32, "cpu") == torch.float32  # auto never lowers full precision
    for stored in (torch.float16, torch.bfloat16, torch.float32):  # CUDA: the checkpoint's own
        assert choose_dtype("auto", stored, "cuda:0") == stored
    for name, want in dtype_rule.DTYPES.items():  # an explicit setting wins everywhere
        assert choose_dtype(name, torch.float16, "cpu") == want == choose_dtype(name, torch.float32, "cuda")


def test_this_machine_chooses_by_its_flags():
    from pathlib import Path

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    want = torch.bfloat16 if fast_bf16_in(flags) else torch.float32
    assert default_compute_dtype("cpu") == want


def test_a_dtype_copy_is_written_once_by_the_store_and_verified(tmp_path):
    model = engine_model("qwen2")  # tied embeddings: an alias that must survive the copy
    src = engine_checkpoint(model, tmp_path)
    assert with_dtype(src, torch.float32) == src  # already in that dtype: no copy
    copy = with_dtype(src, torch.bfloat16)
    assert copy != src and copy.parent.name == "converted" and "bf16" in copy.name
    index, original = read_index(copy), read_index(src)
    assert {e.dtype for e in index.tensors.values()} == {"bfloat16"}
    assert index.aliases == original.aliases and index.total_bytes * 2 == original.total_bytes
    assert json.loads((copy / "config.json").read_text())["dtype"] == "bfloat16"
    assert (copy / "tokenizer.json").is_file() and not (copy / "tangram-template.json").exists()
    loaded = Loader().load(copy, verify=True)  # fresh hashes that match the bytes
    want = {n: t.to(torch.bfloat16) for n, t in Loader().load(src).items()}
    assert all(torch.equal(loaded[n], want[n]) for n in want)
    stamp = (copy / "tangram.json").stat().st_mtime_ns
    assert with_dtype(src, torch.bfloat16) == copy and (copy / "tangram.json").stat().st_mtime_ns == stamp  # cached


def test_a_corrupted_source_is_not_copied_into_a_trusted_checkpoint(tmp_path):
    src = engine_checkpoint(engine_model("llama"), tmp_path)
    data = next(src.glob("data-*.bin"))
    raw = bytearray(data.read_bytes())
    raw[5000:5012] = bytes(b ^ 0xFF for b in raw[5000:5012])
    data.write_bytes(bytes(raw))
    with pytest.raises(HashMismatchError, match="data-00000.bin"):
        with_dtype(src, torch.bfloat16)
    assert not (dtype_copy_path(src, torch.bfloat16) / "tangram.json").exists()  # nothing left to be trusted


@pytest.mark.parametrize("fast, want", [(True, "bfloat16"), (False, "float32")])
def test_auto_runs_an_fp16_checkpoint_on_a_cpu_in_its_fastest_dtype(fast, want, tmp_path, monkeypatch):
    monkeypatch.setattr(dtype_rule, "cpu_has_fast_bf16", lambda: fast)
    hf = save_hf_dir(engine_model("llama").to(torch.float16), tmp_path / "hf")
    stored = resolve_model(hf)  # no setting: the converted checkpoint as it is
    assert {e.dtype for e in read_index(stored).tensors.values()} == {"float16"}
    path = resolve_model(hf, dtype="auto", device="cpu")
    assert {e.dtype for e in read_index(path).tensors.values()} == {want}
    assert resolve_model(hf, dtype="float16", device="cpu") == stored
    with Instance(path, DevicePool(64 << 20), EngineConfig(block_tokens=4, dtype=want)) as inst:
        assert next(inst.engine.runner.model.parameters()).dtype == dtype_rule.DTYPES[want]
        out = inst.engine.generate([[5, 6, 7]], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert out.finish_reason == "length" and out.completion_tokens == 4


def test_an_instance_refuses_a_checkpoint_in_another_dtype_than_asked(tmp_path):
    ckpt = engine_checkpoint(engine_model("llama"), tmp_path)
    with pytest.raises(EngineError, match="float32.*bfloat16"):
        Instance(ckpt, DevicePool(64 << 20), EngineConfig(dtype="bfloat16"))


def test_the_serve_config_takes_an_engine_dtype(tmp_path):
    from pydantic import ValidationError

    from tangram.control import ServeConfig

    cfg = tmp_path / "serve.toml"
    cfg.write_text('[[deployments]]\nname = "m"\ncheckpoint = "demo"\n[deployments.engine]\ndtype = "bfloat16"\n')
    assert ServeConfig.from_file(cfg).deployments[0].engine.dtype == "bfloat16"
    assert EngineConfig().dtype == "auto"
    with pytest.raises(ValidationError):
        EngineConfig(dtype="float64")


def test_a_deployment_in_bf16_loads_its_copy_made_at_deploy(tmp_path):
    import openai

    from serving import chat_model_dir, serving
    from tangram.control import Deployment

    src = chat_model_dir(tmp_path / "src")
    deps = [Deployment(name="m", checkpoint=str(src), engine=EngineConfig(dtype="bfloat16"))]
    with serving(deps) as srv:
        resolved = srv.controller.describe("m")["resolved_checkpoint"]
        assert {e.dtype for e in read_index(resolved).tensors.values()} == {"bfloat16"}
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        out = c.completions.create(model="m", prompt="w5 w6", max_tokens=3, temperature=0)
        assert out.usage.completion_tokens == 3


def test_tangram_run_takes_a_dtype(tmp_path, tangram_home):
    from typer.testing import CliRunner

    from tangram.cli import app

    hf = save_hf_dir(engine_model("llama"), tmp_path / "hf")
    runner = CliRunner()
    result = runner.invoke(app, ["run", str(hf), "w5 w6", "--max-tokens", "3", "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    copies = list((tangram_home / "converted").glob("*-bf16-*"))
    assert len(copies) == 1 and {e.dtype for e in read_index(copies[0]).tensors.values()} == {"bfloat16"}
    bad = runner.invoke(app, ["run", str(hf), "w5", "--dtype", "float64"])
    assert bad.exit_code == 2 and "dtype" in bad.output
