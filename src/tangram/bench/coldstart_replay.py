"""One configuration of bench coldstart: a server set up for it, the trace replayed by a client process.

The server runs in this process (uvicorn on a thread, loopback, free port); the
client is a separate Python process (`coldstart_client`), so its HTTP work does
not share this process's GIL. While the trace plays, pool occupancy is sampled
from `/admin/status`. Then every deployment's keep-alive is raised and the
client measures each model's warm-instance TTFT.
"""

from __future__ import annotations

import collections
import json
import logging
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from tangram.bench.coldstart_workload import Configuration, Sizes
from tangram.bench.kv_workload import ModelPaths, TraceRequest
from tangram.control import Deployment, ServeConfig
from tangram.engine import EngineConfig
from tangram.pool import PoolConfig
from tangram.serve import Server
from tangram.store import Checkpoint
from tangram.store.io import evict_from_page_cache

log = logging.getLogger(__name__)
TOKEN = "bench-coldstart"
MAX_MODEL_LEN = 256  # the reserve configurations hold max_batch x this many tokens of KV per instance
MAX_BATCH = 16  # every configuration's batch: the replay compares starts and memory, not batch sizes
WARM_REPEATS = 3


def engine_config(cfg: Configuration) -> EngineConfig:
    """The engine of every deployment: max_batch 16 (what the defaults were when the protocol was set; elastic KV
    now derives a larger one), a 256-token context, the config's KV mode."""
    return EngineConfig(kv_mode=cfg.kv_mode, templates=cfg.templates, max_model_len=MAX_MODEL_LEN,
                        max_batch=MAX_BATCH)


def pool_config(cfg: Configuration, paths: dict[str, ModelPaths]) -> PoolConfig:
    """The device pools of a configuration: retention, sharing and the loader (the baselines are configurations)."""
    sources = {str(p.ckpt): str(p.hf) for p in paths.values()} if cfg.loader == "safetensors" else {}
    return PoolConfig(retain=cfg.retain, share=cfg.share, loader=cfg.loader, safetensors_sources=sources)


def _deployments(cfg: Configuration, paths: dict[str, ModelPaths], keep_alive_s: float) -> list[Deployment]:
    engine = engine_config(cfg)
    return [Deployment(name=name, checkpoint=str(p.ckpt), keep_alive_s=keep_alive_s, engine=engine)
            for name, p in paths.items()]


def _client(url: str, trace: list[dict], *extra: str) -> object:
    with tempfile.TemporaryDirectory() as tmp:
        tpath, opath = Path(tmp) / "trace.json", Path(tmp) / "out.json"
        tpath.write_text(json.dumps(trace))
        subprocess.run([sys.executable, "-m", "tangram.bench.coldstart_client", url, str(tpath), str(opath), *extra],
                       check=True)
        return json.loads(opath.read_text())


def _sampler(url: str, stop: threading.Event, out: list[dict], every: float = 0.2) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    t0 = time.perf_counter()
    while not stop.is_set():
        try:
            st = httpx.get(url + "/admin/status", headers=headers, timeout=10).json()
            pools = [w["pool"] for w in st["workers"]]
            kv = sum(w["kv_bytes"] for w in st["workers"])
            out.append({"t": time.perf_counter() - t0, "active": sum(p["active"] for p in pools) - kv, "kv": kv,
                        "retained": sum(p["retained"] for p in pools), "free": sum(p["free"] for p in pools)})
        except httpx.HTTPError:
            pass
        stop.wait(every)


def run_config(cfg: Configuration, paths: dict[str, ModelPaths], trace: list[TraceRequest], sizes: Sizes,
               capacity: int, deployments: list[Deployment] | None = None, warm_repeats: int = WARM_REPEATS) -> dict:
    """Replay `trace` on a server set up as `cfg`; request results, warm TTFTs (none when `warm_repeats` is 0),
    bytes loaded, pool samples, the controller's events counted by kind.

    `deployments` replaces the default ones (every model, the configuration's engine, the mode's keep-alive)."""
    deployments = deployments or _deployments(cfg, paths, sizes.keep_alive_s)
    serve = ServeConfig(port=0, pool_capacity=capacity, admin_token=TOKEN, cpu_devices=sizes.devices,
                        host_cache_bytes=(2 * capacity if cfg.host_cache else 0), scheduler=cfg.scheduler,
                        migration=cfg.migration, pool=pool_config(cfg, paths), deployments=deployments)
    server = Server(serve)
    for p in paths.values():  # every configuration starts from disk
        for f in [*Checkpoint(p.ckpt).data_files(), *p.hf.glob("*.safetensors")]:
            evict_from_page_cache(f)
    items = [{"t": r.t, "model": r.model, "prompt": list(r.prompt), "max_tokens": r.max_tokens} for r in trace]
    samples: list[dict] = []
    with server.running():
        stop = threading.Event()
        sampler = threading.Thread(target=_sampler, args=(server.url, stop, samples), daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        results = _client(server.url, items)
        replay_s = time.perf_counter() - t0
        stop.set()
        sampler.join()
        headers = {"Authorization": f"Bearer {TOKEN}"}
        status = httpx.get(server.url + "/admin/status", headers=headers, timeout=30).json()
        events = httpx.get(server.url + "/admin/pool-map", headers=headers, timeout=30).json()["events"]
        warm: dict = {}
        if warm_repeats:
            for d in deployments:  # keep instances up for the warm measurement
                d = d.model_copy(update={"keep_alive_s": 600.0})
                httpx.post(server.url + "/admin/deployments", headers=headers, json=d.model_dump(mode="json"),
                           timeout=600).raise_for_status()
            warm = _client(server.url, items, "--warm", str(warm_repeats))
    bytes_loaded = sum(d["bytes_loaded"] for d in status["deployments"].values())
    warm_ttft = {m: sorted(v)[len(v) // 2] for m, v in warm.items() if v and None not in v}
    kinds = collections.Counter(e["kind"] for e in events)
    return {"results": results, "warm_ttft": warm_ttft, "bytes_loaded": bytes_loaded, "samples": samples,
            "replay_s": replay_s, "events": dict(sorted(kinds.items()))}
