"""Summary statistics for the report: patient-level cluster bootstrap intervals, curve means.

Conventions:

* Every interval is a two-sided 95% percentile interval.
* NaN values are dropped before anything is computed; ``n`` always counts the non-NaN values
  (rows), never patients.
* Intervals are **patient-level cluster bootstrap** intervals. Rows of one image, and of one
  patient, are not independent, so the unit resampled is the patient (``subject_id``; the image
  where that is unknown): a group's rows are first reduced to one (sum, count) pair per patient
  and value; each of ``n_resamples`` resamples draws the group's patients with replacement and
  takes the ratio of the summed sums to the summed counts (the mean over the rows of the drawn
  patients); the interval is the 2.5th and 97.5th percentiles of these ratios. A mean is the
  ratio of per-patient sums of the value to per-patient counts; a proportion (pass rate,
  accuracy, sensitivity, specificity, agreement) the ratio of per-patient counts of successes to
  per-patient counts of trials: proportions get the same cluster bootstrap, no Wilson interval.
  Many rows of one patient therefore weigh in the mean by their number but do not narrow the
  interval as independent rows would.
* All values of one group share its resamples (the same patients drawn for every value), drawn
  from a generator seeded by ``(seed, crc32(group key))``, so a group's interval does not depend
  on which other groups exist or on their order. A resample that draws no patient with a value
  (summed count 0) is left out of that value's percentiles.
* Cost: ``n_resamples`` x patients of the group random draws, in chunks of at most
  ``_CHUNK_ELEMENTS`` (bounded memory).
"""
from __future__ import annotations

import math
import zlib
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

Z95 = 1.959963984540054  # standard normal 97.5th percentile
_CHUNK_ELEMENTS = 2_000_000  # resampled patient indices generated at once (memory bound, ~50 MB)


def _plain(key: object) -> object:
    """A group key with numpy scalars as Python values (a stable repr for seeding)."""
    if isinstance(key, tuple):
        return tuple(_plain(k) for k in key)
    return key.item() if isinstance(key, np.generic) else key


def group_rng(seed: int, key: object) -> np.random.Generator:
    """A generator seeded by the report seed and a stable hash of a group key."""
    return np.random.default_rng([int(seed), zlib.crc32(repr(_plain(key)).encode())])


def cluster_ratio_ci(sums: np.ndarray, counts: np.ndarray, n_resamples: int, rng: np.random.Generator,
                     level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Cluster bootstrap interval of sum(sums) / sum(counts), per column.

    `sums`, `counts`: (patients, values) arrays (a 1-D array is one value). Each resample draws
    the patients (rows) with replacement; the interval is the percentile interval of the
    resampled ratios. Returns (low, high) arrays of length values; NaN where a value has no
    count or ``n_resamples < 1``.
    """
    s = np.asarray(sums, dtype=np.float64).reshape(len(sums), -1)
    c = np.asarray(counts, dtype=np.float64).reshape(len(counts), -1)
    n_pat, k = s.shape
    lo, hi = np.full(k, math.nan), np.full(k, math.nan)
    if n_pat == 0 or n_resamples < 1:
        return lo, hi
    num, den = np.empty((n_resamples, k)), np.empty((n_resamples, k))
    step = max(1, _CHUNK_ELEMENTS // n_pat)
    for a in range(0, n_resamples, step):
        b = min(n_resamples, a + step)
        idx = rng.integers(0, n_pat, size=(b - a, n_pat), dtype=np.int64)
        idx += (np.arange(b - a, dtype=np.int64) * n_pat)[:, None]
        w = np.bincount(idx.ravel(), minlength=(b - a) * n_pat).reshape(b - a, n_pat).astype(np.float64)
        num[a:b], den[a:b] = w @ s, w @ c
    ratio = np.divide(num, den, out=np.full_like(num, math.nan), where=den > 0)
    alpha = (1.0 - level) / 2.0
    ok = np.isfinite(ratio).any(axis=0)
    if ok.any():
        q = np.nanquantile(ratio[:, ok], [alpha, 1.0 - alpha], axis=0)
        lo[ok], hi[ok] = q[0], q[1]
    return lo, hi


def bootstrap_mean_ci(values: Sequence[float] | np.ndarray, n_resamples: int, rng: np.random.Generator,
                      level: float = 0.95, clusters: Sequence[Any] | None = None) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (NaNs dropped), resampling
    `clusters` (labels, one per value; default: every value its own cluster).

    Returns (nan, nan) for no values or ``n_resamples < 1``.
    """
    x = np.asarray(values, dtype=np.float64)
    keep = ~np.isnan(x)
    if not keep.any() or n_resamples < 1:
        return (math.nan, math.nan)
    labels = np.arange(x.size) if clusters is None else np.asarray(clusters, dtype=object)
    per = pd.DataFrame({"c": labels[keep], "x": x[keep]}).groupby("c", sort=True)["x"].agg(["sum", "count"])
    lo, hi = cluster_ratio_ci(per["sum"].to_numpy(), per["count"].to_numpy(), n_resamples, rng, level)
    return (float(lo[0]), float(hi[0]))


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion k / n of independent trials; (nan, nan) when n == 0.
    (The report's proportions are clustered by patient and use :func:`cluster_ratio_ci`.)"""
    if n <= 0:
        return (math.nan, math.nan)
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


# ---------------------------------------------------------------------------------------------
# grouped summaries


SUMMARY_COLUMNS = ["score", "n", "total", "mean", "ci_low", "ci_high"]


def summarise_groups(groups: Iterable[tuple[tuple, pd.DataFrame]], values: Sequence[str], by: Sequence[str],
                     n_resamples: int, seed: int) -> pd.DataFrame:
    """Long table: one row per group x value with ``n`` (summed counts), ``total`` (summed sums),
    ``mean`` (total / n) and the cluster bootstrap interval.

    `groups` yields (group key, one row per patient) with columns ``s__<value>`` (the patient's
    sum) and ``n__<value>`` (its count) for each value (see :func:`reports.data.patient_groups`).
    """
    rows = []
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        s = g[[f"s__{v}" for v in values]].to_numpy(dtype=np.float64)
        c = g[[f"n__{v}" for v in values]].to_numpy(dtype=np.float64)
        lo, hi = cluster_ratio_ci(s, c, n_resamples, group_rng(seed, key))
        tot, n = s.sum(axis=0), c.sum(axis=0)
        for j, v in enumerate(values):
            mean = tot[j] / n[j] if n[j] > 0 else math.nan
            rows.append((*key, v, int(round(n[j])), float(tot[j]), mean, float(lo[j]), float(hi[j])))
    return pd.DataFrame(rows, columns=[*by, *SUMMARY_COLUMNS])


def frame_groups(df: pd.DataFrame, values: Sequence[str], by: Sequence[str],
                 cluster: str | None = None) -> list[tuple[tuple, pd.DataFrame]]:
    """The per-patient (sum, count) rows of an in-memory frame, per group of `by`, as
    :func:`summarise_groups` takes them (`cluster`: the patient column; None: each row its own)."""
    work = df.assign(**{f"x__{v}": pd.to_numeric(df[v], errors="coerce").astype(np.float64) for v in values})
    work["__cluster"] = np.arange(len(df)) if cluster is None else df[cluster].to_numpy()
    agg = {}
    for v in values:
        agg[f"s__{v}"] = (f"x__{v}", "sum")
        agg[f"n__{v}"] = (f"x__{v}", "count")
    out = []
    groups = [((), work)] if not by else work.groupby(list(by), dropna=False, sort=True)
    for key, g in groups:
        per = g.groupby("__cluster", sort=True).agg(**agg).reset_index(drop=True)
        out.append((key if isinstance(key, tuple) else (key,), per))
    return out


def summarise(df: pd.DataFrame, values: Iterable[str], by: Sequence[str], n_resamples: int, seed: int,
              cluster: str | None = None) -> pd.DataFrame:
    """Long table of an in-memory frame: one row per group x value column with n, mean, median,
    ci_low, ci_high (cluster bootstrap over `cluster`; None: rows are the clusters).

    `by` may be empty (one overall group). Value columns missing from `df` are skipped; groups
    whose column has no non-NaN value are kept with n = 0 and NaN statistics.
    """
    values = [v for v in values if v in df.columns]
    cols = list(by) + ["score", "n", "mean", "median", "ci_low", "ci_high"]
    if df.empty or not values:
        return pd.DataFrame(columns=cols)
    out = summarise_groups(frame_groups(df, values, by, cluster), values, by, n_resamples, seed)
    med = []
    groups = [((), df)] if not by else df.groupby(list(by), dropna=False, sort=True)
    for _, g in groups:
        med += [float(pd.to_numeric(g[v], errors="coerce").median()) for v in values]
    return out.assign(median=med)[cols]


# ---------------------------------------------------------------------------------------------
# curves


class CurveMean:
    """Running mean of curves y_i(x_i) fed in batches, with the rule of :func:`mean_curve`.

    Curves that are missing, empty, of a length different from their x values, or contain NaN
    are skipped. If every curve used has the same x values they are averaged directly;
    otherwise each is linearly interpolated onto `grid` (default 21 points over 0..1). The sums
    are kept per distinct x vector (interpolation is linear in y), so memory does not grow with
    the number of curves.
    """

    def __init__(self, grid: np.ndarray | None = None):
        self.grid = grid
        self.sums: dict[bytes, tuple[np.ndarray, np.ndarray, int]] = {}

    def add(self, x: Any, y: Any) -> None:
        """One curve (x values, y values)."""
        if x is None or y is None:
            return
        xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        if xa.size == 0 or xa.size != ya.size or np.isnan(ya).any() or np.isnan(xa).any():
            return
        self.add_stack(xa, ya[None, :])

    def add_stack(self, x: np.ndarray, ys: np.ndarray) -> None:
        """Several valid curves on the same x values: `ys` is (curves, len(x))."""
        if len(ys) == 0:
            return
        k = x.tobytes()
        if k in self.sums:
            xa, total, n = self.sums[k]
            self.sums[k] = (xa, total + ys.sum(axis=0), n + len(ys))
        else:
            self.sums[k] = (x.copy(), ys.sum(axis=0), len(ys))

    def result(self) -> tuple[np.ndarray, np.ndarray, int]:
        """(x, mean y, curves used)."""
        if not self.sums:
            return np.array([]), np.array([]), 0
        parts = list(self.sums.values())
        n = sum(p[2] for p in parts)
        first = parts[0][0]
        if self.grid is None and all(p[0].shape == first.shape and np.allclose(p[0], first) for p in parts):
            return first, sum(p[1] for p in parts) / n, n
        g = np.linspace(0.0, 1.0, 21) if self.grid is None else np.asarray(self.grid, dtype=np.float64)
        total = np.zeros_like(g)
        for xa, ysum, _ in parts:
            order = np.argsort(xa, kind="stable")
            total += np.interp(g, xa[order], ysum[order])
        return g, total / n, n


def mean_curve(fractions: Sequence[Sequence[float]], curves: Sequence[Sequence[float] | None],
               grid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Mean of several curves y_i(x_i) on one x grid (fractions of image tokens, 0..1); see
    :class:`CurveMean`. Returns (x, mean y, n curves used)."""
    acc = CurveMean(grid)
    for x, y in zip(fractions, curves):
        acc.add(x, y)
    return acc.result()


def trapezoid_auc(x: Sequence[float], y: Sequence[float]) -> float:
    """Area under y(x) by the trapezoid rule (x in the units given, typically fractions 0..1)."""
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xa.size < 2:
        return math.nan
    return float(np.sum((xa[1:] - xa[:-1]) * (ya[1:] + ya[:-1]) / 2.0))


# ---------------------------------------------------------------------------------------------
# display


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
