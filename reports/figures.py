"""The report's plots (matplotlib, Agg canvas; no pyplot state, safe in workers).

Each function takes small aggregate DataFrames (box plots: the statistics of
:func:`reports.data.box_stats`, never the rows themselves) and returns PNG bytes, or None when
there is nothing to plot. Methods always get the same colour (the order of
:data:`pipeline.config.METHODS`).
"""
from __future__ import annotations

import io
import math
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg", force=False)

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

DPI = 110
SIDE_ORDER = ("right", "bilateral", "left")

SCORE_LABELS: dict[str, str] = {
    "inside_body_ratio": "inside-body ratio",
    "border_fraction": "border fraction",
    "entropy_bits": "entropy (bits)",
    "entropy_norm": "entropy / log2(cells)",
    "patient_left_fraction": "patient-left fraction",
    "patient_left_fraction_centre": "patient-left fraction (image centre split)",
    "apical_fraction": "apical fraction",
    "middle_fraction": "middle fraction",
    "basal_fraction": "basal fraction",
    "pointing_hit": "pointing hit",
    "box_mass_fraction": "mass in boxes",
    "box_iou": "mIoU (Otsu)",
    "iou_top": "mIoU (top fraction)",
    "cnr": "CNR",
    "first_token_fraction": "first-token mass",
    "corner_fraction": "corner mass",
    "side_agrees": "mass on the stated side",
}


def method_order(methods: Sequence[str]) -> list[str]:
    """Methods in the project's canonical order, unknown names after them alphabetically."""
    from pipeline.config import METHODS

    known = [m for m in METHODS if m in set(methods)]
    return known + sorted(set(methods) - set(METHODS))


def method_colors(methods: Sequence[str]) -> dict[str, tuple]:
    """A fixed colour per method (random is grey: it is the floor)."""
    from matplotlib import colormaps

    from pipeline.config import METHODS

    cmap = colormaps["tab10"]
    out = {}
    for m in methods:
        if m == "random":
            out[m] = (0.55, 0.55, 0.55, 1.0)
            continue
        i = METHODS.index(m) if m in METHODS else len(METHODS) + sorted(methods).index(m)
        out[m] = cmap(i % 10)
    return out


def to_png(fig: Figure) -> bytes:
    """The figure as PNG bytes (white background, the figure's own dpi)."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi, facecolor="white")
    return buf.getvalue()


def _bxp_stats(row: Mapping) -> dict:
    """One box of :func:`reports.data.box_stats` as matplotlib's ``bxp`` takes it."""
    med, q1, q3 = float(row["med"]), float(row["q1"]), float(row["q3"])
    lo = row.get("whislo")
    hi = row.get("whishi")
    fl = row.get("fliers")
    return {"med": med, "q1": q1, "q3": q3,
            "whislo": q1 if lo is None or not np.isfinite(lo) else float(lo),
            "whishi": q3 if hi is None or not np.isfinite(hi) else float(hi),
            "fliers": np.asarray([] if fl is None else fl, dtype=np.float64)}


def _box(ax, boxes: Sequence[Mapping | None], positions: Sequence[float], colors: Sequence, width: float) -> None:
    """Box plots from precomputed statistics at `positions` (None: no box), filled with `colors`."""
    keep = [(b, p, c) for b, p, c in zip(boxes, positions, colors) if b is not None and b.get("n", 0)]
    if not keep:
        return
    bp = ax.bxp([_bxp_stats(k[0]) for k in keep], positions=[k[1] for k in keep], widths=width, patch_artist=True,
                showfliers=True, flierprops={"markersize": 2, "alpha": 0.5},
                medianprops={"color": "black", "linewidth": 1.2}, manage_ticks=False)
    for patch, (_, _, c) in zip(bp["boxes"], keep):
        patch.set_facecolor(c)
        patch.set_alpha(0.75)


def _boxes_by(stats: pd.DataFrame, keys: Sequence[str]) -> dict[tuple, dict]:
    """Rows of a box-statistics frame by their values of `keys`."""
    return {tuple(r[k] for k in keys): r for r in stats.to_dict("records")}


def score_distributions(stats: pd.DataFrame, scores: Sequence[str], methods: Sequence[str]) -> bytes | None:
    """Box plots of each score per method (one panel per score with any value).

    `stats`: :func:`reports.data.box_stats` with columns ``method`` and ``score``."""
    if stats.empty or not methods:
        return None
    by = _boxes_by(stats, ["score", "method"])
    scores = [s for s in scores if any(by.get((s, m), {}).get("n", 0) for m in methods)]
    if not scores:
        return None
    colors = method_colors(methods)
    ncols = min(4, len(scores))
    nrows = math.ceil(len(scores) / ncols)
    fig = Figure(figsize=(3.4 * ncols, 2.9 * nrows + 0.4), dpi=DPI, layout="constrained")
    for i, s in enumerate(scores):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        boxes = [by.get((s, m)) for m in methods]
        _box(ax, boxes, range(len(methods)), [colors[m] for m in methods], 0.6)
        ax.set_xticks(range(len(methods)), [f"{m}\n(n={int(b['n']) if b else 0})" for m, b in zip(methods, boxes)],
                      fontsize=7, rotation=30 if len(methods) > 4 else 0)
        ax.set_title(SCORE_LABELS.get(s, s), fontsize=10)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    return to_png(fig)


def grouped_boxes(stats: pd.DataFrame, group: str, groups: Sequence[str], methods: Sequence[str], *,
                  title: str, ylabel: str, hline: float | None = None, xlabel: str = "") -> bytes | None:
    """Box plots for each group (x axis) with one box per method side by side.

    `stats`: :func:`reports.data.box_stats` with columns `group` and ``method``."""
    if stats.empty or not groups or not methods or not stats["n"].sum():
        return None
    by = _boxes_by(stats, [group, "method"])
    colors = method_colors(methods)
    k = len(methods)
    width = 0.8 / k
    fig = Figure(figsize=(max(6.0, 1.1 * len(groups) * max(1, k) * 0.55 + 2), 4.2), dpi=DPI, layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    labels = []
    for gi, g in enumerate(groups):
        boxes = [by.get((g, m)) for m in methods]
        pos = [gi + (j - (k - 1) / 2) * width for j in range(k)]
        _box(ax, boxes, pos, [colors[m] for m in methods], width * 0.9)
        labels.append(f"{g}\n(n={sum(int(b['n']) for b in boxes if b)})")
    ax.set_xticks(range(len(groups)), labels, fontsize=8, rotation=20 if len(groups) > 6 else 0)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    if hline is not None:
        ax.axhline(hline, color="0.3", linestyle=":", linewidth=1)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(facecolor=colors[m], alpha=0.75, label=m) for m in methods], fontsize=8,
              loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title(title, fontsize=11)
    ax.set_ylabel(ylabel)
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.grid(axis="y", alpha=0.3)
    return to_png(fig)


LOCALISATION_PANELS = (("pointing", "pointing game (hit rate)", 1.0), ("iou", "mIoU (Otsu)", 1.0),
                       ("cnr", "CNR", None), ("mass", "mass in boxes", 1.0))


def localisation_bars(table: pd.DataFrame, uniform: Mapping[str, float]) -> bytes | None:
    """Pointing game, mIoU, CNR and mass in boxes per method, 95% intervals as error bars, floors
    as lines.

    `table` has columns method and, for each panel key of :data:`LOCALISATION_PANELS` present,
    KEY, KEY_lo, KEY_hi; `uniform` maps 'pointing' / 'mass' to the uniform map's expected value
    (mean box area fraction).
    """
    if table.empty:
        return None
    methods = list(table["method"])
    colors = method_colors(methods)
    panels = [p for p in LOCALISATION_PANELS if p[0] in table.columns]
    fig = Figure(figsize=(max(9.0, 1.1 * len(methods) * len(panels) + 2), 3.8), dpi=DPI, layout="constrained")
    for i, (key, title, top) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        y = table[key].to_numpy(dtype=float)
        lo = np.nan_to_num(y - table[f"{key}_lo"].to_numpy(dtype=float), nan=0.0)
        hi = np.nan_to_num(table[f"{key}_hi"].to_numpy(dtype=float) - y, nan=0.0)
        ax.bar(range(len(methods)), np.nan_to_num(y), color=[colors[m] for m in methods], alpha=0.8,
               yerr=[np.clip(lo, 0, None), np.clip(hi, 0, None)], capsize=3)
        u = uniform.get(key)
        if u is not None and np.isfinite(u):
            ax.axhline(u, color="black", linestyle="--", linewidth=1, label=f"uniform map ({u:.3f})")
            ax.legend(fontsize=8, loc="upper right")
        ax.set_xticks(range(len(methods)), methods, fontsize=8, rotation=30 if len(methods) > 3 else 0)
        if top is not None:
            ax.set_ylim(0, top)
        ax.set_title(title, fontsize=11)
        ax.grid(axis="y", alpha=0.3)
    return to_png(fig)


def summary_dots(panels: Sequence[tuple[str, pd.DataFrame, float | None]], methods: Sequence[str]) -> bytes | None:
    """The summary's one figure: per panel, each method's mean as a dot with its 95% interval.

    `panels`: (title, frame with columns method, mean, lo, hi; floor value or None, drawn dashed).
    Methods run top to bottom in `methods` order; a method missing from a panel is left blank.
    """
    panels = [p for p in panels if not p[1].empty]
    if not panels or not methods:
        return None
    colors = method_colors(methods)
    fig = Figure(figsize=(max(8.0, 2.9 * len(panels)), 0.45 * len(methods) + 1.6), dpi=DPI, layout="constrained")
    ypos = {m: len(methods) - 1 - i for i, m in enumerate(methods)}
    for i, (title, df, floor) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for r in df.itertuples():
            if r.method not in ypos or not np.isfinite(r.mean):
                continue
            lo, hi = (r.mean - r.lo, r.hi - r.mean) if np.isfinite(r.lo) and np.isfinite(r.hi) else (0.0, 0.0)
            ax.errorbar(r.mean, ypos[r.method], xerr=[[max(lo, 0.0)], [max(hi, 0.0)]], fmt="o",
                        color=colors[r.method], capsize=3, markersize=6)
        if floor is not None and np.isfinite(floor):
            ax.axvline(floor, color="black", linestyle="--", linewidth=1)
        ax.set_yticks(list(ypos.values()), list(ypos), fontsize=9) if i == 0 else ax.set_yticks([])
        ax.set_ylim(-0.6, len(methods) - 0.4)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    return to_png(fig)


def faithfulness_curves(curves: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray, int]]]) -> bytes | None:
    """Mean deletion and insertion curves per method (solid) with their random-order curves (dashed).

    `curves[method][kind]` = (fractions, mean target log-probability, n targets) for kind in
    deletion, insertion, random_deletion, random_insertion.
    """
    if not curves:
        return None
    methods = method_order(list(curves))
    colors = method_colors(methods)
    fig = Figure(figsize=(11, 4.2), dpi=DPI, layout="constrained")
    for i, kind in enumerate(("deletion", "insertion")):
        ax = fig.add_subplot(1, 2, i + 1)
        for m in methods:
            x, y, n = curves[m].get(kind, (np.array([]), np.array([]), 0))
            if n:
                ax.plot(x, y, color=colors[m], linewidth=1.8, label=f"{m} (n={n})")
            xr, yr, nr = curves[m].get(f"random_{kind}", (np.array([]), np.array([]), 0))
            if nr:
                ax.plot(xr, yr, color=colors[m], linewidth=1.0, linestyle="--", alpha=0.8)
        ax.set_xlabel("fraction of image tokens " + ("removed" if kind == "deletion" else "revealed"))
        ax.set_ylabel("target log-probability (mean over targets)")
        ax.set_title(f"{kind} (dashed: random order)", fontsize=11)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return to_png(fig)
