"""Stage `score`: map scores -> metrics/, prompt sensitivity -> sensitivity/, answers -> answers/.

metrics/: one row per relevancy row with status "ok": every score of `metrics.score_map`, placed
on the original image (non-uniform scaling), with localisation against the boxes of the target's
own finding: a keyword target's finding, a laterality word's finding (the one it places), or the
finding a yes/no prompt asks about for answer_token and answer_span targets (other targets are
not localised). Pass/fail flags are not stored: they are derived where they are reported, from
these raw scores and the thresholds in force (`metrics.quality`, `conf/metrics/`). Body masks
come from body_masks/ (written by the load stage; computed and stored here for images that have
none). Only this shard's rows are read.

sensitivity/: for each image, target and method, every pair of prompt variants that both have a
map for it: Jensen-Shannon divergence (bits) and distance of their maps, both answers, their
yes/no readings and whether they agree (null unless both are yes/no questions with a readable
answer: yes, no or uncertain). The target is identified across variants by its finding
(keywords and laterality: the finding named or placed; answer_token and answer_span of yes/no prompts: the finding asked
about; answer_span of free-text prompts: "answer"). Several occurrences in one answer are
averaged (maps normalised to mass 1 first).

answers/: each yes/no sample's answer read as yes / no / uncertain / unparsed, beside the
dataset's label for the asked finding (positive, negative, uncertain and not mentioned apart).
"""
from __future__ import annotations

import itertools
import logging
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.dataset as ds

from pipeline.body_masks import ShardBodyMasks, decode, midline_split
from pipeline.stages.common import shard_samples
from pipeline.vocabulary import label_column

log = logging.getLogger(__name__)

KEYS = ["sample_id", "target_kind", "target_label", "token_start", "method"]
SCORE_CHUNK_IMAGES = 256  # images whose maps are held at once


def localisation_finding(target_kind: str, target_label: str, prompt_kind: str, prompt_finding: Any) -> str | None:
    """The finding whose boxes a target is scored against (None: not localised)."""
    if target_kind in ("keywords", "laterality"):
        return target_label
    if target_kind in ("answer_token", "answer_span") and prompt_kind == "yes_no" and isinstance(prompt_finding, str):
        return prompt_finding
    return None


def sensitivity_label(target_kind: str, target_label: str, prompt_kind: str, prompt_finding: Any) -> str | None:
    """How a target is matched across prompt variants of one image (None: not compared)."""
    if target_kind in ("keywords", "laterality"):
        return target_label
    if target_kind in ("answer_token", "answer_span") and prompt_kind == "yes_no" and isinstance(prompt_finding, str):
        return prompt_finding
    if target_kind == "answer_span":
        return "answer"
    return None


def finding_side(boxes: list[dict], split_x: np.ndarray) -> str | None:
    """Patient side of a finding's boxes: a box whose centre lies right of the patient's midline
    (`split_x`: its x per image row, pixels) is on the patient's left (radiological convention).
    Boxes on both sides: "bilateral"."""
    if not boxes:
        return None
    last = len(split_x) - 1
    sides = {"left" if b["x"] + b["w"] / 2 > split_x[min(max(int(b["y"] + b["h"] / 2), 0), last)] else "right"
             for b in boxes}
    return sides.pop() if len(sides) == 1 else "bilateral"


def stated_side_share(target_kind: str, matched_text: Any, patient_left_fraction: float) -> float:
    """side_agrees: for a laterality target, the map's mass on the side its word states (patient
    left: patient_left_fraction; right: 1 - it); NaN for other targets or non-frontal views."""
    word = str(matched_text or "").strip().lower()
    if target_kind != "laterality" or word not in ("left", "right"):
        return np.nan
    return patient_left_fraction if word == "left" else 1.0 - patient_left_fraction


def _metric_row(r: dict[str, Any], s: pd.Series, image_id: str, body: tuple[np.ndarray, np.ndarray], scorers: dict,
                ctx) -> dict[str, Any]:
    """The metrics/ row of one relevancy row `r` of sample `s` (`body`: the image's mask and its
    midline per row; scorers cached per image)."""
    import metrics

    finding = localisation_finding(r["target_kind"], r["target_label"], s["prompt_kind"], s["prompt_finding"])
    boxes = [b for b in (s["boxes"] if s["boxes"] is not None else []) if finding and b["finding"] == finding]
    key = (finding if boxes else None, s["view_position"])
    if key not in scorers:
        scorers[key] = metrics.MapScorer(body[0], s["view_position"],
                                         [(b["x"], b["y"], b["w"], b["h"]) for b in boxes] or None,
                                         top_fraction=float(ctx.cfg.metrics.iou_top_fraction), midline_x=body[1])
    grid = np.asarray(r["image_map"], dtype=np.float64).reshape(int(r["grid_h"]), int(r["grid_w"]))
    sc = scorers[key].score(grid)
    return {
        **{k: r[k] for k in KEYS},
        "image_id": image_id, "prompt_id": s["prompt_id"], "prompt_kind": s["prompt_kind"],
        "view_position": s["view_position"], "finding": finding,
        "finding_side": finding_side(boxes, body[1]), "n_boxes": len(boxes),
        **{k: sc.get(k, np.nan) for k in metrics.SCORE_KEYS},
        "side_agrees": stated_side_share(r["target_kind"], r.get("matched_text"), sc["patient_left_fraction"]),
        "shard": ctx.shard,
    }


def _metrics_rows(ctx, samples: pd.DataFrame, rel: pd.DataFrame, done: set, failed: set) -> tuple[int, int]:
    """metrics/ rows of relevancy rows `rel` whose key is not in `done`; a row that cannot be
    scored (an image with no body mask, a malformed map or box) is an errors/ row of its sample,
    once, and is not tried again on resume (`failed`) unless retry_errors."""
    rel = rel[[tuple(k) not in done and k[0] not in failed for k in rel[KEYS].itertuples(index=False, name=None)]]
    if rel.empty:
        return 0, 0
    masks = ShardBodyMasks(ctx.view, sorted(rel["image_id"].unique()), ctx.cfg.dataset.max_pixels)
    by_id = samples.set_index("sample_id")
    n_rows, errors = 0, set()

    def fail(sid: str, image_id: str, e: Exception) -> None:
        if sid not in errors:
            ctx.record_error("score", sid, e, image_id=image_id)
            errors.add(sid)

    with ctx.writer("metrics") as writer:
        groups = rel.groupby("image_id", sort=True)
        for image_id, grp in ctx.progress(groups, total=groups.ngroups, desc="score"):
            first = by_id.loc[grp["sample_id"].iloc[0]]
            try:
                row = masks.row(image_id, first["image_path"], first["image_sha256"])
                body = (decode(row), midline_split(row))
            except Exception as e:  # e.g. a constant image has no body to find
                for sid in grp["sample_id"].unique():
                    fail(sid, image_id, e)
                continue
            scorers: dict[Any, Any] = {}
            for r in grp.to_dict("records"):
                try:
                    writer.add(_metric_row(r, by_id.loc[r["sample_id"]], image_id, body, scorers, ctx))
                    n_rows += 1
                except Exception as e:  # one bad row never stops the stage
                    fail(r["sample_id"], image_id, e)
            writer.maybe_flush()
    masks.save()
    return n_rows, len(errors)


def _normalised(grid: np.ndarray) -> np.ndarray | None:
    total = float(grid.sum())
    return None if not np.isfinite(total) or total <= 0 else grid / total


def _sensitivity_rows(ctx, samples: pd.DataFrame, rel: pd.DataFrame, gens: pd.DataFrame, done: set) -> int:

    if rel.empty:
        return 0
    s = samples.set_index("sample_id")
    answer_of = dict(zip(gens["sample_id"], gens["answer"]))
    rel = rel.join(s[["prompt_id", "prompt_kind", "prompt_finding", "prompt_style", "format_instruction"]], on="sample_id")
    rel["group"] = [sensitivity_label(k, lab, pk, pf) for k, lab, pk, pf in
                    zip(rel["target_kind"], rel["target_label"], rel["prompt_kind"], rel["prompt_finding"])]
    rel = rel[rel["group"].notna()]
    rows: list[dict[str, Any]] = []
    failed: set[str] = set()
    for (image_id, kind, group, method), grp in rel.groupby(["image_id", "target_kind", "group", "method"], sort=True):
        try:
            rows += _pair_rows(ctx, s, answer_of, done, (image_id, kind, group, method), grp)
        except Exception as e:  # one bad group never stops the stage: an errors/ row for its image
            if image_id not in failed:
                image_sid = grp["sample_id"].iloc[0].rsplit(":", 1)[0] + ":*"
                ctx.record_error("sensitivity", image_sid, e, image_id=image_id, detail=f"{kind} {group} {method}")
                failed.add(image_id)
    with ctx.writer("sensitivity") as writer:
        writer.add(rows)
    return len(rows)


def _pair_rows(ctx, s: pd.DataFrame, answer_of: dict, done: set, group_key: tuple, grp: pd.DataFrame) -> list[dict]:
    """sensitivity/ rows of one (image, target kind, target group, method): every pair of prompt
    variants with a map, unless already stored."""
    import metrics

    image_id, kind, group, method = group_key
    rows = []
    maps = {}
    for sid, sub in grp.groupby("sample_id"):
        normed = [_normalised(np.asarray(m, np.float64)) for m in sub["image_map"]]
        normed = [m for m in normed if m is not None]
        if normed:
            maps[sid] = np.mean(normed, axis=0)
    for a, b in itertools.combinations(sorted(maps), 2):
        pa, pb = s.loc[a], s.loc[b]
        key = (image_id, kind, group, method, pa["prompt_id"], pb["prompt_id"])
        if key in done:
            continue
        js = metrics.js_divergence(maps[a], maps[b])
        parsed = [metrics.parse_yes_no(answer_of.get(x, "")) if p["prompt_kind"] == "yes_no" else None
                  for x, p in ((a, pa), (b, pb))]
        rows.append({
            "image_id": image_id, "target_kind": kind, "target_label": group, "method": method,
            "prompt_a": pa["prompt_id"], "prompt_b": pb["prompt_id"], "style_a": pa["prompt_style"],
            "style_b": pb["prompt_style"], "format_a": bool(pa["format_instruction"]),
            "format_b": bool(pb["format_instruction"]), "js_divergence": js, "js_distance": float(np.sqrt(js)),
            "answer_a": answer_of.get(a), "answer_b": answer_of.get(b), "parsed_a": parsed[0], "parsed_b": parsed[1],
            "answers_agree": None if None in parsed or "unparsed" in parsed else parsed[0] == parsed[1],
            "shard": ctx.shard,
        })
    return rows


LABEL_STATES = {1.0: "positive", 0.0: "negative", -1.0: "uncertain"}


def _answer_rows(ctx, samples: pd.DataFrame, gens: pd.DataFrame) -> int:
    import metrics

    done = {k[0] for k in ctx.view.keys("answers", foreign_filter=ds.field("sample_id").isin(sorted(samples["sample_id"])))}
    if not ctx.cfg.retry_errors:
        done |= ctx.view.error_keys("answers", ds.field("sample_id").isin(sorted(samples["sample_id"])))
    yn = samples[(samples["prompt_kind"] == "yes_no") & ~samples["sample_id"].isin(done)]
    answer_of = dict(zip(gens["sample_id"], gens["answer"]))
    rows = []
    for r in yn.to_dict("records"):
        if r["sample_id"] not in answer_of:
            continue
        try:
            label = r[label_column(r["prompt_finding"])]
            label = None if label is None or np.isnan(label) else float(label)
            parsed = metrics.parse_yes_no(answer_of[r["sample_id"]])
        except Exception as e:  # one bad row never stops the stage
            ctx.record_error("answers", r["sample_id"], e, image_id=r["image_id"])
            continue
        definite = parsed in ("yes", "no") and label in (0.0, 1.0)
        rows.append({
            "sample_id": r["sample_id"], "image_id": r["image_id"], "prompt_id": r["prompt_id"],
            "finding": r["prompt_finding"], "answer": answer_of[r["sample_id"]], "parsed": parsed, "label": label,
            "label_state": LABEL_STATES.get(label, "not_mentioned"),
            "correct": (parsed == "yes") == (label == 1.0) if definite else None, "shard": ctx.shard,
        })
    with ctx.writer("answers") as writer:
        writer.add(rows)
    return len(rows)


def _pending_images(keys: pd.DataFrame, image_of: dict, done: set, failed: set, sens_images: set) -> list[str]:
    """Images with work left: a relevancy row without its metrics row (not failed), or two
    prompt variants with maps and no sensitivity row yet. Decided from keys alone: a finished
    shard's resume reads no map."""
    pending = set()
    for k in keys[KEYS].itertuples(index=False, name=None):
        if k not in done and k[0] not in failed:
            pending.add(image_of[k[0]])
    variants = keys.assign(image_id=[image_of[s] for s in keys["sample_id"]]).groupby("image_id")["sample_id"].nunique()
    pending |= {i for i, n in variants.items() if n >= 2 and i not in sens_images}
    return sorted(pending)


def run(ctx) -> dict[str, Any]:
    """Score this shard image chunk by image chunk (`SCORE_CHUNK_IMAGES` images' maps in memory
    at a time); answers once."""
    samples = shard_samples(ctx)
    ids = set(samples["sample_id"])
    only = ds.field("sample_id").isin(sorted(ids))
    image_of = dict(zip(samples["sample_id"], samples["image_id"]))
    ok = ds.field("status") == "ok"
    keys = ctx.view.read("relevancy", KEYS, filter=ok, foreign_filter=only)
    keys = keys[keys["sample_id"].isin(ids)].drop_duplicates(KEYS)
    done = ctx.view.keys("metrics", foreign_filter=only)
    failed = set() if ctx.cfg.retry_errors else ctx.view.error_keys("score", only)
    sens_only = ds.field("image_id").isin(sorted(samples["image_id"].unique()))
    sens_done = ctx.view.keys("sensitivity", foreign_filter=sens_only)
    pending = _pending_images(keys, image_of, done, failed, {k[0] for k in sens_done})
    gens = ctx.view.read("generations", ["sample_id", "answer"], foreign_filter=only)
    gens = gens[gens["sample_id"].isin(ids)]
    n_metrics = n_err = n_sens = 0
    for c in range(0, len(pending), SCORE_CHUNK_IMAGES):
        chunk = samples[samples["image_id"].isin(pending[c: c + SCORE_CHUNK_IMAGES])]
        wanted = ds.field("sample_id").isin(sorted(chunk["sample_id"]))
        rel = ctx.view.read("relevancy", KEYS + ["grid_h", "grid_w", "image_map", "matched_text"], filter=ok & wanted,
                            foreign_filter=wanted).drop_duplicates(KEYS)
        rel = rel.assign(image_id=[image_of[s] for s in rel["sample_id"]])
        m, e = _metrics_rows(ctx, chunk, rel, done, failed)
        n_metrics, n_err = n_metrics + m, n_err + e
        n_sens += _sensitivity_rows(ctx, chunk, rel, gens, sens_done)
    n_answers = _answer_rows(ctx, samples, gens)
    return {"metrics_rows": n_metrics, "sensitivity_rows": n_sens, "answer_rows": n_answers, "errors": n_err,
            "images_scored": len(pending)}
