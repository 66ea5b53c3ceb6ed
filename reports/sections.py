"""The report's sections, each built from the run's tables; a missing or empty table gives a note.

Definitions used throughout (see also :mod:`reports.stats`):

* A *target* is one (sample_id, target_kind, target_label, token_start); relevancy/ has one row
  per target and method. "Explained" means status ``ok``; ``not_mentioned`` (a finding the answer
  does not name) and ``no_targets`` (nothing to explain in the answer) are counted apart.
* Score summaries use the metrics/ rows of every target kind except ``answer_tokens`` (one row per
  generated token would outweigh everything else) unless that is the only kind present; the
  per-kind tables show each kind separately.
* A summary's *finding* is the metrics ``finding`` column; when that is null it is the keyword's
  finding for keyword targets and ``(<target kind>)`` otherwise. *view* is ``view_position``.
* Fractions and rates are in 0..1. JS divergence is in bits (base 2, 0..1). Faithfulness curves
  are the target's log-probability after removing (deletion) or revealing (insertion) a fraction
  of the image tokens; AUCs are trapezoid areas over fractions 0..1.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd

from reports import figures as F
from reports.data import RunData
from reports.document import Figure, Note, Paragraph, Section, Table
from reports.stats import (binary_classification, fmt_ci, fmt_num, mean_curve, proportions, summarise,
                           wilson_interval)

SCORES: tuple[str, ...] = ("inside_body_ratio", "border_fraction", "entropy_bits", "entropy_norm",
                           "patient_left_fraction", "apical_fraction", "middle_fraction", "basal_fraction",
                           "pointing_hit", "box_mass_fraction", "box_iou")
PASS_COLUMNS: tuple[str, ...] = ("pass_inside_body", "pass_border", "pass_entropy", "pass_laterality_balance")
TARGET_KEY = ["sample_id", "target_kind", "target_label", "token_start"]
KIND_ORDER = ("keywords", "laterality", "answer_token", "answer_span", "answer_tokens")
LABEL_STATES = ("positive", "negative", "uncertain", "not_mentioned")
PARSED = ("yes", "no", "uncertain", "unparsed")
STAGE_OF = {"generations": "generate", "relevancy": "explain", "metrics": "score", "sensitivity": "score",
            "answers": "score", "faithfulness": "score (metrics.faithfulness=true)", "samples": "load"}


@dataclass
class Options:
    """Report options (``report.*`` config) plus the image reading guard."""

    include_images: bool = True
    bootstrap: int = 1000
    gallery_size: int = 8
    seed: int = 0
    explorer_samples: int = 8
    explorer_image_size: int = 320
    max_pixels: int = 60_000_000


def missing_note(data: RunData, table: str, what: str = "") -> Note:
    """A note saying a table is missing (or unreadable) and which stage writes it."""
    if table in data.unreadable:
        return Note(f"The `{table}` table could not be read ({data.unreadable[table]}); {what or 'section skipped'}.")
    stage = STAGE_OF.get(table, table)
    return Note(f"No `{table}` rows in this run (stage {stage} not run, not finished or produced no rows)"
                + (f": {what}." if what else "."))


def _s(x: object) -> str:
    return x if isinstance(x, str) else ("" if x is None or (isinstance(x, float) and math.isnan(x)) else str(x))


def _json_short(x: object, limit: int = 160) -> str:
    if x is None:
        return "–"
    s = x if isinstance(x, str) else json.dumps(x, sort_keys=True, default=str)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _fingerprint(fp: object) -> object:
    """A dataset fingerprint for display: its digest and image count when it is a dict."""
    if isinstance(fp, dict):
        digest = fp.get("sha256") or fp.get("selected_ids_sha256")
        n = fp.get("selected_images")
        if digest:
            return f"sha256 {digest}" + (f" ({n} images)" if n is not None else "")
    return fp


def kv_table(name: str, pairs: Sequence[tuple[str, object]], caption: str = "") -> Table:
    df = pd.DataFrame([(k, _json_short(v, 400)) for k, v in pairs], columns=["item", "value"])
    return Table(name, df, caption=caption, max_rows=200, key_value=True)


def finding_key(df: pd.DataFrame) -> pd.Series:
    """The finding a metrics/sensitivity row is summarised under (see the module docstring)."""
    f = df["finding"].astype(object) if "finding" in df.columns else pd.Series(None, index=df.index, dtype=object)
    ok = f.map(lambda v: isinstance(v, str) and v != "")
    fallback = np.where(df["target_kind"] == "keywords", df["target_label"].astype(object),
                        "(" + df["target_kind"].astype(str) + ")")
    return pd.Series(np.where(ok, f, fallback), index=df.index, dtype=object)


def view_key(df: pd.DataFrame) -> pd.Series:
    v = df["view_position"].astype(object) if "view_position" in df.columns else pd.Series("", index=df.index)
    return v.map(lambda x: x if isinstance(x, str) and x else "(unknown)")


def primary_rows(df: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Rows of every target kind but answer_tokens (unless only that exists) and a description."""
    if df.empty or "target_kind" not in df.columns:
        return df, "all target kinds"
    other = df[df["target_kind"] != "answer_tokens"]
    if other.empty:
        return df, "target kind answer_tokens (the only kind scored)"
    kinds = sorted(other["target_kind"].unique(), key=lambda k: KIND_ORDER.index(k) if k in KIND_ORDER else 99)
    return other, "target kinds " + ", ".join(kinds) + (" (answer_tokens left out)" if len(other) < len(df) else "")


def kinds_of(df: pd.DataFrame) -> list[str]:
    return sorted(df["target_kind"].unique(), key=lambda k: (KIND_ORDER.index(k) if k in KIND_ORDER else 99, k))


# ---------------------------------------------------------------------------------------------
# identity and counts


def identity_section(data: RunData, generated_utc: str) -> Section:
    sec = Section("identity", "Run identity")
    ident = data.run_manifest.get("identity") or {}
    model = data.model
    m_any = data.newest_manifest("config")
    cfg_model = (data.config().get("model") or {})
    if not data.run_manifest:
        sec.add(Note("No `manifest.json` in the run directory: the run's identity (config hash) is unknown."))
    shards = sorted({(m.get("config") or {}).get("dataset", {}).get("shard") for m in data.manifests} - {None})
    sec.add(kv_table("run", [
        ("run directory", str(data.root)),
        ("config hash (manifest.json)", data.run_manifest.get("config_hash")),
        ("created (UTC)", data.run_manifest.get("created_utc")),
        ("report generated (UTC)", generated_utc),
        ("invocations (manifests/)", len(data.manifests)),
        ("shard ids seen", ", ".join(str(s) for s in shards) or "–"),
    ], caption="Run"))
    if model:
        model_pairs = [("model id / path", model.get("name_or_path")), ("config name", model.get("config_name")),
                       ("revision (requested)", model.get("revision")),
                       ("revision (resolved)", model.get("resolved_revision")),
                       ("weights fingerprint", model.get("fingerprint")), ("dtype", model.get("dtype")),
                       ("device", model.get("device")), ("model type", model.get("model_type")),
                       ("image tokens per image", model.get("mm_tokens_per_image"))]
    else:
        model_pairs = [("model id / path", ident.get("model.name_or_path", cfg_model.get("name_or_path"))),
                       ("config name", cfg_model.get("name")),
                       ("revision (requested)", ident.get("model.revision", cfg_model.get("revision"))),
                       ("dtype", ident.get("model.dtype", cfg_model.get("dtype")))]
        sec.add(Note("No invocation loaded the model yet (no manifest has a `model` entry): model facts come from "
                     "the configuration only."))
    sec.add(kv_table("model", model_pairs, caption="Model"))
    load_cfg = data.config("load") or data.config()
    dcfg = load_cfg.get("dataset") or {}
    fp = data.newest_manifest("dataset_fingerprint").get("dataset_fingerprint")
    sec.add(kv_table("dataset", [
        ("dataset", ident.get("dataset.name", dcfg.get("name"))),
        ("root / path", ident.get("dataset.root") or ident.get("dataset.path") or dcfg.get("root") or dcfg.get("path")),
        ("views", ident.get("dataset.views", dcfg.get("views"))),
        ("splits", ident.get("dataset.splits", dcfg.get("splits"))),
        ("findings filter", ident.get("dataset.findings", dcfg.get("findings"))),
        ("one image per study", ident.get("dataset.one_image_per_study", dcfg.get("one_image_per_study"))),
        ("labeler", ident.get("dataset.labeler", dcfg.get("labeler"))),
        ("limit (last load)", dcfg.get("limit")),
        ("shards (last load)", f"{dcfg.get('shard')} of {dcfg.get('num_shards')}" if dcfg else None),
        ("demo seed / n", f"{ident.get('dataset.seed')} / {ident.get('dataset.n')}"
         if ident.get("dataset.name", dcfg.get("name")) == "demo" else None),
        ("dataset fingerprint", _fingerprint(fp)),
    ], caption="Dataset and filters"))
    prompts = ident.get("prompts") or load_cfg.get("prompts") or {}
    variants = pd.DataFrame(prompts.get("variants") or [])
    sec.add(Paragraph(f"Prompt set `{prompts.get('name', '–')}`" + (
        f", system prompt: “{prompts.get('system_prompt')}”" if prompts.get("system_prompt") else "")
        + f"; {len(variants)} variant(s)."))
    if not variants.empty:
        cols = [c for c in ("id", "kind", "finding", "style", "format_instruction", "text") if c in variants.columns]
        sec.add(Table("prompt_variants", variants[cols], caption="Prompt variants", max_rows=100, collapsed=True))
    ecfg = (data.config("explain") or {}).get("explain") or {}
    rel = data.table("relevancy")
    present = F.method_order(list(rel["method"].dropna().unique())) if not rel.empty else []
    gen_cfg = (data.config("generate") or {}).get("generate") or {}
    sec.add(kv_table("methods", [
        ("explain.methods (last explain)", ecfg.get("methods")),
        ("explain.targets (last explain)", ecfg.get("targets")),
        ("methods in relevancy/", present or "–"),
        ("generate.max_new_tokens", ident.get("generate.max_new_tokens", gen_cfg.get("max_new_tokens"))),
        ("seed", ident.get("seed")),
    ], caption="Methods and targets"))
    pk = (data.newest_manifest("model") or m_any).get("packages") or {}
    git = (data.newest_manifest("model") or m_any).get("git") or {}
    commits = sorted({_s((m.get("git") or {}).get("commit")) for m in data.manifests} - {""})
    pairs = [("git commit", git.get("commit")), ("working tree dirty", git.get("dirty"))]
    if len(commits) > 1:
        pairs.append(("NOTE: invocations ran from several commits", ", ".join(c[:12] for c in commits)))
    pairs += [(k, v if v is not None else "not installed") for k, v in sorted(pk.items())]
    sec.add(kv_table("software", pairs, caption="Software (the invocation that loaded the model, else the newest)"))
    if data.manifests:
        inv = []
        for m in data.manifests:
            c = m.get("config") or {}
            st = m.get("stages") or {}
            inv.append({"manifest": m["_file"], "started": m.get("started_utc"), "finished": m.get("finished_utc"),
                        "shard": f"{(c.get('dataset') or {}).get('shard')}/{(c.get('dataset') or {}).get('num_shards')}",
                        "stages": ", ".join(f"{k} ({v.get('seconds', '?')} s)" for k, v in st.items())
                        or ", ".join(c.get("stages") or []) + " (unfinished)",
                        "commit": _s((m.get("git") or {}).get("commit"))[:12]})
        sec.add(Table("invocations", pd.DataFrame(inv), caption="Invocations", max_rows=50, collapsed=len(inv) > 8))
    return sec


def model_validation_section(data: RunData) -> Section:
    """The model directory's own held-out validation (its evaluation.json, recorded in the
    manifest by pipeline.model.describe): "summary" ([name, value] pairs or a mapping), "tables"
    (name -> records) and "notes" (sentences). These numbers were measured when the model was
    made, on held-out data, not on this run's images."""
    val = data.model.get("validation") or {}
    sec = Section("model_validation", "Model validation (shipped with the model)")
    if "error" in val:
        sec.add(Note(str(val["error"])))
        return sec
    sec.add(Paragraph(str(val.get("about") or "Held-out validation recorded with the model directory.")))
    summary = val.get("summary") or []
    pairs = list(summary.items()) if isinstance(summary, dict) else [tuple(p) for p in summary]
    if pairs:
        sec.add(kv_table("model_validation_summary", [(k, fmt_num(v) if isinstance(v, float) else v)
                                                      for k, v in pairs], caption="Summary"))
    for name, records in (val.get("tables") or {}).items():
        df = pd.DataFrame(records)
        if df.empty:
            continue
        shown = df.copy()
        for c in shown.columns:
            if pd.api.types.is_float_dtype(shown[c]):
                shown[c] = [fmt_num(v) for v in shown[c]]
        sec.add(Table(f"model_validation_{name}", shown, caption=name.replace("_", " ").capitalize(), data=df))
    for text in val.get("notes") or []:
        sec.add(Note(str(text)))
    return sec


def counts_section(data: RunData) -> Section:
    sec = Section("counts", "Counts and errors")
    samples, gens, rel = data.table("samples"), data.table("generations"), data.table("relevancy")
    rows = []
    for name in ("samples", "generations", "relevancy", "metrics", "sensitivity", "answers", "faithfulness", "errors"):
        rows.append((name, len(data.table(name)), "unreadable" if name in data.unreadable else
                     ("" if data.has(name) else "missing or empty")))
    sec.add(Table("table_rows", pd.DataFrame(rows, columns=["table", "rows", "state"]), caption="Rows per table"))
    if samples.empty:
        sec.add(missing_note(data, "samples"))
    else:
        sec.add(kv_table("sample_counts", [
            ("samples (image x prompt)", len(samples)), ("images", samples["image_id"].nunique()),
            ("studies", samples["study_id"].nunique()), ("subjects", samples["subject_id"].nunique()),
            ("prompt variants", samples["prompt_id"].nunique()),
            ("views", ", ".join(f"{k or '(unknown)'}: {v}" for k, v in
                                samples.drop_duplicates("image_id")["view_position"].fillna("").value_counts().items())),
            ("samples with a generation", int(samples["sample_id"].isin(set(gens["sample_id"])).sum())
             if not gens.empty else 0),
            ("samples explained (any relevancy row)", int(samples["sample_id"].isin(set(rel["sample_id"])).sum())
             if not rel.empty else 0),
        ], caption="Samples"))
    if rel.empty:
        sec.add(missing_note(data, "relevancy", "no targets to count"))
    else:
        t = rel.drop_duplicates(TARGET_KEY)
        ct = pd.crosstab(t["target_kind"].replace("", "(none)"), t["status"], margins=True, margins_name="total")
        ct = ct.reset_index().rename(columns={"target_kind": "target kind"})
        sec.add(Paragraph("Targets (sample x target, counted once over methods) by status: `ok` = explained, "
                          "`not_mentioned` = a finding the answer does not name (not explained), `no_targets` = "
                          "an answer with nothing to explain."))
        sec.add(Table("targets_by_status", ct, caption="Targets by kind and status"))
        pm = pd.crosstab(rel["method"], rel["status"]).reset_index()
        sec.add(Table("relevancy_rows_by_method", pm, caption="relevancy rows by method and status", collapsed=True))
        if "argmax_matches" in rel.columns:
            ok = rel[rel["status"] == "ok"].drop_duplicates("sample_id")
            bad = int((ok["argmax_matches"] == False).sum())  # noqa: E712
            bad_img = int((ok["image_tokens_ok"] == False).sum())  # noqa: E712
            if bad or bad_img:
                sec.add(Note(f"{bad} explained sample(s) whose teacher-forced argmax did not reproduce the answer, "
                             f"{bad_img} with an image-token count different from grid_h x grid_w."))
    err = data.table("errors")
    if err.empty:
        sec.add(Paragraph("No errors recorded." if "errors" not in data.unreadable else ""))
        if "errors" in data.unreadable:
            sec.add(missing_note(data, "errors"))
    else:
        g = err.groupby(["stage", "error_type"], dropna=False)
        et = g.agg(count=("sample_id", "size"), images=("image_id", "nunique"),
                   example=("message", lambda s: _json_short(_s(s.iloc[0]), 140))).reset_index()
        sec.add(Table("errors_by_stage_type", et, caption="Errors by stage and type"))
    return sec


# ---------------------------------------------------------------------------------------------
# scores


def _ci_cell(r: pd.Series, digits: int = 3) -> str:
    if not r["n"]:
        return "–"
    return f"{fmt_ci(r['mean'], r['ci_low'], r['ci_high'], digits)} ({int(r['n'])})"


def _fmt_long(df: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    out = df.copy()
    for c in ("mean", "median", "ci_low", "ci_high", "fraction"):
        if c in out.columns:
            out[c] = out[c].map(lambda v: fmt_num(v, digits))
    return out


def scores_section(data: RunData, opts: Options, thresholds: dict[str, Any]) -> Section:
    sec = Section("scores", "Map scores")
    m = data.table("metrics")
    if m.empty:
        return sec.add(missing_note(data, "metrics", "no score summaries"))
    m = m.assign(finding=finding_key(m), view=view_key(m))
    methods = F.method_order(list(m["method"].unique()))
    sec.add(Paragraph("Mean [bootstrap 95% interval] (n non-NaN) of each score over the targets of each method, "
                      f"percentile bootstrap with {opts.bootstrap} resamples (seed {opts.seed}); NaN values "
                      "(e.g. laterality of lateral views, localisation without boxes) are dropped. Fractions are "
                      "of the raw map's mass on the original image."))
    for kind in kinds_of(m):
        sub = m[m["target_kind"] == kind]
        s = summarise(sub, SCORES, ["method"], opts.bootstrap, opts.seed)
        s["cell"] = s.apply(_ci_cell, axis=1)
        wide = s.pivot(index="score", columns="method", values="cell").reindex(
            [c for c in SCORES if c in set(s["score"])])[[x for x in methods if x in set(s["method"])]]
        wide.index = [F.SCORE_LABELS.get(i, i) for i in wide.index]
        wide = wide.reset_index().rename(columns={"index": "score"})
        sec.add(Table(f"scores_{kind}", wide, caption=f"Scores per method, target kind {kind} "
                      f"({sub[TARGET_KEY].drop_duplicates().shape[0]} targets)", data=s.drop(columns="cell")))
    prim, desc = primary_rows(m)
    png = F.score_distributions(prim, [c for c in SCORES if c != "pointing_hit"], methods)  # 0/1: see localisation
    if png:
        sec.add(Figure("score_distributions", png, f"Score distributions per method ({desc}); n per box under "
                                                   "each method."))
    thr = ", ".join(f"{k}={v}" for k, v in thresholds.items()) if thresholds else "unknown"
    p = proportions(m, PASS_COLUMNS, ["target_kind", "method"])
    if not p.empty:
        sec.add(Paragraph(f"Quality checks (thresholds of the scoring run's metrics config: {thr}): fraction of "
                          "targets passing [Wilson 95%] (n non-null). pass_laterality_balance is null (not counted) "
                          "for non-frontal views."))
        p["cell"] = p.apply(lambda r: "–" if not r["n"] else
                            f"{fmt_ci(r['fraction'], r['ci_low'], r['ci_high'])} ({int(r['n'])})", axis=1)
        kinds = kinds_of(m)
        wide = p.pivot(index=["target_kind", "check"], columns="method", values="cell")
        wide = wide.reindex(pd.MultiIndex.from_tuples([(k, c) for k in kinds for c in PASS_COLUMNS
                                                       if (k, c) in wide.index]))
        wide = wide[[x for x in methods if x in wide.columns]].reset_index()
        wide.columns = ["target kind", "check", *wide.columns[2:]]
        sec.add(Table("pass_rates", wide, caption="Fraction passing each quality check, per method",
                      data=p.drop(columns="cell")))
    full = summarise(m, SCORES, ["target_kind", "method", "finding", "view"], opts.bootstrap, opts.seed)
    sec.add(Table("scores_by_method_finding_view", _fmt_long(full), data=full, max_rows=300, collapsed=True,
                  caption="Scores by target kind x method x finding x view"))
    pf = proportions(m, PASS_COLUMNS, ["target_kind", "method", "finding", "view"])
    sec.add(Table("pass_rates_by_method_finding_view", _fmt_long(pf), data=pf, max_rows=300, collapsed=True,
                  caption="Pass rates by target kind x method x finding x view"))
    return sec


# ---------------------------------------------------------------------------------------------
# answers


def answers_section(data: RunData) -> Section:
    sec = Section("answers", "Answers to yes/no questions")
    a = data.table("answers")
    if a.empty:
        return sec.add(missing_note(data, "answers", "no answer accuracy"))
    a = a.assign(parsed=a["parsed"].fillna("unparsed"), label_state=a["label_state"].fillna("not_mentioned"))
    ct = pd.crosstab(a["label_state"], a["parsed"])
    ct = ct.reindex(index=list(LABEL_STATES) + sorted(set(ct.index) - set(LABEL_STATES)),
                    columns=list(PARSED) + sorted(set(ct.columns) - set(PARSED)), fill_value=0)
    ct["total"] = ct.sum(axis=1)
    ct.loc["total"] = ct.sum(axis=0)
    sec.add(Paragraph("Rates use only definite pairs: answer yes/no and label positive/negative. Uncertain and "
                      "unparsed answers, uncertain and not-mentioned labels are counted apart (table below). "
                      "Intervals: Wilson 95%."))
    sec.add(Table("answers_label_x_parsed", ct.reset_index().rename(columns={"label_state": "label \\ answer"}),
                  caption="Answers by label state (rows) and parsed answer (columns)"))

    def rows_for(groups) -> pd.DataFrame:
        out = []
        for key, g in groups:
            r = binary_classification(g["parsed"], g["label_state"])
            out.append({"group": key if isinstance(key, str) else " / ".join(map(str, key)), "answers": len(g),
                        **r, "answer_uncertain": int((g["parsed"] == "uncertain").sum()),
                        "answer_unparsed": int((g["parsed"] == "unparsed").sum()),
                        "label_uncertain": int((g["label_state"] == "uncertain").sum()),
                        "label_not_mentioned": int((g["label_state"] == "not_mentioned").sum())})
        return pd.DataFrame(out)

    def display(df: pd.DataFrame, first: str) -> pd.DataFrame:
        return pd.DataFrame({
            first: df["group"], "answers": df["answers"], "definite": df["n_definite"],
            "accuracy": [fmt_ci(r.accuracy, r.accuracy_lo, r.accuracy_hi) for r in df.itertuples()],
            "sensitivity": [fmt_ci(r.sensitivity, r.sensitivity_lo, r.sensitivity_hi) for r in df.itertuples()],
            "specificity": [fmt_ci(r.specificity, r.specificity_lo, r.specificity_hi) for r in df.itertuples()],
            "TP/FN/TN/FP": [f"{r.tp}/{r.fn}/{r.tn}/{r.fp}" for r in df.itertuples()],
            "ans. uncertain": df["answer_uncertain"], "ans. unparsed": df["answer_unparsed"],
            "label uncertain": df["label_uncertain"], "label not mentioned": df["label_not_mentioned"]})

    by_f = rows_for([("(all)", a)] + list(a.groupby(a["finding"].fillna("(none)"), sort=True)))
    sec.add(Table("answers_by_finding", display(by_f, "finding"), data=by_f, caption="Accuracy by finding"))
    by_p = rows_for(a.groupby([a["prompt_id"].fillna("(none)"), a["finding"].fillna("(none)")], sort=True))
    sec.add(Table("answers_by_prompt", display(by_p, "prompt / finding"), data=by_p, collapsed=True,
                  caption="Accuracy by prompt variant"))
    return sec


# ---------------------------------------------------------------------------------------------
# localisation


def localisation_section(data: RunData, opts: Options) -> tuple[Section, pd.DataFrame]:
    sec = Section("localisation", "Localisation against ground-truth boxes")
    m = data.table("metrics")
    if m.empty:
        return sec.add(missing_note(data, "metrics", "no localisation scores")), pd.DataFrame()
    prim, desc = primary_rows(m)
    boxed = prim[np.isfinite(pd.to_numeric(prim["box_mass_fraction"], errors="coerce"))
                 | np.isfinite(pd.to_numeric(prim["pointing_hit"], errors="coerce"))]
    if boxed.empty:
        return sec.add(Note("No scored target has ground-truth boxes for its finding (dataset without boxes, or "
                            "no boxed finding named): no localisation scores.")), pd.DataFrame()
    boxed = boxed.assign(finding=finding_key(boxed))
    methods = F.method_order(list(boxed["method"].unique()))
    rows = []
    for meth in methods:
        g = boxed[boxed["method"] == meth]
        s = summarise(g, ["pointing_hit", "box_mass_fraction", "box_iou", "box_area_fraction"], [], opts.bootstrap,
                      opts.seed + 1).set_index("score")
        rows.append({"method": meth, "n": int(s.loc["pointing_hit", "n"]),
                     "pointing": s.loc["pointing_hit", "mean"], "pointing_lo": s.loc["pointing_hit", "ci_low"],
                     "pointing_hi": s.loc["pointing_hit", "ci_high"],
                     "mass": s.loc["box_mass_fraction", "mean"], "mass_lo": s.loc["box_mass_fraction", "ci_low"],
                     "mass_hi": s.loc["box_mass_fraction", "ci_high"],
                     "iou": s.loc["box_iou", "mean"], "iou_lo": s.loc["box_iou", "ci_low"],
                     "iou_hi": s.loc["box_iou", "ci_high"], "uniform_mass": s.loc["box_area_fraction", "mean"]})
    t = pd.DataFrame(rows)
    uniform = float(pd.to_numeric(boxed.drop_duplicates(TARGET_KEY)["box_area_fraction"], errors="coerce").mean())
    disp = pd.DataFrame({
        "method": [m_ + (" (floor)" if m_ == "random" else "") for m_ in t["method"]], "targets": t["n"],
        "pointing game": [fmt_ci(r.pointing, r.pointing_lo, r.pointing_hi) for r in t.itertuples()],
        "mass in boxes": [fmt_ci(r.mass, r.mass_lo, r.mass_hi) for r in t.itertuples()],
        "box IoU": [fmt_ci(r.iou, r.iou_lo, r.iou_hi) for r in t.itertuples()],
        "uniform map: expected mass": [fmt_num(v) for v in t["uniform_mass"]]})
    disp.loc[len(disp)] = ["uniform map (expected)", boxed.drop_duplicates(TARGET_KEY).shape[0], f"≈ {fmt_num(uniform)}",
                           fmt_num(uniform), "–", fmt_num(uniform)]
    sec.add(Paragraph(f"Targets whose finding has boxes ({desc}). Pointing game = mean pointing_hit (the map's "
                      "argmax cell centre inside a box); mass in boxes = mean box_mass_fraction; both with bootstrap "
                      "95% intervals. The floors: the `random` method's values, and a uniform map, whose expected "
                      "mass in the boxes (and, approximately, its hit rate) is the mean box area fraction."))
    if "random" not in set(t["method"]):
        sec.add(Note("The `random` method was not run: only the uniform-map floor is shown."))
    sec.add(Table("localisation", disp, data=t, caption="Localisation per method"))
    png = F.localisation_bars(t, {"pointing": uniform, "mass": uniform})
    if png:
        sec.add(Figure("localisation", png, "Pointing game and mass in boxes per method (95% intervals); dashed: "
                                            "a uniform map's expectation."))
    per_f = summarise(boxed, ["pointing_hit", "box_mass_fraction", "box_iou", "box_area_fraction"],
                      ["method", "finding"], opts.bootstrap, opts.seed + 1)
    sec.add(Table("localisation_by_finding", _fmt_long(per_f), data=per_f, collapsed=True, max_rows=300,
                  caption="Localisation by method x finding"))
    return sec, t


# ---------------------------------------------------------------------------------------------
# faithfulness


def faithfulness_section(data: RunData, opts: Options) -> Section:
    sec = Section("faithfulness", "Faithfulness: deletion and insertion")
    fa = data.table("faithfulness")
    if fa.empty:
        return sec.add(missing_note(data, "faithfulness", "no deletion / insertion curves"))
    methods = F.method_order(list(fa["method"].unique()))
    curves: dict[str, dict[str, tuple]] = {}
    rows = []
    for meth in methods:
        g = fa[fa["method"] == meth]
        curves[meth] = {k: mean_curve(list(g["fractions"]), list(g[k]))
                        for k in ("deletion", "insertion", "random_deletion", "random_insertion")}
        g = g.assign(d_diff=g["deletion_auc"] - g["random_deletion_auc"],
                     i_diff=g["insertion_auc"] - g["random_insertion_auc"])
        s = summarise(g, ["deletion_auc", "random_deletion_auc", "d_diff", "insertion_auc", "random_insertion_auc",
                          "i_diff"], [], opts.bootstrap, opts.seed + 2).set_index("score")
        row = {"method": meth, "targets": int(s["n"].max())}
        for k in s.index:
            row[k], row[f"{k}_lo"], row[f"{k}_hi"] = s.loc[k, "mean"], s.loc[k, "ci_low"], s.loc[k, "ci_high"]
        rows.append(row)
    t = pd.DataFrame(rows)

    def c(r: Any, k: str) -> str:
        return fmt_ci(getattr(r, k), getattr(r, f"{k}_lo"), getattr(r, f"{k}_hi"))

    disp = pd.DataFrame({
        "method": t["method"], "targets": t["targets"],
        "deletion AUC": [c(r, "deletion_auc") for r in t.itertuples()],
        "random deletion AUC": [c(r, "random_deletion_auc") for r in t.itertuples()],
        "deletion − random": [c(r, "d_diff") for r in t.itertuples()],
        "insertion AUC": [c(r, "insertion_auc") for r in t.itertuples()],
        "random insertion AUC": [c(r, "random_insertion_auc") for r in t.itertuples()],
        "insertion − random": [c(r, "i_diff") for r in t.itertuples()]})
    baselines = ", ".join(sorted(fa["baseline"].dropna().unique())) or "–"
    sec.add(Paragraph("Target log-probability as image tokens are removed (deletion; most relevant first: lower "
                      "AUC is better) or revealed (insertion; higher is better), against the same target with a "
                      f"random token order. Baseline replacing removed tokens: {baselines}. Means over targets with "
                      "bootstrap 95% intervals; the differences are paired per target."))
    sec.add(Table("faithfulness_auc", disp, data=t, caption="AUC per method"))
    png = F.faithfulness_curves(curves)
    if png:
        sec.add(Figure("faithfulness_curves", png, "Mean deletion and insertion curves per method; dashed: the "
                                                   "random-order curves of the same targets."))
    ctab = []
    for meth, d in curves.items():
        for k, (x, y, n) in d.items():
            ctab += [{"method": meth, "curve": k, "fraction": float(a), "mean_logprob": float(b), "targets": n}
                     for a, b in zip(x, y)]
    ctab_df = pd.DataFrame(ctab)
    sec.add(Table("faithfulness_curves", _fmt_long(ctab_df), data=ctab_df, collapsed=True, max_rows=200,
                  caption="Mean curves (long format)"))
    return sec


# ---------------------------------------------------------------------------------------------
# prompt sensitivity


def sensitivity_section(data: RunData, opts: Options) -> Section:
    sec = Section("sensitivity", "Prompt sensitivity")
    s = data.table("sensitivity")
    if s.empty:
        return sec.add(missing_note(data, "sensitivity", "no prompt-sensitivity results (needs a prompt set with "
                                    "several phrasings per finding, e.g. prompts=sensitivity)"))
    methods = F.method_order(list(s["method"].unique()))
    s = s.assign(finding=s["target_label"].fillna("(none)"),
                 style_cmp=np.where(s["style_a"].fillna("") == s["style_b"].fillna(""), "same style", "style differs"),
                 format_cmp=np.where(s["format_a"].fillna(False) == s["format_b"].fillna(False), "same format",
                                     "format differs"))
    s["comparison"] = s["style_cmp"] + " / " + s["format_cmp"]
    sec.add(Paragraph("Jensen–Shannon divergence (bits, 0..1) between the maps of two phrasings of one question "
                      "about one image and target; the answer agreement rate is over pairs whose answers are both "
                      "yes/no-parsed, counted once per pair of prompts (it does not depend on the method)."))
    answers = s.drop_duplicates(["image_id", "target_kind", "target_label", "prompt_a", "prompt_b"])
    agree = answers["answers_agree"].dropna().astype(bool)
    lo, hi = wilson_interval(int(agree.sum()), int(agree.size))
    sec.add(Paragraph(f"Answer agreement over all pairs: {fmt_ci(agree.mean() if agree.size else math.nan, lo, hi)} "
                      f"(n = {agree.size} pairs with two parsed yes/no answers)."))
    by_f = summarise(s, ["js_divergence", "js_distance"], ["finding", "method"], opts.bootstrap, opts.seed + 3)
    by_f = by_f[by_f["score"] == "js_divergence"].drop(columns="score")
    pj = proportions(s, ["pass_js"], ["finding", "method"]).set_index(["finding", "method"])
    by_f["pass_js"] = [pj["fraction"].get((r.finding, r.method), math.nan) for r in by_f.itertuples()]
    disp = pd.DataFrame({"finding": by_f["finding"], "method": by_f["method"], "pairs": by_f["n"],
                         "mean JS [95%]": [fmt_ci(r.mean, r.ci_low, r.ci_high) for r in by_f.itertuples()],
                         "median JS": by_f["median"].map(fmt_num), "pass_js": by_f["pass_js"].map(fmt_num)})
    sec.add(Table("js_by_finding", disp, data=by_f, caption="JS divergence by finding and method", max_rows=120))
    # pairs of phrasings
    agree_p = answers.groupby(["prompt_a", "prompt_b"]).agg(
        n_agree=("answers_agree", lambda x: int(x.dropna().astype(bool).sum())),
        n_parsed=("answers_agree", lambda x: int(x.notna().sum())))
    js_p = s.pivot_table(index=["prompt_a", "prompt_b"], columns="method", values="js_divergence", aggfunc="mean")
    meta = s.drop_duplicates(["prompt_a", "prompt_b"]).set_index(["prompt_a", "prompt_b"])
    pairs = []
    for key in sorted(js_p.index):
        r = meta.loc[key]
        na, npar = agree_p.loc[key, "n_agree"], agree_p.loc[key, "n_parsed"]
        lo, hi = wilson_interval(int(na), int(npar))
        row = {"prompt_a": key[0], "prompt_b": key[1], "style": f"{_s(r['style_a'])} / {_s(r['style_b'])}",
               "format": f"{bool(r['format_a'])} / {bool(r['format_b'])}",
               "pairs": int(answers[(answers["prompt_a"] == key[0]) & (answers["prompt_b"] == key[1])].shape[0]),
               "answer agreement": fmt_ci(na / npar if npar else math.nan, lo, hi)}
        for meth in methods:
            row[f"JS {meth}"] = fmt_num(js_p.loc[key].get(meth, math.nan))
        pairs.append(row)
    sec.add(Table("js_by_prompt_pair", pd.DataFrame(pairs), caption="By pair of phrasings (mean JS per method)",
                  max_rows=80, collapsed=len(pairs) > 20))
    by_c = summarise(s, ["js_divergence"], ["comparison", "method"], opts.bootstrap, opts.seed + 3).drop(columns="score")
    ag_c = answers.groupby("comparison")["answers_agree"].agg(lambda x: x.dropna().astype(bool).mean()
                                                               if x.notna().any() else math.nan)
    disp_c = pd.DataFrame({"comparison": by_c["comparison"], "method": by_c["method"], "pairs": by_c["n"],
                           "mean JS [95%]": [fmt_ci(r.mean, r.ci_low, r.ci_high) for r in by_c.itertuples()],
                           "answer agreement": [fmt_num(ag_c.get(c_, math.nan)) for c_ in by_c["comparison"]]})
    sec.add(Table("js_by_style_format", disp_c, data=by_c, caption="By kind of rephrasing (style / format instruction)"))
    findings = sorted(s["finding"].unique())
    png = F.grouped_boxes(s, "js_divergence", "finding", findings, methods, title="JS divergence between phrasings",
                          ylabel="JS divergence (bits)", xlabel="finding")
    if png:
        sec.add(Figure("js_by_finding", png, "JS divergence between the maps of two phrasings, by finding and method."))
    comps = [c_ for c_ in ("same style / same format", "same style / format differs", "style differs / same format",
                           "style differs / format differs") if c_ in set(s["comparison"])]
    png = F.grouped_boxes(s, "js_divergence", "comparison", comps, methods, title="JS divergence by kind of rephrasing",
                          ylabel="JS divergence (bits)")
    if png:
        sec.add(Figure("js_by_comparison", png, "JS divergence by what differs between the two phrasings."))
    return sec


# ---------------------------------------------------------------------------------------------
# laterality


def laterality_section(data: RunData, opts: Options) -> Section:
    sec = Section("laterality", "Laterality")
    m = data.table("metrics")
    if m.empty:
        return sec.add(missing_note(data, "metrics", "no laterality scores"))
    prim, desc = primary_rows(m)
    lat = prim[np.isfinite(pd.to_numeric(prim["patient_left_fraction"], errors="coerce"))]
    if lat.empty:
        return sec.add(Note("No frontal-view target has a patient_left_fraction: no laterality summary."))
    lat = lat.assign(side=lat["finding_side"].map(lambda v: v if isinstance(v, str) and v else "(unknown)"))
    methods = F.method_order(list(lat["method"].unique()))
    sides = [x for x in F.SIDE_ORDER if x in set(lat["side"])] + sorted(set(lat["side"]) - set(F.SIDE_ORDER))
    s = summarise(lat, ["patient_left_fraction"], ["side", "method"], opts.bootstrap, opts.seed + 4).drop(columns="score")
    s["side"] = pd.Categorical(s["side"], sides, ordered=True)
    s = s.sort_values(["side", "method"]).reset_index(drop=True)
    s["side"] = s["side"].astype(str)
    disp = pd.DataFrame({"finding side": s["side"], "method": s["method"], "targets": s["n"],
                         "patient-left fraction [95%]": [fmt_ci(r.mean, r.ci_low, r.ci_high) for r in s.itertuples()],
                         "median": s["median"].map(fmt_num)})
    sec.add(Paragraph(f"Share of the map's mass on the patient's left (the image's right) for frontal views ({desc}), "
                      "by the known side of the finding's boxes. A map that follows the finding has a high value for "
                      "left-sided findings and a low one for right-sided findings; 0.5 is balanced. Unknown side: "
                      "no boxes for the target's finding."))
    sec.add(Table("laterality", disp, data=s, caption="patient_left_fraction by the finding's side"))
    png = F.grouped_boxes(lat, "patient_left_fraction", "side", sides, methods, hline=0.5,
                          title="Patient-left fraction by the finding's known side",
                          ylabel="mass on the patient's left / total", xlabel="finding side (from the boxes)")
    if png:
        sec.add(Figure("laterality", png, "patient_left_fraction by the finding's side; dotted: 0.5."))
    return sec


# ---------------------------------------------------------------------------------------------
# gallery and explorer


def gallery_section(data: RunData, opts: Options) -> Section:
    """Overlays for up to `gallery_size` targets (only when images may be included)."""
    from reports import gallery as G

    sec = Section("gallery", "Gallery")
    if not opts.include_images:
        return sec.add(Note("Patient images are left out of this report (`report.include_images=false`, e.g. for "
                            "MIMIC-CXR, whose data use agreement forbids sharing them): no gallery."))
    if opts.gallery_size <= 0:
        return sec.add(Note("`report.gallery_size=0`: no gallery."))
    rel, samples = data.table("relevancy"), data.table("samples")
    if rel.empty:
        return sec.add(missing_note(data, "relevancy", "no maps to show"))
    if samples.empty:
        return sec.add(missing_note(data, "samples", "no image paths"))
    items = G.select_targets(rel, samples, data.table("metrics"), opts.gallery_size, opts.seed)
    if not items:
        return sec.add(Note("No target was explained (no relevancy row with status ok): no gallery."))
    maps = data.relevancy_maps([i.sample_id for i in items])
    by_id = {r["sample_id"]: r for r in samples[samples["sample_id"].isin({i.sample_id for i in items})]
             .to_dict("records")}
    gens = data.table("generations")
    answers = dict(zip(gens["sample_id"], gens["answer"])) if not gens.empty else {}
    methods = F.method_order(list(rel["method"].unique()))
    sec.add(Paragraph("Each row: one target on its original image, a panel per method. Maps are min-max normalised "
                      "per panel for display (raw range above each panel) and stretched over the image (a cell "
                      "covers W/gw x H/gh pixels). White: ground-truth boxes of the target's finding; cyan: body "
                      "contour; R / L: the patient's right and left (frontal views)."))
    if G._body_mask_fn() is None:
        sec.add(Note("`metrics.body_mask` is not available: no body contour drawn."))
    n_ok = 0
    for k, item in enumerate(items):
        sample = by_id.get(item.sample_id)
        if sample is None:
            continue
        try:
            png = G.render_item(item, maps, sample, answers.get(item.sample_id), methods, max_pixels=opts.max_pixels)
        except Exception as e:  # one unreadable image must not lose the report
            sec.add(Note(f"Gallery item {item.sample_id} / {item.target_label} not drawn: {type(e).__name__}: {e}"))
            continue
        if png:
            n_ok += 1
            sec.add(Figure(f"gallery_{k:02d}", png, f"{item.sample_id} · {item.target_kind} “{item.target_label}”"))
    if not n_ok:
        sec.add(Note("No gallery figure could be drawn."))
    return sec
