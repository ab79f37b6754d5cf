"""Smoke run of the cold-start benchmark skeleton (templates on and off through the real server)."""

from __future__ import annotations

from rich.console import Console

from tangram.bench.coldstart import CONFIGS, run_coldstart_bench


def test_small_coldstart_run(tmp_path):
    result = run_coldstart_bench(quick=True, small=True, json_path=tmp_path / "c.json", repeats=1,
                                 console=Console(quiet=True), progress=False)
    s = result["summary"]
    assert set(s["ttft_p50"]) == set(CONFIGS) and all(v > 0 for v in s["ttft_p50"].values())
    assert s["template_speedup"] > 0 and s["token_identical"] is True
    assert {r["start"] for r in result["rows"]} == {"cold"} and all(r["bytes_loaded"] > 0 for r in result["rows"])
    assert (tmp_path / "c.json").is_file()
