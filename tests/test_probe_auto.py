"""Automatic read-speed measurement: at server start in the background, after convert, and `tangram probe`."""

from __future__ import annotations

import os

import pytest
import torch
from typer.testing import CliRunner

from conftest import make_tensor
from tangram.paths import data_dir
from tangram.store import probe, probe_auto, save

FAKE = {"pread/1x64MiB": {"cold": 1.0, "warm": 8.0}, "mmap/2x16MiB": {"cold": 2.5, "warm": 8.0}}


@pytest.fixture
def measured(monkeypatch):
    """Fake measurements (no real reads): records the file each one ran on, and its size then."""
    calls: list[tuple[str, int]] = []

    def samples(path, nbytes=probe.PROBE_BYTES, repeats=probe.REPEATS, progress=None):
        calls.append((str(path), os.path.getsize(path)))
        if progress:
            progress(1, 1, "done")
        return {label: {s: [g] for s, g in v.items()} for label, v in FAKE.items()}

    monkeypatch.setattr(probe, "measure_samples", samples)
    monkeypatch.delenv(probe_auto.ENV_PROBE)  # the tests' conftest turns automatic probing off
    return calls


def big_checkpoint(path):
    save({"w": make_tensor((3 << 20,), torch.float32, seed=1)}, path)  # one 12 MiB data file
    return path


def test_background_probe_measures_a_deployed_checkpoint_and_is_remembered(tmp_path, measured):
    ckpt = big_checkpoint(tmp_path / "c")
    thread = probe_auto.probe_in_background([ckpt])
    assert thread is not None
    thread.join(30)
    assert measured == [(str(ckpt / "data-00000.bin"), 12 << 20)]  # a real data file of the checkpoint
    assert probe.choose_config(ckpt / "data-00000.bin").label == "mmap/2x16MiB"
    assert probe_auto.probe_in_background([ckpt]) is None  # remembered: nothing to do at the next start


def test_background_probe_uses_a_temporary_file_in_the_data_dir_and_removes_it(tmp_path, measured):
    small = tmp_path / "small"
    save({"w": torch.ones(10)}, small)  # too small to say anything about bandwidth
    thread = probe_auto.probe_in_background([small])
    thread.join(30)
    (path, size), = measured
    assert path.startswith(str(data_dir())) and size == probe_auto.TEMP_PROBE_BYTES
    assert not os.path.exists(path) and not list(data_dir().glob(".read-probe-*"))


def test_a_benchmark_measures_now_what_a_server_would_measure_in_the_background(tmp_path, measured, monkeypatch):
    ckpt = big_checkpoint(tmp_path / "c")
    monkeypatch.setenv(probe_auto.ENV_PROBE, "off")
    assert probe_auto.measure_pending([ckpt]) == [] and measured == []
    monkeypatch.delenv(probe_auto.ENV_PROBE)
    results = probe_auto.measure_pending([ckpt])  # synchronous: done when it returns
    assert [r.config.label for r in results] == ["mmap/2x16MiB"]
    assert measured == [(str(ckpt / "data-00000.bin"), 12 << 20)]
    assert probe_auto.measure_pending([ckpt]) == [] and probe_auto.probe_in_background([ckpt]) is None  # known now


def test_no_automatic_probe_when_turned_off_or_forced(tmp_path, measured, monkeypatch):
    ckpt = big_checkpoint(tmp_path / "c")
    monkeypatch.setenv(probe_auto.ENV_PROBE, "off")
    assert probe_auto.probe_in_background([ckpt]) is None
    monkeypatch.delenv(probe_auto.ENV_PROBE)
    monkeypatch.setenv(probe.ENV_METHOD, "pread")
    assert probe_auto.probe_in_background([ckpt]) is None
    assert measured == []


def test_server_start_starts_the_background_probe_with_the_deployed_checkpoints(tmp_path, monkeypatch):
    from serving import chat_model_dir, serving
    from tangram.control import Deployment
    from tangram.serve import server as server_module

    seen: list = []
    monkeypatch.setattr(server_module, "probe_in_background", lambda paths: seen.append(list(paths)))
    model = chat_model_dir(tmp_path / "m")
    with serving([Deployment(name="m", checkpoint=str(model))]) as srv:
        resolved = srv.controller.describe("m")["resolved_checkpoint"]
    assert len(seen) == 1 and [str(p) for p in seen[0]] == [resolved]


def test_probe_command_prints_the_table_and_the_choice(tmp_path, measured):
    from tangram.cli import app

    ckpt = big_checkpoint(tmp_path / "c")
    out = CliRunner().invoke(app, ["probe", str(ckpt)], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    assert "mmap/2x16MiB" in out.output and "pread/1x64MiB" in out.output and "chosen" in out.output
    assert len(measured) == 1
    again = CliRunner().invoke(app, ["probe", str(ckpt)], env={"COLUMNS": "200"})
    assert again.exit_code == 0 and len(measured) == 2  # on demand: measured again even when remembered
    missing = CliRunner().invoke(app, ["probe", str(tmp_path / "nope")])
    assert missing.exit_code != 0 and "no such file" in missing.output


def test_convert_measures_the_new_checkpoints_filesystem(tmp_path, measured, monkeypatch):
    from conftest import save_hf_dir, tiny_model
    from tangram.cli import app

    asked: list = []
    real = probe_auto.measure_filesystems
    monkeypatch.setattr(probe_auto, "measure_filesystems", lambda paths, **kw: asked.append(paths) or real(paths, **kw))
    hf = save_hf_dir(tiny_model("llama"), tmp_path / "hf")
    out = CliRunner().invoke(app, ["convert", str(hf), str(tmp_path / "out")])
    assert out.exit_code == 0, out.output
    assert asked == [[tmp_path / "out"]]
    assert measured == []  # the tiny model's data file is too small to say anything: skipped
    monkeypatch.setenv(probe_auto.ENV_PROBE, "off")
    out = CliRunner().invoke(app, ["convert", str(hf), str(tmp_path / "out2")])
    assert out.exit_code == 0 and len(asked) == 1
