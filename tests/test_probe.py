"""Read-method probe: environment override, no measuring of small files, measured once and remembered."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import make_tensor
from tangram.paths import data_dir
from tangram.store import Loader, probe, save
from tangram.store.io import ReadMethod, odirect_supported


@pytest.fixture
def big_file(tmp_path):
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(probe.MIN_PROBE_BYTES))  # exactly the threshold: measured
    return path


# mmap wins on cold + warm time although odirect is faster cold
FAKE = {
    "pread/1x64MiB": {"cold": 1.0, "warm": 8.0},
    "mmap/2x16MiB": {"cold": 2.5, "warm": 8.0},
    "odirect/2x16MiB": {"cold": 3.0, "warm": 3.0},
}


@pytest.fixture
def fake_measure(monkeypatch):
    calls = []

    def measure(path, nbytes=probe.PROBE_BYTES, repeats=2):
        calls.append(str(path))
        return dict(FAKE)

    monkeypatch.setattr(probe, "measure_configs", measure)
    return calls


def test_data_dir_is_the_test_home(tangram_home):
    assert data_dir() == tangram_home
    assert probe._cache_file() == tangram_home / "read_method.json"


@pytest.mark.parametrize("value", ["pread", "odirect", "mmap"])
def test_env_override(monkeypatch, tmp_path, fake_measure, value, big_file):
    monkeypatch.setenv(probe.ENV_METHOD, value)
    assert probe.choose_config(big_file).method is ReadMethod(value)
    assert probe.choose_config(tmp_path / "does-not-even-exist").method is ReadMethod(value)
    assert fake_measure == []
    assert not probe._cache_file().exists()


def test_env_override_bad_value(monkeypatch, tmp_path):
    monkeypatch.setenv(probe.ENV_METHOD, "turbo")
    with pytest.raises(ValueError) as ei:
        probe.choose_config(tmp_path)
    msg = str(ei.value)
    assert "TANGRAM_READ_METHOD" in msg and "'turbo'" in msg
    assert all(m in msg for m in ("pread", "odirect", "mmap"))
    save({"a": torch.ones(3)}, tmp_path / "c")
    with pytest.raises(ValueError, match="turbo"):
        Loader().load(tmp_path / "c")  # the loader surfaces it as is


def test_small_file_uses_pread_without_persisting(tmp_path, fake_measure):
    small = tmp_path / "small.bin"
    small.write_bytes(b"x" * (probe.MIN_PROBE_BYTES - 1))
    assert probe.choose_config(small).method is ReadMethod.PREAD
    assert probe.choose_config(small).method is ReadMethod.PREAD
    assert fake_measure == []
    assert not probe._cache_file().exists()
    assert os.stat(small).st_dev not in probe._memo  # not remembered: a later big file gets measured


def test_big_file_measured_once_and_persisted(big_file, fake_measure):
    assert probe.choose_config(big_file).method is ReadMethod.MMAP  # the fastest of the fake measurement
    assert fake_measure == [str(big_file)]
    stored = json.loads(probe._cache_file().read_text())
    dev = str(os.stat(big_file).st_dev)
    assert stored[dev]["config"] == "mmap/2x16MiB"
    assert stored[dev]["gbps"] == FAKE
    assert stored[dev]["measured_on"] == str(big_file)
    # same process: memoised
    assert probe.choose_config(big_file).method is ReadMethod.MMAP
    # a new process (memo empty): read back from read_method.json, not measured again
    probe._memo.clear()
    assert probe.choose_config(big_file).method is ReadMethod.MMAP
    assert len(fake_measure) == 1
    # other files on the same filesystem share the answer, small ones included
    other = big_file.parent / "other.bin"
    other.write_bytes(b"y")
    assert probe.choose_config(other).method is ReadMethod.MMAP
    assert len(fake_measure) == 1
    # forget() drops both memo and file; the next call measures again
    probe.forget()
    assert not probe._cache_file().exists()
    assert probe.choose_config(big_file).method is ReadMethod.MMAP
    assert len(fake_measure) == 2


def test_unreadable_cache_file_is_remeasured(big_file, fake_measure):
    probe._cache_file().write_text("{broken")
    assert probe.choose_config(big_file).method is ReadMethod.MMAP
    assert len(fake_measure) == 1
    assert json.loads(probe._cache_file().read_text())[str(os.stat(big_file).st_dev)]["config"] == "mmap/2x16MiB"


def test_loader_uses_remembered_method(tmp_path, big_file, fake_measure):
    probe.choose_config(big_file)
    state = {"w": make_tensor((1000,), torch.float16, seed=3)}
    save(state, tmp_path / "c")
    dests = {"w": torch.empty(2000, dtype=torch.uint8)}
    stats = Loader().load_into(tmp_path / "c", dests)
    assert stats.method == "mmap"
    assert torch.equal(dests["w"], state["w"].view(torch.uint8))


def test_real_measurement(big_file):
    results = probe.measure_configs(big_file, repeats=1)
    odirect = odirect_supported(big_file)
    expected = {c.label for c in probe.CANDIDATES if odirect or c.method is not ReadMethod.ODIRECT}
    assert set(results) == expected
    assert all(g > 0 for v in results.values() for g in v.values())
    # end to end, with the real measurement
    config = probe.choose_config(big_file)
    stored = json.loads(probe._cache_file().read_text())[str(os.stat(big_file).st_dev)]
    assert stored["config"] == config.label
    assert config.label == min(stored["gbps"], key=lambda k: probe._score(stored["gbps"][k]))
    assert all(set(v) == {"cold", "warm"} for v in stored["gbps"].values())
