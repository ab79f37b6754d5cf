"""PEFT adapters -> Tangram adapter checkpoints: faithful tensors, and clear refusals of what cannot be served."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import engine_checkpoint, engine_model, tiny_config
from lora_util import make_adapter
from tangram.store import Checkpoint, load
from tangram.store.adapter import AdapterError, AdapterInfo, check_adapter, convert_adapter
from tangram.store.errors import CorruptCheckpointError, MissingFileError

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora-base")
    model = engine_model("llama")
    return model, Checkpoint(engine_checkpoint(model, tmp))


def test_tensors_are_peft_s_own(base, tmp_path):
    model, ckpt = base
    src = make_adapter(model, tmp_path / "peft", seed=1, r=4, alpha=8)
    index = convert_adapter(src, tmp_path / "out", ckpt.index)
    want = load_file(src / "adapter_model.safetensors")
    got = load(tmp_path / "out", device="cpu")
    assert sorted(got) == sorted(n.removeprefix("base_model.model.") for n in want)
    for name, t in want.items():
        assert torch.equal(got[name.removeprefix("base_model.model.")], t)
    info = check_adapter(index, ckpt.index, tmp_path / "out")
    assert info.scaling == 2.0 and len(info.modules) == 2 * 3
    assert (tmp_path / "out" / "adapter_config.json").is_file()


@pytest.mark.parametrize("extra, match", [
    (dict(use_dora=True), "DoRA"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
])
def test_unsupported_features_are_refused(base, tmp_path, extra, match):
    model, ckpt = base
    src = make_adapter(model, tmp_path / "peft", seed=2, **extra)
    with pytest.raises(AdapterError, match=match):
        convert_adapter(src, tmp_path / "out", ckpt.index)
    assert not (tmp_path / "out").exists()


def test_unknown_target_module_is_refused(base, tmp_path):
    model, ckpt = base
    src = make_adapter(model, tmp_path / "peft", seed=3)
    config = json.loads((src / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj", "w_gate"]
    (src / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="unknown target modules"):
        convert_adapter(src, tmp_path / "out", ckpt.index)
    lm = make_adapter(model, tmp_path / "peft-lm", seed=3, targets=["lm_head"])
    with pytest.raises(AdapterError, match="lm_head"):  # a saved lm_head or its LoRA: refused by name
        convert_adapter(lm, tmp_path / "out", ckpt.index)


def test_adapter_of_another_base_is_refused(base, tmp_path):
    model, ckpt = base
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.intermediate_size = 48
    other = AutoModelForCausalLM.from_config(config).eval()
    src = make_adapter(other, tmp_path / "peft", seed=4, targets=["down_proj"])
    with pytest.raises(AdapterError, match="another base model"):
        convert_adapter(src, tmp_path / "out", ckpt.index)
    # a converted adapter deployed on another base fails the same check
    other_ckpt = Checkpoint(engine_checkpoint(other, tmp_path / "other"))
    convert_adapter(src, tmp_path / "ok", other_ckpt.index)
    with pytest.raises(AdapterError, match="another base model"):
        check_adapter(Checkpoint(tmp_path / "ok").index, ckpt.index, tmp_path / "ok")


def test_malformed_and_truncated_adapters(base, tmp_path):
    model, ckpt = base
    src = make_adapter(model, tmp_path / "peft", seed=5)
    (src / "adapter_config.json").write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match="adapter config"):
        convert_adapter(src, tmp_path / "out", ckpt.index)
    src = make_adapter(model, tmp_path / "peft2", seed=5)
    weights = src / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CorruptCheckpointError):
        convert_adapter(src, tmp_path / "out", ckpt.index)
    src = make_adapter(model, tmp_path / "peft3", seed=5)
    state = load_file(src / "adapter_model.safetensors")
    state.pop(next(n for n in state if "lora_B" in n))
    save_file(state, src / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="not both lora_A and lora_B"):
        convert_adapter(src, tmp_path / "out", ckpt.index)
    (src / "adapter_model.safetensors").unlink()
    with pytest.raises(MissingFileError, match="no weights"):
        convert_adapter(src, tmp_path / "out", ckpt.index)
    with pytest.raises(AdapterError, match="not a converted LoRA adapter"):
        AdapterInfo.of(ckpt.index, ckpt.path)
