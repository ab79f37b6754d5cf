"""Save -> load round trips are bit-exact for every dtype, shape, size and read method."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import (
    READ_METHODS,
    all_dtype_state,
    assert_bit_exact,
    assert_state_equal,
    make_tensor,
    raw_bytes,
    skip_if_no_odirect,
)
from tangram.store import Loader, load, read_index, save
from tangram.store.format import ALIGNMENT, DTYPES, INDEX_FILE, dtype_name

TAIL_SIZES = [1, 511, 513, 4095, 4096, 4097, 1_000_003]


def check_layout(path, state):
    """The on-disk layout matches the index: aligned offsets, exact file sizes, raw bytes at the offsets."""
    index = read_index(path)
    datas = [(path / f.name).read_bytes() for f in index.files]
    for f, data in zip(index.files, datas):
        assert len(data) == f.size
    for name, entry in index.tensors.items():
        assert entry.offset % ALIGNMENT == 0, name
        assert entry.dtype == dtype_name(state[name].dtype)
        assert entry.shape == list(state[name].shape)
        chunk = datas[entry.file][entry.offset : entry.offset + entry.nbytes]
        assert chunk == raw_bytes(state[name]).numpy().tobytes(), name
    return index


def test_dtype_table_covers_llm_dtypes():
    for name in ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"):
        assert name in DTYPES
    for name in ("float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64"):
        if hasattr(torch, name):
            assert name in DTYPES
    for name, dtype in DTYPES.items():
        assert dtype_name(dtype) == name
    with pytest.raises(ValueError, match="not supported"):
        dtype_name(torch.complex128)


def test_unsupported_dtype_refused_and_nothing_left(tmp_path):
    with pytest.raises(ValueError, match="not supported"):
        save({"a": torch.zeros(3), "c": torch.zeros(4, dtype=torch.complex128)}, tmp_path / "c")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("method", READ_METHODS)
@pytest.mark.parametrize("chunk_bytes", [4096, 8192, 16 << 20])
def test_every_dtype_roundtrip(tmp_path, method, chunk_bytes):
    state = all_dtype_state()
    path = tmp_path / "ckpt"
    index = save(state, path, max_shard_bytes=64 << 10)
    assert len(index.files) > 1  # several shards
    check_layout(path, state)
    skip_if_no_odirect(method, path / index.files[0].name)
    loaded = Loader(method=method, chunk_bytes=chunk_bytes, threads=3).load(path)
    assert_state_equal(loaded, state)
    for name, t in loaded.items():
        assert t.device.type == "cpu"
        if t.numel():
            assert t.data_ptr() % 256 == 0, name  # placed on DEST_ALIGNMENT boundaries


def test_zero_dim_and_empty_tensors(tmp_path):
    state = {
        "scalar_f32": torch.tensor(3.5),
        "scalar_bool": torch.tensor(True),
        "scalar_i64": torch.tensor(-(2**62)),
        "empty": torch.empty(0),
        "empty_2d": torch.empty(4, 0, dtype=torch.bfloat16),
        "after": torch.arange(10, dtype=torch.int16),
    }
    index = save(state, tmp_path / "c")
    assert index.tensors["scalar_f32"].shape == []
    assert index.tensors["scalar_f32"].nbytes == 4
    assert index.tensors["empty_2d"].shape == [4, 0]
    assert index.tensors["empty_2d"].nbytes == 0
    loaded = load(tmp_path / "c", method="pread")
    assert_state_equal(loaded, state)
    assert loaded["scalar_f32"].dim() == 0 and loaded["scalar_f32"].item() == 3.5
    assert loaded["scalar_i64"].item() == -(2**62)
    assert loaded["scalar_bool"].item() is True


@pytest.mark.parametrize("method", READ_METHODS)
@pytest.mark.parametrize("nbytes", TAIL_SIZES)
def test_unaligned_sizes_and_file_tail(tmp_path, method, nbytes):
    """Tensors whose byte length is not a multiple of 512/4096, the last one ending the data file."""
    state = {
        "head": make_tensor((nbytes,), torch.uint8, seed=1),
        "mid": make_tensor((3,), torch.float16, seed=2),
        "tail": make_tensor((nbytes,), torch.uint8, seed=3),  # the file ends inside this tensor's block
    }
    path = tmp_path / "c"
    index = save(state, path)
    data = path / index.files[-1].name
    assert data.stat().st_size == index.tensors["tail"].offset + nbytes  # no trailing padding
    skip_if_no_odirect(method, data)
    for chunk_bytes in (4096, 8192, 16 << 20):
        loaded = Loader(method=method, chunk_bytes=chunk_bytes, threads=2).load(path)
        assert_state_equal(loaded, state)


@pytest.mark.parametrize("method", READ_METHODS)
def test_multiple_shards(tmp_path, method):
    state = {f"t{i}": make_tensor((1000 + 37 * i,), torch.float32, seed=i) for i in range(12)}
    path = tmp_path / "c"
    index = save(state, path, max_shard_bytes=12 << 10)
    assert len(index.files) >= 4
    assert [f.name for f in index.files] == [f"data-{i:05d}.bin" for i in range(len(index.files))]
    for f in index.files:
        # a shard holds more than max bytes only if a single tensor does
        assert f.size <= 12 << 10 or sum(e.file == index.files.index(f) for e in index.tensors.values()) == 1
    assert {e.file for e in index.tensors.values()} == set(range(len(index.files)))
    check_layout(path, state)
    skip_if_no_odirect(method, path / index.files[0].name)
    loader = Loader(method=method, chunk_bytes=4096, threads=4)
    assert_state_equal(loader.load(path), state)
    # a subset spanning several files
    sub = loader.load(path, names=["t0", "t11", "t5"])
    assert list(sub) == ["t0", "t11", "t5"]
    assert_state_equal(sub, {k: state[k] for k in ("t0", "t11", "t5")})


def test_shard_larger_than_limit_holds_one_tensor(tmp_path):
    state = {"small": torch.ones(10), "big": make_tensor((40_000,), torch.uint8), "after": torch.zeros(3)}
    index = save(state, tmp_path / "c", max_shard_bytes=16 << 10)
    assert [index.tensors[n].file for n in ("small", "big", "after")] == [0, 1, 2]
    assert_state_equal(load(tmp_path / "c"), state)


def test_padding_is_zero_and_index_is_json(tmp_path):
    state = {"a": make_tensor((5,), torch.uint8, 1), "b": make_tensor((7,), torch.uint8, 2)}
    save(state, tmp_path / "c", purpose="test", step=3)
    data = (tmp_path / "c" / "data-00000.bin").read_bytes()
    assert len(data) == ALIGNMENT + 7
    assert data[5:ALIGNMENT] == bytes(ALIGNMENT - 5)
    raw = json.loads((tmp_path / "c" / INDEX_FILE).read_text())
    assert raw["format"] == "tangram" and raw["version"] == 1 and raw["alignment"] == ALIGNMENT
    assert raw["metadata"]["purpose"] == "test" and raw["metadata"]["step"] == 3
    assert raw["metadata"]["created_by"].startswith("tangram ")
    assert sorted(raw["tensors"]) == ["a", "b"]


def test_tied_tensors_stored_once(tmp_path):
    w = make_tensor((64, 32), torch.float32, seed=5)
    state = {
        "embed.weight": w,
        "lm_head.weight": w,  # tied: the same tensor object
        "copy.weight": w.clone(),  # equal content: stored once too
        "other": make_tensor((64, 32), torch.float32, seed=6),
        "same_bytes_other_dtype": w.view(torch.int32),  # equal bytes, different identity: stored
    }
    path = tmp_path / "c"
    index = save(state, path)
    assert set(index.tensors) == {"embed.weight", "other", "same_bytes_other_dtype"}
    assert index.aliases == {"lm_head.weight": "embed.weight", "copy.weight": "embed.weight"}
    assert index.names() == sorted(state)
    assert index.entry("lm_head.weight") is index.tensors["embed.weight"]
    assert index.tensors["same_bytes_other_dtype"].hash == index.tensors["embed.weight"].hash
    # the data file holds one copy of w per stored identity: 3 tensors of 8 KiB, not 5
    assert (path / "data-00000.bin").stat().st_size == 3 * w.nbytes
    assert index.total_bytes == 3 * w.nbytes
    loaded = load(path)
    assert_state_equal(loaded, state)
    assert loaded["lm_head.weight"].data_ptr() == loaded["embed.weight"].data_ptr()
    assert loaded["copy.weight"].data_ptr() == loaded["embed.weight"].data_ptr()
    assert loaded["other"].data_ptr() != loaded["embed.weight"].data_ptr()
    # asking only for an alias loads the stored tensor behind it
    only = load(path, names=["lm_head.weight"])
    assert list(only) == ["lm_head.weight"]
    assert_bit_exact(only["lm_head.weight"], w)


def test_streamed_iterable_and_noncontiguous_inputs(tmp_path):
    base = make_tensor((6, 10), torch.float32, seed=9)
    items = [("t", base.t()), ("strided", base[:, ::3]), ("grad", torch.ones(3, requires_grad=True))]

    def gen():
        yield from items

    save(gen(), tmp_path / "c")
    loaded = load(tmp_path / "c")
    for name, t in items:
        assert_bit_exact(loaded[name], t.detach().contiguous(), name)
        assert loaded[name].is_contiguous()


def test_empty_state(tmp_path):
    index = save({}, tmp_path / "c")
    assert index.files == [] and index.tensors == {}
    assert load(tmp_path / "c") == {}


def test_extra_files_copied(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text('{"model_type": "x"}')
    save({"a": torch.ones(2)}, tmp_path / "c", extra_files={"config.json": cfg})
    assert (tmp_path / "c" / "config.json").read_text() == '{"model_type": "x"}'


_dtypes = st.sampled_from(sorted(DTYPES))
_shapes = st.lists(st.integers(0, 40), min_size=0, max_size=3)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    specs=st.lists(st.tuples(_dtypes, _shapes), min_size=1, max_size=8),
    method=st.sampled_from(["pread", "mmap", "odirect"]),
    chunk_kib=st.sampled_from([4, 8, 64]),
    shard_kib=st.sampled_from([4, 16, 1 << 20]),
    seed=st.integers(0, 2**16),
)
def test_property_roundtrip(tmp_path_factory, specs, method, chunk_kib, shard_kib, seed):
    state = {f"t{i}": make_tensor(shape, DTYPES[d], seed=seed + i) for i, (d, shape) in enumerate(specs)}
    path = tmp_path_factory.mktemp("prop") / "c"
    index = save(state, path, max_shard_bytes=shard_kib << 10)
    assert len(index.tensors) + len(index.aliases) == len(state)
    check_layout(path, {n: state[n] for n in index.tensors})
    if method == "odirect" and index.files:
        skip_if_no_odirect(method, path / index.files[0].name)
    loaded = Loader(method=method, chunk_bytes=chunk_kib << 10, threads=2).load(path)
    assert_state_equal(loaded, state)
