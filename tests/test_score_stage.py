"""Stage score on the demo: one metrics row per explained target and method, localisation against
the target's own finding, thresholds, prompt-sensitivity pairs, answers against labels; resume."""
from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import metrics
from conftest import run_pipeline
from pipeline.store import RunStore

OVERRIDES = ["stages=[load,generate,explain,score]", "dataset.n=4", "prompts=sensitivity",
             "prompts.only_findings=[Pleural Effusion]", "generate.max_new_tokens=6",
             "explain.methods=[chefer,raw_attention,random]", "metrics.max_border_fraction=0.2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("score_run")
    run_pipeline([*OVERRIDES, f"run_dir={d}", f"model.name_or_path={tiny_model_dir}", "model.device=cpu"])
    return d


def test_metrics_rows_match_relevancy_and_recompute(run_dir):
    rel = pd.read_parquet(run_dir / "relevancy")
    ok = rel[rel["status"] == "ok"]
    m = pd.read_parquet(run_dir / "metrics")
    keys = ["sample_id", "target_kind", "target_label", "token_start", "method"]
    assert len(m) == len(ok) and not m.duplicated(keys).any()
    samples = pd.read_parquet(run_dir / "samples").set_index("sample_id")
    row = m.merge(ok, on=keys).iloc[0]
    s = samples.loc[row["sample_id"]]
    from pipeline.body_masks import decode
    from pipeline.images import read_image

    masks = RunStore(run_dir).table("body_masks").read()  # written by load, one per image
    assert sorted(masks["image_id"]) == sorted(samples["image_id"].unique()) and masks["error"].isna().all()
    assert not (run_dir / "cache").exists()  # no per-image files
    pixels = read_image(s["image_path"]).pixels
    body = metrics.body_mask(pixels)
    stored_row = masks.set_index("image_id").loc[s["image_id"]].to_dict() | {"image_id": s["image_id"]}
    np.testing.assert_array_equal(decode(stored_row), body)
    line = metrics.patient_midline(metrics.to_grey01(pixels), body)  # the phantoms are not inverted
    assert (stored_row["midline_source"], stored_row["midline_x0"]) == (line.source, pytest.approx(line.x0))
    assert masks["midline_source"].notna().all()
    boxes = [(b["x"], b["y"], b["w"], b["h"]) for b in s["boxes"] if b["finding"] == row["finding"]]
    grid = np.asarray(row["image_map"]).reshape(int(row["grid_h"]), int(row["grid_w"]))
    expect = metrics.score_map(grid, body, s["view_position"], boxes or None, midline_x=line.per_row())
    for k in ("inside_body_ratio", "border_fraction", "entropy_bits", "patient_left_fraction",
              "patient_left_fraction_centre", "box_mass_fraction"):
        assert row[k] == pytest.approx(expect[k], rel=1e-5, nan_ok=True), k
    centre = metrics.score_map(grid, body, s["view_position"], boxes or None)["patient_left_fraction"]
    assert row["patient_left_fraction_centre"] == pytest.approx(centre, rel=1e-5, nan_ok=True)


def test_localisation_uses_the_targets_own_finding(run_dir):
    m = pd.read_parquet(run_dir / "metrics")
    yn = m[(m["prompt_kind"] == "yes_no") & m["target_kind"].isin(["answer_token", "answer_span"])]
    assert set(yn["finding"]) == {"Pleural Effusion"}
    tokens = m[m["target_kind"] == "answer_tokens"]  # explained for the token explorer only
    assert len(tokens) > 0 and tokens["finding"].isna().all()
    free = m[(m["prompt_kind"] == "free_text") & (m["target_kind"] == "answer_span")]
    assert free["finding"].isna().all() and free["pointing_hit"].isna().all()
    with_boxes = m[m["n_boxes"] > 0]
    assert with_boxes["box_mass_fraction"].notna().all() and with_boxes["finding_side"].isin(["left", "right", "bilateral"]).all()


def test_flags_are_derived_not_stored(run_dir):
    m = pd.read_parquet(run_dir / "metrics")
    assert not [c for c in m.columns if c.startswith("pass_")]  # never stale: derived where reported
    flags = metrics.map_flags(m, metrics.Thresholds(max_border_fraction=0.2))
    np.testing.assert_array_equal(flags["pass_inside_body"] == 1, m["inside_body_ratio"] >= 0.7)
    np.testing.assert_array_equal(flags["pass_border"] == 1, m["border_fraction"] <= 0.2)
    frontal = m["view_position"].isin(["PA", "AP"])
    assert np.isnan(flags["pass_laterality_balance"][~frontal.to_numpy()]).all()
    strict = metrics.map_flags(m, metrics.Thresholds(min_inside_body_ratio=0.99))
    np.testing.assert_array_equal(strict["pass_inside_body"] == 1, m["inside_body_ratio"] >= 0.99)


def test_sensitivity_pairs(run_dir):
    sens = pd.read_parquet(run_dir / "sensitivity")
    samples = pd.read_parquet(run_dir / "samples")
    n_variants = samples[samples["prompt_finding"] == "Pleural Effusion"].groupby("image_id")["prompt_id"].nunique()
    span = sens[(sens["target_kind"] == "answer_span") & (sens["target_label"] == "Pleural Effusion")
                & (sens["method"] == "chefer")]
    for image_id, k in n_variants.items():
        assert (span["image_id"] == image_id).sum() == len(list(combinations(range(k), 2)))
    assert sens["js_divergence"].between(0, 1).all()
    np.testing.assert_allclose(sens["js_distance"] ** 2, sens["js_divergence"], rtol=1e-5)
    assert ((sens["style_a"] != sens["style_b"]) | (sens["format_a"] != sens["format_b"])).any()


def test_answers_against_labels(run_dir):
    a = pd.read_parquet(run_dir / "answers")
    samples = pd.read_parquet(run_dir / "samples").set_index("sample_id")
    assert set(a["sample_id"]) == set(samples.index[samples["prompt_kind"] == "yes_no"])
    states = {1.0: "positive", 0.0: "negative", -1.0: "uncertain"}
    for r in a.itertuples():
        lab = samples.loc[r.sample_id, "label_pleural_effusion"]
        assert r.label_state == states.get(None if np.isnan(lab) else lab, "not_mentioned")
        assert r.parsed == metrics.parse_yes_no(r.answer)


def test_score_resume_adds_nothing(run_dir, tiny_model_dir):
    before = {t: len(pd.read_parquet(run_dir / t)) for t in ("metrics", "sensitivity", "answers")}
    run_pipeline([*OVERRIDES, f"run_dir={run_dir}", f"model.name_or_path={tiny_model_dir}", "model.device=cpu",
                  "stages=[score]"])
    assert before == {t: len(pd.read_parquet(run_dir / t)) for t in before}


def test_protocol_and_sink_columns(run_dir):
    m = pd.read_parquet(run_dir / "metrics")
    for col in ("iou_top", "cnr", "first_token_fraction", "corner_fraction", "side_agrees"):
        assert col in m.columns, col
    assert m["first_token_fraction"].between(0, 1).all() and (m["corner_fraction"] >= m["first_token_fraction"] - 1e-6).all()
    with_boxes = m[m["n_boxes"] > 0]
    assert with_boxes["iou_top"].between(0, 1).all()
    assert m.loc[m["n_boxes"] == 0, ["iou_top", "cnr"]].isna().all().all()
    assert m.loc[m["target_kind"] != "laterality", "side_agrees"].isna().all()


def test_stated_side_share():
    from pipeline.stages.score import stated_side_share

    assert stated_side_share("laterality", "Left", 0.8) == pytest.approx(0.8)
    assert stated_side_share("laterality", "right", 0.8) == pytest.approx(0.2)
    assert np.isnan(stated_side_share("keywords", "left", 0.8))
    assert np.isnan(stated_side_share("laterality", "left", float("nan")))  # lateral view


def test_body_masks_rows_without_a_midline_are_computed_again(tmp_path):
    """A body_masks/ row written before midlines were stored is recomputed from the image; the
    complete row then wins over the old one, and a constant image keeps its error row."""
    from PIL import Image

    from pipeline.body_masks import ShardBodyMasks, decode, midline_split

    path = Path(__file__).parent / "data" / "real_cxr" / "hannover" / "images" / "0a7faa2a.png"
    pixels = np.asarray(Image.open(path))
    h, w = pixels.shape[:2]
    body = metrics.body_mask(pixels)
    old = {"image_id": "a", "image_sha256": "d", "height": h, "width": w, "error": None, "shard": 0,
           "mask": np.packbits(body, axis=None).tobytes()}  # no midline columns: an older row
    flat = tmp_path / "flat.png"
    Image.fromarray(np.full((64, 64), 7, np.uint8)).save(flat)
    view = RunStore(tmp_path / "run").shard(0, 1)
    view.write_rows("body_masks", [old])
    masks = ShardBodyMasks(view, ["a", "b"], 60_000_000)
    row = masks.row("a", str(path), "d")
    line = metrics.patient_midline(metrics.to_grey01(pixels), body)
    assert row["midline_source"] == line.source == "image" and row["midline_x0"] == pytest.approx(line.x0)
    np.testing.assert_allclose(midline_split(row), line.per_row())
    np.testing.assert_array_equal(decode(row), body)
    with pytest.raises(ValueError, match="no body mask for image b"):
        masks.get("b", str(flat), "e")
    masks.save()
    again = ShardBodyMasks(view, ["a", "b"], 60_000_000)
    assert again.rows["a"]["midline_source"] == "image" and again.new_rows == []
    assert "constant image" in again.row("b", str(flat), "e")["error"] and again.new_rows == []
