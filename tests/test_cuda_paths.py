"""CUDA-only code paths, checked without a GPU so that a lent GPU's first run is not spent on typos.

Two kinds of test:
- plumbing (CPU, always): every module imports; the CUDA branch of the loader's read executor runs with
  torch.cuda's Stream/Event/stream replaced by CPU stand-ins and CPU destinations (the bytes must land right,
  each tensor reported once, the staging ring must wait for a buffer's copies before reusing it); device
  arguments of the pool, the host cache, the engine and the benchmarks;
- on the device under test (`device_under_test`: $TANGRAM_TEST_DEVICE, cpu by default): loads, the pool, the
  host-cache tier and execute-while-load on that device, compared with the CPU. scripts/gpu-check runs this
  file with TANGRAM_TEST_DEVICE=cuda.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import pkgutil

import pytest
import torch
from typer.testing import CliRunner

import tangram
from conftest import all_dtype_state, assert_state_equal, engine_checkpoint, engine_model, make_tensor, reference_greedy
from tangram.store import HostCache, Loader, read_index, save
from tangram.store import io as store_io
from tangram.store import loader as store_loader
from tangram.store.errors import HashMismatchError

CHUNK = 64 << 10


OPTIONAL_DEPS = {"ray", "matplotlib", "vllm"}  # extras (cluster, bench; vllm: the vllm backend's shell modules, run by
# vLLM's own interpreter): a CUDA image without them still checks the rest


def test_every_module_imports():
    names = [m.name for m in pkgutil.walk_packages(tangram.__path__, "tangram.")]
    assert "tangram.store.execute" in names and "tangram.bench.gpu_check" in names
    for name in names:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name not in OPTIONAL_DEPS or importlib.util.find_spec(exc.name) is not None:
                raise


# --------------------------------------------------------------------------- the CUDA branch on CPU stand-ins


class FakeCuda:
    """CPU stand-ins for torch.cuda.Stream, Event, stream() and synchronize(), recording how they were used."""

    def __init__(self) -> None:
        self.streams: list[FakeCuda.Stream] = []
        self.events: list[FakeCuda.Event] = []
        self.entered: list[object] = []
        self.synced_devices: list[object] = []
        fake = self

        class Stream:
            def __init__(self, device=None, *args, **kwargs) -> None:
                self.device = torch.device(device) if device is not None else None
                fake.streams.append(self)

        class Event:
            def __init__(self, *args, **kwargs) -> None:
                self.recorded_on: object = None
                self.synced = 0
                fake.events.append(self)

            def record(self, stream=None) -> None:
                self.recorded_on = stream

            def synchronize(self) -> None:
                self.synced += 1

            def query(self) -> bool:
                return True

        self.Stream, self.Event = Stream, Event

    @contextlib.contextmanager
    def stream(self, s):
        self.entered.append(s)
        yield s

    def synchronize(self, device=None) -> None:
        self.synced_devices.append(device)


@pytest.fixture()
def fake_cuda(monkeypatch):
    """torch.cuda's stream and event API on the CPU, unpinned host buffers, and the loader's executor told that
    its (CPU) destinations are on cuda:0: the CUDA branch runs end to end on the CPU."""
    fake = FakeCuda()
    monkeypatch.setattr(torch.cuda, "Stream", fake.Stream)
    monkeypatch.setattr(torch.cuda, "Event", fake.Event)
    monkeypatch.setattr(torch.cuda, "stream", fake.stream)
    monkeypatch.setattr(torch.cuda, "synchronize", fake.synchronize)
    plain = store_io.host_buffer
    monkeypatch.setattr(store_io, "host_buffer", lambda nbytes, *, pin=False, touch=True: plain(nbytes, touch=touch))
    real = store_loader.execute
    calls: list[torch.device] = []

    def on_cuda(runs, paths, config, device, *args, **kwargs):
        assert device.type == "cpu"  # what the loader saw: CPU destinations
        calls.append(device)
        return real(runs, paths, config, torch.device("cuda", 0), *args, **kwargs)

    monkeypatch.setattr(store_loader, "execute", on_cuda)
    fake.calls = calls
    return fake


def _state() -> dict[str, torch.Tensor]:
    state = all_dtype_state(seed=3)
    for i in range(4):  # larger than a chunk: several reads per tensor, several tensors per read
        state[f"big.{i}"] = make_tensor((3 * CHUNK + 1000 * i,), torch.uint8, seed=50 + i)
    return state


@pytest.fixture()
def ckpt(tmp_path):
    state = _state()
    save(state, tmp_path / "ckpt")
    return tmp_path / "ckpt", state


def _dests(index) -> dict[str, torch.Tensor]:
    return {n: torch.full((e.nbytes,), 0xAB, dtype=torch.uint8) for n, e in index.tensors.items()}


def _typed(index, dests) -> dict[str, torch.Tensor]:
    out = {}
    for name in index.names():
        e = index.tensors[index.resolve(name)]
        out[name] = store_loader.typed_view(dests[index.resolve(name)], e.torch_dtype, e.shape)
    return out


@pytest.mark.timeout(60, method="thread")  # a hang is a failure in a minute (signals cannot stop a blocked wait)
@pytest.mark.parametrize("method", ["pread", "odirect", "mmap", "auto"])
def test_cuda_branch_of_the_executor_lands_every_byte(fake_cuda, ckpt, method):
    path, state = ckpt
    index = read_index(path)
    if method == "odirect" and not store_io.odirect_supported(path / index.files[0].name):
        pytest.skip("no O_DIRECT on this filesystem")
    loader = Loader(method=method, threads=3, chunk_bytes=CHUNK)  # the default ring: 2 x threads buffers
    dests = _dests(index)
    landed: list[str] = []
    stats = loader.load_into(path, dests, landed=landed.append)
    assert fake_cuda.calls, "the loader did not go through the executor"
    assert_state_equal(_typed(index, dests), state)
    nonempty = {n for n, e in index.tensors.items() if e.nbytes}
    assert nonempty <= set(landed) and len(landed) == len(set(landed))  # each tensor reported once
    assert stats.bytes_from_disk == sum(e.nbytes for e in index.tensors.values())
    assert fake_cuda.streams and all(s.device == torch.device("cuda", 0) for s in fake_cuda.streams)
    assert len(fake_cuda.streams) <= 3  # one per reader thread
    assert fake_cuda.events and all(e.recorded_on in fake_cuda.streams for e in fake_cuda.events)
    assert set(map(id, fake_cuda.entered)) <= set(map(id, fake_cuda.streams))  # copies enqueued on those streams
    # six staging buffers for many more reads: each reuse waited for the copies out of the buffer
    assert len(fake_cuda.events) > 12 and sum(1 for e in fake_cuda.events if e.synced) >= len(fake_cuda.events) - 6
    assert torch.device("cuda", 0) in fake_cuda.synced_devices


@pytest.mark.timeout(60, method="thread")
def test_cuda_branch_finishes_with_fewer_staging_buffers_than_reader_threads(fake_cuda, ckpt):
    """A reader that holds a staging buffer must never wait for a read that still needs one: with 2 buffers for
    3 threads (or several loads sharing one loader's ring) that hung when a tensor's later chunk waited for its
    earlier one to be hashed on another thread."""
    import threading

    path, state = ckpt
    index = read_index(path)
    loader = Loader(method="pread", threads=3, chunk_bytes=CHUNK, staging_buffers=2)
    results: list[dict[str, torch.Tensor]] = []

    def one() -> None:
        dests = _dests(index)
        loader.load_into(path, dests)
        results.append(dests)

    for concurrent in (1, 1, 1, 3, 3):
        threads = [threading.Thread(target=one, daemon=True) for _ in range(concurrent)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert not any(t.is_alive() for t in threads), f"{concurrent} load(s) on a 2-buffer ring did not finish"
    assert len(results) == 9
    for dests in results:
        assert_state_equal(_typed(index, dests), state)


@pytest.mark.timeout(60, method="thread")
def test_cuda_branch_reports_a_corrupt_tensor(fake_cuda, ckpt):
    path, _ = ckpt
    index = read_index(path)
    e = index.tensors["big.2"]
    data = path / index.files[e.file].name
    with open(data, "r+b") as fh:
        fh.seek(e.offset + 5)
        fh.write(bytes([fh.read(1)[0] ^ 0xFF]))
    with pytest.raises(HashMismatchError, match="big.2"):
        Loader(method="pread", threads=2, chunk_bytes=CHUNK).load_into(path, _dests(index), verify=True)


@pytest.mark.timeout(60, method="thread")
def test_cuda_branch_serves_host_cache_hits(fake_cuda, ckpt):
    path, state = ckpt
    index = read_index(path)
    loader = Loader(method="pread", threads=2, chunk_bytes=CHUNK, cache=HostCache(16 << 20, pin=False))
    loader.load_into(path, _dests(index))
    loader.cache.wait_idle()
    dests = _dests(index)
    stats = loader.load_into(path, dests)
    assert stats.bytes_from_cache == index.total_bytes and stats.bytes_from_disk == 0
    assert_state_equal(_typed(index, dests), state)


# --------------------------------------------------------------------------- device arguments


def test_host_cache_pins_its_entries_where_cuda_is_present(monkeypatch):
    from tangram.store import cache as store_cache

    asked: list[bool] = []
    plain = store_io.host_buffer

    def record(nbytes, *, pin=False, touch=True):
        asked.append(pin)
        return plain(nbytes, touch=touch)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(store_cache, "host_buffer", record)
    cache = HostCache(1 << 20)
    cache.fill([("k", make_tensor((1000,), torch.uint8))], verified=True)
    assert cache.get("k") is not None and asked == [True]


def test_free_bytes_of_a_cuda_device_come_from_cuda(monkeypatch):
    from tangram.pool.arena import free_device_bytes

    seen = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: seen.append(device) or (3 << 30, 8 << 30))
    assert free_device_bytes(torch.device("cuda", 1)) == 3 << 30
    assert seen and torch.device(seen[0]) == torch.device("cuda", 1)


def test_overlap_defaults_to_on_for_every_cuda_spelling():
    from tangram.engine import EngineConfig

    for dev in ("cuda", "cuda:1", torch.device("cuda", 0)):
        assert EngineConfig().overlaps(dev) and not EngineConfig(overlap="off").overlaps(dev)
    assert EngineConfig(overlap="on").overlaps("cpu") and not EngineConfig().overlaps(torch.device("cpu"))


def _fake_gpus(monkeypatch, n: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


def test_bench_devices_are_checked_before_any_work(monkeypatch):
    from tangram.bench.coldstart import server_device
    from tangram.bench.common import resolve_device
    from tangram.worker import local_devices

    _fake_gpus(monkeypatch, 0)
    for bad in ("cuda", "cuda:0", "tpu", "nonsense"):
        with pytest.raises(ValueError):
            resolve_device(bad)
    with pytest.raises(ValueError, match="CUDA is not available"):
        server_device("cuda")
    assert server_device("auto") == torch.device("cpu") == server_device("cpu")
    _fake_gpus(monkeypatch, 2)
    assert resolve_device("cuda") == torch.device("cuda", 0) and resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="only 2 CUDA"):
        resolve_device("cuda:2")
    assert local_devices() == ["cuda:0", "cuda:1"]
    assert server_device("cuda") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="server runs on cuda:0"):
        server_device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("args", [["bench", "load", "--device", "cuda", "--model", "tiny-qwen2", "--repeats", "1"],
                                  ["bench", "coldstart", "--quick", "--device", "cuda"]])
def test_bench_device_cuda_without_cuda_is_a_clear_error(args, tmp_path):
    from tangram.cli import app

    out = tmp_path / "r.json"
    result = CliRunner().invoke(app, [*args, "--json", str(out)])
    assert result.exit_code == 2, result.output
    assert "CUDA is not available" in result.output and not out.exists()


def test_overlap_probe_runs_on_the_given_device(monkeypatch, tmp_path):
    from tangram.bench import overlap_probe

    class Stop(Exception):
        pass

    seen = []

    def pool(capacity, device="cpu", **kw):
        seen.append(torch.device(device))
        raise Stop

    save({"w": torch.ones(4)}, tmp_path / "c")
    monkeypatch.setattr(overlap_probe, "DevicePool", pool)
    with pytest.raises(Stop):
        overlap_probe.probe_overlap(tmp_path / "c", [1, 2], device="cuda:0")
    assert seen == [torch.device("cuda", 0)]


def test_h2d_probe_refuses_cuda_without_cuda_and_measures_on_cpu(monkeypatch):
    from tangram.bench.gpu_probe import h2d_limit

    _fake_gpus(monkeypatch, 0)
    with pytest.raises(ValueError, match="CUDA is not available"):
        h2d_limit("cuda", 4096)
    doc = h2d_limit("cpu", 1 << 16, repeats=2)
    assert doc["bytes"] == 1 << 16 and len(doc["pinned"]["runs_s"]) == 2 and doc["h2d_pinned_gbps"] > 0


# --------------------------------------------------------------------------- on the device under test


@pytest.mark.parametrize("method", ["pread", "auto"])
def test_loads_on_the_device_under_test(device_under_test, ckpt, method):
    path, state = ckpt
    loaded = Loader(method=method, threads=3, chunk_bytes=CHUNK).load(path, device_under_test, verify=True)
    assert all(t.device.type == device_under_test.type for t in loaded.values())
    assert_state_equal(loaded, state)


def test_pool_and_host_cache_on_the_device_under_test(device_under_test, ckpt):
    from tangram.pool import DevicePool

    path, state = ckpt
    loader = Loader(method="pread", threads=2, chunk_bytes=CHUNK, cache=HostCache(16 << 20))
    pool = DevicePool(8 << 20, device_under_test, loader=loader)
    first = pool.acquire(path, model="m")
    assert first.bytes_loaded == read_index(path).total_bytes
    assert_state_equal(first.tensors, state)
    pool.release(first)
    again = pool.acquire(path, model="m")  # retained: a re-bind, nothing read
    assert again.bytes_loaded == 0
    assert_state_equal(again.tensors, state)
    pool.release(again)
    loader.cache.wait_idle()
    fresh = DevicePool(8 << 20, device_under_test, loader=loader)  # empty pool, warm host cache: the dram tier
    third = fresh.acquire(path, model="m")
    assert third.load is not None and third.load.bytes_from_cache == read_index(path).total_bytes
    assert_state_equal(third.tensors, state)
    fresh.release(third)


def test_execute_while_load_on_the_device_under_test(device_under_test, tmp_path):
    from tangram.engine import EngineConfig, Instance, SamplingParams
    from tangram.pool import DevicePool
    from tangram.templates import load_template

    model = engine_model("llama")
    ckpt = engine_checkpoint(model, tmp_path)
    prompt, params = [5, 17, 33, 9, 60, 7, 101], SamplingParams(max_tokens=8, ignore_eos=True)
    want = reference_greedy(model, prompt, 8)
    for first in (True, False):  # the first start records the template, the second loads and runs with it
        with Instance(ckpt, DevicePool(64 << 20, device_under_test),
                      EngineConfig(block_tokens=4, overlap="on")) as inst:
            templated = inst.template is not None
            out = inst.engine.generate([prompt], params)[0]
        assert templated != first and load_template(ckpt) is not None
        assert out.output_ids == want, f"{'first' if first else 'templated'} start on {device_under_test}"
