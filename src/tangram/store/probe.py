"""Pick the fastest read configuration for a filesystem by measuring it once, and remember the answer.

The candidates are the loader's own configurations (read method x reader
threads x chunk size), run through the loader's own executor over a real data
file, once cold (evicted from the page cache) and once warm (in it). The
winner has the least cold + warm time: a cold start finds the checkpoint in
either state. On the development VMs one buffered reader with 64 MiB chunks
beat several interleaved buffered readers by about 1.6x cold, O_DIRECT was
fastest cold but slow warm, and `auto` (page-cache hits buffered, the rest
O_DIRECT) got both: what wins depends on the machine, so it is measured.

Override with TANGRAM_READ_METHOD (pread, odirect, mmap) or `Loader(method=...,
threads=..., chunk_bytes=...)`. Measurements are cached per filesystem (st_dev)
in `<data dir>/read_method.json`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

import torch

from tangram.paths import data_dir
from tangram.store import io
from tangram.store.execute import ReadConfig, execute
from tangram.store.format import ALIGNMENT
from tangram.store.io import ReadMethod
from tangram.store.plan import Piece, plan_reads

log = logging.getLogger(__name__)

ENV_METHOD = "TANGRAM_READ_METHOD"
PROBE_BYTES = 256 << 20
MIN_PROBE_BYTES = 8 << 20  # smaller files say nothing useful about bandwidth
DEFAULT = ReadConfig(ReadMethod.PREAD, 1, 64 << 20)
CANDIDATES = [
    ReadConfig(ReadMethod.PREAD, 1, 64 << 20),
    ReadConfig(ReadMethod.PREAD, 2, 16 << 20),
    ReadConfig(ReadMethod.ODIRECT, 2, 16 << 20),
    ReadConfig(ReadMethod.ODIRECT, 4, 16 << 20),
    ReadConfig(ReadMethod.AUTO, 2, 16 << 20),
    ReadConfig(ReadMethod.AUTO, 4, 16 << 20),
    ReadConfig(ReadMethod.MMAP, 2, 16 << 20),
]
_lock = threading.Lock()
_memo: dict[int, ReadConfig] = {}


def _cache_file() -> Path:
    return data_dir() / "read_method.json"


def forced_method() -> ReadMethod | None:
    """The method set by TANGRAM_READ_METHOD, if any (ValueError for an unknown value)."""
    forced = os.environ.get(ENV_METHOD)
    if not forced:
        return None
    try:
        return ReadMethod(forced)
    except ValueError:
        raise ValueError(f"{ENV_METHOD}={forced!r}: expected one of {[m.value for m in ReadMethod]}") from None


def config_for(method: ReadMethod) -> ReadConfig:
    """The default threads and chunk size for a given read method."""
    if method is ReadMethod.PREAD:
        return DEFAULT
    return ReadConfig(method, 2, 16 << 20)  # O_DIRECT and mmap need parallel requests


def measure_configs(path: Path, nbytes: int = PROBE_BYTES, repeats: int = 2) -> dict[str, dict[str, float]]:
    """Cold and warm GB/s of each usable candidate over the first `nbytes` of `path` (best of `repeats`)."""
    size = min(os.path.getsize(path), nbytes) // ALIGNMENT * ALIGNMENT
    buf = io.host_buffer(size)
    odirect = io.odirect_supported(path)
    results: dict[str, dict[str, float]] = {}
    for _ in range(repeats):  # repeat-major, so drift hits every candidate alike
        for cfg in CANDIDATES:
            if cfg.method in (ReadMethod.ODIRECT, ReadMethod.AUTO) and not odirect:
                continue
            runs = plan_reads([Piece("probe", 0, 0, size, buf)], chunk_bytes=cfg.chunk_bytes)
            row = results.setdefault(cfg.label, {"cold": 0.0, "warm": 0.0})
            for state in ("cold", "warm"):
                (io.evict_from_page_cache if state == "cold" else io.populate_page_cache)(path)
                t0 = time.perf_counter()
                execute(runs, {0: path}, cfg, torch.device("cpu"))
                row[state] = max(row[state], size / (time.perf_counter() - t0) / 1e9)
    return results


def _score(gbps: dict[str, float]) -> float:
    """Seconds per GB over one cold and one warm read (lower is better)."""
    return sum(1.0 / max(v, 1e-9) for v in gbps.values())


def choose_config(path: Path) -> ReadConfig:
    """The read configuration for files on the filesystem of `path` (measured once per filesystem)."""
    forced = forced_method()
    if forced is not None:
        return config_for(forced)
    dev = os.stat(path).st_dev
    with _lock:
        if dev in _memo:
            return _memo[dev]
        stored = _read_cached().get(str(dev))
        if stored is not None:
            cfg = _from_label(stored.get("config", ""))
            if cfg is not None:
                _memo[dev] = cfg
                return cfg
        if os.path.getsize(path) < MIN_PROBE_BYTES:
            return DEFAULT  # not enough bytes to measure; do not remember
        results = measure_configs(path)
        best = min(results, key=lambda label: _score(results[label]))
        log.info("read configuration for device %s: %s (GB/s %s)", dev, best,
                 {k: {s: round(g, 2) for s, g in v.items()} for k, v in results.items()})
        data = _read_cached()
        data[str(dev)] = {"config": best, "gbps": results, "measured_on": str(path), "at": time.time()}
        _write_cached(data)
        _memo[dev] = _from_label(best) or DEFAULT
        return _memo[dev]


def _from_label(label: str) -> ReadConfig | None:
    return next((c for c in CANDIDATES if c.label == label), None)


def _read_cached() -> dict[str, dict]:
    try:
        data = json.loads(_cache_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cached(data: dict[str, dict]) -> None:
    target = _cache_file()
    tmp = target.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, target)


def forget() -> None:
    """Drop remembered measurements (tests)."""
    with _lock:
        _memo.clear()
        try:
            _cache_file().unlink()
        except FileNotFoundError:
            pass
