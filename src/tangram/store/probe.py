"""Pick the fastest read configuration for a filesystem by measuring it once, and remember the answer.

The candidates are the loader's own configurations (read method x reader
threads x chunk size), run through the loader's own executor over a real data
file, once cold (evicted from the page cache) and once warm (in it), verifying
the bytes against their hashes as a load does (in tensor-sized pieces). The
winner has the least cold + warm time: a cold start finds the checkpoint in
either state. What wins depends on the machine, so it is measured.

Measuring never happens on a request's path: `choose_config` answers at once
with what is remembered for the filesystem, or with the safe DEFAULT. The
measurement runs on demand (`tangram probe`), after `tangram convert` and
`tangram fetch-demo`, and at server start on a background thread when the
data dir's filesystem has no answer yet (probe_auto.py); it holds its own lock,
never the one `choose_config` takes, so a concurrent load never waits for it.

Scoring: each candidate is measured `repeats` times, the candidate order
rotated every repeat (a disturbance during one part of the probe then hits
different candidates each time), and its best time per state is kept; a
candidate whose samples of one state disagree by more than SPREAD is measured
again (up to MAX_EXTRA more times), since its best sample may still be a
disturbed one. All samples are stored for inspection.

Override with TANGRAM_READ_METHOD (pread, odirect, mmap, auto) or
`Loader(method=..., threads=..., chunk_bytes=...)`. Measurements are stored per
filesystem (st_dev) in `<data dir>/read_method.json`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tangram.paths import data_dir
from tangram.store import io
from tangram.store.execute import ReadConfig, execute
from tangram.store.format import ALIGNMENT
from tangram.store.hashing import BLOCK_BYTES, block_hashes, hash_bytes
from tangram.store.io import ReadMethod
from tangram.store.plan import Piece, ReadRun, plan_reads

log = logging.getLogger(__name__)

ENV_METHOD = "TANGRAM_READ_METHOD"
PROBE_BYTES = 256 << 20
LARGE_PROBE_BYTES = 1 << 30  # the leaders at 256 MiB are measured again over this much of a file that large
LARGE_FINALISTS = 3
LARGE_REPEATS = 2
MIN_PROBE_BYTES = 8 << 20  # smaller files say nothing useful about bandwidth
PROBE_PIECE_BYTES = 32 << 20  # a probe read is verified in pieces of a large layer weight's size
# Stored answers of another version are measured again: 2 = reads verified as loads are (1 measured them unchecked),
# 3 = verified by blocks, as loads of indexes with block hashes are.
PROBE_VERSION = 3
REPEATS = 3
SPREAD = 1.5  # samples of one candidate and state further apart than this ratio are re-measured
MAX_EXTRA = 2
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
STATES = ("cold", "warm")
Progress = Callable[[int, int, str], None]  # (steps done, steps planned, what runs now)
_lock = threading.Lock()  # the memo and the stored file: held for microseconds, never while measuring
_measure_lock = threading.Lock()  # one measurement at a time
_memo: dict[int, ReadConfig] = {}
_memo_large: dict[int, ReadConfig | None] = {}


@dataclass
class ProbeResult:
    """One measurement of a filesystem: the chosen configuration and every candidate's best GB/s."""

    device: int
    config: ReadConfig
    gbps: dict[str, dict[str, float]]
    measured_on: str
    seconds: float
    large_config: ReadConfig | None = None  # the winner over LARGE_PROBE_BYTES, when the file was that large
    large_gbps: dict[str, dict[str, float]] | None = None


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


def measure_configs(path: Path, nbytes: int = PROBE_BYTES, repeats: int = REPEATS,
                    progress: Progress | None = None) -> dict[str, dict[str, float]]:
    """Cold and warm GB/s of each usable candidate over the first `nbytes` of `path` (best sample per state)."""
    samples = measure_samples(path, nbytes, repeats, progress)
    return {label: {s: max(v) for s, v in states.items()} for label, states in samples.items()}


def measure_samples(path: Path, nbytes: int = PROBE_BYTES, repeats: int = REPEATS,
                    progress: Progress | None = None,
                    candidates: list[ReadConfig] | None = None) -> dict[str, dict[str, list[float]]]:
    """Every GB/s sample of each usable candidate, cold and warm (see the module docstring for the schedule)."""
    size = min(os.path.getsize(path), nbytes) // ALIGNMENT * ALIGNMENT
    buf = io.host_buffer(size)
    odirect = io.odirect_supported(path)
    usable = [c for c in candidates or CANDIDATES if odirect or c.method not in (ReadMethod.ODIRECT, ReadMethod.AUTO)]
    samples: dict[str, dict[str, list[float]]] = {c.label: {s: [] for s in STATES} for c in usable}
    planned, done = repeats * len(usable), 0
    pieces = probe_pieces(path, buf)  # loads verify every tensor they read: so do the measured reads

    def one(cfg: ReadConfig) -> None:
        nonlocal done
        if progress:
            progress(done, planned, cfg.label)
        for state in STATES:
            samples[cfg.label][state].append(read_gbps(path, buf, cfg, state, pieces))
        done += 1

    for rep in range(repeats):  # repeat-major, rotated: drift and disturbances hit different candidates
        k = rep % len(usable)
        for cfg in usable[k:] + usable[:k]:
            one(cfg)
    for cfg in usable:
        for _ in range(MAX_EXTRA):
            if not any(_spread(samples[cfg.label][s]) > SPREAD for s in STATES):
                break
            planned += 1
            one(cfg)
    if progress:
        progress(done, planned, "done")
    return samples


def probe_pieces(path: Path, buf: torch.Tensor, piece_bytes: int = PROBE_PIECE_BYTES) -> list[Piece]:
    """The first `buf.numel()` bytes of `path` as tensor-sized pieces into `buf`, each with the xxh3-128 of its
    bytes and of its blocks (read and hashed here, untimed), so a probe read verifies them as a load verifies its
    tensors."""
    fd = io.open_data_file(path, direct=False)
    try:
        io.preadv_full(fd, [memoryview(buf.numpy())], 0, path, ReadRun(0, 0))
    finally:
        os.close(fd)
    return [Piece(f"probe@{at}", 0, at, min(piece_bytes, buf.numel() - at), buf[at : at + piece_bytes],
                  hash_bytes(buf[at : at + piece_bytes]), tuple(block_hashes(buf[at : at + piece_bytes])), BLOCK_BYTES)
            for at in range(0, buf.numel(), piece_bytes)]


def read_gbps(path: Path, buf: torch.Tensor, cfg: ReadConfig, state: str,
              pieces: list[Piece] | None = None) -> float:
    """GB/s of one read of the first `buf.numel()` bytes of `path` into `buf` with `cfg`, the file `state`;
    verified against their hashes when `pieces` (probe_pieces) are given."""
    (io.evict_from_page_cache if state == "cold" else io.populate_page_cache)(path)
    runs = plan_reads(pieces or [Piece("probe", 0, 0, buf.numel(), buf)], chunk_bytes=cfg.chunk_bytes,
                      piece_cuts=True)
    t0 = time.perf_counter()
    execute(runs, {0: path}, cfg, torch.device("cpu"))
    return buf.numel() / (time.perf_counter() - t0) / 1e9


def _spread(values: list[float]) -> float:
    return max(values) / max(min(values), 1e-9) if values else 1.0


def _score(gbps: dict[str, float]) -> float:
    """Seconds per GB over one cold and one warm read (lower is better)."""
    return sum(1.0 / max(v, 1e-9) for v in gbps.values())


def best_config(gbps: dict[str, dict[str, float]]) -> ReadConfig:
    """The candidate with the least cold + warm time."""
    label = min(gbps, key=lambda k: _score(gbps[k]))
    return _from_label(label) or DEFAULT


def remembered(path: Path) -> ReadConfig | None:
    """The configuration measured for the filesystem holding `path`, if any (never measures)."""
    dev = os.stat(path).st_dev
    with _lock:
        if dev in _memo:
            return _memo[dev]
        stored = _current(_read_cached().get(str(dev)))
        cfg = _from_label(stored.get("config", "")) if stored else None
        if cfg is not None:
            _memo[dev] = cfg
        return cfg


def remembered_large(path: Path) -> ReadConfig | None:
    """The configuration measured over LARGE_PROBE_BYTES for the filesystem of `path`, if any (never measures)."""
    dev = os.stat(path).st_dev
    with _lock:
        if dev not in _memo_large:
            stored = _current(_read_cached().get(str(dev)))
            large = stored.get("large") if stored else None
            _memo_large[dev] = _from_label(large.get("config", "")) if isinstance(large, dict) else None
        return _memo_large[dev]


def choose_config(path: Path, nbytes: int | None = None) -> ReadConfig:
    """The read configuration for files on the filesystem of `path`: forced, remembered, or DEFAULT, at once.

    A load of `nbytes` at least half of LARGE_PROBE_BYTES gets the winner of the large measurement when
    there is one (what wins over 256 MiB may lose over gigabytes: the page cache, read-ahead, memory).
    """
    forced = forced_method()
    if forced is not None:
        return config_for(forced)
    if nbytes is not None and nbytes >= LARGE_PROBE_BYTES // 2:
        large = remembered_large(path)
        if large is not None:
            return large
    return remembered(path) or DEFAULT


def measure(path: Path, progress: Progress | None = None, nbytes: int = PROBE_BYTES) -> ProbeResult:
    """Measure the candidates on data file `path` now, remember the winner for its filesystem, return all."""
    if os.path.getsize(path) < MIN_PROBE_BYTES:
        raise ValueError(f"{path}: at least {MIN_PROBE_BYTES >> 20} MiB are needed to measure read speed")
    dev = os.stat(path).st_dev
    with _measure_lock:
        t0 = time.perf_counter()
        samples = measure_samples(path, nbytes, REPEATS, progress)
        gbps = {label: {s: max(v) for s, v in states.items()} for label, states in samples.items()}
        cfg = best_config(gbps)
        large: dict | None = None
        if os.path.getsize(path) >= LARGE_PROBE_BYTES and nbytes < LARGE_PROBE_BYTES:
            leaders = sorted(gbps, key=lambda k: _score(gbps[k]))[:LARGE_FINALISTS]
            big = measure_samples(path, LARGE_PROBE_BYTES, LARGE_REPEATS, progress,
                                  candidates=[c for c in CANDIDATES if c.label in leaders])
            big_gbps = {label: {s: max(v) for s, v in states.items()} for label, states in big.items()}
            large = {"bytes": LARGE_PROBE_BYTES, "config": best_config(big_gbps).label, "gbps": big_gbps,
                     "samples": big}
        seconds = time.perf_counter() - t0
        log.info("read configuration for device %s: %s (GB/s %s)", dev, cfg.label,
                 {k: {s: round(g, 2) for s, g in v.items()} for k, v in gbps.items()})
        with _lock:
            data = _read_cached()
            data[str(dev)] = {"version": PROBE_VERSION, "config": cfg.label, "gbps": gbps, "samples": samples, "measured_on": str(path),
                              "at": time.time(), "seconds": round(seconds, 2)}
            if large is not None:
                data[str(dev)]["large"] = large
            _write_cached(data)
            _memo[dev] = cfg
            _memo_large[dev] = _from_label(large["config"]) if large is not None else None
    return ProbeResult(dev, cfg, gbps, str(path), seconds,
                       _from_label(large["config"]) if large is not None else None, large["gbps"] if large else None)


def _current(stored: object) -> dict | None:
    """A stored measurement if it was made by this version of the probe, else None (it is measured again)."""
    return stored if isinstance(stored, dict) and stored.get("version") == PROBE_VERSION else None


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
    tmp = target.with_suffix(f".tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, target)


def forget_memo() -> None:
    """Drop the measurements remembered in this process (the file stays)."""
    with _lock:
        _memo.clear()
        _memo_large.clear()


def forget() -> None:
    """Drop remembered measurements, in this process and in the data dir's file (tests)."""
    forget_memo()
    with _lock:
        try:
            _cache_file().unlink()
        except FileNotFoundError:
            pass
