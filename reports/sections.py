"""The report's sections, built from the engine's aggregates (:mod:`reports.data`); a missing or
empty table gives a note.

Definitions used throughout (see also :mod:`reports.stats`):

* A *target* is one (sample_id, target_kind, target_label, token_start); relevancy/ has one row
  per target and method. "Explained" means status ``ok``; ``not_mentioned`` (a finding the answer
  does not name) and ``no_targets`` (nothing to explain in the answer) are counted apart.
* Score summaries use the metrics/ rows of every target kind except ``answer_tokens`` (one row per
  generated token would outweigh everything else) unless that is the only kind present; the
  per-kind tables show each kind separately.
* A summary's *finding* is the metrics ``finding`` column; when that is null it is the keyword's
  finding for keyword targets and ``(<target kind>)`` otherwise. *view* is ``view_position``.
* Pass flags are derived at report time from the raw scores and the thresholds in force
  (:mod:`metrics.quality`); stored flags of earlier versions are ignored.
* Means and rates carry patient-level cluster bootstrap 95% intervals (:mod:`reports.stats`);
  ``n`` counts rows (targets, pairs, answers), not patients. Medians are exact
  (:func:`reports.data.quantiles`).
* Fractions and rates are in 0..1. JS divergence is in bits (base 2, 0..1). Faithfulness curves
  are the target's log-probability after removing (deletion) or revealing (insertion) a fraction
  of the image tokens; AUCs are trapezoid areas over fractions 0..1.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd

from metrics.quality import MAP_FLAGS
from reports import data as D
from reports import figures as F
from reports.data import RunData, num
from reports.document import Figure, Note, Paragraph, Section, Table
from reports.literature import literature_blocks
from reports.stats import cluster_ratio_ci, fmt_ci, fmt_num, group_rng

SCORES: tuple[str, ...] = ("inside_body_ratio", "border_fraction", "entropy_bits", "entropy_norm",
                           "patient_left_fraction", "patient_left_fraction_centre", "apical_fraction",
                           "middle_fraction", "basal_fraction", "pointing_hit", "box_mass_fraction", "box_iou", "iou_top", "cnr", "first_token_fraction",
                           "corner_fraction", "side_agrees")
PASS_COLUMNS: tuple[str, ...] = tuple(MAP_FLAGS)  # derived by metrics.quality.map_flags
TARGET_KEY = ["sample_id", "target_kind", "target_label", "token_start"]
KIND_ORDER = ("keywords", "laterality", "answer_token", "answer_span", "answer_tokens")
LABEL_STATES = ("positive", "negative", "uncertain", "not_mentioned")
PARSED = ("yes", "no", "uncertain", "unparsed")
STAGE_OF = {"generations": "generate", "relevancy": "explain", "metrics": "score", "sensitivity": "score",
            "answers": "score", "faithfulness": "faithfulness (faithfulness.enabled=true)", "samples": "load"}
CLUSTER_NOTE = ("Intervals are patient-level cluster bootstrap 95% intervals: patients (subject_id; the image "
                "where that is unknown) are resampled with replacement, {b} resamples, percentile interval "
                "(seed {seed}), so rows of one patient do not count as independent.")


@dataclass
class Options:
    """Report options (``report.*`` config), the image reading guard and the engine's resources
    (``engine_memory_limit``: a DuckDB size string; ``engine_threads``: 0 = the machine's cores,
    at most 8)."""

    include_images: bool = True
    bootstrap: int = 1000
    gallery_size: int = 8
    seed: int = 0
    explorer_samples: int = 8
    explorer_image_size: int = 320
    max_pixels: int = 60_000_000
    engine_memory_limit: str = "2GB"
    engine_threads: int = 0


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


def kinds_sorted(kinds: Sequence[str]) -> list[str]:
    """Target kinds in the report's order (unknown kinds last, alphabetically)."""
    return sorted(kinds, key=lambda k: (KIND_ORDER.index(k) if k in KIND_ORDER else 99, k))


def primary_kinds(kinds: Sequence[str]) -> tuple[list[str], str]:
    """The kinds score summaries use (every kind but answer_tokens, unless only that) and a description."""
    other = [k for k in kinds_sorted(kinds) if k != "answer_tokens"]
    if not kinds:
        return [], "all target kinds"
    if not other:
        return list(kinds), "target kind answer_tokens (the only kind scored)"
    return other, "target kinds " + ", ".join(other) + (" (answer_tokens left out)" if len(other) < len(kinds) else "")


# ---------------------------------------------------------------------------------------------
# aggregates as the sections use them


def long_stats(s: pd.DataFrame) -> pd.DataFrame:
    """A summary without its ``total`` column (the CSV layout of the score tables)."""
    return s.drop(columns=["total"])


def rates(s: pd.DataFrame) -> pd.DataFrame:
    """A summary of 0/1 flags as pass rates: check, n, passed, fraction, ci_low, ci_high."""
    out = s.rename(columns={"score": "check", "total": "passed", "mean": "fraction"}).drop(columns=["median"])
    out["passed"] = out["passed"].round().astype(int)
    return out



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
    present = F.method_order(data.distinct("relevancy", "method")) if data.has("relevancy") else []
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


def _crosstab(df: pd.DataFrame, index: str, columns: str, values: str = "n", margins: bool = False) -> pd.DataFrame:
    """A count table (rows `index`, columns `columns`) from long counts, optionally with totals."""
    ct = df.pivot_table(index=index, columns=columns, values=values, aggfunc="sum", fill_value=0).astype(int)
    ct = ct.sort_index().sort_index(axis=1)
    ct.columns.name = None
    if margins:
        ct["total"] = ct.sum(axis=1)
        ct.loc["total"] = ct.sum(axis=0)
    return ct


def _sample_pairs(data: RunData) -> list[tuple[str, object]]:
    c = data.sql("SELECT count(*) AS n, count(DISTINCT image_id) AS images, count(DISTINCT study_id) AS studies, "
                 "count(DISTINCT subject_id) AS subjects, count(DISTINCT prompt_id) AS prompts FROM samples").iloc[0]
    views = data.sql("SELECT v, count(*) AS n FROM (SELECT image_id, min(coalesce(view_position, '')) AS v "
                     "FROM samples GROUP BY image_id) GROUP BY v ORDER BY n DESC, v")
    with_gen = data.scalar("SELECT count(*) FROM samples WHERE sample_id IN (SELECT sample_id FROM generations)") \
        if data.has("generations") else 0
    explained = data.scalar("SELECT count(*) FROM samples WHERE sample_id IN (SELECT sample_id FROM relevancy)") \
        if data.has("relevancy") else 0
    return [("samples (image x prompt)", int(c["n"])), ("images", int(c["images"])), ("studies", int(c["studies"])),
            ("subjects", int(c["subjects"])), ("prompt variants", int(c["prompts"])),
            ("views", ", ".join(f"{r.v or '(unknown)'}: {int(r.n)}" for r in views.itertuples())),
            ("samples with a generation", int(with_gen)), ("samples explained (any relevancy row)", int(explained))]


def _target_blocks(data: RunData) -> list:
    """Targets by kind and status, relevancy rows by method and status, teacher-forcing checks."""
    key = ", ".join(TARGET_KEY)
    t = data.sql(f"SELECT coalesce(nullif(target_kind, ''), '(none)') AS kind, status, count(*) AS n FROM "
                 f"(SELECT {key}, min(status) AS status FROM relevancy GROUP BY {key}) "
                 "WHERE status IS NOT NULL AND target_kind IS NOT NULL GROUP BY ALL")
    ct = _crosstab(t, "kind", "status", margins=True).reset_index().rename(columns={"kind": "target kind"})
    pm = _crosstab(data.sql("SELECT method, status, count(*) AS n FROM relevancy WHERE method IS NOT NULL AND "
                            "status IS NOT NULL GROUP BY ALL"), "method", "status").reset_index()
    blocks: list = [
        Paragraph("Targets (sample x target, counted once over methods) by status: `ok` = explained, "
                  "`not_mentioned` = a finding the answer does not name (not explained), `no_targets` = "
                  "an answer with nothing to explain."),
        Table("targets_by_status", ct, caption="Targets by kind and status"),
        Table("relevancy_rows_by_method", pm, caption="relevancy rows by method and status", collapsed=True)]
    bad = data.sql("SELECT count(*) FILTER (WHERE am = 0) AS bad, count(*) FILTER (WHERE io = 0) AS bad_img FROM "
                   "(SELECT sample_id, min(CAST(argmax_matches AS INTEGER)) AS am, "
                   "min(CAST(image_tokens_ok AS INTEGER)) AS io FROM relevancy WHERE status = 'ok' GROUP BY sample_id)"
                   ).iloc[0]
    if bad["bad"] or bad["bad_img"]:
        blocks.append(Note(f"{int(bad['bad'])} explained sample(s) whose teacher-forced argmax did not reproduce the "
                           f"answer, {int(bad['bad_img'])} with an image-token count different from grid_h x grid_w."))
    return blocks


def counts_section(data: RunData) -> Section:
    sec = Section("counts", "Counts and errors")
    rows = [(name, data.rows.get(name, 0), "unreadable" if name in data.unreadable else
             ("" if data.has(name) else "missing or empty")) for name in D.TABLE_NAMES]
    sec.add(Table("table_rows", pd.DataFrame(rows, columns=["table", "rows", "state"]), caption="Rows per table"))
    if not data.has("samples"):
        sec.add(missing_note(data, "samples"))
    else:
        sec.add(kv_table("sample_counts", _sample_pairs(data), caption="Samples"))
    if not data.has("relevancy"):
        sec.add(missing_note(data, "relevancy", "no targets to count"))
    else:
        sec.add(*_target_blocks(data))
    if not data.has("errors"):
        sec.add(Paragraph("No errors recorded." if "errors" not in data.unreadable else ""))
        if "errors" in data.unreadable:
            sec.add(missing_note(data, "errors"))
    else:
        et = data.sql("SELECT stage, error_type, count(*) AS count, count(DISTINCT image_id) AS images, "
                      "arg_min(message, coalesce(time_utc, '')) AS example FROM errors "
                      "GROUP BY stage, error_type ORDER BY stage, error_type")
        et["example"] = [_json_short(_s(x), 140) for x in et["example"]]
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


SCORE_KEYS = {"target_kind": "target_kind", "method": "method"}
FULL_KEYS = {**SCORE_KEYS, "finding": "finding_group", "view": "view_group"}


def _score_values() -> dict[str, str]:
    """Scores (NaN as NULL) and derived flags of metrics_rows, by name."""
    return {**{s: num(s) for s in SCORES}, **{f: f"flags.{f}" for f in PASS_COLUMNS}}


def _per_kind_tables(data: RunData, s: pd.DataFrame, methods: list[str], kinds: list[str]) -> list[Table]:
    targets = data.sql("SELECT target_kind, count(*) AS n FROM (SELECT DISTINCT sample_id, target_kind, target_label, "
                       "token_start FROM metrics) GROUP BY target_kind").set_index("target_kind")["n"]
    out = []
    for kind in kinds:
        sk = long_stats(s[s["target_kind"] == kind].drop(columns="target_kind")).reset_index(drop=True)
        sk["cell"] = sk.apply(_ci_cell, axis=1)
        wide = sk.pivot(index="score", columns="method", values="cell").reindex(
            [c for c in SCORES if c in set(sk["score"])])[[x for x in methods if x in set(sk["method"])]]
        wide.index = [F.SCORE_LABELS.get(i, i) for i in wide.index]
        wide = wide.reset_index().rename(columns={"index": "score"})
        wide.columns.name = None
        out.append(Table(f"scores_{kind}", wide, caption=f"Scores per method, target kind {kind} "
                         f"({int(targets.get(kind, 0))} targets)", data=sk.drop(columns="cell")))
    return out


def _pass_table(p: pd.DataFrame, kinds: list[str], methods: list[str]) -> Table:
    p = p.copy()
    p["cell"] = p.apply(lambda r: "–" if not r["n"] else
                        f"{fmt_ci(r['fraction'], r['ci_low'], r['ci_high'])} ({int(r['n'])})", axis=1)
    applies = p.groupby(["target_kind", "check"])["n"].sum()  # checks no row of a kind has: not shown
    wide = p.pivot(index=["target_kind", "check"], columns="method", values="cell")
    wide = wide.reindex(pd.MultiIndex.from_tuples([(k, c) for k in kinds for c in PASS_COLUMNS
                                                   if (k, c) in wide.index and applies[(k, c)] > 0]))
    wide = wide[[x for x in methods if x in wide.columns]].reset_index()
    wide.columns = ["target kind", "check", *wide.columns[2:]]
    return Table("pass_rates", wide, caption="Fraction passing each quality check, per method",
                 data=p.drop(columns="cell"))


def scores_section(data: RunData, opts: Options) -> Section:
    sec = Section("scores", "Map scores")
    if not data.has("metrics"):
        return sec.add(missing_note(data, "metrics", "no score summaries"))
    kinds = kinds_sorted(data.distinct("metrics", "target_kind"))
    methods = F.method_order(data.distinct("metrics", "method"))
    sec.add(Paragraph("Mean [95% interval] (n non-NaN) of each score over the targets of each method; NaN values "
                      "(e.g. laterality of lateral views, localisation without boxes) are dropped. Fractions are "
                      "of the raw map's mass on the original image. "
                      + CLUSTER_NOTE.format(b=opts.bootstrap, seed=opts.seed)))
    src, values = D.metrics_rows(), _score_values()
    s = D.summarise(data, src, SCORE_KEYS, values, opts.bootstrap, opts.seed, medians=SCORES)
    sec.add(*_per_kind_tables(data, s[s["score"].isin(SCORES)], methods, kinds))
    prim, desc = primary_kinds(kinds)
    box = D.box_stats(data, D.project(D.metrics_rows(prim), {"method": "method"}, {c: num(c) for c in SCORES}),
                      ["method"], [c for c in SCORES if c != "pointing_hit"])  # 0/1: see localisation
    png = F.score_distributions(box, [c for c in SCORES if c != "pointing_hit"], methods)
    if png:
        sec.add(Figure("score_distributions", png, f"Score distributions per method ({desc}); n per box under "
                                                   "each method."))
    thr = ", ".join(f"{k}={v}" for k, v in asdict(data.thresholds).items())
    p = rates(s[s["score"].isin(PASS_COLUMNS)].reset_index(drop=True))
    if len(p) and p["n"].sum():
        sec.add(Paragraph(f"Quality checks, derived from the scores with the thresholds in force ({thr}): fraction "
                          "of targets passing [patient-level cluster bootstrap 95%] (n non-null). "
                          "A check that does not apply to a row is not counted (pass_laterality_balance on "
                          "non-frontal views; a check whose scores the row lacks)."))
        sec.add(_pass_table(p, kinds, methods))
    full = D.summarise(data, src, FULL_KEYS, values, opts.bootstrap, opts.seed, medians=SCORES)
    fs = long_stats(full[full["score"].isin(SCORES)]).reset_index(drop=True)
    sec.add(Table("scores_by_method_finding_view", _fmt_long(fs), data=fs, max_rows=300, collapsed=True,
                  caption="Scores by target kind x method x finding x view"))
    pf = rates(full[full["score"].isin(PASS_COLUMNS)].reset_index(drop=True))
    sec.add(Table("pass_rates_by_method_finding_view", _fmt_long(pf), data=pf, max_rows=300, collapsed=True,
                  caption="Pass rates by target kind x method x finding x view"))
    return sec


# ---------------------------------------------------------------------------------------------
# answers

DEFINITE = "parsed IN ('yes', 'no') AND label_state IN ('positive', 'negative')"
ANSWER_COUNTS = {  # per-patient counts (SQL aggregates over answers_rows)
    "answers": "count(*)",
    "tp": "count(*) FILTER (WHERE parsed = 'yes' AND label_state = 'positive')",
    "fn": "count(*) FILTER (WHERE parsed = 'no' AND label_state = 'positive')",
    "tn": "count(*) FILTER (WHERE parsed = 'no' AND label_state = 'negative')",
    "fp": "count(*) FILTER (WHERE parsed = 'yes' AND label_state = 'negative')",
    "answer_uncertain": "count(*) FILTER (WHERE parsed = 'uncertain')",
    "answer_unparsed": "count(*) FILTER (WHERE parsed = 'unparsed')",
    "label_uncertain": "count(*) FILTER (WHERE label_state = 'uncertain')",
    "label_not_mentioned": "count(*) FILTER (WHERE label_state = 'not_mentioned')",
}
ANSWER_RATES = {  # rate -> (successes, trials), per-patient counts
    "accuracy": ("parsed = 'yes' AND label_state = 'positive' OR parsed = 'no' AND label_state = 'negative'", DEFINITE),
    "sensitivity": ("parsed = 'yes' AND label_state = 'positive'", "label_state = 'positive' AND parsed IN ('yes', 'no')"),
    "specificity": ("parsed = 'no' AND label_state = 'negative'", "label_state = 'negative' AND parsed IN ('yes', 'no')"),
}


def _answer_aggs() -> dict[str, str]:
    aggs = dict(ANSWER_COUNTS)
    for rate, (k, n) in ANSWER_RATES.items():
        aggs[f"s__{rate}"] = f"count(*) FILTER (WHERE {k})"
        aggs[f"n__{rate}"] = f"count(*) FILTER (WHERE {n})"
    return aggs


def answer_rates(data: RunData, by: Sequence[str], n_resamples: int, seed: int, label: str | None = None) -> pd.DataFrame:
    """Per group of `by` (columns of answers_rows): the counts of :data:`ANSWER_COUNTS`,
    ``n_definite`` and each rate of :data:`ANSWER_RATES` with its cluster bootstrap interval
    (``<rate>_lo``, ``<rate>_hi``). `label` names the single group when `by` is empty."""
    out = []
    rates_ = list(ANSWER_RATES)
    for key, g in D.patient_groups(data, D.answers_rows(), by, _answer_aggs()):
        s = g[[f"s__{r}" for r in rates_]].to_numpy(dtype=np.float64)
        n = g[[f"n__{r}" for r in rates_]].to_numpy(dtype=np.float64)
        lo, hi = cluster_ratio_ci(s, n, n_resamples, group_rng(seed, key))
        row: dict[str, Any] = {"group": label if not by else " / ".join(map(str, key))}
        row.update({c: int(g[c].sum()) for c in ANSWER_COUNTS})
        row["n_definite"] = row["tp"] + row["fn"] + row["tn"] + row["fp"]
        for j, r in enumerate(rates_):
            tot = n[:, j].sum()
            row[r] = s[:, j].sum() / tot if tot else math.nan
            row[f"{r}_lo"], row[f"{r}_hi"] = float(lo[j]), float(hi[j])
        out.append(row)
    cols = ["group", "answers", "n_definite", "tp", "fn", "tn", "fp",
            *[c for r in rates_ for c in (r, f"{r}_lo", f"{r}_hi")],
            "answer_uncertain", "answer_unparsed", "label_uncertain", "label_not_mentioned"]
    return pd.DataFrame(out, columns=cols)


def _answers_display(df: pd.DataFrame, first: str) -> pd.DataFrame:
    return pd.DataFrame({
        first: df["group"], "answers": df["answers"], "definite": df["n_definite"],
        "accuracy": [fmt_ci(r.accuracy, r.accuracy_lo, r.accuracy_hi) for r in df.itertuples()],
        "sensitivity": [fmt_ci(r.sensitivity, r.sensitivity_lo, r.sensitivity_hi) for r in df.itertuples()],
        "specificity": [fmt_ci(r.specificity, r.specificity_lo, r.specificity_hi) for r in df.itertuples()],
        "TP/FN/TN/FP": [f"{r.tp}/{r.fn}/{r.tn}/{r.fp}" for r in df.itertuples()],
        "ans. uncertain": df["answer_uncertain"], "ans. unparsed": df["answer_unparsed"],
        "label uncertain": df["label_uncertain"], "label not mentioned": df["label_not_mentioned"]})


def answers_section(data: RunData, opts: Options) -> Section:
    sec = Section("answers", "Answers to yes/no questions")
    if not data.has("answers"):
        return sec.add(missing_note(data, "answers", "no answer accuracy"))
    long = data.sql(f"SELECT label_state, parsed, count(*) AS n FROM ({D.answers_rows()}) GROUP BY ALL")
    ct = _crosstab(long, "label_state", "parsed")
    ct = ct.reindex(index=list(LABEL_STATES) + sorted(set(ct.index) - set(LABEL_STATES)),
                    columns=list(PARSED) + sorted(set(ct.columns) - set(PARSED)), fill_value=0)
    ct["total"] = ct.sum(axis=1)
    ct.loc["total"] = ct.sum(axis=0)
    ct.index.name = "label_state"
    sec.add(Paragraph("Rates use only definite pairs: answer yes/no and label positive/negative. Uncertain and "
                      "unparsed answers, uncertain and not-mentioned labels are counted apart (table below). "
                      + CLUSTER_NOTE.format(b=opts.bootstrap, seed=opts.seed)))
    sec.add(Table("answers_label_x_parsed", ct.reset_index().rename(columns={"label_state": "label \\ answer"}),
                  caption="Answers by label state (rows) and parsed answer (columns)"))
    by_f = pd.concat([answer_rates(data, [], opts.bootstrap, opts.seed, "(all)"),
                      answer_rates(data, ["finding"], opts.bootstrap, opts.seed)], ignore_index=True)
    sec.add(Table("answers_by_finding", _answers_display(by_f, "finding"), data=by_f, caption="Accuracy by finding"))
    by_p = answer_rates(data, ["prompt", "finding"], opts.bootstrap, opts.seed)
    sec.add(Table("answers_by_prompt", _answers_display(by_p, "prompt / finding"), data=by_p, collapsed=True,
                  caption="Accuracy by prompt variant"))
    return sec


# ---------------------------------------------------------------------------------------------
# localisation

LOC_VALUES = ("pointing_hit", "box_mass_fraction", "box_iou", "iou_top", "cnr", "box_area_fraction")
LOC_COLUMNS = (("pointing", "pointing_hit"), ("mass", "box_mass_fraction"), ("iou", "box_iou"), ("iou_top", "iou_top"),
               ("cnr", "cnr"))  # localisation table column -> score


def _boxed_rows(kinds: Sequence[str]) -> str:
    """metrics_rows of `kinds` whose finding has boxes (a finite box_mass_fraction or pointing_hit)."""
    return (f"SELECT * FROM ({D.metrics_rows(kinds)}) AS b "
            "WHERE isfinite(CAST(box_mass_fraction AS DOUBLE)) OR isfinite(CAST(pointing_hit AS DOUBLE))")


def _localisation_table(s: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    """One row per method: n, pointing / mass / iou / iou_top / cnr with intervals (and their n),
    uniform_mass."""
    rows = []
    for meth in methods:
        g = s[s["method"] == meth].set_index("score")
        if g.empty:
            continue
        row: dict[str, Any] = {"method": meth, "n": int(g.loc["pointing_hit", "n"])}
        for name, score in LOC_COLUMNS:
            row[name], row[f"{name}_lo"], row[f"{name}_hi"] = (g.loc[score, "mean"], g.loc[score, "ci_low"],
                                                               g.loc[score, "ci_high"])
            row[f"{name}_n"] = int(g.loc[score, "n"])
        row["uniform_mass"] = g.loc["box_area_fraction", "mean"]
        rows.append(row)
    return pd.DataFrame(rows)


def _iou_top_fraction(data: RunData) -> object:
    """The image share iou_top was binarised at (the scoring run's `metrics.iou_top_fraction`)."""
    m = (data.config("score") or {}).get("metrics") or {}
    return m.get("iou_top_fraction", "?")


def localisation_section(data: RunData, opts: Options) -> tuple[Section, pd.DataFrame]:
    sec = Section("localisation", "Localisation against ground-truth boxes")
    if not data.has("metrics"):
        return sec.add(missing_note(data, "metrics", "no localisation scores")), pd.DataFrame()
    prim, desc = primary_kinds(data.distinct("metrics", "target_kind"))
    boxed = _boxed_rows(prim)
    floor = data.sql(f"SELECT count(*) AS targets, avg(b) AS uniform FROM (SELECT {', '.join(TARGET_KEY)}, "
                     f"min({num('box_area_fraction')}) AS b FROM ({boxed}) GROUP BY ALL)").iloc[0]
    if not floor["targets"]:
        return sec.add(Note("No scored target has ground-truth boxes for its finding (dataset without boxes, or "
                            "no boxed finding named): no localisation scores.")), pd.DataFrame()
    uniform = float(floor["uniform"]) if floor["uniform"] is not None else math.nan
    values = {v: num(v) for v in LOC_VALUES}
    s = D.summarise(data, boxed, {"method": "method"}, values, opts.bootstrap, opts.seed + 1, medians=())
    methods = F.method_order(list(s["method"].unique()))
    t = _localisation_table(s, methods)
    top = _iou_top_fraction(data)
    disp = pd.DataFrame({
        "method": [m_ + (" (floor)" if m_ == "random" else "") for m_ in t["method"]], "targets": t["n"],
        "pointing game": [fmt_ci(r.pointing, r.pointing_lo, r.pointing_hi) for r in t.itertuples()],
        "mIoU (Otsu)": [fmt_ci(r.iou, r.iou_lo, r.iou_hi) for r in t.itertuples()],
        f"mIoU (top {top})": [fmt_ci(r.iou_top, r.iou_top_lo, r.iou_top_hi) for r in t.itertuples()],
        "CNR": [fmt_ci(r.cnr, r.cnr_lo, r.cnr_hi) for r in t.itertuples()],
        "mass in boxes": [fmt_ci(r.mass, r.mass_lo, r.mass_hi) for r in t.itertuples()],
        "uniform map: expected mass": [fmt_num(v) for v in t["uniform_mass"]]})
    disp.loc[len(disp)] = ["uniform map (expected)", int(floor["targets"]), f"≈ {fmt_num(uniform)}", "–", "–",
                           "– (undefined)", fmt_num(uniform), fmt_num(uniform)]
    sec.add(Paragraph(f"Targets whose finding has boxes ({desc}), scored in pixel space: the map is placed on the "
                      "image (each pixel takes its cell's value) and compared with the union of the finding's boxes. "
                      "Pointing game = hit rate of the map's most representative point (its maximal cell's centre "
                      "inside a box); mIoU = mean IoU of the binarised map with the boxes, binarised by Otsu's "
                      f"threshold on the map's values (cheXlocalize, Saporta et al. 2022) or as the top cells covering "
                      f"{top} of the image (`metrics.iou_top_fraction`); CNR = |mean inside − mean outside| / "
                      "sqrt(var inside + var outside) of the map's pixel values (MS-CXR, Boecking et al. 2022); mass "
                      "in boxes = mean box_mass_fraction. All with patient-level cluster bootstrap 95% intervals. "
                      "The floors: the `random` method's values, and a uniform map, whose expected mass in the boxes "
                      "(and, approximately, its hit rate) is the mean box area fraction; a uniform map has no CNR."))
    if "random" not in set(t["method"]):
        sec.add(Note("The `random` method was not run: only the uniform-map floor is shown."))
    sec.add(Table("localisation", disp, data=t, caption="Localisation per method"))
    sec.add(*literature_blocks())
    png = F.localisation_bars(t, {"pointing": uniform, "mass": uniform})
    if png:
        sec.add(Figure("localisation", png, "Pointing game, mIoU (Otsu), CNR and mass in boxes per method (95% "
                                            "intervals); dashed: a uniform map's expectation."))
    per_f = long_stats(D.summarise(data, boxed, {"method": "method", "finding": "finding_group"}, values,
                               opts.bootstrap, opts.seed + 1))
    sec.add(Table("localisation_by_finding", _fmt_long(per_f), data=per_f, collapsed=True, max_rows=300,
                  caption="Localisation by method x finding"))
    return sec, t


# ---------------------------------------------------------------------------------------------
# faithfulness

AUC_VALUES = {"deletion_auc": num("deletion_auc"), "random_deletion_auc": num("random_deletion_auc"),
              "d_diff": f"({num('deletion_auc')} - {num('random_deletion_auc')})",
              "insertion_auc": num("insertion_auc"), "random_insertion_auc": num("random_insertion_auc"),
              "i_diff": f"({num('insertion_auc')} - {num('random_insertion_auc')})"}
CURVES = ("deletion", "insertion", "random_deletion", "random_insertion")


def _auc_table(s: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    rows = []
    for meth in methods:
        g = s[s["method"] == meth].set_index("score")
        row: dict[str, Any] = {"method": meth, "targets": int(g["n"].max())}
        for k in g.index:
            row[k], row[f"{k}_lo"], row[f"{k}_hi"] = g.loc[k, "mean"], g.loc[k, "ci_low"], g.loc[k, "ci_high"]
        rows.append(row)
    return pd.DataFrame(rows)


def faithfulness_section(data: RunData, opts: Options) -> tuple[Section, pd.DataFrame]:
    """The section and its AUC table (one row per method; see :func:`_auc_table`)."""
    sec = Section("faithfulness", "Faithfulness: deletion and insertion")
    if not data.has("faithfulness"):
        return sec.add(missing_note(data, "faithfulness", "no deletion / insertion curves")), pd.DataFrame()
    src = D.faithfulness_rows()
    s = D.summarise(data, src, {"method": "method"}, AUC_VALUES, opts.bootstrap, opts.seed + 2, medians=())
    methods = F.method_order(list(s["method"].dropna().unique()))
    acc = D.curve_means(data, "SELECT * FROM faithfulness", "method", "fractions", CURVES)
    curves = {m: {k: acc[m][k].result() for k in CURVES} for m in methods if m in acc}
    t = _auc_table(s, methods)

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
    baselines = ", ".join(data.distinct("faithfulness", "baseline")) or "–"
    sec.add(Paragraph("Target log-probability as image tokens are removed (deletion; most relevant first: lower "
                      "AUC is better) or revealed (insertion; higher is better), against the same target with a "
                      f"random token order. Baseline replacing removed tokens: {baselines}. Means over targets with "
                      "patient-level cluster bootstrap 95% intervals; the differences are paired per target."))
    sec.add(Table("faithfulness_auc", disp, data=t, caption="AUC per method"))
    png = F.faithfulness_curves(curves)
    if png:
        sec.add(Figure("faithfulness_curves", png, "Mean deletion and insertion curves per method; dashed: the "
                                                   "random-order curves of the same targets."))
    ctab = [{"method": meth, "curve": k, "fraction": float(a), "mean_logprob": float(b), "targets": n}
            for meth, d in curves.items() for k, (x, y, n) in d.items() for a, b in zip(x, y)]
    ctab_df = pd.DataFrame(ctab)
    sec.add(Table("faithfulness_curves", _fmt_long(ctab_df), data=ctab_df, collapsed=True, max_rows=200,
                  caption="Mean curves (long format)"))
    return sec, t


# ---------------------------------------------------------------------------------------------
# prompt sensitivity

COMPARISONS = ("same style / same format", "same style / format differs", "style differs / same format",
               "style differs / format differs")


def _agreement(data: RunData, by: Sequence[str], opts: Options) -> pd.DataFrame:
    """Answer agreement over prompt pairs per group of `by` (columns of answer_pairs): n parsed
    pairs, pairs, agreement rate and its cluster bootstrap interval."""
    aggs = {**D.mean_aggs({"agree": "agree"}), "pairs": "count(*)"}
    rows = []
    for key, g in D.patient_groups(data, D.answer_pairs(), by, aggs):
        lo, hi = cluster_ratio_ci(g["s__agree"].to_numpy(), g["n__agree"].to_numpy(), opts.bootstrap,
                                  group_rng(opts.seed + 3, key))
        n = int(g["n__agree"].sum())
        rows.append((*key, n, int(g["pairs"].sum()), g["s__agree"].sum() / n if n else math.nan, lo[0], hi[0]))
    return pd.DataFrame(rows, columns=[*by, "n_parsed", "pairs", "agreement", "ci_low", "ci_high"])


def _js_by_finding(data: RunData, opts: Options) -> pd.DataFrame:
    values = {"js_divergence": num("js_divergence"), "js_distance": num("js_distance"), "pass_js": "flags.pass_js"}
    s = D.summarise(data, D.sensitivity_rows(), {"finding": "finding", "method": "method"}, values, opts.bootstrap,
                opts.seed + 3, medians=("js_divergence", "js_distance"))
    by_f = long_stats(s[s["score"] == "js_divergence"]).drop(columns="score").reset_index(drop=True)
    pj = s[s["score"] == "pass_js"].set_index(["finding", "method"])["mean"]
    by_f["pass_js"] = [pj.get((r.finding, r.method), math.nan) for r in by_f.itertuples()]
    return by_f


def _prompt_pairs(data: RunData, methods: list[str], opts: Options) -> pd.DataFrame:
    agree = _agreement(data, ["prompt_a", "prompt_b"], opts).set_index(["prompt_a", "prompt_b"])
    meta = data.sql("SELECT prompt_a, prompt_b, min(style_a) AS style_a, min(style_b) AS style_b, "
                    "min(format_a) AS format_a, min(format_b) AS format_b FROM sensitivity GROUP BY ALL"
                    ).set_index(["prompt_a", "prompt_b"])
    js = data.sql(f"SELECT prompt_a, prompt_b, method, avg({num('js_divergence')}) AS js FROM sensitivity "
                  "GROUP BY ALL").pivot_table(index=["prompt_a", "prompt_b"], columns="method", values="js")
    pairs = []
    for key in sorted(js.index):
        r, a = meta.loc[key], agree.loc[key]
        row = {"prompt_a": key[0], "prompt_b": key[1], "style": f"{_s(r['style_a'])} / {_s(r['style_b'])}",
               "format": f"{bool(r['format_a'])} / {bool(r['format_b'])}", "pairs": int(a["pairs"]),
               "answer agreement": fmt_ci(a["agreement"], a["ci_low"], a["ci_high"])}
        for meth in methods:
            row[f"JS {meth}"] = fmt_num(js.loc[key].get(meth, math.nan))
        pairs.append(row)
    return pd.DataFrame(pairs)


def _js_figures(data: RunData, methods: list[str], findings: list[str]) -> list[Figure]:
    src = D.project(D.sensitivity_rows(), {"finding": "finding", "comparison": "comparison", "method": "method"},
                    {"js_divergence": num("js_divergence")})
    out = []
    by_f = D.box_stats(data, src, ["finding", "method"], ["js_divergence"])
    png = F.grouped_boxes(by_f, "finding", findings, methods, title="JS divergence between phrasings",
                          ylabel="JS divergence (bits)", xlabel="finding")
    if png:
        out.append(Figure("js_by_finding", png, "JS divergence between the maps of two phrasings, by finding and method."))
    by_c = D.box_stats(data, src, ["comparison", "method"], ["js_divergence"])
    comps = [c_ for c_ in COMPARISONS if c_ in set(by_c["comparison"])]
    png = F.grouped_boxes(by_c, "comparison", comps, methods, title="JS divergence by kind of rephrasing",
                          ylabel="JS divergence (bits)")
    if png:
        out.append(Figure("js_by_comparison", png, "JS divergence by what differs between the two phrasings."))
    return out


def sensitivity_section(data: RunData, opts: Options) -> Section:
    sec = Section("sensitivity", "Prompt sensitivity")
    if not data.has("sensitivity"):
        return sec.add(missing_note(data, "sensitivity", "no prompt-sensitivity results (needs a prompt set with "
                                    "several phrasings per finding, e.g. prompts=sensitivity)"))
    methods = F.method_order(data.distinct("sensitivity", "method"))
    sec.add(Paragraph("Jensen–Shannon divergence (bits, 0..1) between the maps of two phrasings of one question "
                      "about one image and target; the answer agreement rate is over pairs whose answers are both "
                      "yes/no-parsed, counted once per pair of prompts (it does not depend on the method). pass_js: "
                      f"divergence <= {data.thresholds.max_js_divergence} (the threshold in force). "
                      + CLUSTER_NOTE.format(b=opts.bootstrap, seed=opts.seed + 3)))
    overall = _agreement(data, [], opts).iloc[0]
    sec.add(Paragraph(f"Answer agreement over all pairs: {fmt_ci(overall['agreement'], overall['ci_low'], overall['ci_high'])} "
                      f"(n = {int(overall['n_parsed'])} pairs with two parsed yes/no answers)."))
    by_f = _js_by_finding(data, opts)
    disp = pd.DataFrame({"finding": by_f["finding"], "method": by_f["method"], "pairs": by_f["n"],
                         "mean JS [95%]": [fmt_ci(r.mean, r.ci_low, r.ci_high) for r in by_f.itertuples()],
                         "median JS": by_f["median"].map(fmt_num), "pass_js": by_f["pass_js"].map(fmt_num)})
    sec.add(Table("js_by_finding", disp, data=by_f, caption="JS divergence by finding and method", max_rows=120))
    pairs = _prompt_pairs(data, methods, opts)
    sec.add(Table("js_by_prompt_pair", pairs, caption="By pair of phrasings (mean JS per method)",
                  max_rows=80, collapsed=len(pairs) > 20))
    by_c = long_stats(D.summarise(data, D.sensitivity_rows(), {"comparison": "comparison", "method": "method"},
                              {"js_divergence": num("js_divergence")}, opts.bootstrap, opts.seed + 3)).drop(columns="score")
    ag_c = _agreement(data, ["comparison"], opts).set_index("comparison")["agreement"]
    disp_c = pd.DataFrame({"comparison": by_c["comparison"], "method": by_c["method"], "pairs": by_c["n"],
                           "mean JS [95%]": [fmt_ci(r.mean, r.ci_low, r.ci_high) for r in by_c.itertuples()],
                           "answer agreement": [fmt_num(ag_c.get(c_, math.nan)) for c_ in by_c["comparison"]]})
    sec.add(Table("js_by_style_format", disp_c, data=by_c, caption="By kind of rephrasing (style / format instruction)"))
    sec.add(*_js_figures(data, methods, sorted(by_f["finding"].unique())))
    return sec


# ---------------------------------------------------------------------------------------------
# laterality

SIDE_SQL = "(CASE WHEN finding_side IS NOT NULL AND finding_side <> '' THEN finding_side ELSE '(unknown)' END)"


def _midline_blocks(data: RunData) -> list:
    """Where the patient's midline came from, per image (body_masks/): found on the image, or the
    image's centre column with the reason."""
    if not data.has("body_masks"):
        return [Note("No body_masks/ table: where each image's midline came from is not known here.")]
    t = data.sql("SELECT coalesce(midline_source, '(none stored)') AS source, count(DISTINCT image_id) AS images, "
                 "min(midline_reason) AS example_reason FROM body_masks WHERE error IS NULL GROUP BY ALL ORDER BY 1")
    n = int(t["images"].sum())
    found = int(t.loc[t["source"] == "image", "images"].sum())
    text = (f"The patient's midline was found on {found} of {n} images; on the others laterality splits at the "
            "image's centre column (the reason is recorded per image in body_masks/, `midline_reason`).")
    return [Paragraph(text), Table("midline_sources", t, caption="Midline source per image")]


def laterality_section(data: RunData, opts: Options) -> Section:
    sec = Section("laterality", "Laterality")
    if not data.has("metrics"):
        return sec.add(missing_note(data, "metrics", "no laterality scores"))
    prim, desc = primary_kinds(data.distinct("metrics", "target_kind"))
    lat = (f"SELECT *, {SIDE_SQL} AS side FROM ({D.metrics_rows(prim)}) AS l "
           "WHERE isfinite(CAST(patient_left_fraction AS DOUBLE))")
    values = {"patient_left_fraction": num("patient_left_fraction")}
    both = long_stats(D.summarise(data, lat, {"side": "side", "method": "method"},
                                  {**values, "centre": num("patient_left_fraction_centre")}, opts.bootstrap,
                                  opts.seed + 4))
    s = both[both["score"] == "patient_left_fraction"].drop(columns="score")
    centre = (both[both["score"] == "centre"].set_index(["side", "method"])[["mean", "ci_low", "ci_high"]]
              .add_prefix("centre_"))
    s = s.merge(centre, left_on=["side", "method"], right_index=True, how="left")
    if s.empty:
        return sec.add(Note("No frontal-view target has a patient_left_fraction: no laterality summary."))
    methods = F.method_order(list(s["method"].unique()))
    sides = [x for x in F.SIDE_ORDER if x in set(s["side"])] + sorted(set(s["side"]) - set(F.SIDE_ORDER))
    s["side"] = pd.Categorical(s["side"], sides, ordered=True)
    s = s.sort_values(["side", "method"]).reset_index(drop=True)
    s["side"] = s["side"].astype(str)
    disp = pd.DataFrame({"finding side": s["side"], "method": s["method"], "targets": s["n"],
                         "patient-left fraction [95%]": [fmt_ci(r.mean, r.ci_low, r.ci_high) for r in s.itertuples()],
                         "median": s["median"].map(fmt_num),
                         "split at the image centre [95%]": [fmt_ci(r.centre_mean, r.centre_ci_low, r.centre_ci_high)
                                                             for r in s.itertuples()]})
    sec.add(Paragraph(f"Share of the map's mass on the patient's left (the image's right) for frontal views ({desc}), "
                      "by the known side of the finding's boxes. The split is the patient's midline (the mediastinum "
                      "line found on each image; `patient_left_fraction`); the last column splits at the image's "
                      "centre column instead (`patient_left_fraction_centre`), which a patient lying off-centre "
                      "shifts. A map that follows the finding has a high value for left-sided findings and a low "
                      "one for right-sided findings; 0.5 is balanced. Unknown side: no boxes for the target's "
                      "finding. Intervals: patient-level cluster bootstrap 95%."))
    sec.add(Table("laterality", disp, data=s, caption="patient_left_fraction by the finding's side"))
    sec.add(*_midline_blocks(data))
    box = D.box_stats(data, D.project(lat, {"side": "side", "method": "method"}, values), ["side", "method"],
                      ["patient_left_fraction"])
    png = F.grouped_boxes(box, "side", sides, methods, hline=0.5,
                          title="Patient-left fraction by the finding's known side",
                          ylabel="mass on the patient's left / total", xlabel="finding side (from the boxes)")
    if png:
        sec.add(Figure("laterality", png, "patient_left_fraction by the finding's side; dotted: 0.5."))
    return sec


# ---------------------------------------------------------------------------------------------
# gallery


def gallery_section(data: RunData, opts: Options) -> Section:
    """Overlays for up to `gallery_size` targets (only when images may be included)."""
    from reports import gallery as G

    sec = Section("gallery", "Gallery")
    if not opts.include_images:
        return sec.add(Note("Patient images are left out of this report (`report.include_images=false`, e.g. for "
                            "MIMIC-CXR, whose data use agreement forbids sharing them): no gallery."))
    if opts.gallery_size <= 0:
        return sec.add(Note("`report.gallery_size=0`: no gallery."))
    if not data.has("relevancy"):
        return sec.add(missing_note(data, "relevancy", "no maps to show"))
    if not data.has("samples"):
        return sec.add(missing_note(data, "samples", "no image paths"))
    items = G.select_targets(data, opts.gallery_size, opts.seed)
    if not items:
        return sec.add(Note("No target was explained (no relevancy row with status ok): no gallery."))
    ids = sorted({i.sample_id for i in items})
    maps = data.relevancy_maps(ids)
    by_id = {r["sample_id"]: r for r in data.rows_where("samples", "sample_id", ids).to_dict("records")}
    gens = data.rows_where("generations", "sample_id", ids, ["answer"])
    answers = dict(zip(gens["sample_id"], gens["answer"]))
    methods = F.method_order(data.distinct("relevancy", "method"))
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
