"""Jensen-Shannon divergence and distance between two maps of one image and target.

Both are in bits (base-2 logarithms), so they lie in [0, 1]. The divergence and its square root
(the distance, a metric) are different numbers and are named apart: never report one as the
other.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["js_distance", "js_divergence"]


def _distribution(x: np.ndarray | list[float], name: str) -> tuple[np.ndarray, float]:
    a = np.asarray(x, dtype=np.float64)
    if (a < 0).any():
        raise ValueError(f"{name} must be non-negative")
    return a, float(a.sum())


def js_divergence(p: np.ndarray | list[float], q: np.ndarray | list[float]) -> float:
    """Jensen-Shannon divergence, in bits (0..1), of two non-negative arrays of the same shape.

    Each array is normalised to sum 1 first (raw relevancy maps can be passed as they are);
    JS = 0.5 KL(p || m) + 0.5 KL(q || m) with m = (p + q) / 2 and 0 log 0 = 0. It is 0 for maps
    proportional to each other and 1 for maps with disjoint support. NaN when either array has
    no mass (sum 0) or a non-finite sum. Raises ValueError when the shapes differ or a value is
    negative.
    """
    a, sa = _distribution(p, "p")
    b, sb = _distribution(q, "q")
    if a.shape != b.shape:
        raise ValueError(f"maps differ in shape: {a.shape} vs {b.shape}")
    if not (sa > 0 and sb > 0 and math.isfinite(sa) and math.isfinite(sb)):
        return math.nan
    a = a.ravel() / sa
    b = b.ravel() / sb
    m = 0.5 * (a + b)
    total = 0.0
    for x in (a, b):
        nz = x > 0  # where x > 0, m >= x / 2 > 0
        total += 0.5 * float(x[nz] @ np.log2(x[nz] / m[nz]))
    return min(1.0, max(0.0, total))


def js_distance(p: np.ndarray | list[float], q: np.ndarray | list[float]) -> float:
    """Jensen-Shannon distance: the square root of `js_divergence` (bits; 0..1, a metric).
    Same inputs, NaN and errors as `js_divergence`."""
    d = js_divergence(p, q)
    return math.sqrt(d) if math.isfinite(d) else math.nan
