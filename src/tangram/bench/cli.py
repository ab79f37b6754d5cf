"""`tangram bench ...`: the benchmark drivers' commands, mounted on the `tangram` CLI through the `tangram.cli`
entry point (so product code never imports `tangram.bench`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tangram.cli_common import console
from tangram.cli_common import fail as _fail

bench_app = typer.Typer(help="Benchmarks (protocol and results: docs/benchmarks.md).", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add the `bench` command group to the `tangram` app."""
    app.add_typer(bench_app, name="bench")


@bench_app.command("load")
def bench_load(
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the result JSON here.")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Small sizes, fewer repeats (< 60 s).")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    model: Annotated[Optional[list[str]], typer.Option("--model", help="Synthetic model to load (repeatable; "
                                                       "default: the mode's models).")] = None,
    repeats: Annotated[Optional[int], typer.Option(min=1, help="Timed runs per method (default: the mode's).")]
    = None,
) -> None:
    """Checkpoint bytes into device memory: Tangram vs safetensors, torch.load and peer loaders."""
    from tangram.bench.common import resolve_device
    from tangram.bench.load import run_load_bench
    from tangram.bench.synthetic import MODELS

    try:
        resolve_device(device)
        unknown = [m for m in model or [] if m not in MODELS]
        if unknown:
            raise ValueError(f"unknown --model {', '.join(unknown)}; known: {', '.join(sorted(MODELS))}")
    except ValueError as exc:
        _fail(exc)
    run_load_bench(quick=quick, json_path=json_path, device=device, console=console, models=model or None,
                   repeats=repeats)


@bench_app.command("pool")
def bench_pool(
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the result JSON here.")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Small models, short trace (< 60 s).")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the workload generator.")] = 0,
) -> None:
    """Device pool policies (tangram, lru, lfu) replaying one acquire/release trace over a small pool."""
    from tangram.bench.pool import run_pool_bench

    run_pool_bench(quick=quick, json_path=json_path, seed=seed, console=console)


@bench_app.command("kv")
def bench_kv(
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the result JSON here.")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Small models, short trace (< 60 s).")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the workload generator.")] = 0,
) -> None:
    """ElasticKV against reserved KV: retained bytes, cold loads, decode throughput, concurrency."""
    from tangram.bench.kv import run_kv_bench

    run_kv_bench(quick=quick, json_path=json_path, seed=seed, console=console)


@bench_app.command("coldstart")
def bench_coldstart(
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the result JSON here.")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Smaller models, a shorter trace (< 3 min).")] = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write PNG figures into this directory.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the workload generator.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda: must be what the server runs on here (every "
                                        "CUDA device when present, else the CPU).")] = "auto",
) -> None:
    """End-to-end cold-start TTFT through the server: baseline, sllm, tangram, tangram-notemplate."""
    from tangram.bench.coldstart import run_coldstart_bench, server_device

    try:
        server_device(device)
    except ValueError as exc:
        _fail(exc)
    run_coldstart_bench(quick=quick, json_path=json_path, plot_dir=plot, seed=seed, console=console, device=device)


@bench_app.command("migrate")
def bench_migrate(
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the result JSON here.")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Two logical CPU devices, 6 streams (< 2 min); full: two "
                                        "loopback Ray nodes, 12 streams.")] = False,
    dtype: Annotated[str, typer.Option(help="Demo model dtype: float32 (recomputed KV bit-exact) or bfloat16.")]
    = "float32",
) -> None:
    """Live migration of running streams between two devices, token by token against unmigrated twins."""
    from tangram.bench.migrate import run_migrate_bench

    if dtype not in ("float32", "bfloat16", "float16"):
        _fail(f"--dtype must be float32, bfloat16 or float16, not {dtype!r}")
    run_migrate_bench(quick=quick, json_path=json_path, console=console, dtype=dtype)


@bench_app.command("sim")
def bench_sim(
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the result JSON here.")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="512 devices, a shorter trace (< 60 s).")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the workload generator.")] = 0,
    calibration: Annotated[Optional[str], typer.Option(
        "--calibration", help="Tier bandwidths: a `bench load` result JSON, or 'measure' (probe this machine); "
        "default: the built-in figures of docs/results/load-cpu-full.json.")] = None,
) -> None:
    """Scheduling policies at cluster scale in the trace-driven simulator (real scheduler and pool policy code)."""
    from tangram.bench.sim import calibration_bandwidths, run_sim_bench

    if calibration not in (None, "measure"):
        try:
            calibration_bandwidths(calibration)  # a bad file is refused before any work
        except ValueError as exc:
            _fail(exc)
    run_sim_bench(quick=quick, json_path=json_path, seed=seed, console=console, calibration=calibration)


@bench_app.command("serve")
def bench_serve(
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the result JSON here.")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="One run per concurrency, a 100-chat burst (< 3 min).")]
    = False,
    vllm_python: Annotated[Optional[str], typer.Option(
        "--vllm-python", help="Python that has vLLM (default: $TANGRAM_VLLM_PYTHON, else this one if it imports "
        "vllm; none: Tangram alone).")] = None,
) -> None:
    """Streaming-chat throughput and TTFT through the HTTP API: Tangram's engine against vLLM on the demo model."""
    from tangram.bench.serve import run_serve_bench

    result = run_serve_bench(quick=quick, json_path=json_path, vllm_python=vllm_python, console=console)
    if result["summary"]["server_errors"]:
        _fail("some servers did not run: " + "; ".join(result["summary"]["server_errors"]))


@bench_app.command("lora")
def bench_lora(
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the result JSON here.")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Rank-16 adapters only, fewer repeats.")] = False,
) -> None:
    """LoRA adapter loads (cold / dram / pool) against PEFT's load_adapter, and a batch mixing 4 adapters."""
    from tangram.bench.lora import run_lora_bench

    run_lora_bench(quick=quick, json_path=json_path, console=console)
