"""Read mechanisms: page-cache residency, O_DIRECT straight into aligned destinations, the `auto` method."""

from __future__ import annotations

import os

import pytest
import torch

from tangram.store import Loader, execute, io, save
from tangram.store.format import ALIGNMENT, Checkpoint
from tangram.store.plan import ReadRun, Segment

pytestmark = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.bin"
    payload = os.urandom(64 * ALIGNMENT + 123)  # ends mid-block
    path.write_bytes(payload)
    if not io.odirect_supported(path):
        pytest.skip("filesystem refuses O_DIRECT")
    return path, payload


def test_cached_fraction_follows_the_page_cache(data_file):
    path, payload = data_file
    fd = os.open(path, os.O_RDONLY)
    try:
        io.evict_from_page_cache(path)
        assert io.cached_fraction(fd, 0, len(payload)) < 0.5
        io.populate_page_cache(path)
        assert io.cached_fraction(fd, 0, len(payload)) == 1.0
        assert io.cached_fraction(fd, 0, 0) == 1.0
    finally:
        os.close(fd)


def test_direct_read_lands_in_aligned_destination_without_bounce(data_file):
    path, payload = data_file
    dest = io.host_buffer(16 * ALIGNMENT)  # page aligned, whole blocks
    bounce = io.host_buffer(32 * ALIGNMENT)
    bounce.fill_(0xAB)
    run = ReadRun(0, 4 * ALIGNMENT, [Segment(16 * ALIGNMENT, dest, 0)])
    fd = io.open_data_file(path, direct=True)
    try:
        io.read_direct(fd, run, bounce, path)
    finally:
        os.close(fd)
    assert bytes(dest.numpy()) == payload[4 * ALIGNMENT : 20 * ALIGNMENT]
    assert bool((bounce == 0xAB).all())  # nothing went through the bounce buffer


def test_direct_read_through_the_bounce_copies_even_aligned_parts(data_file):
    path, payload = data_file
    dest = io.shared_host_buffer(16 * ALIGNMENT)[0]  # aligned, but 4 KiB-page shared memory
    bounce = io.host_buffer(32 * ALIGNMENT)
    bounce.fill_(0xAB)
    run = ReadRun(0, 4 * ALIGNMENT, [Segment(16 * ALIGNMENT, dest, 0)])
    fd = io.open_data_file(path, direct=True)
    try:
        io.read_direct(fd, run, bounce, path, through_bounce=True)
    finally:
        os.close(fd)
    assert bytes(dest.numpy()) == payload[4 * ALIGNMENT : 20 * ALIGNMENT]
    assert bytes(bounce[: 16 * ALIGNMENT].numpy()) == bytes(dest.numpy())  # it went through the bounce


def test_direct_reads_land_in_private_memory_and_in_shared_memory_only_with_huge_pages(monkeypatch, tmp_path):
    assert io.direct_reads_land_fast(False)
    knob = tmp_path / "shmem_enabled"
    real = io.Path

    def at(path, *a):
        return knob if str(path).endswith("shmem_enabled") else real(path, *a)

    monkeypatch.setattr(io, "Path", at)
    for text, fast in (("always within_size advise [never] deny force", False), ("always [advise] never", True),
                       ("[always] never", True), ("always never [deny]", False)):
        knob.write_text(text + "\n")
        assert io.direct_reads_land_fast(True) is fast, text
    knob.unlink()
    assert not io.direct_reads_land_fast(True)  # no such knob: assume 4 KiB pages


def test_direct_read_of_unaligned_parts_and_the_file_tail(data_file):
    path, payload = data_file
    start = 60 * ALIGNMENT
    n = len(payload) - start  # 4 blocks + 123 bytes: the last block is short at EOF
    holder = torch.zeros(n + 1, dtype=torch.uint8)
    dest = holder[1:]  # deliberately misaligned destination
    run = ReadRun(0, start, [Segment(100, dest, 0), Segment(n - 100, dest, 100)])
    fd = io.open_data_file(path, direct=True)
    try:
        io.read_direct(fd, run, io.host_buffer(8 * ALIGNMENT), path)
    finally:
        os.close(fd)
    assert bytes(dest.numpy()) == payload[start:]


@pytest.mark.parametrize("warm", [False, True])
def test_auto_reads_cold_chunks_direct_and_warm_chunks_buffered(tmp_path, monkeypatch, warm):
    state = {f"w{i}": torch.randn(8192) for i in range(4)}
    save(state, tmp_path / "c")
    ckpt = Checkpoint(tmp_path / "c")
    if not io.odirect_supported(ckpt.file_path(0)):
        pytest.skip("filesystem refuses O_DIRECT")
    calls: list[str] = []
    for name in ("read_direct", "read_scatter"):
        real = getattr(io, name)
        monkeypatch.setattr(io, name, lambda *a, _real=real, _name=name, **k: (calls.append(_name), _real(*a, **k))[1])
    (io.populate_page_cache if warm else io.evict_from_page_cache)(ckpt.file_path(0))
    loaded = Loader(method="auto", threads=2, chunk_bytes=ALIGNMENT * 8).load(ckpt)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert calls and set(calls) == {"read_scatter" if warm else "read_direct"}


def test_auto_falls_back_to_buffered_reads_without_o_direct(tmp_path, monkeypatch):
    state = {"w": torch.randn(5000)}
    save(state, tmp_path / "c")
    real_open = io.open_data_file

    def refuse_direct(path, *, direct):
        if direct:
            raise OSError(22, "Invalid argument")
        return real_open(path, direct=direct)

    monkeypatch.setattr(io, "open_data_file", refuse_direct)
    loaded = Loader(method="auto").load(tmp_path / "c")
    assert torch.equal(loaded["w"], state["w"])
    with pytest.raises(OSError, match="O_DIRECT not supported"):
        Loader(method="odirect").load(tmp_path / "c")


def test_execute_is_importable_from_store():
    assert execute.ReadConfig().label == "pread/2x16MiB"


def test_residency_sees_part_of_a_file_cached(data_file):
    path, payload = data_file
    fd = os.open(path, os.O_RDONLY)
    res = io.Residency(fd)
    try:
        io.evict_from_page_cache(path)
        half = 32 * ALIGNMENT
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no read-ahead past what is read
        os.pread(fd, half, 0)  # the first half through the page cache
        assert res.fraction(0, half, sample_bytes=4 * ALIGNMENT) == 1.0
        assert res.fraction(48 * ALIGNMENT, 16 * ALIGNMENT, sample_bytes=4 * ALIGNMENT) < 0.5
        assert res.fraction(len(payload) + ALIGNMENT, ALIGNMENT) == 0.0  # past the end: not cached
        assert res.fraction(0, 0) == 1.0
    finally:
        res.close()
        os.close(fd)


def test_auto_maps_each_file_once_per_load_not_once_per_chunk(tmp_path, monkeypatch):
    from conftest import make_tensor

    state = {f"w{i}": make_tensor((20 * ALIGNMENT,), torch.uint8, seed=i) for i in range(4)}
    save(state, tmp_path / "c")
    made = []
    real = io.Residency.__init__

    def init(self, fd):
        made.append(fd)
        real(self, fd)

    monkeypatch.setattr(io.Residency, "__init__", init)
    got = Loader(method="auto", threads=2, chunk_bytes=4 * ALIGNMENT).load(tmp_path / "c")
    assert all(torch.equal(got[n], t) for n, t in state.items())
    assert len(made) == 1  # 20 chunks, one data file


def test_resident_fraction_sees_a_populated_file_whole_and_an_evicted_one_gone(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(4 << 20))
    io.populate_page_cache(path)
    assert io.resident_fraction(path) == 1.0
    if io.odirect_supported(path):  # a disk-backed filesystem: its pages can be dropped (tmpfs keeps them)
        io.evict_from_page_cache(path)
        assert io.resident_fraction(path) < 0.5
