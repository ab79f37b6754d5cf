"""One dtype row's servers in bench serve: started together, their runs played interleaved, stopped.

The development VM's speed drifts by 10-20% over minutes (the same Tangram
server measured 217 tokens/s in one row and 261 in the identical row five
minutes later, while vLLM's numbers held). With one server at a time, the
system measured in a slow minute loses to the one measured in a fast one. So
the systems a ratio compares (`tangram` and `vllm`) are up together, idle
but one, and their runs alternate: the i-th run of each back to back, the
one that goes first swapping from one step to the next (`interleave`). An
idle vLLM server used 1.4% of a CPU. `tangram-vllm` is played alone, all its
runs in one block: its deployment scales to zero after a 1 s keep-alive, and
with gaps between its runs each would begin with a start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tangram.bench.serve_client import PROMPT
from tangram.bench.serve_peer import (
    MODEL_NAME, ServerProcess, VllmFound, tangram_served, tangram_server, vllm_served, vllm_server,
)
from tangram.bench.serve_vllm import drop_cached, start_phase
from tangram.store import Checkpoint

log = logging.getLogger(__name__)

CLIENT_TIMEOUT_S = 3600.0
RunKey = tuple[str, int, int]  # (kind, repeat, n): the same run on each system


@dataclass
class Session:
    """What one system's server gave in a group: its start time, (run, the client's result) for every run
    played (in the system's own run order), the server's facts, and the error that stopped it, if any."""

    start_s: float | None = None
    results: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def run_key(run: dict[str, Any]) -> RunKey:
    """The run's identity across systems."""
    return (run["kind"], run["repeat"], run["n"])


def interleave(runs: dict[str, list[dict[str, Any]]]) -> list[tuple[str, int]]:
    """The play order of several systems' runs (pure): (system, index into its runs). Runs with the same
    `run_key` are played back to back, keys in order of first appearance; at each step the system that goes
    first rotates, so a drift of the machine's speed lands on every system alike. A run only one system has
    (Tangram's structured chats) is played in its place alone."""
    index = {s: {run_key(r): i for i, r in enumerate(rs)} for s, rs in runs.items()}
    keys = list(dict.fromkeys(run_key(r) for rs in runs.values() for r in rs))
    systems = list(runs)
    order = []
    for step, key in enumerate(keys):
        turn = systems[step % len(systems):] + systems[:step % len(systems)]
        order += [(s, index[s][key]) for s in turn if key in index[s]]
    return order


def _label(system: str, row: str) -> str:
    """The name of a Tangram server's config and log files (`tangram_server`'s `label`)."""
    return f"vllm-backend-{row}" if system == "tangram-vllm" else row


def start_server(system: str, row: str, checkpoint: Path, hf_dir: Path, max_batch: int | None,
                 kv_cache_bytes: int, vllm: VllmFound, workdir: Path) -> ServerProcess:
    """The (not yet started) server of `system` for dtype row `row`."""
    if system in ("tangram", "tangram-vllm"):
        backend = "vllm" if system == "tangram-vllm" else "builtin"
        return tangram_server(checkpoint, "auto" if row == "default" else row, workdir, max_batch,
                              label=_label(system, row), backend=backend, vllm_python=vllm.python,
                              kv_cache_bytes=kv_cache_bytes)
    assert vllm.python is not None
    if not (hf_dir / "config.json").is_file():
        raise RuntimeError(f"{hf_dir}: no Hugging Face directory beside {checkpoint} for vLLM "
                           "(tangram.demo.fetch_demo(force=True) rebuilds both)")
    drop_cached(sorted(hf_dir.glob("*.safetensors")))  # its load is cold, as tangram-vllm's is
    return vllm_server(vllm.python, hf_dir, None if row == "default" else row, workdir, kv_cache_bytes)


def _prepare(system: str, server: ServerProcess, row: str, workdir: Path, facts: dict[str, Any]) -> None:
    """Facts read from a started server; the vllm backend's first two requests: a cold start, then a pool hit
    after scale-to-zero."""
    if system != "vllm":
        facts.update(tangram_served(server.url))
    if system == "tangram-vllm":
        spec = json.loads((workdir / f"tangram-{_label(system, row)}.json").read_text())["deployments"][0]
        drop_cached(Checkpoint(facts["resolved_checkpoint"]).data_files())
        facts["start_phase"] = start_phase(server.url, spec)


def play(server: ServerProcess, runs: list[dict[str, Any]], workdir: Path, tag: str, *, warmup_tokens: int,
         first_prompt: int) -> dict[str, Any]:
    """A client process plays `runs` on `server` (prompts numbered from `first_prompt`; `warmup_tokens` 0:
    no warm-up chat) and returns its results."""
    spec = {"url": server.url, "model": MODEL_NAME, "prompt": PROMPT, "warmup_tokens": warmup_tokens,
            "first_prompt": first_prompt,
            "runs": [{k: r[k] for k in ("n", "max_tokens", "response_format") if k in r} for r in runs]}
    spec_path, out_path = workdir / f"client-{tag}.json", workdir / f"client-{tag}.out.json"
    spec_path.write_text(json.dumps(spec))
    subprocess.run([sys.executable, "-m", "tangram.bench.serve_client", str(spec_path), str(out_path)], check=True,
                   timeout=CLIENT_TIMEOUT_S)
    return json.loads(out_path.read_text())


def measure_group(servers: dict[str, ServerProcess], runs: dict[str, list[dict[str, Any]]], row: str,
                  workdir: Path, warmup_tokens: int) -> dict[str, Session]:
    """Start every server of `servers` (system -> server), warm each with one chat, play `runs` (system -> its
    runs) interleaved, stop them all. A server that does not start, or whose client dies, gets its error; the
    others go on."""
    sessions = {s: Session() for s in servers}
    with contextlib.ExitStack() as stack:
        live: dict[str, ServerProcess] = {}
        for system, server in servers.items():
            facts = sessions[system].facts
            facts["log"] = str(server.log_path)
            try:
                stack.enter_context(server)
                _prepare(system, server, row, workdir, facts)
            except (RuntimeError, OSError, subprocess.SubprocessError, httpx.HTTPError) as exc:
                log.error("%s %s: %s", system, row, exc)
                sessions[system].error = str(exc)
                continue
            sessions[system].start_s = server.start_s
            live[system] = server
        played = {s: 0 for s in live}  # prompts each server has had
        results: dict[str, dict[int, dict[str, Any]]] = {s: {} for s in live}
        order = interleave({s: runs[s] for s in live})
        blocks = [order] if len(live) == 1 else [[step] for step in order]  # one system: one client
        for block in blocks:
            system = block[0][0]
            if sessions[system].error:
                continue
            todo = [runs[system][i] for _, i in block]
            warm = warmup_tokens if played[system] == 0 else 0
            try:
                out = play(live[system], todo, workdir, f"{system}-{row}-{played[system]}", warmup_tokens=warm,
                           first_prompt=played[system])
            except (OSError, subprocess.SubprocessError) as exc:
                log.error("%s %s: the client failed: %s", system, row, exc)
                sessions[system].error = str(exc)
                continue
            played[system] += (1 if warm else 0) + sum(r["n"] for r in todo)
            if out["warmup"] is not None:
                sessions[system].facts["warmup"] = out["warmup"]
            results[system].update({i: res for (_, i), res in zip(block, out["runs"])})
        for system, server in live.items():
            if system == "vllm":
                sessions[system].facts.update(vllm_served(server.log_tail(10_000)))
            sessions[system].results = [(runs[system][i], results[system][i]) for i in sorted(results[system])]
    return sessions


PAIRED = ("tangram", "vllm")  # the systems whose ratio the acceptance reads: measured together


def row_groups(rows: list[str], systems: list[str],
               twins: dict[str, str | None]) -> list[tuple[str, tuple[str, ...]]]:
    """The groups of servers, row by row (pure): Tangram and vLLM together, Tangram on the vllm backend alone
    (its deployment scales to zero between interleaved runs); which group goes first alternates by row. A
    system whose default is measured as an explicit row (`twins`) has no default-row server."""
    out = []
    for i, row in enumerate(rows):
        todo = [s for s in systems if not (row == "default" and twins.get(s))]
        paired = tuple(s for s in todo if s in PAIRED)
        units = ([paired] if paired else []) + [(s,) for s in todo if s not in PAIRED]
        out += [(row, unit) for unit in (units if i % 2 == 0 else units[::-1])]
    return out
