"""The loader: partial loads read only what is asked, reads coalesce, concurrent loads stay exact."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import READ_METHODS, assert_state_equal, make_tensor, skip_if_no_odirect
from tangram.store import Checkpoint, LoadStats, Loader, load, read_index, save
from tangram.store import io as store_io
from tangram.store.format import ALIGNMENT, align_up

SENTINEL = 0xAB


def mixed_state(seed=0, n=10):
    dtypes = [torch.float32, torch.bfloat16, torch.int8, torch.float16, torch.int64]
    return {f"layer{i}.w": make_tensor((97 + 401 * i,), dtypes[i % len(dtypes)], seed=seed + i) for i in range(n)}


@pytest.fixture
def ckpt(tmp_path):
    state = mixed_state()
    path = tmp_path / "ckpt"
    save(state, path, max_shard_bytes=16 << 10)
    return path, state


@pytest.fixture
def record_reads(monkeypatch):
    """Record (file, offset, length) of every planned read the pread path executes."""
    seen: list[tuple[int, int, int]] = []
    real = store_io.read_scatter

    def spy(fd, run, path):
        seen.append((run.file, run.offset, run.length))
        return real(fd, run, path)

    monkeypatch.setattr(store_io, "read_scatter", spy)
    return seen


def test_load_subset_reads_only_requested(ckpt, record_reads):
    path, state = ckpt
    index = read_index(path)
    wanted = ["layer2.w", "layer7.w", "layer8.w"]
    loader = Loader(method="pread", chunk_bytes=4096, threads=2)
    got = loader.load(path, names=wanted)
    assert list(got) == wanted
    assert_state_equal(got, {n: state[n] for n in wanted})
    stats = loader.last_stats
    assert isinstance(stats, LoadStats)
    payload = sum(index.tensors[n].nbytes for n in wanted)
    assert stats.bytes_from_disk == payload
    assert stats.bytes_from_cache == 0
    assert stats.tensors == 3
    # every byte read belongs to a requested tensor or to the padding right before another requested one
    wanted_ranges = {(index.tensors[n].file, index.tensors[n].offset, index.tensors[n].offset + index.tensors[n].nbytes)
                     for n in wanted}
    assert len(record_reads) >= 3
    read_total = 0
    for file, off, length in record_reads:
        read_total += length
        # a read starts at a requested tensor or at a chunk cut inside one (or inside its trailing padding)
        assert any(f == file and lo <= off < align_up(hi) for f, lo, hi in wanted_ranges), (file, off)
        for name, e in index.tensors.items():
            if name in wanted or e.file != file:
                continue
            assert off + length <= e.offset or off >= e.offset + e.nbytes, f"read {off}+{length} touches {name}"
    assert read_total == stats.bytes_from_disk + stats.bytes_padding
    assert stats.bytes_padding < ALIGNMENT * len(wanted)


@pytest.mark.parametrize("method", READ_METHODS)
def test_load_into_subset_leaves_other_bytes_untouched(ckpt, method):
    path, state = ckpt
    skip_if_no_odirect(method, path / "data-00000.bin")
    ckpt_ = Checkpoint(path)
    index = ckpt_.index
    # one arena holding every tensor with a 1000-byte guard band around each
    layout, pos = {}, 1000
    for name, e in index.tensors.items():
        layout[name] = pos
        pos += e.nbytes + 1000
    arena = torch.full((pos,), SENTINEL, dtype=torch.uint8)
    wanted = ["layer0.w", "layer1.w", "layer5.w", "layer9.w"]
    dests = {n: arena[layout[n] : layout[n] + index.tensors[n].nbytes] for n in wanted}
    stats = Loader(method=method, chunk_bytes=8192, threads=3).load_into(ckpt_, dests)
    assert stats.method == method
    assert stats.bytes_from_disk == sum(index.tensors[n].nbytes for n in wanted)
    assert stats.bytes_total == stats.bytes_from_disk
    touched = torch.zeros(pos, dtype=torch.bool)
    for n in wanted:
        lo = layout[n]
        assert torch.equal(arena[lo : lo + index.tensors[n].nbytes], state[n].reshape(-1).view(torch.uint8)), n
        touched[lo : lo + index.tensors[n].nbytes] = True
    assert bool((arena[~touched] == SENTINEL).all()), "bytes outside the requested destinations changed"


def test_coalescing_many_small_tensors(tmp_path):
    state = {f"t{i:03d}": make_tensor((25,), torch.float32, seed=i) for i in range(200)}  # 100 bytes each
    save(state, tmp_path / "c")
    ck = Checkpoint(tmp_path / "c")
    dests = {n: torch.empty(100, dtype=torch.uint8) for n in state}
    stats = Loader(method="pread", threads=2).load_into(ck, dests)
    assert stats.reads == 1  # 200 tensors, one read
    assert stats.bytes_from_disk == 200 * 100
    assert stats.bytes_padding == 199 * (ALIGNMENT - 100)
    for n in state:
        assert torch.equal(dests[n], state[n].view(torch.uint8))
    # smaller chunks: the same bytes in chunk-sized reads
    stats = Loader(method="pread", chunk_bytes=50 * ALIGNMENT).load_into(ck, dests)
    assert stats.reads == 4
    assert stats.bytes_from_disk == 200 * 100


def test_far_apart_tensors_are_not_coalesced(tmp_path):
    state = {"a": make_tensor((10,), torch.uint8, 1), "big": make_tensor((200_000,), torch.uint8, 2),
             "b": make_tensor((10,), torch.uint8, 3)}
    save(state, tmp_path / "c")
    ck = Checkpoint(tmp_path / "c")
    stats = Loader(method="pread").load_into(ck, {n: torch.empty(10, dtype=torch.uint8) for n in ("a", "b")})
    assert stats.reads == 2  # the 200 KB gap is above max_gap: no reading of "big"
    assert stats.bytes_padding == 0
    assert stats.bytes_from_disk == 20


def test_stats_consistent(ckpt):
    path, state = ckpt
    index = read_index(path)
    dests = {n: torch.empty(e.nbytes, dtype=torch.uint8) for n, e in index.tensors.items()}
    progress: list[int] = []
    stats = Loader(method="mmap", chunk_bytes=4096, threads=4).load_into(path, dests, progress=progress.append)
    assert stats.tensors == len(state)
    assert stats.bytes_total == stats.bytes_from_disk == index.total_bytes
    assert stats.bytes_from_cache == 0
    assert stats.reads >= len(index.files)
    assert stats.method == "mmap" and stats.threads == 4
    assert stats.seconds > 0
    assert sum(progress) == index.total_bytes
    # each read is at most a chunk
    assert stats.bytes_from_disk + stats.bytes_padding <= stats.reads * 4096


def test_default_method_and_env_override(ckpt, monkeypatch):
    path, state = ckpt
    index = read_index(path)
    dests = {n: torch.empty(e.nbytes, dtype=torch.uint8) for n, e in index.tensors.items()}
    assert Loader().load_into(path, dests).method == "pread"  # small files are never measured
    monkeypatch.setenv("TANGRAM_READ_METHOD", "mmap")
    assert Loader().load_into(path, dests).method == "mmap"
    assert Loader(method="pread").load_into(path, dests).method == "pread"  # explicit beats env
    for n, d in dests.items():
        assert torch.equal(d, state[n].reshape(-1).view(torch.uint8))


def test_concurrent_loads(tmp_path):
    paths, states = [], []
    for k in range(3):
        state = mixed_state(seed=100 * k, n=8)
        save(state, tmp_path / f"c{k}", max_shard_bytes=8192)
        paths.append(tmp_path / f"c{k}")
        states.append(state)
    shared = Loader(chunk_bytes=4096, threads=3)
    jobs = []
    for i in range(8):
        k = i % 3
        method = READ_METHODS[i % 3] if READ_METHODS[i % 3] != "odirect" or store_io.odirect_supported(
            paths[k] / "data-00000.bin") else "pread"
        loader = shared if i % 2 else Loader(method=method, chunk_bytes=8192, threads=2)
        jobs.append((loader, k))
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(lambda lk: (lk[1], lk[0].load(paths[lk[1]])), job) for job in jobs]
        results = [f.result() for f in futures]
    assert len(results) == 8
    for k, got in results:
        assert_state_equal(got, states[k])


def test_concurrent_load_into_same_checkpoint(ckpt):
    path, state = ckpt
    opened = Checkpoint(path)
    loader = Loader(method="pread", chunk_bytes=4096)

    def one(_):
        dests = {n: torch.empty(e.nbytes, dtype=torch.uint8) for n, e in opened.index.tensors.items()}
        return loader.load_into(opened, dests), dests

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    for stats, dests in results:
        assert stats.bytes_from_disk == opened.index.total_bytes
        for n, d in dests.items():
            assert torch.equal(d, state[n].reshape(-1).view(torch.uint8))


def test_bad_destinations(ckpt):
    path, _ = ckpt
    ck = Checkpoint(path)
    e = ck.index.tensors["layer1.w"]
    loader = Loader(method="pread")
    bad = [
        {"layer1.w": torch.empty(e.nbytes + 1, dtype=torch.uint8)},  # wrong size
        {"layer1.w": torch.empty(e.nbytes - 1, dtype=torch.uint8)},
        {"layer1.w": torch.empty(e.nbytes // 2, dtype=torch.int16)},  # wrong dtype
        {"layer1.w": torch.empty(2, e.nbytes // 2, dtype=torch.uint8)},  # not flat
        {"layer1.w": torch.empty(2 * e.nbytes, dtype=torch.uint8)[::2]},  # not contiguous
        {"layer1.w": torch.empty(e.nbytes, dtype=torch.uint8),  # devices mixed
         "layer2.w": torch.empty(ck.index.tensors["layer2.w"].nbytes, dtype=torch.uint8, device="meta")},
    ]
    for dests in bad:
        with pytest.raises(ValueError, match="layer1.w|devices"):
            loader.load_into(ck, dests)


def test_bad_destination_for_empty_tensor(tmp_path):
    save({"empty": torch.empty(0, 3), "x": torch.ones(4)}, tmp_path / "c")
    with pytest.raises(ValueError, match="'empty'"):
        Loader().load_into(tmp_path / "c", {"empty": torch.empty(5, dtype=torch.uint8)})


def test_top_level_load_names_and_order(ckpt):
    path, state = ckpt
    got = load(path, names=iter(["layer9.w", "layer0.w"]), method="odirect" if store_io.odirect_supported(
        path / "data-00000.bin") else "pread", chunk_bytes=8192)
    assert list(got) == ["layer9.w", "layer0.w"]
    assert_state_equal(got, {n: state[n] for n in got})
    assert load(path, names=[]) == {}


def test_single_thread_loader(ckpt):
    path, state = ckpt
    assert_state_equal(Loader(threads=1, method="pread", chunk_bytes=4096).load(path), state)


@pytest.mark.parametrize("method", READ_METHODS)
def test_ordered_load_reports_each_tensor_as_it_lands_complete(ckpt, method):
    path, state = ckpt
    skip_if_no_odirect(method, path / "data-00000.bin")
    index = read_index(path)
    dests = {n: torch.full((e.nbytes,), SENTINEL, dtype=torch.uint8) for n, e in index.tensors.items()}
    order = [["layer9.w", "layer0.w"], ["layer4.w"], ["layer5.w", "layer1.w", "layer2.w"]]
    seen: list[str] = []

    def landed(name: str) -> None:  # called from a reader thread: the bytes must all be there already
        assert torch.equal(dests[name], state[name].reshape(-1).view(torch.uint8)), name
        seen.append(name)

    Loader(method=method, chunk_bytes=4096, threads=3).load_into(path, dests, order=order, landed=landed)
    assert sorted(seen) == sorted(dests)  # every tensor once (the ones outside `order` last)
    assert_state_equal({n: d.view(state[n].dtype).view(state[n].shape) for n, d in dests.items()}, state)


def test_one_reader_lands_tensors_group_after_group(ckpt):
    path, _ = ckpt
    index = read_index(path)
    dests = {n: torch.empty(e.nbytes, dtype=torch.uint8) for n, e in index.tensors.items()}
    order = [["layer8.w"], ["layer3.w", "layer1.w"], ["layer6.w"]]
    seen: list[str] = []
    Loader(method="pread", threads=1).load_into(path, dests, order=order, landed=seen.append)
    assert seen[:4] == ["layer8.w", "layer1.w", "layer3.w", "layer6.w"]  # within a group: file order
    assert sorted(seen[4:]) == sorted(set(dests) - {"layer8.w", "layer3.w", "layer1.w", "layer6.w"})
