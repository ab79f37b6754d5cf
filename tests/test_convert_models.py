"""Converting tiny random-weight models of real architectures: identical tensors, identical logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_bit_exact, meta_model_from, save_hf_dir, tiny_config, tiny_model
from tangram.store import convert, load, read_index

ARCHS = ["llama", "qwen2", "opt", "gpt2", "mistral"]
INPUT_IDS = torch.tensor([[1, 5, 17, 42, 99, 200, 3, 255], [2, 7, 7, 7, 130, 64, 11, 0]])


def source_tensors(src, fmt) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory, read with the reference libraries."""
    out: dict[str, torch.Tensor] = {}
    if fmt.startswith("safetensors"):
        for f in sorted(src.glob("*.safetensors")):
            out.update(load_file(f))
    else:
        for f in sorted(src.glob("*.bin")):
            out.update(torch.load(f, weights_only=True))
    return out


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_converted_model_gives_identical_logits(tmp_path, arch):
    model = tiny_model(arch, seed=ARCHS.index(arch))
    src = save_hf_dir(model, tmp_path / "hf")
    index = convert(src, tmp_path / "tg")
    assert index.metadata["model_type"] == model.config.model_type
    assert index.metadata["source_format"] == "safetensors"
    assert index.metadata["architectures"] == model.config.architectures

    loaded = load(tmp_path / "tg")
    want = source_tensors(src, "safetensors")
    assert sorted(loaded) == sorted(want)
    for name, t in want.items():
        assert_bit_exact(loaded[name], t, name)
    # the source model's own parameters (tied ones included) match too
    for name, p in model.state_dict().items():
        if name in loaded:
            assert torch.equal(loaded[name], p), name

    rebuilt = meta_model_from(loaded, tiny_config(arch))
    assert torch.equal(logits(rebuilt), logits(model))
    # negative control: one flipped weight changes the logits, so the comparison above can fail
    norm = next(n for n in loaded if n.endswith("norm.weight") or n.endswith("ln_f.weight")
                or n.endswith("final_layer_norm.weight"))
    tampered = dict(loaded, **{norm: loaded[norm] + 1})
    assert not torch.equal(logits(meta_model_from(tampered, tiny_config(arch))), logits(model))
    if model.config.tie_word_embeddings:
        assert rebuilt.get_output_embeddings().weight.data_ptr() == rebuilt.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize(
    "arch, fmt",
    [("llama", "safetensors-sharded"), ("qwen2", "safetensors-sharded"), ("llama", "bin"), ("qwen2", "bin"),
     ("opt", "bin-sharded"), ("mistral", "bin-sharded")],
)
def test_sharded_and_bin_inputs(tmp_path, arch, fmt):
    model = tiny_model(arch, seed=7)
    src = save_hf_dir(model, tmp_path / "hf", fmt)
    if fmt == "safetensors-sharded":
        assert (src / "model.safetensors.index.json").is_file()
        assert len(list(src.glob("model-*-of-*.safetensors"))) >= 2
    elif fmt == "bin-sharded":
        assert (src / "pytorch_model.bin.index.json").is_file()
        assert len(list(src.glob("pytorch_model-*.bin"))) == 3
    else:
        assert (src / "pytorch_model.bin").is_file()
    index = convert(src, tmp_path / "tg")
    assert index.metadata["source_format"] == ("safetensors" if fmt.startswith("safetensors") else "bin")

    want = source_tensors(src, fmt)
    loaded = load(tmp_path / "tg", method="pread", chunk_bytes=8192)
    assert sorted(loaded) == sorted(want)
    for name, t in want.items():
        assert_bit_exact(loaded[name], t, name)
    if fmt.startswith("bin") and model.config.tie_word_embeddings:
        # torch.save keeps the tied output embedding: the converter stores it once, as an alias
        out_name = next(n for n in want if n.endswith("lm_head.weight"))
        assert out_name in index.aliases
        assert loaded[out_name].data_ptr() == loaded[index.aliases[out_name]].data_ptr()
    rebuilt = meta_model_from(loaded, tiny_config(arch))
    assert torch.equal(logits(rebuilt), logits(model))


def test_model_files_copied_through(tmp_path):
    from transformers import AutoConfig, PreTrainedTokenizerFast

    model = tiny_model("llama")
    src = save_hf_dir(model, tmp_path / "hf")
    (src / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    (src / "README.md").write_text("not copied")
    convert(src, tmp_path / "tg")
    dst = tmp_path / "tg"
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja"):
        assert (dst / name).read_bytes() == (src / name).read_bytes(), name
    assert not (dst / "README.md").exists()
    assert not list(dst.glob("*.safetensors"))
    cfg = AutoConfig.from_pretrained(dst)
    assert cfg.model_type == "llama" and cfg.hidden_size == 32
    tok_src = PreTrainedTokenizerFast.from_pretrained(src)
    tok_dst = PreTrainedTokenizerFast.from_pretrained(dst)
    assert tok_dst("w5 w17 w42")["input_ids"] == tok_src("w5 w17 w42")["input_ids"] == [5, 17, 42]
    assert json.loads((dst / "tangram.json").read_text())["metadata"]["source"] == str(src.resolve())


def test_convert_overwrite_with_another_model(tmp_path):
    a, b = tiny_model("gpt2", seed=1), tiny_model("opt", seed=2)
    src_a, src_b = save_hf_dir(a, tmp_path / "a"), save_hf_dir(b, tmp_path / "b")
    convert(src_a, tmp_path / "tg")
    assert read_index(tmp_path / "tg").metadata["model_type"] == "gpt2"
    convert(src_b, tmp_path / "tg", overwrite=True)
    index = read_index(tmp_path / "tg")
    assert index.metadata["model_type"] == "opt"
    loaded = load(tmp_path / "tg")
    assert torch.equal(logits(meta_model_from(loaded, tiny_config("opt"))), logits(b))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "tg"]
