"""The report's opening: what the model looks at, in a few sentences, one table and one figure,
and the per-method shortcut and artefact diagnostics it draws on.

The summary reuses the detail sections' per-method tables (localisation, faithfulness,
diagnostics), so it costs no extra pass over the run's tables beyond the answer rates. Every
sentence is written from the numbers and says which way they point only when the 95% interval
does (patient-level cluster bootstrap, as everywhere in the report).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import pandas as pd

from reports import data as D
from reports import figures as F
from reports.data import RunData, num
from reports.document import Figure, Note, Paragraph, Section, Table
from reports.literature import headline
from reports.sections import CLUSTER_NOTE, Options, answer_rates, missing_note, primary_kinds
from reports.stats import fmt_ci, fmt_num

SIDE = num("side_agrees")
DIAGNOSTIC_VALUES: dict[str, str] = {  # name -> SQL over metrics_rows
    "inside_body_ratio": num("inside_body_ratio"),
    "border_fraction": num("border_fraction"),
    "first_token_fraction": num("first_token_fraction"),
    "corner_fraction": num("corner_fraction"),
    "sink_dominated": "(1.0 - flags.pass_no_sink)",
    "side_agrees": SIDE,
    "side_majority": f"(CASE WHEN {SIDE} IS NULL THEN NULL WHEN {SIDE} > 0.5 THEN 1.0 ELSE 0.0 END)",
}


def wide(long: pd.DataFrame, key: str = "method") -> pd.DataFrame:
    """A long summary (key, score, n, mean, ci_low, ci_high) as one row per key with columns
    SCORE, SCORE_lo, SCORE_hi, SCORE_n."""
    rows: dict[Any, dict[str, Any]] = {}
    for r in long.itertuples():
        row = rows.setdefault(getattr(r, key), {key: getattr(r, key)})
        row[r.score], row[f"{r.score}_lo"], row[f"{r.score}_hi"], row[f"{r.score}_n"] = (
            r.mean, r.ci_low, r.ci_high, int(r.n))
    return pd.DataFrame(list(rows.values()))


def _ci(row: Any, name: str) -> str:
    if row is None or name not in row or pd.isna(row[name]):
        return "–"
    return fmt_ci(row[name], row[f"{name}_lo"], row[f"{name}_hi"])


def diagnostics_section(data: RunData, opts: Options) -> tuple[Section, pd.DataFrame]:
    """Shortcut and artefact diagnostics per method, and agreement with the side the answer states."""
    sec = Section("diagnostics", "Shortcuts, artefacts and the stated side")
    if not data.has("metrics"):
        return sec.add(missing_note(data, "metrics", "no diagnostics")), pd.DataFrame()
    prim, desc = primary_kinds(data.distinct("metrics", "target_kind"))
    long = D.summarise(data, D.metrics_rows(prim), {"method": "method"}, DIAGNOSTIC_VALUES, opts.bootstrap,
                       opts.seed + 5, medians=())
    t = wide(long)
    if t.empty:
        return sec.add(Note("No scored maps: no diagnostics.")), t
    t = t.set_index("method").reindex(F.method_order(list(t["method"]))).reset_index()
    thr = data.thresholds
    sec.add(Paragraph(
        f"Where each method puts its mass regardless of the finding ({desc}): inside-body ratio (mass on the "
        "patient's body), border fraction (mass on the outer ring of cells), first-token and corner mass (the "
        "first image token and the four corner cells, where vision-language models park attention as a sink). "
        f"A map is sink-dominated when its first-token or corner mass exceeds {thr.max_sink_fraction} "
        "(`metrics.max_sink_fraction`); such maps are not evidence about the image. "
        + CLUSTER_NOTE.format(b=opts.bootstrap, seed=opts.seed + 5)))
    rows = [t.loc[i] for i in t.index]
    sec.add(Table("diagnostics", pd.DataFrame({
        "method": t["method"], "maps": [int(r.get("inside_body_ratio_n", 0)) for r in rows],
        "inside-body ratio": [_ci(r, "inside_body_ratio") for r in rows],
        "border fraction": [_ci(r, "border_fraction") for r in rows],
        "first-token mass": [_ci(r, "first_token_fraction") for r in rows],
        "corner mass": [_ci(r, "corner_fraction") for r in rows],
        "sink-dominated maps": [_ci(r, "sink_dominated") for r in rows]}), data=t,
        caption="Shortcut and artefact diagnostics per method"))
    n_side = [int(r.get("side_agrees_n", 0) or 0) for r in rows]
    if any(n_side):
        sec.add(Paragraph("Answers that state a side (laterality targets: the word left or right in the answer, "
                          "frontal views): the share of the map's mass on the stated side of the patient "
                          "(`side_agrees`), and how often most of the mass is there (> 0.5). A map that explains "
                          "the stated side puts most of its mass on that side; 0.5 is no preference."))
        sec.add(Table("side_agreement", pd.DataFrame({
            "method": t["method"], "targets stating a side": n_side,
            "mass on the stated side": [_ci(r, "side_agrees") for r in rows],
            "majority on the stated side": [_ci(r, "side_majority") for r in rows]}),
            caption="Does the map agree with the side the answer states?"))
    else:
        sec.add(Note("No answer stated left or right on a frontal view (no laterality target scored): no side "
                     "agreement."))
    return sec, t


def _run_counts(data: RunData, kinds: Sequence[str]) -> dict[str, int]:
    r = data.sql(f"SELECT count(DISTINCT image_id) AS images, count(DISTINCT patient) AS patients, "
                 "count(DISTINCT (sample_id, target_kind, target_label, token_start)) AS targets "
                 f"FROM ({D.metrics_rows(kinds)}) AS m").iloc[0]
    return {k: int(r[k] or 0) for k in ("images", "patients", "targets")}


def _above(row: Any, name: str, ref: float) -> bool:
    """The interval of `name` lies wholly above `ref`."""
    return row is not None and name in row and not pd.isna(row[f"{name}_lo"]) and row[f"{name}_lo"] > ref


def _below(row: Any, name: str, ref: float) -> bool:
    return row is not None and name in row and not pd.isna(row[f"{name}_hi"]) and row[f"{name}_hi"] < ref


def _row(t: pd.DataFrame, method: str) -> Any:
    if t.empty or method not in set(t["method"]):
        return None
    return t[t["method"] == method].iloc[0]


def _best(t: pd.DataFrame, col: str, largest: bool = True) -> Any:
    """The non-random method with the best mean of `col` (None when none has one)."""
    if t.empty or col not in t.columns:
        return None
    c = t[(t["method"] != "random") & t[col].notna()]
    if c.empty:
        return None
    return c.loc[c[col].idxmax() if largest else c[col].idxmin()]


def _answer_sentence(data: RunData, opts: Options) -> str:
    if not data.has("answers"):
        return "No yes/no answers were scored (no answers table)."
    a = answer_rates(data, [], opts.bootstrap, opts.seed, "(all)").iloc[0]
    if not a["n_definite"]:
        return f"None of the {int(a['answers'])} answers was a definite yes/no to a question with a known label."
    return (f"The model answered {int(a['answers'])} yes/no questions; on the {int(a['n_definite'])} definite ones its "
            f"accuracy is {fmt_ci(a['accuracy'], a['accuracy_lo'], a['accuracy_hi'])} (sensitivity "
            f"{fmt_num(a['sensitivity'])}, specificity {fmt_num(a['specificity'])}).")


def _localisation_sentence(loc: pd.DataFrame) -> str:
    best = _best(loc, "pointing")
    if best is None:
        return "No target has ground-truth boxes: localisation is not measured."
    rnd = _row(loc, "random")
    floor = (f"random maps {fmt_num(rnd['pointing'])}" if rnd is not None
             else f"a uniform map about {fmt_num(best['uniform_mass'])}")
    beats = (_above(best, "pointing", rnd["pointing_hi"]) if rnd is not None
             else _above(best, "pointing", best["uniform_mass"]))
    verdict = "clearly above" if beats else "not distinguishable from"
    return (f"Localisation ({int(best['n'])} targets with boxes): {best['method']} points inside the boxes for "
            f"{_ci(best, 'pointing')} of targets, {verdict} the floor ({floor}); its mIoU is {_ci(best, 'iou')} and "
            f"its CNR {_ci(best, 'cnr')}. " + headline())


def _faithfulness_sentence(faith: pd.DataFrame) -> str:
    best = _best(faith, "d_diff", largest=False)
    if best is None:
        return "Faithfulness was not measured (`faithfulness.enabled=false` or no curves)."
    if _below(best, "d_diff", 0.0):
        return (f"Faithfulness: deleting the image tokens {best['method']} ranks highest lowers the target's "
                f"log-probability faster than a random order (deletion AUC − random: {_ci(best, 'd_diff')}, "
                f"{int(best['targets'])} targets).")
    return (f"Faithfulness: no method's deletion order lowers the target's log-probability faster than a random "
            f"order beyond chance (best: {best['method']}, deletion AUC − random {_ci(best, 'd_diff')}).")


def _shortcut_sentence(diag: pd.DataFrame, data: RunData) -> str:
    if diag.empty:
        return ""
    thr = data.thresholds
    real = diag[diag["method"] != "random"]
    parts = []
    border = [r["method"] for _, r in real.iterrows() if _above(r, "border_fraction", thr.max_border_fraction)]
    outside = [r["method"] for _, r in real.iterrows() if _below(r, "inside_body_ratio", thr.min_inside_body_ratio)]
    sinks = [f"{r['method']} ({fmt_num(r['sink_dominated'])})" for _, r in real.iterrows()
             if "sink_dominated" in r and not pd.isna(r["sink_dominated"]) and r["sink_dominated"] > 0.1]
    parts.append(f"more border mass than {thr.max_border_fraction}: {', '.join(border)}" if border
                 else "no method puts more than the allowed border mass on average")
    if outside:
        parts.append(f"less than {thr.min_inside_body_ratio} of the mass inside the body: {', '.join(outside)}")
    parts.append(f"sink-dominated maps in more than 10% of targets: {', '.join(sinks)}" if sinks
                 else "no method has sink-dominated maps in more than 10% of targets")
    side = [f"{r['method']} {fmt_num(r['side_agrees'])}" for _, r in real.iterrows()
            if "side_agrees" in r and not pd.isna(r["side_agrees"])]
    rnd = _row(diag, "random")
    if side:
        floor = ("" if rnd is None or "side_agrees" not in rnd or pd.isna(rnd["side_agrees"])
                 else f" (random {fmt_num(rnd['side_agrees'])})")
        parts.append("mass on the side the answer states: " + ", ".join(side) + floor)
    return "Shortcuts: " + "; ".join(parts) + "."


def _summary_table(methods: Sequence[str], loc: pd.DataFrame, faith: pd.DataFrame, diag: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for m in methods:
        lr, fr, dr = _row(loc, m), _row(faith, m), _row(diag, m)
        rows.append({"method": m + (" (floor)" if m == "random" else ""),
                     "pointing game": _ci(lr, "pointing"), "mIoU (Otsu)": _ci(lr, "iou"), "CNR": _ci(lr, "cnr"),
                     "deletion − random": _ci(fr, "d_diff"),
                     "inside body": _ci(dr, "inside_body_ratio"), "border": _ci(dr, "border_fraction"),
                     "sink-dominated": _ci(dr, "sink_dominated"), "stated side": _ci(dr, "side_agrees")})
    return pd.DataFrame(rows)


SUMMARY_COLUMNS = (("localisation", ("n", "pointing", "iou", "iou_top", "cnr", "mass", "uniform_mass")),
                   ("faithfulness", ("targets", "d_diff", "i_diff")),
                   ("diagnostics", ("inside_body_ratio", "border_fraction", "sink_dominated", "side_agrees")))


def _summary_numbers(methods: Sequence[str], tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The summary table's numbers (means, interval ends, n), one row per method, for its CSV."""
    out = pd.DataFrame({"method": list(methods)})
    for name, cols in SUMMARY_COLUMNS:
        t = tables[name]
        if t.empty:
            continue
        keep = [c for c in t.columns if c != "method" and any(c == k or c.startswith(f"{k}_") for k in cols)]
        part = t[["method", *keep]].rename(columns={c: f"{name}.{c}" for c in keep})
        out = out.merge(part, on="method", how="left")
    return out


def _panel(t: pd.DataFrame, col: str) -> pd.DataFrame:
    if t.empty or col not in t.columns:
        return pd.DataFrame(columns=["method", "mean", "lo", "hi"])
    return pd.DataFrame({"method": t["method"], "mean": t[col].astype(float), "lo": t[f"{col}_lo"].astype(float),
                         "hi": t[f"{col}_hi"].astype(float)})


def summary_section(data: RunData, opts: Options, loc: pd.DataFrame, faith: pd.DataFrame,
                    diag: pd.DataFrame) -> Section:
    """The findings first: sentences, one table per method, one figure (see the module docstring)."""
    sec = Section("summary", "Summary")
    if not data.has("metrics"):
        return sec.add(missing_note(data, "metrics", "nothing to summarise"))
    prim, _ = primary_kinds(data.distinct("metrics", "target_kind"))
    methods = F.method_order(data.distinct("metrics", "method"))
    c = _run_counts(data, prim)
    text = [f"{c['targets']} targets on {c['images']} images of {c['patients']} patients were explained by "
            f"{len(methods)} methods ({', '.join(methods)}).", _answer_sentence(data, opts),
            _localisation_sentence(loc), _faithfulness_sentence(faith), _shortcut_sentence(diag, data)]
    sec.add(Paragraph(" ".join(t for t in text if t)))
    numbers = _summary_numbers(methods, {"localisation": loc, "faithfulness": faith, "diagnostics": diag})
    sec.add(Table("summary", _summary_table(methods, loc, faith, diag), data=numbers,
                  caption="Per method: mean [95% interval]; random is the floor (insertion and the rest in the "
                          "sections below)"))
    uniform = float(loc["uniform_mass"].mean()) if not loc.empty else math.nan
    png = F.summary_dots([("pointing game", _panel(loc, "pointing"), uniform),
                          ("mIoU (Otsu)", _panel(loc, "iou"), None), ("CNR", _panel(loc, "cnr"), None),
                          ("deletion AUC − random", _panel(faith, "d_diff"), 0.0),
                          ("border fraction", _panel(diag, "border_fraction"), data.thresholds.max_border_fraction)],
                         methods)
    if png:
        sec.add(Figure("summary", png, "Per method, mean with 95% interval. Dashed: a uniform map's expected hit "
                                       "rate (pointing), no effect (deletion − random; lower is more faithful), "
                                       "the border-fraction limit in force."))
    return sec
