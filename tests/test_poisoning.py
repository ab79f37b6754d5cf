"""A corrupted checkpoint fails clearly and never poisons the pool: bytes are verified before they are shared.

The scenario of "First contact", critical defect 2: 12 bytes flipped in a data
file used to be served silently, and the intact original then re-used the
corrupt bytes from the pool as a pool hit (sharing trusted the index hash).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from conftest import READ_METHODS, make_tensor, skip_if_no_odirect
from tangram.pool import DevicePool
from tangram.store import HashMismatchError, Loader, read_index, save
from tangram.store import io as store_io

FLIPPED = 12


def corrupt_copy(src: Path, dst: Path, tensor: str, nbytes: int = FLIPPED) -> Path:
    """A copy of checkpoint `src` at `dst` with `nbytes` bytes flipped in the middle of `tensor`."""
    shutil.copytree(src, dst)
    index = read_index(dst)
    entry = index.tensors[index.resolve(tensor)]
    with open(dst / index.files[entry.file].name, "r+b") as fh:
        at = entry.offset + entry.nbytes // 2
        fh.seek(at)
        flipped = bytes(b ^ 0xFF for b in fh.read(nbytes))
        fh.seek(at)
        fh.write(flipped)
    return dst


def model_state() -> dict[str, torch.Tensor]:
    return {f"layer{i}.weight": make_tensor((6000 + 1000 * i,), torch.float32, seed=i) for i in range(4)}


@pytest.fixture
def original(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    state = model_state()
    save(state, tmp_path / "original")
    return tmp_path / "original", state


# --------------------------------------------------------------------------- loader


@pytest.mark.parametrize("method", READ_METHODS)
@pytest.mark.parametrize("threads", [1, 3])
def test_a_corrupt_tensor_fails_the_load_naming_file_and_tensor(original, tmp_path, method, threads):
    path, state = original
    skip_if_no_odirect(method, path / read_index(path).files[0].name)
    bad = corrupt_copy(path, tmp_path / "bad", "layer2.weight")
    landed: list[str] = []
    dests = {n: torch.empty(t.nbytes, dtype=torch.uint8) for n, t in state.items()}
    loader = Loader(method=method, threads=threads, chunk_bytes=8192)  # the tensor spans several chunks
    with pytest.raises(HashMismatchError) as ei:
        loader.load_into(bad, dests, landed=landed.append)
    msg = str(ei.value)
    assert "'layer2.weight'" in msg and str(bad / read_index(bad).files[0].name) in msg
    assert "layer2.weight" not in landed  # never reported: nothing can share or compute with it


def test_verification_can_be_turned_off_for_comparison(original, tmp_path):
    path, state = original
    bad = corrupt_copy(path, tmp_path / "bad", "layer1.weight")
    got = Loader(method="pread").load(bad, verify=False)
    assert not torch.equal(got["layer1.weight"].view(torch.uint8), state["layer1.weight"].view(torch.uint8))
    with pytest.raises(HashMismatchError):
        Loader(method="pread", verify=False).load(bad, verify=True)  # per call wins
    with pytest.raises(HashMismatchError):
        Loader(method="pread").load(bad)  # verified by default


@pytest.mark.parametrize("threads", [2, 4])
def test_verified_pieces_spanning_many_chunks_on_many_threads_load_exactly(original, threads):
    path, state = original
    landed: list[str] = []
    dests = {n: torch.empty(t.nbytes, dtype=torch.uint8) for n, t in state.items()}
    Loader(method="pread", threads=threads, chunk_bytes=4096).load_into(path, dests, landed=landed.append)
    assert sorted(landed) == sorted(state)
    for n, t in state.items():
        assert torch.equal(dests[n], t.view(torch.uint8)), n


def test_a_failing_reader_stops_the_others_and_its_error_comes_out(original, monkeypatch):
    path, state = original
    real = store_io.read_scatter
    calls = []

    def fails_on_the_first_chunk(fd, run, p):
        calls.append(run.offset)
        if run.offset == 0:
            raise OSError("disk went away")
        return real(fd, run, p)

    monkeypatch.setattr(store_io, "read_scatter", fails_on_the_first_chunk)
    dests = {n: torch.empty(t.nbytes, dtype=torch.uint8) for n, t in state.items()}
    with pytest.raises(OSError, match="disk went away"):  # not the stop of the threads waiting for chunk 0
        Loader(method="pread", threads=3, chunk_bytes=4096).load_into(path, dests)


# --------------------------------------------------------------------------- pool


def test_the_pool_never_shares_bytes_that_failed_their_check(original, tmp_path):
    path, state = original
    bad = corrupt_copy(path, tmp_path / "bad", "layer3.weight")
    key = read_index(path).tensors["layer3.weight"].key  # the same identity in both indexes
    pool = DevicePool(1 << 20, loader=Loader(method="pread", verify=False))  # the pool verifies anyway
    with pytest.raises(HashMismatchError, match="'layer3.weight'"):
        pool.acquire(bad)
    snap = pool.snapshot()
    assert key not in {t["key"] for t in snap["tensors"]}  # nothing under the corrupt tensor's hash
    assert snap["totals"]["active"] == 0
    good = pool.acquire(path)  # the intact original: the other three were verified and are shared
    assert good.bytes_loaded == state["layer3.weight"].nbytes
    for n, t in state.items():
        assert torch.equal(good.tensors[n].view(torch.uint8), t.view(torch.uint8)), n
    pool.release(good)


def test_a_background_acquire_of_a_corrupt_copy_fails_its_waiters(original, tmp_path):
    path, _ = original
    bad = corrupt_copy(path, tmp_path / "bad", "layer0.weight")
    pool = DevicePool(1 << 20, loader=Loader(method="pread"))
    binding = pool.acquire(bad, background=True)
    binding.loading.wait(30)
    assert binding.loading.done() and isinstance(binding.loading.error, HashMismatchError)
    assert binding.loading.landed["layer0.weight"].is_set() and binding.loading.failed()  # waiters wake, see it
    pool.release(binding)
    key = read_index(path).tensors["layer0.weight"].key
    assert key not in {t["key"] for t in pool.snapshot()["tensors"]}


# --------------------------------------------------------------------------- command line and server

BAD_TENSOR = "model.layers.0.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def served_model(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny chat model as a Tangram checkpoint, and a copy of it with 12 bytes flipped in BAD_TENSOR."""
    from serving import chat_model_dir
    from tangram.store import convert

    tmp = tmp_path_factory.mktemp("poison")
    hf = chat_model_dir(tmp / "hf", seed=4)
    convert(hf, tmp / "original")
    return tmp / "original", corrupt_copy(tmp / "original", tmp / "corrupt", BAD_TENSOR)


@pytest.mark.parametrize("command", [["load", "--device", "cpu"], ["run", "--device", "cpu", "--max-tokens", "2"]])
def test_the_cli_fails_clearly_on_a_corrupt_checkpoint(served_model, command):
    from typer.testing import CliRunner

    from tangram.cli import app

    _, bad = served_model
    args = [command[0], str(bad), *(["w5 w6"] if command[0] == "run" else []), *command[1:]]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 2, out.output
    assert BAD_TENSOR in out.output and "content hash" in out.output and "data-00000.bin" in out.output
    assert "Traceback" not in out.output


def _greedy(srv, model: str) -> list[str]:
    import openai

    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    return [client.completions.create(model=model, prompt=p, max_tokens=6, temperature=0).choices[0].text
            for p in ("w5 w6", "w9 w10 w11")]


def test_a_corrupt_copy_fails_its_start_and_never_poisons_the_original(served_model):
    import openai

    from serving import serving
    from tangram.control import Deployment

    original, bad = served_model
    with serving([Deployment(name="fresh", checkpoint=str(original))]) as srv:
        want = _greedy(srv, "fresh")  # a server that never saw the corrupt copy
    key = read_index(original).tensors[BAD_TENSOR].key
    deps = [Deployment(name="corrupt", checkpoint=str(bad)), Deployment(name="original", checkpoint=str(original))]
    with serving(deps) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError) as ei:
            client.completions.create(model="corrupt", prompt="w5 w6", max_tokens=6, temperature=0)
        assert ei.value.status_code >= 500 and BAD_TENSOR in ei.value.message and "content hash" in ei.value.message
        pool = srv.workers[0].pool
        assert key not in {t["key"] for t in pool.snapshot()["tensors"]}  # nothing left under the corrupt hash
        assert _greedy(srv, "original") == want  # exactly like a fresh load
        view = pool.acquire(original)  # a pool hit now: the bytes held under the hash are the original's
        try:
            want_bytes = Loader(method="pread").load(original, names=[BAD_TENSOR])[BAD_TENSOR]
            assert view.bytes_loaded == 0
            assert torch.equal(view.tensors[BAD_TENSOR].view(torch.uint8), want_bytes.view(torch.uint8))
        finally:
            pool.release(view)
