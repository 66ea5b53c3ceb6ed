"""Compare map scores of several run directories (e.g. two models on the same images).

    python -m reports.compare runs/shortcut/demo runs/shortcut/demo_shortcut --target-kind laterality

Prints, per run x target kind x method: the number of maps, mean pointing game (over maps with
boxes), mass in the boxes relative to the boxes' area (1 = a uniform map), mIoU (Otsu) and CNR
(pixel space, as the report), border fraction, inside-body ratio, entropy (bits) and the mass on
the side an answer states (laterality targets), each as "mean [95% interval]" (patient-level
cluster bootstrap, as in the report);
``--csv`` writes the long table. Runs are labelled by their model's name (from the manifest).
The runs are read through the report's engine (:mod:`reports.data`): aggregates only, memory
bounded independently of the runs' sizes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import pandas as pd

from reports.data import EngineSettings, RunData, load_run, metrics_rows, num, summarise
from reports.stats import fmt_ci

#: Scores compared (box_mass_ratio = box_mass_fraction / box_area_fraction; 1 = a uniform map)
SCORES: tuple[str, ...] = ("pointing_hit", "box_mass_ratio", "box_iou", "cnr", "border_fraction", "inside_body_ratio",
                           "entropy_bits", "side_agrees")


def _run_label(run: RunData, root: Path) -> str:
    model = run.model.get("config_name") or (run.config().get("model") or {}).get("name")
    return str(model) if model else root.name


def _values() -> dict[str, str]:
    ratio = f"({num('box_mass_fraction')} / nullif({num('box_area_fraction')}, 0))"
    return {s: ratio if s == "box_mass_ratio" else num(s) for s in SCORES}


def _source(target_kinds: Sequence[str], methods: Sequence[str]) -> str:
    src = f"SELECT * FROM ({metrics_rows(list(target_kinds) or None)}) AS m"
    if methods:
        src += " WHERE method IN (" + ", ".join("'" + m.replace("'", "''") + "'" for m in methods) + ")"
    return src


def compare_runs(roots: Sequence[str | Path], *, target_kinds: Sequence[str] = (), methods: Sequence[str] = (),
                 seed: int = 0, n_resamples: int = 2000, settings: EngineSettings | None = None) -> pd.DataFrame:
    """Long table (as :func:`reports.data.summarise`): one row per run x target_kind x method x
    score with n, mean, median and the patient-level cluster bootstrap 95% interval of the mean,
    from per-(group, patient) aggregates of the engine."""
    frames = []
    for root in roots:
        with load_run(root, settings=settings) as run:
            if not run.has("metrics"):
                raise ValueError(f"{root}: no metrics/ rows (run the score stage first)")
            label = _run_label(run, Path(root))
            keys = {"run": "'" + label.replace("'", "''") + "'", "target_kind": "target_kind", "method": "method"}
            s = summarise(run, _source(target_kinds, methods), keys, _values(), n_resamples, seed)
            frames.append(s.drop(columns="total"))
    return pd.concat(frames, ignore_index=True)


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
