"""Quality checks of map scores against thresholds: the one definition of every pass flag.

The flags are not stored with the scores: whoever reports them derives them from the raw scores
(`metrics/` and `sensitivity/` tables) and the thresholds in force (`conf/metrics/`), so a changed
threshold is never reported against stale flags. Every function is vectorised over numpy arrays
(or pandas columns) and returns a float array: 1.0 pass, 0.0 fail, NaN not applicable (a NaN
score, or a laterality balance on a non-frontal view).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from metrics.maps import is_frontal

MAP_FLAGS = ("pass_inside_body", "pass_border", "pass_entropy", "pass_laterality_balance", "pass_no_sink")
PAIR_FLAGS = ("pass_js",)


@dataclass(frozen=True)
class Thresholds:
    """Pass limits (conf/metrics/default.yaml holds the defaults)."""

    min_inside_body_ratio: float = 0.7
    max_border_fraction: float = 0.05
    max_entropy_norm: float = 0.85
    left_fraction_range: tuple[float, float] = (0.3, 0.7)
    max_js_divergence: float = 0.2
    max_sink_fraction: float = 0.5

    @classmethod
    def from_config(cls, mcfg: Any) -> "Thresholds":
        """From a `metrics` config node (or any mapping / object with these attributes)."""
        get = (lambda k, d=None: mcfg.get(k, d)) if isinstance(mcfg, Mapping) else (lambda k, d=None: getattr(mcfg, k, d))
        lo, hi = get("left_fraction_range")
        return cls(float(get("min_inside_body_ratio")), float(get("max_border_fraction")),
                   float(get("max_entropy_norm")), (float(lo), float(hi)), float(get("max_js_divergence")),
                   float(get("max_sink_fraction", cls.max_sink_fraction)))


def _flag(values: Any, test) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    out = np.where(test(v), 1.0, 0.0)
    out[np.isnan(v)] = np.nan
    return out


def frontal_mask(view_position: Any) -> np.ndarray:
    """True where the view is frontal (`metrics.is_frontal`)."""
    views = np.asarray(view_position, dtype=object)
    return np.array([isinstance(v, str) and is_frontal(v) for v in views], dtype=bool)


def map_flags(scores: Mapping[str, Any], thresholds: Thresholds) -> dict[str, np.ndarray]:
    """The map checks from the columns `inside_body_ratio`, `border_fraction`, `entropy_norm`,
    `patient_left_fraction`, `view_position`, `first_token_fraction` and `corner_fraction` of
    `scores` (a DataFrame or a dict of arrays). inside body >= min; border <= max; normalised
    entropy <= max; patient-left fraction within the range, frontal views only; no attention sink:
    first-token and corner mass both <= max_sink_fraction (NaN where those scores are absent,
    e.g. rows scored before they existed)."""
    t = thresholds
    lo, hi = t.left_fraction_range
    lateral = _flag(scores["patient_left_fraction"], lambda v: (v >= lo) & (v <= hi))
    lateral[~frontal_mask(scores["view_position"])] = np.nan
    return {
        "pass_inside_body": _flag(scores["inside_body_ratio"], lambda v: v >= t.min_inside_body_ratio),
        "pass_border": _flag(scores["border_fraction"], lambda v: v <= t.max_border_fraction),
        "pass_entropy": _flag(scores["entropy_norm"], lambda v: v <= t.max_entropy_norm),
        "pass_laterality_balance": lateral,
        "pass_no_sink": _no_sink(scores, t.max_sink_fraction),
    }


def _no_sink(scores: Mapping[str, Any], limit: float) -> np.ndarray:
    n = len(np.asarray(scores["inside_body_ratio"]))
    if "first_token_fraction" not in scores or "corner_fraction" not in scores:
        return np.full(n, np.nan)
    worst = np.fmax(np.asarray(scores["first_token_fraction"], dtype=np.float64),
                    np.asarray(scores["corner_fraction"], dtype=np.float64))
    return _flag(worst, lambda v: v <= limit)


def pair_flags(scores: Mapping[str, Any], thresholds: Thresholds) -> dict[str, np.ndarray]:
    """The prompt-pair check from `js_divergence` (bits): divergence <= max."""
    return {"pass_js": _flag(scores["js_divergence"], lambda v: v <= thresholds.max_js_divergence)}
