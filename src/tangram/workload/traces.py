"""Seeded trace building blocks: bursty arrivals, skewed popularity, and what a trace looks like.

Arrivals are gamma distributed gaps with a chosen mean and coefficient of
variation (CV 1 is Poisson; a higher CV gives bursts, then quiet gaps).
Popularity is Zipf(s) over a seeded ranking of the model names: the model at
rank r (from 0) is chosen with probability proportional to 1 / (r + 1)^s.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence

from tangram.workload.stats import coefficient_of_variation


def gamma_gaps(rng: random.Random, n: int, mean: float, cv: float) -> list[float]:
    """`n` gamma-distributed gaps with mean `mean` and coefficient of variation `cv` (shape 1/cv^2)."""
    if mean <= 0 or cv <= 0:
        raise ValueError(f"gamma gaps need a positive mean and cv, got mean={mean}, cv={cv}")
    shape = 1.0 / (cv * cv)
    return [rng.gammavariate(shape, mean / shape) for _ in range(n)]


def zipf_popularity(names: Sequence[str], s: float, rng: random.Random) -> dict[str, float]:
    """Zipf(s) probabilities over a seeded ranking of `names` (shuffled with `rng`), most popular first.

    Draw with `rng.choices(list(p), list(p.values()))`: the keys are in rank order.
    """
    ranked = list(names)
    rng.shuffle(ranked)
    weights = [1.0 / (r + 1) ** s for r in range(len(ranked))]
    total = sum(weights)
    return {n: w / total for n, w in zip(ranked, weights)}


def trace_stats(times: Sequence[float], models: Sequence[str]) -> dict[str, object]:
    """What a trace looks like: its size, duration, gap mean and CV, and its request mix per model.

    `times` are the arrivals (sorted, from trace time 0) and `models` the model of each request.
    """
    if len(times) != len(models):
        raise ValueError(f"{len(times)} arrival times for {len(models)} requests")
    gaps = [b - a for a, b in zip([0.0, *times[:-1]], times)]
    per_model: dict[str, int] = {}
    for m in models:
        per_model[m] = per_model.get(m, 0) + 1
    return {"requests": len(times), "duration_s": round(times[-1], 3) if times else 0.0,
            "gap_cv": round(coefficient_of_variation(gaps), 3),
            "mean_gap_s": round(statistics.fmean(gaps), 4) if gaps else 0.0,
            "models_requested": len(per_model),
            "top_model_share": round(max(per_model.values()) / len(models), 4) if models else 0.0,
            "per_model": dict(sorted(per_model.items(), key=lambda kv: -kv[1]))}
