"""Compare map scores of several run directories (e.g. two models on the same images).

    python -m reports.compare runs/shortcut/demo runs/shortcut/demo_shortcut --target-kind laterality

Prints, per run x target kind x method: the number of maps, mean pointing game (over maps with
boxes), mass in the boxes relative to the boxes' area (1 = a uniform map), border fraction,
inside-body ratio and entropy (bits), each as "mean [95% bootstrap interval]"; ``--csv`` writes
the long table. Runs are labelled by their model's name (from the manifest).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import pandas as pd

from reports.data import load_run
from reports.stats import fmt_ci, summarise

#: Scores compared (box_mass_ratio = box_mass_fraction / box_area_fraction; 1 = a uniform map)
SCORES: tuple[str, ...] = ("pointing_hit", "box_mass_ratio", "border_fraction", "inside_body_ratio", "entropy_bits")


def _run_label(run, root: Path) -> str:
    model = run.model.get("config_name") or (run.config().get("model") or {}).get("name")
    return str(model) if model else root.name


def compare_runs(roots: Sequence[str | Path], *, target_kinds: Sequence[str] = (), methods: Sequence[str] = (),
                 seed: int = 0, n_resamples: int = 2000) -> pd.DataFrame:
    """Long table (reports.stats.summarise): one row per run x target_kind x method x score with
    n, mean, median and the bootstrap 95% interval of the mean."""
    frames = []
    for root in roots:
        run = load_run(root)
        m = run.table("metrics")
        if m.empty:
            raise ValueError(f"{root}: no metrics/ rows (run the score stage first)")
        m = m.assign(box_mass_ratio=m["box_mass_fraction"] / m["box_area_fraction"],
                     run=_run_label(run, Path(root)))
        if target_kinds:
            m = m[m["target_kind"].isin(list(target_kinds))]
        if methods:
            m = m[m["method"].isin(list(methods))]
        frames.append(m)
    df = pd.concat(frames, ignore_index=True)
    return summarise(df, SCORES, ["run", "target_kind", "method"], n_resamples, seed)


def format_table(long: pd.DataFrame) -> str:
    """The comparison as text: one row per run x target_kind x method, "mean [lo, hi]" per score."""
    if long.empty:
        return "(no maps)"
    cell = [fmt_ci(m, lo, hi) for m, lo, hi in zip(long["mean"], long["ci_low"], long["ci_high"])]
    wide = long.assign(cell=cell).pivot_table(index=["run", "target_kind", "method"], columns="score",
                                               values="cell", aggfunc="first", sort=False)
    n = long.groupby(["run", "target_kind", "method"], sort=False)["n"].max()
    wide.insert(0, "n", n)
    return wide[["n", *[c for c in SCORES if c in wide.columns]]].to_string()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m reports.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories (each with metrics/)")
    ap.add_argument("--target-kind", action="append", default=[], help="keep only this target kind (repeatable)")
    ap.add_argument("--method", action="append", default=[], help="keep only this method (repeatable)")
    ap.add_argument("--csv", help="also write the table here")
    args = ap.parse_args(argv)
    df = compare_runs(args.runs, target_kinds=args.target_kind, methods=args.method)
    print(format_table(df))
    if args.csv:
        df.to_csv(args.csv, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
