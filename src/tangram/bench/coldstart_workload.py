"""Workload, configurations and result aggregation of `tangram bench coldstart` (pure; unit-tested).

Models: a family (a base and variants that re-draw one or two layers, the rest
byte-identical, so a pool shares those tensors) plus unrelated models, real
architectures with random fp32 weights. Trace: seeded gamma arrivals (high CV),
Zipf popularity, one prompt length, keep-alive short enough that most
requests find no running instance.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from tangram.bench.kv_workload import TraceRequest
from tangram.workload import ModelSpec, TraceShape, family, percentile, transformer

CONFIGS = ("baseline", "sllm", "tangram", "tangram-notemplate")
START_TYPES = ("warm", "pool-hit", "dram", "cold")


@dataclass(frozen=True)
class Configuration:
    """How the server is set up for one configuration (see docs/benchmarks.md)."""

    name: str
    loader: str  # "tangram" (the fast loader) or "safetensors" (load_file, then a copy)
    host_cache: bool  # host DRAM cache tier
    retain: bool  # parameters stay in the device pool after an instance ends
    share: bool  # models share identical tensors in the device pool (content-addressed)
    kv_mode: str  # "elastic" or "reserve"
    scheduler: str  # placement policy
    templates: bool
    migration: bool = False  # the controller moves running requests by itself (docs/migration.md)


def configurations() -> dict[str, Configuration]:
    """Each configuration with its best honest settings."""
    return {
        "baseline": Configuration("baseline", "safetensors", False, False, False, "reserve", "random", False),
        "sllm": Configuration("sllm", "tangram", True, False, False, "reserve", "sllm", False),
        "tangram": Configuration("tangram", "tangram", True, True, True, "elastic", "tangram", True),
        "tangram-notemplate": Configuration("tangram-notemplate", "tangram", True, True, True, "elastic", "tangram",
                                            False),
        "tangram-migrate": Configuration("tangram-migrate", "tangram", True, True, True, "elastic", "tangram", True,
                                         migration=True),  # replayed on the migration trace (coldstart_migrate)
    }


@dataclass(frozen=True)
class Sizes:
    """Scale of a run."""

    models: str  # "quick" / "full": the model set of `make_models`; anything else names a caller-given set
    requests: int
    mean_gap_s: float
    keep_alive_s: float
    prompt_tokens: int
    max_tokens: int
    pool_fraction: float  # pool capacity / bytes of all distinct tensors
    devices: int


QUICK = Sizes("quick", 64, 0.5, 1.0, 32, 8, 0.7, 1)
FULL = Sizes("full", 150, 0.8, 2.0, 32, 16, 0.7, 2)


def make_models(size: str) -> list[ModelSpec]:
    """A family of three sharing most tensors, and two unrelated models ("quick" or "full" sizes)."""
    if size not in ("quick", "full"):
        raise ValueError(f"unknown size {size!r}")
    hidden, layers = (640, 8) if size == "full" else (384, 6)  # about 0.2 / 0.07 GB each
    base = transformer("fam-base", "qwen2", hidden, hidden * 3, layers, 8, 2, 32000, 2048, seed=33)
    return [*family(base, {"fam-chat": (layers - 1,), "fam-code": (layers - 2, layers - 1)}),
            transformer("solo-a", "qwen2", hidden, hidden * 3, layers, 8, 2, 32000, 2048, seed=34),
            transformer("solo-b", "llama", hidden, hidden * 2, layers, 8, 2, 24000, 2048, seed=35)]


def trace_spec(sizes: Sizes) -> TraceShape:
    """Bursty arrivals, one prompt length (so a request's warm TTFT is its model's)."""
    return TraceShape(sizes.requests, mean_gap_s=sizes.mean_gap_s, cv=3.0, zipf_s=1.1,
                     prompt_tokens=(sizes.prompt_tokens, sizes.prompt_tokens),
                     max_tokens=(sizes.max_tokens, sizes.max_tokens))


def overheads(results: list[dict], warm_ttft: dict[str, float]) -> list[float]:
    """Cold-start overhead of each successful request: its TTFT minus its model's warm TTFT."""
    return [r["ttft_s"] - warm_ttft[r["model"]] for r in results if r.get("ttft_s") is not None
            and r["model"] in warm_ttft]


def pool_hit_vs_warm(results: list[dict], warm_ttft: dict[str, float]) -> float | None:
    """Median over the successful pool-hit starts of TTFT / their model's warm TTFT (None without any)."""
    ratios = [r["ttft_s"] / warm_ttft[r["model"]] for r in results
              if r.get("start") == "pool-hit" and r.get("ttft_s") is not None and not r.get("error")
              and warm_ttft.get(r["model"])]
    return statistics.median(ratios) if ratios else None


def summarize(per_config: dict[str, dict]) -> dict:
    """docs/benchmarks.md summary keys from each configuration's request results and warm TTFTs.

    Percentiles are `tangram.workload.percentile` (linear interpolation, numpy's default).
    """
    s: dict = {k: {} for k in ("ttft_p50", "ttft_p95", "ttft_p99", "overhead_p50", "overhead_p95",
                               "bytes_loaded", "failed", "starts", "trace_pool_hit_vs_warm_ttft")}
    for name, run in per_config.items():
        ok = [r for r in run["results"] if r.get("ttft_s") is not None and not r.get("error")]
        ttft = [r["ttft_s"] for r in ok]
        over = overheads(ok, run["warm_ttft"])
        for q in (50, 95, 99):
            s[f"ttft_p{q}"][name] = percentile(ttft, q)
        for q in (50, 95):
            s[f"overhead_p{q}"][name] = percentile(over, q)
        s["bytes_loaded"][name] = run["bytes_loaded"]
        s["failed"][name] = len(run["results"]) - len(ok)
        s["starts"][name] = {t: sum(1 for r in ok if r.get("start") == t) for t in START_TYPES}
        s["trace_pool_hit_vs_warm_ttft"][name] = pool_hit_vs_warm(ok, run["warm_ttft"])
    if "tangram" in per_config and "sllm" in per_config:
        def reduction(key: str, q: int) -> float | None:
            t, b = s[f"{key}_p{q}"]["tangram"], s[f"{key}_p{q}"]["sllm"]
            return None if t is None or not b else 1 - t / b
        s["ttft_reduction_vs_sllm"] = {f"p{q}": reduction("ttft", q) for q in (50, 95)}
        s["overhead_reduction_vs_sllm"] = {f"p{q}": reduction("overhead", q) for q in (50, 95)}
        loads = {n: sum(r.get("load_s") or 0.0 for r in per_config[n]["results"] if r.get("start") != "warm")
                 for n in ("tangram", "sllm")}  # seconds spent loading for the requests that waited for a start
        s["load_speedup_vs_sllm"] = loads["sllm"] / loads["tangram"] if loads["tangram"] else None
        n_t = len(per_config["tangram"]["results"])
        s["pool_hit_ratio"] = s["starts"]["tangram"]["pool-hit"] / n_t if n_t else 0.0
    if "tangram" in per_config and "tangram-notemplate" in per_config:
        a, b = s["ttft_p50"].get("tangram-notemplate"), s["ttft_p50"].get("tangram")
        s["template_speedup"] = a / b if a and b else None
    return s


__all__ = ["CONFIGS", "Configuration", "FULL", "QUICK", "Sizes", "TraceRequest", "configurations",
           "make_models", "overheads", "percentile", "pool_hit_vs_warm", "summarize", "trace_spec"]
