"""Jensen-Shannon divergence between two maps of one image and target."""
from __future__ import annotations

import math

import numpy as np

__all__ = ["js_distance", "js_divergence"]


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits (base 2, range 0..1) of two non-negative maps of the same
    shape, each normalised to mass 1 first: JS = 0.5 KL(p||m) + 0.5 KL(q||m), m = (p + q) / 2.
    0 for identical maps, 1 for maps with disjoint support; NaN when either map has no mass.
    """
    a = np.asarray(p, dtype=np.float64)
    b = np.asarray(q, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"maps differ in shape: {a.shape} vs {b.shape}")
    if (a < 0).any() or (b < 0).any():
        raise ValueError("maps must be non-negative")
    sa, sb = float(a.sum()), float(b.sum())
    if not (sa > 0 and sb > 0 and math.isfinite(sa) and math.isfinite(sb)):
        return math.nan
    a, b = a.ravel() / sa, b.ravel() / sb
    m = 0.5 * (a + b)

    def kl(x: np.ndarray) -> float:
        nz = x > 0
        return float((x[nz] * np.log2(x[nz] / m[nz])).sum())

    return float(min(1.0, max(0.0, 0.5 * kl(a) + 0.5 * kl(b))))


def js_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon distance: the square root of `js_divergence` (a metric; 0..1)."""
    d = js_divergence(p, q)
    return math.sqrt(d) if math.isfinite(d) else math.nan
