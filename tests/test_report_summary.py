"""The report leads with its findings: the summary (sentences, one table, one figure) comes first,
the pixel-space localisation protocols, shortcut diagnostics and side agreement per method equal
the metrics rows, published values are labelled as other models', identity comes last."""
from __future__ import annotations

import re
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from test_report import build_run, make_report

PRIMARY = ("keywords", "answer_token", "answer_span")  # the synthetic run's kinds but answer_tokens


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    d = build_run(tmp_path_factory.mktemp("summary") / "run")
    ctx = make_report(d)
    return d, ctx.manifest.data["stages"]["report"]


def _boxed(met: pd.DataFrame) -> pd.DataFrame:
    m = met[met["target_kind"].isin(PRIMARY)]
    return m[np.isfinite(m["box_mass_fraction"]) | np.isfinite(m["pointing_hit"])]


def test_report_opens_with_the_summary_and_ends_with_identity(reported):
    run_dir, summary = reported
    assert summary["failed_sections"] == []
    md = (run_dir / "report" / "report.md").read_text()
    html = (run_dir / "report" / "report.html").read_text()
    headings = re.findall(r"^## (.+)$", md, flags=re.M)
    assert headings[0] == "Summary" and headings[-1] == "Run identity"
    assert headings.index("Counts and errors") > headings.index("Localisation against ground-truth boxes")
    assert re.findall(r"<h2[^>]*>([^<]+)</h2>", html)[0] == "Summary"
    first = md.split("## Summary", 1)[1].split("\n## ", 1)[0]
    assert "accuracy is" in first and "points inside the boxes" in first and "deletion AUC − random" in first
    assert "BioViL-T reports CNR 1.33" in first and "not this run" in first
    assert "sink-dominated maps in more than 10% of targets: raw_attention" in first
    assert "figures/summary.png" in first and (run_dir / "report" / "figures" / "summary.png").stat().st_size > 0


def test_summary_numbers_are_the_detail_tables(reported):
    rep = reported[0] / "report" / "tables"
    s = pd.read_csv(rep / "summary.csv").set_index("method")
    loc = pd.read_csv(rep / "localisation.csv").set_index("method")
    fa = pd.read_csv(rep / "faithfulness_auc.csv").set_index("method")
    dg = pd.read_csv(rep / "diagnostics.csv").set_index("method")
    for m in ("chefer", "raw_attention", "rollout", "random"):
        assert s.loc[m, "localisation.cnr"] == pytest.approx(loc.loc[m, "cnr"])
        assert s.loc[m, "localisation.iou"] == pytest.approx(loc.loc[m, "iou"])
        assert s.loc[m, "faithfulness.d_diff"] == pytest.approx(fa.loc[m, "d_diff"])
        assert s.loc[m, "diagnostics.border_fraction"] == pytest.approx(dg.loc[m, "border_fraction"])


def test_localisation_reports_the_pixel_protocols(reported):
    run_dir = reported[0]
    loc = pd.read_csv(run_dir / "report" / "tables" / "localisation.csv").set_index("method")
    boxed = _boxed(pd.read_parquet(run_dir / "metrics"))
    for m, g in boxed.groupby("method"):
        for col, score in (("iou", "box_iou"), ("iou_top", "iou_top"), ("cnr", "cnr"), ("pointing", "pointing_hit")):
            x = g[score].dropna()
            assert loc.loc[m, col] == pytest.approx(x.mean()) and loc.loc[m, f"{col}_n"] == len(x)
            assert loc.loc[m, f"{col}_lo"] <= loc.loc[m, col] <= loc.loc[m, f"{col}_hi"]
    assert loc.loc["chefer", "cnr_lo"] > loc.loc["random", "cnr_hi"]
    md = (run_dir / "report" / "report.md").read_text()
    section = md.split("## Localisation against ground-truth boxes", 1)[1].split("\n## ", 1)[0]
    assert "| mIoU (Otsu) | mIoU (top 0.1) | CNR |" in section
    assert "Saporta et al. 2022" in section and "Boecking et al. 2022" in section
    pub = pd.read_csv(run_dir / "report" / "tables" / "published_localisation.csv")
    assert "model (not this run's)" in pub.columns and "Published values of other models (not this run)" in section
    row = pub[(pub["model (not this run's)"] == "BioViL-T") & (pub["metric"] == "mIoU")].iloc[0]
    assert str(row["value"]) in ("0.24", "0.240") and "MS-CXR" in row["dataset"]


def test_diagnostics_and_side_agreement_per_method(reported):
    run_dir = reported[0]
    met = pd.read_parquet(run_dir / "metrics")
    prim = met[met["target_kind"].isin(PRIMARY)]
    dg = pd.read_csv(run_dir / "report" / "tables" / "diagnostics.csv").set_index("method")
    for m, g in prim.groupby("method"):
        sink = (np.fmax(g["first_token_fraction"], g["corner_fraction"]) > 0.5).astype(float)
        assert dg.loc[m, "sink_dominated"] == pytest.approx(sink.mean())
        assert dg.loc[m, "first_token_fraction"] == pytest.approx(g["first_token_fraction"].mean())
        assert dg.loc[m, "inside_body_ratio"] == pytest.approx(g["inside_body_ratio"].mean())
        side = g["side_agrees"].dropna()
        assert len(side) > 0 and dg.loc[m, "side_agrees"] == pytest.approx(side.mean())
        assert dg.loc[m, "side_majority"] == pytest.approx((side > 0.5).mean())
    assert dg.loc["raw_attention", "sink_dominated"] > 0.1 and dg.loc["chefer", "sink_dominated"] == 0.0
    side_table = pd.read_csv(run_dir / "report" / "tables" / "side_agreement.csv")
    assert list(side_table.columns[:2]) == ["method", "targets stating a side"]


def test_summary_says_what_was_not_measured(reported, tmp_path):
    """Without faithfulness curves, boxes or answers the summary says so instead of failing."""
    d = tmp_path / "run"
    shutil.copytree(reported[0], d)
    for name in ("faithfulness", "answers"):
        shutil.rmtree(d / name)
    met = pd.read_parquet(d / "metrics")
    for c in ("pointing_hit", "box_mass_fraction", "box_area_fraction", "box_iou", "iou_top", "cnr"):
        met[c] = np.nan
    shutil.rmtree(d / "metrics")
    from pipeline.store import RunStore

    table = RunStore(d).table("metrics")
    table.write_rows(pa.Table.from_pandas(met, schema=table.spec.schema, preserve_index=False), tag="s00000")
    ctx = make_report(d)
    assert ctx.manifest.data["stages"]["report"]["failed_sections"] == []
    md = (d / "report" / "report.md").read_text()
    first = md.split("## Summary", 1)[1].split("\n## ", 1)[0]
    assert "localisation is not measured" in first and "Faithfulness was not measured" in first
    assert "No yes/no answers were scored" in first
