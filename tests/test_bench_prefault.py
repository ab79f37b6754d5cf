"""`tangram bench`'s one-time write of the free memory: what it touches, that the result JSON records it, and the
switch (on by default; `--no-prefault` or TANGRAM_BENCH_PREFAULT=0, which the tests' conftest sets)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from tangram.bench import common, prefault


def test_it_touches_whole_steps_within_the_limit_and_the_result_records_it():
    free = prefault.mem_free_bytes()
    assert free is not None and free > 0
    done = prefault.prefault_host_memory(prefault.STEP_BYTES)
    expected = prefault.STEP_BYTES if free >= prefault.STEP_BYTES + prefault.MARGIN_BYTES else 0
    assert done["bytes"] == expected and len(done["gbps_per_gib"]) == expected // prefault.STEP_BYTES
    assert all(r > 0 for r in done["gbps_per_gib"])
    assert common.result_doc("x", "cpu", {}, [], {})["host"]["memory_prefault"] == done


def test_it_leaves_the_margin_alone(monkeypatch):
    monkeypatch.setattr(prefault, "mem_free_bytes", lambda: prefault.MARGIN_BYTES + prefault.STEP_BYTES - 1)
    assert prefault.prefault_host_memory()["bytes"] == 0  # less than a whole step above the margin


@pytest.mark.parametrize("args,env,calls", [(["bench", "load", "--model", "nope"], "1", 1),
                                            (["bench", "--no-prefault", "load", "--model", "nope"], "1", 0),
                                            (["bench", "load", "--model", "nope"], "0", 0)])
def test_the_bench_commands_prefault_unless_told_not_to(monkeypatch, args, env, calls):
    from tangram.cli import app

    seen: list = []
    monkeypatch.setattr(prefault, "prefault_host_memory", lambda *a, **k: seen.append(a) or {"bytes": 0})
    monkeypatch.setenv("TANGRAM_BENCH_PREFAULT", env)
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0 and "unknown --model nope" in result.output  # the command itself still ran
    assert len(seen) == calls
