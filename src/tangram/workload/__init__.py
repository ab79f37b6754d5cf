"""What benchmarks and the simulator share, below both: trace generation, statistics and model descriptions.

`traces`: gamma inter-arrival gaps with a chosen coefficient of variation, Zipf
popularity over a seeded ranking, a trace's statistics; `stats`: the one
percentile definition (linear interpolation, numpy's default) and the
coefficient of variation; `models`: `ModelSpec`, the one description of a
synthetic model (an architecture's shapes, seeded random contents, variants
that re-draw a few layers of a base). Nothing here imports `tangram.bench` or
`tangram.sim`.
"""

from __future__ import annotations

from tangram.workload.models import RAW, ModelSpec, family, raw_model, transformer
from tangram.workload.stats import coefficient_of_variation, percentile
from tangram.workload.traces import TraceShape, arrivals, gamma_gaps, trace_stats, zipf_popularity

__all__ = ["RAW", "ModelSpec", "TraceShape", "arrivals", "coefficient_of_variation", "family", "gamma_gaps", "percentile", "raw_model",
           "trace_stats", "transformer", "zipf_popularity"]
