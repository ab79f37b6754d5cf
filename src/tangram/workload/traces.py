"""Seeded trace building blocks: bursty arrivals, skewed popularity, and what a trace looks like.

Arrivals are gamma distributed gaps with a chosen mean and coefficient of
variation (CV 1 is Poisson; a higher CV gives bursts, then quiet gaps).
Popularity is Zipf(s) over a seeded ranking of the model names: the model at
rank r (from 0) is chosen with probability proportional to 1 / (r + 1)^s.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

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
    if len(set(ranked)) != len(ranked):
        raise ValueError(f"model names must be distinct for a popularity ranking: {sorted(ranked)}")
    rng.shuffle(ranked)
    weights = [1.0 / (r + 1) ** s for r in range(len(ranked))]
    total = sum(weights)
    return {n: w / total for n, w in zip(ranked, weights)}


@dataclass(frozen=True)
class TraceShape:
    """Shape of a trace: how many requests, arrivals (mean gap, CV), popularity skew and request sizes (ranges)."""

    n_requests: int
    mean_gap_s: float = 0.05
    cv: float = 4.0  # coefficient of variation of the gaps (1 = Poisson; > 1 = bursty)
    zipf_s: float = 1.1
    prompt_tokens: tuple[int, int] = (64, 1024)
    max_tokens: tuple[int, int] = (16, 256)


def arrivals(rng: random.Random, shape: TraceShape, popularity: dict[str, float]) -> Iterator[tuple[float, str]]:
    """(arrival time, model) of each of the shape's requests: gamma gaps, models drawn by `popularity`.

    The caller may draw a request's sizes from `rng` between two arrivals: the sequence stays seeded.
    """
    names, weights = list(popularity), list(popularity.values())
    t = 0.0
    for gap in gamma_gaps(rng, shape.n_requests, shape.mean_gap_s, shape.cv):
        t += gap
        yield t, rng.choices(names, weights)[0]


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
