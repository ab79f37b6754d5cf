"""Parsed indexes are kept by the bytes of `tangram.json`: never stale, and the data files are checked every time."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import make_tensor
from tangram.store import Checkpoint, read_index, save
from tangram.store import format as store_format
from tangram.store.errors import CorruptCheckpointError, MissingFileError
from tangram.store.format import INDEX_FILE


@pytest.fixture
def ckpt(tmp_path):
    save({"a": make_tensor((64, 8), torch.float32, seed=1), "b": make_tensor((5,), torch.float32, seed=2)},
         tmp_path / "c")
    return tmp_path / "c"


def test_a_second_read_of_the_same_bytes_is_the_kept_parse(ckpt, monkeypatch):
    first = read_index(ckpt)
    parses = []
    real = store_format._parse
    monkeypatch.setattr(store_format, "_parse", lambda data, path: parses.append(path) or real(data, path))
    assert read_index(ckpt) is first and Checkpoint(ckpt).index is first
    assert parses == []


def test_an_index_rewritten_in_place_with_the_same_size_and_times_is_parsed_again(ckpt):
    path = ckpt / INDEX_FILE
    before = read_index(ckpt)
    st = path.stat()
    text = path.read_text()
    old = before.tensors["a"].hash
    new = old[::-1] if old[::-1] != old else "0" * len(old)
    path.write_text(text.replace(old, new))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # what a stat-keyed cache would take for unchanged
    assert path.stat().st_size == st.st_size
    after = read_index(ckpt)
    assert after.tensors["a"].hash == new and after is not before


def test_a_kept_index_still_finds_a_truncated_or_missing_data_file(ckpt):
    index = read_index(ckpt)
    data = ckpt / index.files[0].name
    with open(data, "r+b") as f:
        f.truncate(index.files[0].size - 1)
    with pytest.raises(CorruptCheckpointError, match="truncated or overwritten"):
        read_index(ckpt)
    data.unlink()
    with pytest.raises(MissingFileError, match="missing"):
        read_index(ckpt)


def test_a_corrupted_index_after_a_good_read_is_an_error(ckpt):
    read_index(ckpt)
    (ckpt / INDEX_FILE).write_text('{"format": "tangram", "files": [')
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        read_index(ckpt)


def test_the_kept_parses_are_bounded(ckpt, monkeypatch):
    monkeypatch.setattr(store_format, "PARSED_KEEP", 2)
    raw = json.loads((ckpt / INDEX_FILE).read_text())
    for i in range(5):  # five different index texts (metadata differs)
        (ckpt / INDEX_FILE).write_text(json.dumps({**raw, "metadata": {**raw["metadata"], "n": i}}))
        assert read_index(ckpt).metadata["n"] == i
    assert len(store_format._PARSED) <= 2
