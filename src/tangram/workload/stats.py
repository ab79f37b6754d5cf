"""The statistics every benchmark and the simulator report with, defined once.

Percentiles are linearly interpolated between the two nearest ranks, numpy's
default (`numpy.percentile(values, q)`, method "linear"; `statistics.quantiles`
with method "inclusive"): for sorted values v[0..n-1] the q-th percentile is
v[i] + (v[i+1] - v[i]) * f where i + f = (n - 1) * q / 100. So p50 of an even
count is the mean of the middle two, p0 the minimum, p100 the maximum, and one
value is every percentile of itself. "p95" means this in every result.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0 <= q <= 100) of `values` by linear interpolation; None when there are none."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be within [0, 100], got {q}")
    s = sorted(values)
    if not s:
        return None
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def coefficient_of_variation(values: Sequence[float]) -> float:
    """Sample standard deviation over mean (0 when undefined: fewer than two values or a mean <= 0)."""
    if len(values) < 2:
        return 0.0
    mean = statistics.fmean(values)
    return statistics.stdev(values) / mean if mean > 0 else 0.0
