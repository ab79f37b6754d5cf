"""Read-method probe: never on a load's path, measured on demand and remembered, sound scoring, automatic runs."""

from __future__ import annotations

import json
import os
import threading

import pytest
import torch

from conftest import make_tensor
from tangram.paths import data_dir
from tangram.store import Loader, probe, probe_auto, save
from tangram.store.io import ReadMethod, odirect_supported


@pytest.fixture
def big_file(tmp_path):
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(probe.MIN_PROBE_BYTES))  # exactly the threshold: measurable
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

    def samples(path, nbytes=probe.PROBE_BYTES, repeats=probe.REPEATS, progress=None):
        calls.append(str(path))
        return {label: {s: [g] for s, g in v.items()} for label, v in FAKE.items()}

    monkeypatch.setattr(probe, "measure_samples", samples)
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
    monkeypatch.delenv("TANGRAM_PROBE")
    assert not probe_auto.auto_enabled()  # a forced method: nothing to measure automatically


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


def test_choose_config_never_measures(big_file, fake_measure, tmp_path):
    assert probe.choose_config(big_file) == probe.DEFAULT  # nothing remembered: the safe default, at once
    save({"w": make_tensor((3 << 20,), torch.float32, seed=1)}, tmp_path / "c")  # a 12 MiB data file
    stats = Loader().load_into(tmp_path / "c", {"w": torch.empty(12 << 20, dtype=torch.uint8)})
    assert stats.method == probe.DEFAULT.method.value
    assert fake_measure == [] and not probe._cache_file().exists()


def test_small_file_is_not_measured(tmp_path, fake_measure):
    small = tmp_path / "small.bin"
    small.write_bytes(b"x" * (probe.MIN_PROBE_BYTES - 1))
    with pytest.raises(ValueError, match="MiB"):
        probe.measure(small)
    assert fake_measure == [] and not probe._cache_file().exists()


def test_measured_once_remembered_and_persisted(big_file, fake_measure):
    result = probe.measure(big_file)
    assert result.config.method is ReadMethod.MMAP and result.gbps == FAKE  # the least cold + warm time
    stored = json.loads(probe._cache_file().read_text())
    dev = str(os.stat(big_file).st_dev)
    assert stored[dev]["config"] == "mmap/2x16MiB" and stored[dev]["gbps"] == FAKE
    assert stored[dev]["measured_on"] == str(big_file) and stored[dev]["samples"]["mmap/2x16MiB"]["cold"] == [2.5]
    assert probe.choose_config(big_file).method is ReadMethod.MMAP
    probe._memo.clear()  # a new process: read back from read_method.json, not measured again
    assert probe.choose_config(big_file).method is ReadMethod.MMAP
    other = big_file.parent / "other.bin"
    other.write_bytes(b"y")  # other files on the same filesystem share the answer, small ones included
    assert probe.choose_config(other).method is ReadMethod.MMAP
    assert len(fake_measure) == 1
    probe.forget()
    assert not probe._cache_file().exists() and probe.choose_config(big_file) == probe.DEFAULT


def test_unreadable_cache_file_means_nothing_remembered(big_file, fake_measure):
    probe._cache_file().write_text("{broken")
    assert probe.remembered(big_file) is None and probe.choose_config(big_file) == probe.DEFAULT
    probe.measure(big_file)
    assert json.loads(probe._cache_file().read_text())[str(os.stat(big_file).st_dev)]["config"] == "mmap/2x16MiB"


def test_a_load_does_not_wait_for_a_probe_in_progress(big_file, monkeypatch, tmp_path):
    entered, release = threading.Event(), threading.Event()

    def slow_samples(path, nbytes=probe.PROBE_BYTES, repeats=probe.REPEATS, progress=None):
        entered.set()
        release.wait(30)
        return {label: {s: [g] for s, g in v.items()} for label, v in FAKE.items()}

    monkeypatch.setattr(probe, "measure_samples", slow_samples)
    prober = threading.Thread(target=probe.measure, args=(big_file,))
    prober.start()
    try:
        assert entered.wait(30)
        state = {"w": make_tensor((1000,), torch.float16, seed=3)}
        save(state, tmp_path / "c")
        done: list = []
        loading = threading.Thread(target=lambda: done.append(Loader().load(tmp_path / "c")))
        loading.start()
        loading.join(20)
        assert done and torch.equal(done[0]["w"].view(torch.uint8), state["w"].view(torch.uint8))  # not waited
    finally:
        release.set()
        prober.join(30)
    assert probe.choose_config(big_file).method is ReadMethod.MMAP  # and the answer is used from then on


def test_scoring_rotates_the_order_and_remeasures_disturbed_candidates(big_file, monkeypatch):
    order: list[tuple[str, str]] = []

    def fake_read(path, buf, cfg, state, pieces=None):
        order.append((cfg.label, state))
        n = sum(1 for label, s in order if label == cfg.label and s == state)
        if cfg.label == "auto/2x16MiB" and state == "warm" and n <= 3:
            return 1.4  # disturbed in every regular repeat...
        return 20.0 if state == "warm" else 4.0

    monkeypatch.setattr(probe, "read_gbps", fake_read)
    monkeypatch.setattr(probe.io, "odirect_supported", lambda p: True)
    samples = probe.measure_samples(big_file, repeats=3)
    firsts = [order[i][0] for i in range(0, 2 * 3 * len(probe.CANDIDATES), 2 * len(probe.CANDIDATES))]
    assert len(set(firsts)) == 3  # each repeat starts with another candidate
    auto = samples["auto/2x16MiB"]["warm"]
    assert auto[:3] == [1.4, 1.4, 1.4] and len(auto) == 3  # consistent samples: believed (no extra run)

    order.clear()

    def once_disturbed(path, buf, cfg, state, pieces=None):
        order.append((cfg.label, state))
        first = sum(1 for label, s in order if label == cfg.label and s == state) == 1
        if cfg.label == "auto/2x16MiB" and state == "warm" and first:
            return 1.4  # one disturbed sample among good ones
        return 20.0 if state == "warm" else 4.0

    monkeypatch.setattr(probe, "read_gbps", once_disturbed)
    samples = probe.measure_samples(big_file, repeats=2)
    assert len(samples["auto/2x16MiB"]["warm"]) > 2  # the disagreeing candidate was measured again
    assert all(len(samples[c.label]["cold"]) == 2 for c in probe.CANDIDATES if c.label != "auto/2x16MiB")
    best = {label: {s: max(v) for s, v in st.items()} for label, st in samples.items()}
    assert best["auto/2x16MiB"]["warm"] == 20.0


def test_real_measurement(big_file):
    result = probe.measure(big_file)
    odirect = odirect_supported(big_file)
    expected = {c.label for c in probe.CANDIDATES
                if odirect or c.method not in (ReadMethod.ODIRECT, ReadMethod.AUTO)}
    assert set(result.gbps) == expected
    assert all(g > 0 for v in result.gbps.values() for g in v.values())
    stored = json.loads(probe._cache_file().read_text())[str(os.stat(big_file).st_dev)]
    assert stored["config"] == result.config.label == probe.choose_config(big_file).label
    assert result.config.label == min(stored["gbps"], key=lambda k: probe._score(stored["gbps"][k]))
    assert all(set(v) == {"cold", "warm"} for v in stored["gbps"].values())


def test_loader_uses_remembered_method(tmp_path, big_file, fake_measure):
    probe.measure(big_file)
    state = {"w": make_tensor((1000,), torch.float16, seed=3)}
    save(state, tmp_path / "c")
    dests = {"w": torch.empty(2000, dtype=torch.uint8)}
    stats = Loader().load_into(tmp_path / "c", dests)
    assert stats.method == "mmap"
    assert torch.equal(dests["w"], state["w"].view(torch.uint8))


def test_an_answer_of_an_older_probe_version_is_measured_again(big_file, fake_measure):
    probe.measure(big_file)
    stored = json.loads(probe._cache_file().read_text())
    dev = str(os.stat(big_file).st_dev)
    assert stored[dev]["version"] == probe.PROBE_VERSION
    stored[dev].pop("version")  # as the probe stored it before it verified its reads
    probe._cache_file().write_text(json.dumps(stored))
    probe.forget_memo()
    assert probe.remembered(big_file) is None and probe.choose_config(big_file) == probe.DEFAULT
    assert probe_auto.pending([big_file])  # so the next automatic run measures it again
