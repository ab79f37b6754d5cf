"""The headline numbers of `scripts/gpu-check`, read from the JSON its steps wrote (pure; unit-tested).

Every key is present in every summary (None where its step failed, was skipped, or in a dry run), so a
reader of summary.json never has to guess which keys a run may have.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from typing import Any

HEADLINE_KEYS = (
    "gpu", "torch", "h2d_pinned_limit_gbps", "h2d_pinned_bench_gbps", "tangram_cold_gbps", "tangram_warm_gbps",
    "tangram_dram_gbps", "cold_vs_h2d_limit", "cold_vs_limit", "warm_vs_limit", "pool_speedup", "dram_speedup",
    "cold_vs_best_peer", "big_model", "big_cold_gbps", "big_warm_gbps", "big_cold_vs_h2d_limit", "big_pool_speedup",
    "template_speedup", "template_overlap_bound", "template_speedup_ceiling", "template_token_identical",
    "overhead_reduction_vs_sllm_p50", "overhead_reduction_vs_sllm_p95", "tests",
)
FAILING = ("failed", "timeout", "no-time")


def _row(doc: Mapping[str, Any] | None, state: str, method: str) -> Mapping[str, Any] | None:
    """The first error-free row of `doc` with this state and method (bench load's rows)."""
    for r in (doc or {}).get("rows", []):
        if r.get("state") == state and r.get("method") == method and not r.get("error"):
            return r
    return None


def _get(doc: Mapping[str, Any] | None, *path: str) -> Any:
    cur: Any = doc
    for key in path:
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(key)
    return cur


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def headline(docs: Mapping[str, Mapping[str, Any] | None]) -> dict[str, Any]:
    """HEADLINE_KEYS from the step documents `env`, `h2d`, `load`, `coldstart`, `load-7b`, `tests` (any missing)."""
    env, h2d, load, cs, big, tests = (docs.get(k) for k in ("env", "h2d", "load", "coldstart", "load-7b", "tests"))
    gpus = _get(env, "gpus") or []
    limit = _get(h2d, "h2d_pinned_gbps")
    bench_h2d = _row(load, "warm", "h2d_pinned")
    cold, warm, dram = _row(load, "cold", "tangram"), _row(load, "warm", "tangram"), _row(load, "dram", "tangram")
    gb = lambda r: r.get("gbps") if r else None  # noqa: E731
    limit_any = limit if limit is not None else gb(bench_h2d)
    big_cold = _get(big, "summary", "cold_gbps")
    out: dict[str, Any] = {
        "gpu": gpus[0]["name"] if gpus else None,
        "torch": f"{env['torch']} (CUDA {env.get('torch_cuda')})" if env and env.get("torch") else None,
        "h2d_pinned_limit_gbps": limit,
        "h2d_pinned_bench_gbps": gb(bench_h2d),
        "tangram_cold_gbps": gb(cold), "tangram_warm_gbps": gb(warm), "tangram_dram_gbps": gb(dram),
        "cold_vs_h2d_limit": _ratio(gb(cold), limit_any),
        "big_model": _get(big, "summary", "model"), "big_cold_gbps": big_cold,
        "big_warm_gbps": _get(big, "summary", "warm_gbps"),
        "big_cold_vs_h2d_limit": _ratio(big_cold, limit_any),
        "big_pool_speedup": _get(big, "summary", "pool_speedup"),
        "overhead_reduction_vs_sllm_p50": _get(cs, "summary", "overhead_reduction_vs_sllm", "p50"),
        "overhead_reduction_vs_sllm_p95": _get(cs, "summary", "overhead_reduction_vs_sllm", "p95"),
        "tests": (f"{tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped"
                  if tests and "passed" in tests else None),
    }
    for key in ("cold_vs_limit", "warm_vs_limit", "pool_speedup", "dram_speedup", "cold_vs_best_peer"):
        out[key] = _get(load, "summary", key)
    for key in ("template_speedup", "template_overlap_bound", "template_speedup_ceiling", "template_token_identical"):
        out[key] = _get(cs, "summary", key)
    return {k: out[k] for k in HEADLINE_KEYS}


def junit_counts(path: Path) -> dict[str, Any]:
    """passed / failed / skipped counts and the failing test ids of a pytest --junitxml report."""
    root = ET.parse(path).getroot()
    passed = failed = skipped = 0
    failures: list[str] = []
    for case in root.iter("testcase"):
        kinds = {child.tag for child in case}
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if kinds & {"failure", "error"}:
            failed += 1
            failures.append(name)
        elif "skipped" in kinds:
            skipped += 1
        else:
            passed += 1
    return {"passed": passed, "failed": failed, "skipped": skipped, "failures": failures}


def lines(summary: Mapping[str, Any], steps: Mapping[str, Mapping[str, Any]], *, dry_run: bool) -> list[str]:
    """The one-screen text: every headline key, then one line per step (status, seconds, error)."""
    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    width = max(len(k) for k in HEADLINE_KEYS)
    out = [f"gpu-check {'DRY RUN (CPU: no CUDA call made)' if dry_run else 'on CUDA'}"]
    out += [f"  {k:<{width}}  {fmt(summary.get(k))}" for k in HEADLINE_KEYS]
    out.append("steps:")
    for name, st in steps.items():
        err = f"  {st['error']}" if st.get("error") else ""
        out.append(f"  {name:<10} {st['status']:<8} {st.get('seconds', 0.0):6.1f} s{err[:150]}")
    return out
