"""Summary statistics for the report: bootstrap and Wilson intervals, grouped score summaries.

Conventions:

* Every interval is a two-sided 95% interval.
* NaN values are dropped before anything is computed; ``n`` always counts the non-NaN values.
* The interval of a mean is a percentile bootstrap: ``n_resamples`` resamples of the ``n``
  values with replacement, the 2.5th and 97.5th percentiles of their means. Each group gets its
  own generator seeded by ``(seed, crc32(group key))``, so a group's interval does not depend on
  which other groups exist or on their order. A 0/1 variable is resampled exactly and cheaply
  (the bootstrap distribution of its mean is Binomial(n, p) / n).
* Proportions (pass rates, accuracy, sensitivity, specificity, agreement) get Wilson score
  intervals.
"""
from __future__ import annotations

import math
import zlib
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

Z95 = 1.959963984540054  # standard normal 97.5th percentile
_CHUNK_ELEMENTS = 4_000_000  # resample matrix elements generated at once (memory bound)


def group_rng(seed: int, key: object) -> np.random.Generator:
    """A generator seeded by the report seed and a stable hash of a group key."""
    return np.random.default_rng([int(seed), zlib.crc32(repr(key).encode())])


def bootstrap_mean_ci(values: Sequence[float] | np.ndarray, n_resamples: int, rng: np.random.Generator,
                      level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (NaNs dropped).

    Returns (nan, nan) for no values or ``n_resamples < 1``; (x, x) for a single value.
    """
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    n = x.size
    if n == 0 or n_resamples < 1:
        return (math.nan, math.nan)
    if n == 1 or np.all(x == x[0]):
        return (float(x[0]), float(x[0]))
    if np.all((x == 0) | (x == 1)):  # exact and O(n_resamples) for a 0/1 variable
        means = rng.binomial(n, x.mean(), size=n_resamples) / n
    else:
        means = np.empty(n_resamples, dtype=np.float64)
        step = max(1, _CHUNK_ELEMENTS // n)
        for a in range(0, n_resamples, step):
            b = min(n_resamples, a + step)
            means[a:b] = x[rng.integers(0, n, size=(b - a, n), dtype=np.int32)].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return (float(lo), float(hi))


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion k / n; (nan, nan) when n == 0."""
    if n <= 0:
        return (math.nan, math.nan)
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def summarise(df: pd.DataFrame, values: Iterable[str], by: Sequence[str], n_resamples: int,
              seed: int) -> pd.DataFrame:
    """Long table: one row per group x value column with n, mean, median, ci_low, ci_high.

    `by` may be empty (one overall group). Value columns missing from `df` are skipped; groups
    whose column has no non-NaN value are kept with n = 0 and NaN statistics.
    """
    values = [v for v in values if v in df.columns]
    cols = list(by) + ["score", "n", "mean", "median", "ci_low", "ci_high"]
    if df.empty or not values:
        return pd.DataFrame(columns=cols)
    groups = [((), df)] if not by else df.groupby(list(by), dropna=False, sort=True)
    rows = []
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        for v in values:
            x = pd.to_numeric(g[v], errors="coerce").to_numpy(dtype=np.float64)
            x = x[~np.isnan(x)]
            lo, hi = bootstrap_mean_ci(x, n_resamples, group_rng(seed, (key, v)))
            rows.append((*key, v, int(x.size), float(x.mean()) if x.size else math.nan,
                         float(np.median(x)) if x.size else math.nan, lo, hi))
    return pd.DataFrame(rows, columns=cols)


def proportions(df: pd.DataFrame, flags: Iterable[str], by: Sequence[str]) -> pd.DataFrame:
    """Long table of boolean columns per group: n (non-null), passed, fraction, Wilson interval."""
    flags = [f for f in flags if f in df.columns]
    cols = list(by) + ["check", "n", "passed", "fraction", "ci_low", "ci_high"]
    if df.empty or not flags:
        return pd.DataFrame(columns=cols)
    groups = [((), df)] if not by else df.groupby(list(by), dropna=False, sort=True)
    rows = []
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        for f in flags:
            x = g[f].dropna().astype(bool)
            n, k = int(x.size), int(x.sum())
            lo, hi = wilson_interval(k, n)
            rows.append((*key, f, n, k, k / n if n else math.nan, lo, hi))
    return pd.DataFrame(rows, columns=cols)


def binary_classification(parsed: pd.Series, label_state: pd.Series) -> dict[str, float]:
    """Accuracy, sensitivity and specificity of yes/no answers against positive/negative labels.

    Only pairs with a definite answer (yes / no) and a definite label (positive / negative) enter
    the rates; everything else is counted apart by the caller. Returns counts (tp, fn, tn, fp,
    n_definite) and each rate with its Wilson interval (``*_lo``, ``*_hi``).
    """
    p = parsed.astype("string").str.lower()
    s = label_state.astype("string").str.lower()
    definite = p.isin(["yes", "no"]) & s.isin(["positive", "negative"])
    p, s = p[definite], s[definite]
    tp = int(((p == "yes") & (s == "positive")).sum())
    fn = int(((p == "no") & (s == "positive")).sum())
    tn = int(((p == "no") & (s == "negative")).sum())
    fp = int(((p == "yes") & (s == "negative")).sum())
    out: dict[str, float] = {"n_definite": tp + fn + tn + fp, "tp": tp, "fn": fn, "tn": tn, "fp": fp}
    for name, k, n in (("accuracy", tp + tn, tp + fn + tn + fp), ("sensitivity", tp, tp + fn),
                       ("specificity", tn, tn + fp)):
        lo, hi = wilson_interval(k, n)
        out[name] = k / n if n else math.nan
        out[f"{name}_lo"], out[f"{name}_hi"] = lo, hi
    return out


def trapezoid_auc(x: Sequence[float], y: Sequence[float]) -> float:
    """Area under y(x) by the trapezoid rule (x in the units given, typically fractions 0..1)."""
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xa.size < 2:
        return math.nan
    return float(np.sum((xa[1:] - xa[:-1]) * (ya[1:] + ya[:-1]) / 2.0))


def mean_curve(fractions: Sequence[Sequence[float]], curves: Sequence[Sequence[float] | None],
               grid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Mean of several curves y_i(x_i) on one x grid (fractions of image tokens, 0..1).

    Curves on identical x values are averaged directly; otherwise each is linearly interpolated
    onto `grid` (default: 21 points over 0..1). Curves that are missing, empty, of a length
    different from their x values, or contain NaN are skipped. Returns (x, mean y, n curves used).
    """
    pairs = []
    for x, y in zip(fractions, curves):
        if x is None or y is None:
            continue
        xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        if xa.size == 0 or xa.size != ya.size or np.isnan(ya).any() or np.isnan(xa).any():
            continue
        pairs.append((xa, ya))
    if not pairs:
        return np.array([]), np.array([]), 0
    first = pairs[0][0]
    if grid is None and all(p[0].shape == first.shape and np.allclose(p[0], first) for p in pairs):
        return first, np.mean([p[1] for p in pairs], axis=0), len(pairs)
    g = np.linspace(0.0, 1.0, 21) if grid is None else np.asarray(grid, dtype=np.float64)
    ys = [np.interp(g, *(_sorted(xa, ya))) for xa, ya in pairs]
    return g, np.mean(ys, axis=0), len(pairs)


def _sorted(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(x, kind="stable")
    return x[order], y[order]


def fmt_num(x: object, digits: int = 3) -> str:
    """A number for display: `digits` decimals ('–' for missing); values below 10**-(digits-1) in
    magnitude keep `digits` significant digits instead (0.000612, not 0.001)."""
    try:
        v = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "–" if x is None else str(x)
    if math.isnan(v):
        return "–"
    if v.is_integer() and abs(v) >= 1000:
        return f"{int(v):,}"
    if v != 0 and abs(v) < 10 ** -(digits - 1):  # small values keep `digits` significant digits
        return f"{v:.{digits}g}"
    return f"{v:.{digits}f}"


def fmt_ci(mean: object, lo: object, hi: object, digits: int = 3) -> str:
    """'mean [lo, hi]' for display; only the mean when the interval is missing."""
    m = fmt_num(mean, digits)
    if m == "–":
        return m
    a, b = fmt_num(lo, digits), fmt_num(hi, digits)
    return m if "–" in (a, b) else f"{m} [{a}, {b}]"
