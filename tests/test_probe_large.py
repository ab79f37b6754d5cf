"""The probe measures large files at a second size, and a large load gets the configuration that won there."""

from __future__ import annotations

import json
import os

import pytest

from tangram.store import Loader, probe
from tangram.store.io import ReadMethod


SMALL = {"pread/1x64MiB": {"cold": 3.0, "warm": 9.0}, "auto/2x16MiB": {"cold": 2.0, "warm": 8.0},
         "mmap/2x16MiB": {"cold": 1.0, "warm": 2.0}, "odirect/2x16MiB": {"cold": 1.5, "warm": 1.5}}
LARGE = {"pread/1x64MiB": {"cold": 1.0, "warm": 3.0}, "auto/2x16MiB": {"cold": 2.5, "warm": 9.0}}


@pytest.fixture
def fake(monkeypatch, tmp_path):
    monkeypatch.setattr(probe, "LARGE_PROBE_BYTES", 2 * probe.MIN_PROBE_BYTES)
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(2 * probe.MIN_PROBE_BYTES))
    calls = []

    def samples(path, nbytes=probe.PROBE_BYTES, repeats=probe.REPEATS, progress=None, candidates=None):
        calls.append((nbytes, sorted(c.label for c in candidates) if candidates else None))
        table = LARGE if nbytes >= probe.LARGE_PROBE_BYTES else SMALL
        labels = [c.label for c in candidates] if candidates else list(table)
        return {k: {s: [g] for s, g in table[k].items()} for k in labels if k in table}

    monkeypatch.setattr(probe, "measure_samples", samples)
    return path, calls


def test_large_file_measured_at_two_sizes(fake):
    path, calls = fake
    result = probe.measure(path, nbytes=probe.MIN_PROBE_BYTES)
    assert result.config.label == "pread/1x64MiB"  # the winner over the small probe
    assert result.large_config is not None and result.large_config.label == "auto/2x16MiB"
    # only the small probe's leaders are measured again over the large size
    assert calls == [(probe.MIN_PROBE_BYTES, None),
                     (probe.LARGE_PROBE_BYTES, sorted(["pread/1x64MiB", "auto/2x16MiB", "odirect/2x16MiB"]))]
    stored = json.loads(probe._cache_file().read_text())[str(os.stat(path).st_dev)]
    assert stored["large"]["config"] == "auto/2x16MiB" and stored["large"]["bytes"] == probe.LARGE_PROBE_BYTES


def test_choice_depends_on_load_size(fake):
    path, _ = fake
    probe.measure(path, nbytes=probe.MIN_PROBE_BYTES)
    probe._memo.clear()
    probe._memo_large.clear()  # answered from the stored file, as in a new process
    assert probe.choose_config(path).label == "pread/1x64MiB"
    assert probe.choose_config(path, 1 << 20).label == "pread/1x64MiB"
    assert probe.choose_config(path, probe.LARGE_PROBE_BYTES).label == "auto/2x16MiB"
    assert Loader().config(path, probe.LARGE_PROBE_BYTES).method is ReadMethod.AUTO
    assert Loader(threads=3).config(path, probe.LARGE_PROBE_BYTES).threads == 3


def test_small_file_has_no_large_answer(fake, tmp_path):
    _, calls = fake
    small = tmp_path / "small.bin"
    small.write_bytes(os.urandom(probe.MIN_PROBE_BYTES))
    result = probe.measure(small, nbytes=probe.MIN_PROBE_BYTES)
    assert result.large_config is None and len(calls) == 1
    assert probe.choose_config(small, probe.LARGE_PROBE_BYTES).label == result.config.label
