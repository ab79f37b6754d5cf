"""bench serve: the summary and per-run counting (pure, hand-made numbers), the client against a real server on a
tiny model, the server processes' start and stop, finding vLLM, and one tiny run of the whole bench (no vLLM)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from serving import chat_model_dir, serving
from typer.testing import CliRunner

from tangram.bench.serve import (
    DTYPE_ROWS, FULL, QUICK, ServeSizes, Weights, client_runs, default_twin, run_row, run_serve_bench, summarize,
)
from tangram.bench.serve_client import play
from tangram.bench.serve_peer import VLLM_ENV, ServerProcess, VllmFound, find_vllm_python, group_alive
from tangram.control import Deployment

SIZES = ServeSizes(concurrency=(1, 16, 32), max_tokens=64, repeats=3, burst=100, burst_tokens=8)
FOUND = VllmFound("/x/python", "0.32.0", "vLLM 0.32.0 from --vllm-python /x/python")
ABSENT = VllmFound(None, None, "vLLM was not found: --vllm-python /x/python cannot import vllm")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny chat-capable model directory (random weights), shared by this module's server tests."""
    return chat_model_dir(tmp_path_factory.mktemp("bench-serve") / "tiny")


def row(system: str, dtype: str, n: int, tps: float, *, kind: str = "concurrent", wall: float = 1.0,
        ttfts: list[float] | None = None, failed: int = 0, lost: int = 0) -> dict:
    """A hand-made per-run row with the keys `summarize` reads."""
    return {"system": system, "dtype": dtype, "kind": kind, "n": n, "tokens_per_s": tps, "wall_s": wall,
            "ttfts": ttfts or [0.1], "failed": failed, "lost": lost}


# --------------------------------------------------------------------------- pure


def test_summary_from_hand_made_runs():
    rows = []
    for dtype, (t, v) in {"float32": (100.0, 200.0), "bfloat16": (300.0, 150.0), "default": (50.0, 100.0)}.items():
        for n in (1, 16, 32):
            for k, jitter in enumerate((0.9, 1.0, 1.3)):  # medians: t * n, v * n
                rows.append(row("tangram", dtype, n, t * n * jitter, ttfts=[0.1 * (k + 1)]))
                rows.append(row("vllm", dtype, n, v * n * jitter, ttfts=[0.2 * (k + 1)]))
    rows += [row("tangram", "default", 100, 800.0, kind="burst", wall=3.0, ttfts=[1.0, 2.0], failed=2, lost=1),
             row("vllm", "default", 100, 800.0, kind="burst", wall=2.0, ttfts=[0.5], lost=3)]
    rows += [row("tangram", "default", 16, tps, kind="structured") for tps in (300.0, 400.0, 700.0)]
    starts = {"tangram": {"float32": 4.0, "bfloat16": 5.0, "default": 6.0}, "vllm": {"float32": 20.0,
                                                                                    "default": 30.0}}
    s = summarize(rows, starts, SIZES, FOUND)
    assert s["tokens_per_s"]["tangram"]["float32"] == {"1": 100.0, "16": 1600.0, "32": 3200.0}
    assert s["tokens_per_s"]["vllm"]["bfloat16"]["32"] == 150.0 * 32
    assert set(s["tokens_per_s"]["vllm"]) == set(DTYPE_ROWS)
    assert s["throughput_vs_vllm"] == {"float32": {"16": 0.5, "32": 0.5}, "bfloat16": {"16": 2.0, "32": 2.0}}
    assert s["burst_wall_s"] == {"tangram": 3.0, "vllm": 2.0} and s["burst_wall_vs_vllm"] == 1.5
    assert s["structured_tokens_per_s"] == 400.0 and s["structured_tokens_per_s_vs_plain"] == 0.5  # of 50 x 16
    assert s["ttft_p50"]["tangram"]["float32"]["16"] == pytest.approx(0.2)  # pooled over the repeats
    assert s["ttft_p99"]["vllm"]["default"]["1"] == pytest.approx(0.4 + 0.2 * 0.98)  # linear interpolation
    assert s["ttft_p50"]["tangram"]["default"]["100"] == 1.5  # the burst, under its N
    assert s["failed"] == 2 and s["lost"] == 4
    assert s["failed_by_system"] == {"tangram": 2, "vllm": 0, "tangram-vllm": 0}
    assert s["lost_by_system"] == {"tangram": 1, "vllm": 3, "tangram-vllm": 0}
    assert s["tangram_process_start_s"] == 5.0 and s["vllm_process_start_s"] == 25.0
    assert s["vllm_found"] is True


def test_summary_without_vllm_has_null_ratios():
    rows = [row("tangram", d, n, 10.0 * n) for d in DTYPE_ROWS for n in (1, 16, 32)]
    rows.append(row("tangram", "default", 100, 5.0, kind="burst", wall=4.0))
    s = summarize(rows, {"tangram": {"default": 3.0}}, SIZES, ABSENT)
    assert s["tokens_per_s"]["tangram"]["bfloat16"]["16"] == 160.0
    assert all(v is None for d in DTYPE_ROWS for v in s["tokens_per_s"]["vllm"][d].values())
    assert s["throughput_vs_vllm"] == {"float32": {"16": None, "32": None}, "bfloat16": {"16": None, "32": None}}
    assert s["burst_wall_vs_vllm"] is None and s["burst_wall_s"] == {"tangram": 4.0, "vllm": None}
    assert s["structured_tokens_per_s_vs_plain"] is None  # no structured run
    assert s["ttft_p50"]["vllm"]["default"]["16"] is None
    assert s["vllm_process_start_s"] is None and s["tangram_process_start_s"] == 3.0
    assert s["vllm_found"] is False and "not found" in s["vllm_note"]
    assert s["failed"] == 0 and s["lost"] == 0


def test_run_row_counts_failed_and_lost():
    def req(tokens: int | None, finish: str | None = "length", error: str | None = None,
            ttft: float | None = 0.1) -> dict:
        return {"max_tokens": 4, "ttft_s": ttft, "total_s": 1.0, "completion_tokens": tokens, "chunks": tokens or 0,
                "finish_reason": finish, "error": error}

    reqs = [req(4), req(4), req(3, finish="stop"),  # short: lost
            req(None, finish=None),  # no usage chunk, no final chunk: lost
            req(4, finish=None),  # no finish reason: lost
            req(None, finish=None, error="APIConnectionError: reset", ttft=None)]  # failed, not lost
    r = run_row("tangram", "float32", {"kind": "concurrent", "repeat": 0},
                {"n": 6, "max_tokens": 4, "wall_s": 2.0, "requests": reqs})
    assert r["failed"] == 1 and r["lost"] == 3
    assert r["tokens"] == 4 + 4 + 3 + 4 and r["tokens_per_s"] == 7.5
    assert len(r["ttfts"]) == 5 and r["errors"] == ["APIConnectionError: reset"]


def test_client_runs_repeat_major_with_the_burst_and_structured_chats_in_the_default_row_only():
    sizes = ServeSizes(concurrency=(1, 4), max_tokens=5, repeats=2, burst=7, burst_tokens=2, structured=3)
    runs = client_runs(sizes, "float32")
    assert [(r["repeat"], r["n"]) for r in runs] == [(0, 1), (0, 4), (1, 1), (1, 4)]
    assert {r["max_tokens"] for r in runs} == {5}
    assert {r["dtype"] for r in runs} == {"float32"}
    default = client_runs(sizes, "default")
    assert default[-1] == {"kind": "burst", "dtype": "default", "repeat": 0, "n": 7, "max_tokens": 2}
    structured = [r for r in default if r["kind"] == "structured"]
    assert [(r["repeat"], r["n"], r["max_tokens"]) for r in structured] == [(0, 3, 5), (1, 3, 5)]
    assert structured[0]["response_format"]["type"] == "json_schema"
    assert not [r for r in client_runs(sizes, "default", system="vllm") if r["kind"] == "structured"]
    assert client_runs(ServeSizes(burst=0, structured=0), "default")[-1]["kind"] == "concurrent"
    twin = client_runs(sizes, "bfloat16", burst=True)  # the default measured as the bfloat16 row
    assert twin[-1]["dtype"] == "default" and {r["dtype"] for r in twin if r["kind"] == "concurrent"} == {"bfloat16"}


def test_the_structured_schema_outlasts_every_answer():
    from tangram.bench.serve import STRUCTURED_SCHEMA

    items = STRUCTURED_SCHEMA["properties"]["lines"]
    assert items["minItems"] * items["items"]["minLength"] > 8 * FULL.max_tokens  # > 8 characters a token


def test_modes():
    assert QUICK.concurrency == FULL.concurrency == (1, 16, 32) and QUICK.max_tokens == FULL.max_tokens == 64
    assert QUICK.repeats == 1 and FULL.repeats == 3 and FULL.burst == 1000 and FULL.burst_tokens == 8
    assert QUICK.reuse_identical_default and not FULL.reuse_identical_default  # full mode measures every row


def test_default_twin_is_an_identical_explicit_row_only(tmp_path):
    a, b = Weights(tmp_path / "a", tmp_path / "a-hf"), Weights(tmp_path / "b", tmp_path / "b-hf")
    weights = {"float32": a, "bfloat16": b, "default": a}
    assert default_twin("tangram", weights, torch.float32, "cpu") == "float32"  # auto keeps a float32 model
    assert default_twin("vllm", weights, torch.float32, "cpu") is None  # vLLM's auto runs it in float16
    weights["default"] = b
    assert default_twin("vllm", weights, torch.bfloat16, "cpu") == "bfloat16"
    assert default_twin("tangram", weights, torch.bfloat16, "cuda") == "bfloat16"  # auto: the stored dtype
    weights["default"] = Weights(tmp_path / "c", tmp_path / "c-hf")  # other weights: never a twin
    assert default_twin("tangram", weights, torch.bfloat16, "cuda") is None
    assert default_twin("vllm", weights, torch.bfloat16, "cpu") is None
    assert default_twin("tangram", {"float32": a}, torch.float32, "cpu") is None  # no default row


def test_summary_of_a_default_measured_as_its_twin():
    rows = [row(s, d, n, 10.0 * n if d == "bfloat16" else 1.0) for s in ("tangram", "vllm")
            for d in ("float32", "bfloat16") for n in (1, 16, 32)]
    rows += [row("tangram", "default", 100, 5.0, kind="burst", wall=4.0),
             row("vllm", "default", 100, 5.0, kind="burst", wall=2.0)]
    s = summarize(rows, {}, SIZES, FOUND, {"tangram": "bfloat16", "vllm": None})
    assert s["tokens_per_s"]["tangram"]["default"] == s["tokens_per_s"]["tangram"]["bfloat16"]
    assert s["tokens_per_s"]["vllm"]["default"] == {"1": None, "16": None, "32": None}  # not measured, not copied
    assert s["burst_wall_vs_vllm"] == 2.0
    assert s["default_measured_as"] == {"tangram": "bfloat16", "vllm": None, "tangram-vllm": None}


def test_the_vllm_backend_summary_from_hand_made_runs_and_start_phases():
    rows = [row(s, d, n, tps * n) for s, tps in (("vllm", 100.0), ("tangram-vllm", 97.0))
            for d in ("float32", "bfloat16") for n in (1, 16, 32)]
    rows += [row("tangram-vllm", "bfloat16", 16, 80.0 * 16), row("tangram-vllm", "bfloat16", 16, 90.0 * 16)]

    def phase(cold: float, hit: float, load: float) -> dict:
        return {"start_phase": {"cold": {"ttft_s": cold, "stages": {"start": "cold", "load_s": load,
                                                                    "bytes_loaded": 500}},
                                "pool_hit": {"ttft_s": hit, "stages": {"start": "pool-hit", "bytes_loaded": 0}}}}

    facts = {"tangram-vllm/float32": phase(9.0, 0.3, 0.4), "tangram-vllm/bfloat16": phase(7.0, 0.5, 0.2),
             "vllm/float32": {"load_s": 0.6}, "vllm/bfloat16": {"load_s": 1.0}}
    s = summarize(rows, {"vllm": {"float32": 30.0}, "tangram-vllm": {"float32": 2.0}}, SIZES, FOUND, facts=facts)
    assert s["vllm_backend_vs_vllm_by_dtype"] == {"float32": 0.97, "bfloat16": 0.9}  # median of 97, 80, 90
    assert s["vllm_backend_vs_vllm"] == 0.9  # the lower one
    assert s["vllm_backend_cold_ttft_s"] == 8.0 and s["vllm_backend_pool_hit_ttft_s"] == 0.4
    assert s["vllm_backend_pool_hit_bytes_loaded"] == 0 and s["vllm_backend_pool_hit_start"] == ["pool-hit"]
    assert s["vllm_backend_cold_load_s"] == pytest.approx(0.3) and s["vllm_default_load_s"] == 0.8
    assert s["vllm_backend_load_speedup"] == pytest.approx(2.667, abs=1e-3)
    assert s["vllm_process_start_s"] == 30.0 and s["tangram_vllm_process_start_s"] == 2.0


# --------------------------------------------------------------------------- processes and peers


def test_server_process_stops_its_whole_group(tmp_path):
    script = "sleep 600 & sleep 600 & wait"
    server = ServerProcess("sh", ["sh", "-c", script], "http://unused", lambda http: True, tmp_path / "sh.log")
    with server:
        pgid = server.proc.pid
        assert group_alive(pgid) and server.start_s is not None
    assert not group_alive(pgid)


def test_server_process_that_exits_early_fails_with_its_log(tmp_path):
    server = ServerProcess("boom", ["sh", "-c", "echo it broke; exit 3"], "http://unused", lambda http: False,
                           tmp_path / "boom.log")
    with pytest.raises(RuntimeError, match="(?s)exited with 3.*it broke"):
        with server:
            pass


def test_find_vllm_python(monkeypatch, tmp_path):
    monkeypatch.delenv(VLLM_ENV, raising=False)
    here = sys.executable  # the project's interpreter: no vllm in it
    got = find_vllm_python(here)
    assert got.python is None and "not found" in got.note and "--vllm-python" in got.note
    monkeypatch.setenv(VLLM_ENV, here)
    got = find_vllm_python()
    assert got.python is None and VLLM_ENV in got.note
    monkeypatch.delenv(VLLM_ENV)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    monkeypatch.setattr("tangram.vllm.python.BESIDE_CHECKOUT", tmp_path / "no-venv" / "bin" / "python")
    assert find_vllm_python().python is None


# --------------------------------------------------------------------------- against a real server


def test_client_streams_exact_token_counts_from_a_real_server(model_dir):
    dep = Deployment(name="tiny", checkpoint=str(model_dir), keep_alive_s=600)
    with serving([dep]) as srv:
        spec = {"url": srv.url, "model": "tiny", "warmup_tokens": 2, "runs": [{"n": 1, "max_tokens": 5},
                                                                               {"n": 6, "max_tokens": 7}]}
        out = asyncio.run(play(spec))
    assert out["warmup"]["error"] is None and out["warmup"]["completion_tokens"] == 2
    rows = [run_row("tangram", "float32", {"kind": "concurrent", "repeat": 0}, res) for res in out["runs"]]
    assert [r["n"] for r in rows] == [1, 6]
    assert [r["tokens"] for r in rows] == [5, 42]
    for r, res in zip(rows, out["runs"]):
        assert r["failed"] == 0 and r["lost"] == 0, r["errors"]
        assert all(q["finish_reason"] == "length" and q["chunks"] >= 1 for q in res["requests"])
        assert len(r["ttfts"]) == r["n"] and r["tokens_per_s"] > 0


@pytest.mark.slow
def test_small_run_end_to_end_without_vllm(model_dir, tmp_path):
    from tangram.store import convert

    ckpt = tmp_path / "ckpt"
    convert(model_dir, ckpt)  # float32: Tangram's default (auto) is the float32 row, measured once as it
    sizes = ServeSizes(concurrency=(1, 3), max_tokens=6, repeats=1, burst=5, burst_tokens=2, warmup_tokens=2,
                       max_batch=4, reuse_identical_default=True, structured=0)
    w = Weights(ckpt, model_dir)
    result = run_serve_bench(quick=True, json_path=tmp_path / "s.json", console=Console(quiet=True), progress=False,
                             sizes=sizes, weights={"float32": w, "default": w}, use_vllm=False,
                             workdir=tmp_path / "work")
    assert (tmp_path / "s.json").is_file() and result["bench"] == "serve"
    s = result["summary"]
    assert s["failed"] == 0 and s["lost"] == 0 and s["server_errors"] == []
    assert [(r["dtype"], r["kind"], r["n"], r["tokens"]) for r in result["rows"]] == [
        ("float32", "concurrent", 1, 6), ("float32", "concurrent", 3, 18), ("default", "burst", 5, 10)]
    assert s["default_measured_as"] == {"tangram": "float32", "vllm": None, "tangram-vllm": None}
    assert list(result["config"]["servers"]) == ["tangram/float32"]  # one server for both rows
    assert result["config"]["servers"]["tangram/float32"]["served_dtype"] == "float32"
    assert s["tokens_per_s"]["tangram"]["float32"]["3"] > 0
    assert s["tokens_per_s"]["tangram"]["default"] == s["tokens_per_s"]["tangram"]["float32"]
    assert s["tokens_per_s"]["tangram"]["bfloat16"]["3"] is None
    assert s["throughput_vs_vllm"]["float32"] == {"3": None} and s["burst_wall_vs_vllm"] is None
    assert s["tangram_process_start_s"] > 0 and s["vllm_found"] is False
    assert s["ttft_p50"]["tangram"]["default"]["5"] > 0
    assert os.path.isfile(result["config"]["servers"]["tangram/float32"]["log"])


def test_cli_lists_bench_serve():
    from tangram.cli import app

    out = CliRunner().invoke(app, ["bench", "--help"]).output
    assert "serve" in out
    out = CliRunner().invoke(app, ["bench", "serve", "--help"]).output
    for flag in ("--quick", "--json", "--vllm-python"):
        assert flag in out


def test_a_server_that_cannot_start_is_reported_and_stopped(tmp_path):
    sizes = ServeSizes(concurrency=(1,), max_tokens=2, burst=0, warmup_tokens=1)
    result = run_serve_bench(quick=True, json_path=None, console=Console(quiet=True), progress=False, sizes=sizes,
                             weights={"float32": Weights(tmp_path / "missing", tmp_path / "missing")},
                             use_vllm=False, workdir=tmp_path / "work")
    assert result["rows"] == []
    errors = result["summary"]["server_errors"]
    assert len(errors) == 1 and errors[0].startswith("tangram/float32: tangram could not deploy")
    assert "no such model" in result["config"]["servers"]["tangram/float32"]["error"]  # the server's log tail
    assert result["summary"]["tokens_per_s"]["tangram"]["float32"]["1"] is None
