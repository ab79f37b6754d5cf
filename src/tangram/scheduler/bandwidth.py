"""Tier bandwidths for the cost model: measured at worker start, refined from every observed load.

Sources, in order:
1. the loader probe's cached measurements (`<data dir>/read_method.json`, per
   filesystem: cold and warm GB/s of each read configuration): disk = cold
   GB/s of the chosen configuration, DRAM = its warm GB/s (a page-cache or
   host-cache hit is a memory copy);
2. else a short measurement (`measure_short`): a copy between two pre-touched
   host buffers for DRAM and, given a file, one cold read of it for disk;
3. the priors below, used only until one of the above or an observed load
   replaces them (documented guesses, never the final word).

Refinement: `observe(LoadStats)` folds a load into an exponentially weighted
moving average per tier. A load of only disk bytes (or only cache bytes) is a
sample of that tier; a mixed load charges the cache bytes at the current DRAM
estimate and attributes the remaining seconds to the disk bytes. Loads under
`min_bytes` are ignored (fixed costs dominate them).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tangram.defaults import RELOAD_BANDWIDTH
from tangram.scheduler.cost import Bandwidths
from tangram.store import LoadStats

log = logging.getLogger(__name__)

PRIOR_DISK = RELOAD_BANDWIDTH  # bytes/s: the same prior as the pools' reload bandwidth (tangram.defaults)
PRIOR_DRAM = 10e9  # bytes/s: docs/design.md's copies into a touched buffer (10-13 GB/s)


@dataclass
class TierEstimate:
    """One tier's bandwidth (bytes/s), where it came from, and how many loads refined it."""

    value: float
    source: str
    samples: int = 0


class BandwidthEstimator:
    """Per-tier bandwidths (DRAM cache, disk): measured, then refined from observed loads by EWMA."""

    def __init__(self, dram: float = PRIOR_DRAM, disk: float = PRIOR_DISK, *, alpha: float = 0.3,
                 min_bytes: int = 1 << 20, source: str = "prior") -> None:
        if not 0 < alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")
        self.dram = TierEstimate(dram, source)
        self.disk = TierEstimate(disk, source)
        self.alpha = alpha
        self.min_bytes = min_bytes

    @property
    def bandwidths(self) -> Bandwidths:
        """The current estimates, as the cost model takes them."""
        return Bandwidths(dram=self.dram.value, disk=self.disk.value)

    def _fold(self, tier: TierEstimate, sample: float) -> None:
        if tier.source == "prior":  # a prior is only a placeholder: the first observation replaces it
            tier.value, tier.source = sample, "observed"
        else:
            tier.value = (1 - self.alpha) * tier.value + self.alpha * sample
        tier.samples += 1

    def observe(self, stats: LoadStats) -> None:
        """Refine the estimates with one load's bytes per tier and seconds."""
        disk, cache, seconds = stats.bytes_from_disk, stats.bytes_from_cache, stats.seconds
        if seconds <= 0 or disk + cache < self.min_bytes:
            return
        if disk == 0:
            self._fold(self.dram, cache / seconds)
        elif cache == 0:
            self._fold(self.disk, disk / seconds)
        else:
            left = seconds - cache / self.dram.value
            if left > 0 and disk >= self.min_bytes:
                self._fold(self.disk, disk / left)

    # ------------------------------------------------------------------ start-up measurements

    @classmethod
    def from_probe(cls, cache_file: Path | None = None, **kwargs) -> BandwidthEstimator | None:
        """Estimates from the loader probe's cached measurements (None when there are none)."""
        if cache_file is None:
            from tangram.store.probe import _cache_file

            cache_file = _cache_file()
        try:
            data = json.loads(Path(cache_file).read_text())
        except (OSError, ValueError):
            return None
        colds, warms = [], []
        for entry in data.values() if isinstance(data, dict) else ():
            gbps = entry.get("gbps", {}).get(entry.get("config", ""), {}) if isinstance(entry, dict) else {}
            if gbps.get("cold", 0) > 0 and gbps.get("warm", 0) > 0:
                colds.append(gbps["cold"] * 1e9)
                warms.append(gbps["warm"] * 1e9)
        if not colds:
            return None
        return cls(dram=max(warms), disk=min(colds), source=f"probe:{cache_file}", **kwargs)

    @classmethod
    def measure_short(cls, path: Path | None = None, nbytes: int = 64 << 20, **kwargs) -> BandwidthEstimator:
        """A quick measurement: host copy bandwidth for DRAM; one cold read of `path` for disk (else the prior)."""
        from tangram.store import io

        src, dst = io.host_buffer(nbytes), io.host_buffer(nbytes)
        dst.copy_(src)  # touch
        t0 = time.perf_counter()
        dst.copy_(src)
        dram = nbytes / max(time.perf_counter() - t0, 1e-9)
        est = cls(dram=dram, source="measured", **kwargs)
        if path is not None and os.path.getsize(path) >= (1 << 20):
            size = min(os.path.getsize(path), nbytes)
            buf = torch.empty(size, dtype=torch.uint8)
            io.evict_from_page_cache(path)
            t0 = time.perf_counter()
            with open(path, "rb", buffering=0) as fh:
                fh.readinto(memoryview(buf.numpy()))
            est.disk = TierEstimate(size / max(time.perf_counter() - t0, 1e-9), "measured")
        else:
            est.disk.source = "prior"
        return est

    @classmethod
    def at_start(cls, path: Path | None = None, **kwargs) -> BandwidthEstimator:
        """A worker's start-up estimates: the probe's cached measurements when present, else a short measurement."""
        est = cls.from_probe(**kwargs)
        if est is None:
            est = cls.measure_short(path, **kwargs)
        log.info("tier bandwidths: dram %.2f GB/s (%s), disk %.2f GB/s (%s)", est.dram.value / 1e9,
                 est.dram.source, est.disk.value / 1e9, est.disk.source)
        return est

    def describe(self) -> dict:
        """Estimates, sources and sample counts (for results and status)."""
        return {t: {"bytes_per_s": getattr(self, t).value, "source": getattr(self, t).source,
                    "samples": getattr(self, t).samples} for t in ("dram", "disk")}
