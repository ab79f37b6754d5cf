"""Measurements `scripts/gpu-check` takes beside the benchmarks, each run as its own process (`python -m ...`).

- `env`: the machine: Python, torch and its CUDA, the GPUs, and the filesystem of the work directory
  (a tmpfs there would make every "cold" read a memory read).
- `h2d`: the pinned host-to-device limit: one plain copy of N bytes from a pinned host tensor into a device
  tensor with `non_blocking=True` (one cudaMemcpyAsync on the current stream), timed with CUDA events after a
  warm-up; a pageable source beside it for reference. With `--device cpu` (the CPU dry run) a host copy timed
  with perf_counter, so the same code and the same JSON are exercised without a GPU.
- `bigload`: Tangram's loader and device pool on one large synthetic checkpoint (Tangram's format only, so a
  Qwen2-7B shape costs one 15 GB file set): cold and warm loads into a device buffer, a pool re-acquire, the
  bytes checked against the index once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from tangram.bench.common import gbps, ratio, resolve_device, result_doc, write_result
from tangram.bench.synthetic import MODELS, ModelSpec, ensure_checkpoint

# Qwen2-7B's shapes (untied output embedding): about 15.2 GB in fp16.
QWEN2_7B = ModelSpec("qwen2-7b", "Qwen2Config", dict(
    hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False))
BIG_MODELS: dict[str, ModelSpec] = {QWEN2_7B.name: QWEN2_7B, **MODELS}


def filesystem_of(path: Path) -> dict[str, str | None]:
    """The mount point and filesystem type holding `path` (from /proc/mounts; None where unknown)."""
    best: tuple[str, str] | None = None
    target = str(path.resolve())
    try:
        with open("/proc/mounts") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 3 and (target == parts[1] or target.startswith(parts[1].rstrip("/") + "/")):
                    if best is None or len(parts[1]) > len(best[0]):
                        best = (parts[1], parts[2])
    except OSError:
        pass
    return {"mount": best[0] if best else None, "fstype": best[1] if best else None}


def env_info(workdir: Path) -> dict[str, Any]:
    """Facts of this machine that the GPU numbers depend on."""
    workdir.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {
        "python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "gpus": [], "workdir": str(workdir), **filesystem_of(workdir),
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["gpus"].append({"name": p.name, "memory_bytes": p.total_memory,
                                 "capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count})
    return info


def _timed_copy(dst: torch.Tensor, src: torch.Tensor) -> float:
    """Seconds of one `dst.copy_(src, non_blocking=True)`: CUDA events on a CUDA destination, else perf_counter."""
    if dst.device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    dst.copy_(src, non_blocking=True)
    return time.perf_counter() - t0


def _series(runs: list[float], nbytes: int) -> dict[str, Any]:
    best, med = min(runs), statistics.median(runs)
    return {"runs_s": [round(r, 6) for r in runs], "best_s": best, "median_s": med,
            "best_gbps": gbps(nbytes, best), "median_gbps": gbps(nbytes, med)}


def h2d_limit(device: str, nbytes: int, repeats: int = 5) -> dict[str, Any]:
    """The host-to-device copy limit of `nbytes`: pinned (the limit) and pageable (for reference) sources."""
    from tangram.store.io import host_buffer

    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    sources = {"pinned": host_buffer(nbytes, pin=cuda)}
    if cuda:
        sources["pageable"] = host_buffer(nbytes)
    out: dict[str, Any] = {"device": str(dev), "bytes": nbytes, "repeats": repeats,
                           "timing": "CUDA events around one copy_(non_blocking=True)" if cuda else "perf_counter"}
    for name, src in sources.items():
        _timed_copy(dst, src)  # warm-up: first-touch and driver set-up are not the limit
        out[name] = _series([_timed_copy(dst, src) for _ in range(repeats)], nbytes)
    out["h2d_pinned_gbps"] = out["pinned"]["best_gbps"]
    return out


def _load_once(loader: Any, opened: Any, target: Any, cold: bool) -> float:
    from tangram.store.io import evict_from_page_cache, populate_page_cache

    target.clear()
    for i in range(len(opened.index.files)):
        if cold:
            evict_from_page_cache(opened.file_path(i))
        else:
            populate_page_cache(opened.file_path(i))
    target.sync()
    t0 = time.perf_counter()
    loader.load_into(opened, target.views)
    target.sync()
    return time.perf_counter() - t0


def big_load(model: str, device: str, workdir: Path, repeats: int = 2) -> dict[str, Any]:
    """Cold, warm and pool-hit loads of a large synthetic model with Tangram's loader and pool; a result document."""
    from tangram.bench.load_methods import Target
    from tangram.pool import DevicePool
    from tangram.store import Checkpoint, Loader
    from tangram.store.format import align_up

    if model not in BIG_MODELS:
        raise ValueError(f"unknown model {model!r}; known: {sorted(BIG_MODELS)}")
    dev = resolve_device(device)
    t0 = time.perf_counter()
    ckpt = ensure_checkpoint(BIG_MODELS[model], workdir, formats=["tangram"])
    prepare_s = time.perf_counter() - t0
    opened = Checkpoint(ckpt.tangram_dir)
    nbytes = opened.index.total_bytes
    loader = Loader()
    cfg = loader.config(opened.file_path(0)) if opened.index.files else None
    target = Target.create(opened.index, dev)
    first_s = _load_once(loader, opened, target, cold=True)  # untimed in the medians: imports, first faults
    bad = target.mismatches()
    cold = [_load_once(loader, opened, target, cold=True) for _ in range(repeats)]
    warm = [_load_once(loader, opened, target, cold=False) for _ in range(repeats)]
    del target
    capacity = sum(align_up(e.nbytes, 4096) for e in opened.index.tensors.values()) + (1 << 20)
    pool = DevicePool(capacity, dev, loader=Loader())
    t1 = time.perf_counter()
    pool.release(pool.acquire(opened, model=model))  # a cold-ish load into the pool leaves the tensors retained
    pool_first_s = time.perf_counter() - t1
    hits, misses = [], 0
    for _ in range(repeats):
        t2 = time.perf_counter()
        binding = pool.acquire(opened, model=model)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        hits.append(time.perf_counter() - t2)
        misses += binding.bytes_loaded
        pool.release(binding)
    rows = [{"state": s, "method": "tangram", "bytes": nbytes, "runs": [round(r, 6) for r in runs],
             "seconds": statistics.median(runs), "gbps": gbps(nbytes, statistics.median(runs))}
            for s, runs in (("cold", cold), ("warm", warm), ("pool", hits))]
    summary = {
        "model": model, "bytes": nbytes, "checked": not bad, "mismatches": bad[:5],
        "cold_gbps": rows[0]["gbps"], "warm_gbps": rows[1]["gbps"],
        "pool_speedup": ratio(rows[0]["seconds"], rows[2]["seconds"]), "pool_bytes_loaded_on_hits": misses,
    }
    config = {"model": model, "device": str(dev), "repeats": repeats, "prepare_s": round(prepare_s, 2),
              "first_load_s": round(first_s, 3), "pool_first_load_s": round(pool_first_s, 3),
              "read_config": cfg.label if cfg else None, "workdir": str(workdir)}
    return result_doc("gpu-check-bigload", dev, config, rows, summary)


def main(argv: list[str] | None = None) -> int:
    """`python -m tangram.bench.gpu_probe {env,h2d,bigload} --json PATH ...`."""
    ap = argparse.ArgumentParser(prog="python -m tangram.bench.gpu_probe", description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("env", "h2d", "bigload"))
    ap.add_argument("--json", type=Path, required=True, help="write the result here")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--bytes", type=int, default=1 << 30, help="h2d: bytes copied")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--model", default=QWEN2_7B.name, help=f"bigload: one of {sorted(BIG_MODELS)}")
    ap.add_argument("--workdir", type=Path, default=Path("gpu-check-work"))
    args = ap.parse_args(argv)
    if args.what == "env":
        doc: dict[str, Any] = env_info(args.workdir)
    elif args.what == "h2d":
        doc = h2d_limit(args.device, args.bytes, args.repeats)
    else:
        doc = big_load(args.model, args.device, args.workdir, args.repeats)
    write_result(doc, args.json)
    sys.stdout.write(json.dumps(doc.get("summary", doc), indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
