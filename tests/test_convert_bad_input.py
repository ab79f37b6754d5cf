"""Bad conversion sources: each a typed error naming the file and the problem, nothing half-written left behind."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import (
    assert_state_equal,
    save_tokenizer,
    write_json,
)
from tangram.store import (
    CorruptCheckpointError,
    DestinationExistsError,
    MissingFileError,
    UnsupportedFormatError,
    convert,
    load,
)




def names_file(exc_info, path) -> None:
    """The error message names the file (its full path) and `exc.path` is that file."""
    assert str(path) in str(exc_info.value), str(exc_info.value)
    assert exc_info.value.path == str(path)


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------- convert


def hf_dir(tmp_path, *, tokenizer=True, config=True):
    src = tmp_path / "hf"
    src.mkdir()
    if config:
        write_json(src / "config.json", {"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    if tokenizer:
        save_tokenizer(src, 16)
    return src


def test_convert_missing_tokenizer(tmp_path):
    from safetensors.torch import save_file

    src = hf_dir(tmp_path, tokenizer=False)
    save_file({"w": torch.ones(2)}, src / "model.safetensors")
    with pytest.raises(MissingFileError) as ei:
        convert(src, tmp_path / "out")
    names_file(ei, src)
    assert "tokenizer" in str(ei.value)
    assert not (tmp_path / "out").exists()
    convert(src, tmp_path / "out", require_tokenizer=False)
    assert_state_equal(load(tmp_path / "out"), {"w": torch.ones(2)})


def test_convert_missing_config(tmp_path):
    src = hf_dir(tmp_path, config=False)
    with pytest.raises(MissingFileError) as ei:
        convert(src, tmp_path / "out")
    names_file(ei, src / "config.json")


def test_convert_missing_source(tmp_path):
    with pytest.raises(MissingFileError) as ei:
        convert(tmp_path / "nothing", tmp_path / "out")
    names_file(ei, tmp_path / "nothing")


def test_convert_only_gguf(tmp_path):
    src = hf_dir(tmp_path)
    (src / "model-q4.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(UnsupportedFormatError) as ei:
        convert(src, tmp_path / "out")
    names_file(ei, src)
    assert "model-q4.gguf" in str(ei.value)
    assert not (tmp_path / "out").exists()


def test_convert_no_weights_at_all(tmp_path):
    src = hf_dir(tmp_path)
    with pytest.raises(UnsupportedFormatError) as ei:
        convert(src, tmp_path / "out")
    names_file(ei, src)
    assert "no safetensors" in str(ei.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MissingFileError):  # nothing at all: not even a config
        convert(empty, tmp_path / "out")


def test_convert_corrupt_safetensors(tmp_path):
    src = hf_dir(tmp_path)
    (src / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CorruptCheckpointError) as ei:
        convert(src, tmp_path / "out")
    names_file(ei, src / "model.safetensors")
    assert list(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_convert_truncated_safetensors(tmp_path):
    from safetensors.torch import save_file

    src = hf_dir(tmp_path)
    save_file({"w": torch.ones(1000), "v": torch.ones(1000)}, src / "model.safetensors")
    os.truncate(src / "model.safetensors", (src / "model.safetensors").stat().st_size - 100)
    with pytest.raises(CorruptCheckpointError) as ei:
        convert(src, tmp_path / "out")
    names_file(ei, src / "model.safetensors")
    assert not (tmp_path / "out").exists()


def test_convert_corrupt_bin(tmp_path):
    src = hf_dir(tmp_path)
    (src / "pytorch_model.bin").write_bytes(b"definitely not a pickle")
    with pytest.raises(CorruptCheckpointError) as ei:
        convert(src, tmp_path / "out")
    names_file(ei, src / "pytorch_model.bin")


def test_convert_bin_not_a_state_dict(tmp_path):
    src = hf_dir(tmp_path)
    torch.save([torch.ones(2)], src / "pytorch_model.bin")
    with pytest.raises(UnsupportedFormatError) as ei:
        convert(src, tmp_path / "out")
    names_file(ei, src / "pytorch_model.bin")
    assert "list" in str(ei.value)


def test_convert_shard_index_problems(tmp_path):
    from safetensors.torch import save_file

    src = hf_dir(tmp_path)
    save_file({"w": torch.ones(2)}, src / "model-00001-of-00002.safetensors")
    write_json(src / "model.safetensors.index.json",
               {"weight_map": {"w": "model-00001-of-00002.safetensors", "v": "model-00002-of-00002.safetensors"}})
    with pytest.raises(MissingFileError) as ei:
        convert(src, tmp_path / "out")
    names_file(ei, src / "model-00002-of-00002.safetensors")
    (src / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CorruptCheckpointError) as ei:
        convert(src, tmp_path / "out")
    names_file(ei, src / "model.safetensors.index.json")
    (src / "model.safetensors.index.json").write_text("{oops")
    with pytest.raises(CorruptCheckpointError) as ei:
        convert(src, tmp_path / "out")
    names_file(ei, src / "model.safetensors.index.json")


def test_convert_destination_exists(tmp_path):
    from safetensors.torch import save_file

    src = hf_dir(tmp_path)
    save_file({"w": torch.ones(2)}, src / "model.safetensors")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DestinationExistsError) as ei:
        convert(src, out)
    names_file(ei, out)
    assert (out / "keep.txt").read_text() == "mine"
    convert(src, out, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert_state_equal(load(out), {"w": torch.ones(2)})
    assert leftovers(tmp_path) == []
