"""Pick the fastest read method for a filesystem by measuring it once, and remember the answer.

Override with the environment variable TANGRAM_READ_METHOD (pread, odirect, mmap)
or `Loader(method=...)`. Measurements are cached per filesystem (st_dev) in
`<data dir>/read_method.json`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from tangram.paths import data_dir
from tangram.store import io
from tangram.store.format import ALIGNMENT
from tangram.store.io import ReadMethod
from tangram.store.plan import ReadRun, Segment

log = logging.getLogger(__name__)

ENV_METHOD = "TANGRAM_READ_METHOD"
PROBE_BYTES = 64 << 20
MIN_PROBE_BYTES = 8 << 20  # smaller files say nothing useful about bandwidth
_lock = threading.Lock()
_memo: dict[int, ReadMethod] = {}


def _cache_file() -> Path:
    return data_dir() / "read_method.json"


def measure_methods(path: Path, nbytes: int = PROBE_BYTES, repeats: int = 2) -> dict[str, float]:
    """Cold-read GB/s of each usable method over the first `nbytes` of `path` (best of `repeats`)."""
    size = min(os.path.getsize(path), nbytes) // ALIGNMENT * ALIGNMENT
    buf = io.host_buffer(size)
    chunk = 8 << 20
    runs = [
        ReadRun(0, off, [Segment(min(chunk, size - off), buf, off)]) for off in range(0, size, chunk)
    ]
    methods = [ReadMethod.PREAD, ReadMethod.MMAP]
    if io.odirect_supported(path):
        methods.append(ReadMethod.ODIRECT)
    bounce = io.host_buffer(chunk + ALIGNMENT)
    results: dict[str, float] = {}
    for method in methods:
        best = 0.0
        for _ in range(repeats):
            io.evict_from_page_cache(path)
            fd = io.open_data_file(path, direct=method is ReadMethod.ODIRECT)
            try:
                t0 = time.perf_counter()
                for run in runs:
                    if method is ReadMethod.PREAD:
                        io.read_scatter(fd, run, path)
                    elif method is ReadMethod.MMAP:
                        io.read_mmap(fd, run, path)
                    else:
                        io.read_contiguous(fd, run, bounce, path, direct=True)
                        io.scatter_from(bounce, run)
                best = max(best, size / (time.perf_counter() - t0) / 1e9)
            finally:
                os.close(fd)
        results[method.value] = best
    return results


def choose_method(path: Path) -> ReadMethod:
    """The read method to use for files on the filesystem of `path`."""
    forced = os.environ.get(ENV_METHOD)
    if forced:
        try:
            return ReadMethod(forced)
        except ValueError:
            raise ValueError(f"{ENV_METHOD}={forced!r}: expected one of {[m.value for m in ReadMethod]}") from None
    dev = os.stat(path).st_dev
    with _lock:
        if dev in _memo:
            return _memo[dev]
        stored = _read_cached()
        if str(dev) in stored:
            _memo[dev] = ReadMethod(stored[str(dev)]["method"])
            return _memo[dev]
        if os.path.getsize(path) < MIN_PROBE_BYTES:
            return ReadMethod.PREAD  # not enough bytes to measure; do not remember
        results = measure_methods(path)
        best = max(results, key=results.__getitem__)
        log.info("read method for device %s: %s (cold GB/s %s)", dev, best, {k: round(v, 2) for k, v in results.items()})
        stored[str(dev)] = {"method": best, "gbps": results, "measured_on": str(path), "at": time.time()}
        _write_cached(stored)
        _memo[dev] = ReadMethod(best)
        return _memo[dev]


def _read_cached() -> dict[str, dict]:
    try:
        return json.loads(_cache_file().read_text())
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
