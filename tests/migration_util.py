"""Helpers of the live-migration tests: a tiny model with a long context and streams run with and without a move."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import torch

from conftest import save_hf_dir, tiny_config
from tangram.control import Controller, Deployment
from tangram.engine import EngineConfig, SamplingParams
from tangram.worker import Worker


def long_context_checkpoint(directory: Path, width: int | None = None) -> Path:
    """A tiny qwen2 (random weights, varied greedy continuations, no eos) with a 512-token context, converted;
    `width`: its hidden size, larger for slower steps (default the tiny 32)."""
    from transformers import AutoModelForCausalLM

    from tangram.store import convert

    config = tiny_config("qwen2")
    config.initializer_range, config.max_position_embeddings = 0.5, 512
    if width is not None:
        config.hidden_size, config.intermediate_size = width, 4 * width
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = None
    save_hf_dir(model, directory / "hf")
    convert(directory / "hf", directory / "ckpt")
    return directory / "ckpt"


def two_device_controller(ckpt: Path) -> tuple[Controller, Deployment]:
    """A controller over two logical CPU devices (each its own pool) and a deployment of `ckpt` (not deployed)."""
    ctl = Controller([Worker(0, "cpu", 64 << 20), Worker(1, "cpu", 64 << 20)])
    return ctl, Deployment(name="m", checkpoint=str(ckpt), max_instances=2, keep_alive_s=600,
                           engine=EngineConfig(block_tokens=4))


@dataclass
class Stream:
    """What a client saw of one request: ids and text in order, the final reason, and the moves made."""

    ids: list[int] = field(default_factory=list)
    text: str = ""
    finish: str | None = None
    error: str | None = None
    moves: list[dict] = field(default_factory=list)
    ttft_s: float = 0.0  # as the final output reports it


async def stream(ctl: Controller, params: SamplingParams, prompt: list[int], *, move_after: int | None = None,
                 to: str | None = None) -> Stream:
    """Run one request; with `move_after`, migrate the deployment to worker `to` once that many ids came."""
    seen = Stream()
    task = None
    if move_after is not None:  # a busy source: on a loaded machine the move still lands mid-stream
        for r in ctl._states["m"].replicas:  # noqa: SLF001 - a test reads the controller's records
            slow_steps(r, BUSY_STEP_S)
    async for out in ctl.generate("m", prompt, params):
        seen.ids += out.token_ids
        seen.text += out.delta
        if out.finished:
            seen.finish, seen.error = out.finish_reason, out.error
            seen.ttft_s = out.stages.ttft_s if out.stages is not None else 0.0
        if move_after is not None and task is None and len(seen.ids) >= move_after:
            task = asyncio.ensure_future(ctl.migrator.migrate("m", to=to))
    if task is not None:
        seen.moves = (await task)["moves"]
    return seen


def other_worker(ctl: Controller) -> str:
    """The name of the worker that does not hold the deployment's (only) instance."""
    here = ctl._states["m"].replicas[0].worker.name  # noqa: SLF001 - a test reads the controller's records
    return next(w.name for w in ctl.workers if w.name != here)


BUSY_STEP_S = 0.01  # per source step: long enough for a move to land mid-stream on a 2-core machine running two tests


def slow_steps(replica_state, seconds: float) -> None:
    """Make every step of a local instance take `seconds` longer (a busy source: a move always has time)."""
    import time as _time

    engine = replica_state.ref.backend.instance.engine
    real = engine.runner.run
    if getattr(real, "slowed", False):
        return

    def run(plan):
        _time.sleep(seconds)
        return real(plan)

    run.slowed = True
    engine.runner.run = run
