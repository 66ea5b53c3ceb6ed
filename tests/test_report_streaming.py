"""The streaming report: part files in any layout, derived pass flags, the patient-level cluster
bootstrap, and aggregates (never per-row tables of the big tables) reaching pandas.

Small synthetic run directories are written here part file by part file (flat and in per-shard
folders, with and without the stored pass_* columns of earlier versions); the report is built
with :func:`reports.build.write_report` (no images), or its engine queried directly.
"""
from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.schemas import TABLES

OLD_FLAGS = [("pass_inside_body", pa.bool_()), ("pass_border", pa.bool_()), ("pass_entropy", pa.bool_()),
             ("pass_laterality_balance", pa.bool_())]


def write_part(run: Path, table: str, rows: list[dict], folder: str | None = None,
               extra: list[tuple[str, pa.DataType]] = (), drop: tuple[str, ...] = ()) -> Path:
    """One part file of `table` (schema plus `extra` columns, minus `drop`) in `folder`."""
    fields = [f for f in TABLES[table].schema if f.name not in drop and f.name not in dict(extra)]
    schema = pa.schema([*fields, *[pa.field(n, t) for n, t in extra]])
    d = run / table / folder if folder else run / table
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"part-s00000-{uuid.uuid4().hex}.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def sample_rows(patients: dict[str, int]) -> list[dict]:
    """One PA image per (patient, k), one free-text prompt each; subject_id = patient."""
    return [{"sample_id": f"syn:{p}_{k}:free", "dataset": "syn", "image_id": f"{p}_{k}", "study_id": f"{p}_{k}",
             "subject_id": p, "view_position": "PA", "prompt_id": "free", "prompt_kind": "free_text",
             "width": 64, "height": 64, "boxes": [], "shard": 0}
            for p, n in patients.items() for k in range(n)]


def f32(x: float) -> float:
    """A value as the float32 columns store it."""
    return float(np.float32(x))


def metric_rows(samples: list[dict], rng: np.random.Generator, per_image: int = 1,
                methods: tuple[str, ...] = ("chefer", "random")) -> list[dict]:
    """Keyword targets x methods with random scores (float32-exact)."""
    rows = []
    for s in samples:
        for t in range(per_image):
            for m in methods:
                rows.append({"sample_id": s["sample_id"], "target_kind": "keywords", "target_label": "Nodule",
                             "token_start": 10 + t, "method": m, "image_id": s["image_id"], "prompt_id": "free",
                             "prompt_kind": "free_text", "view_position": "PA", "finding": None,
                             "inside_body_ratio": f32(rng.uniform(0.5, 1.0)),
                             "border_fraction": f32(rng.uniform(0.0, 0.1)), "entropy_bits": 6.0,
                             "entropy_norm": f32(rng.uniform(0.7, 0.95)),
                             "patient_left_fraction": f32(rng.uniform(0.2, 0.8)), "pointing_hit": float("nan"),
                             "box_mass_fraction": float("nan"), "box_area_fraction": float("nan"), "shard": 0})
    return rows


def _opts(**kw):
    from reports.sections import Options

    return Options(include_images=False, bootstrap=200, gallery_size=0, explorer_samples=0, **kw)


def _report(run: Path, thresholds: dict | None = None, **kw) -> dict:
    from reports.build import write_report

    return write_report(run, _opts(**kw), thresholds=thresholds)


# ---------------------------------------------------------------------------------------------
# part files and derived flags


def test_shard_folders_are_read_and_hidden_files_are_not(tmp_path):
    """Parts flat in the table folder and in per-shard folders are read (union by name: columns
    one layout lacks read as null); "." files and folders (temporary, compaction) are not."""
    run = tmp_path / "run"
    rng = np.random.default_rng(0)
    samples = sample_rows({"p1": 3, "p2": 2, "p3": 1})
    write_part(run, "samples", samples)
    met = metric_rows(samples, rng)
    write_part(run, "metrics", met[:4], extra=OLD_FLAGS)  # an older flat part with stored flags
    write_part(run, "metrics", met[4:8], folder="shard-00000-of-00002", drop=("box_iou",))
    write_part(run, "metrics", met[8:], folder="shard-00001-of-00002")
    stale = [dict(r, inside_body_ratio=0.0) for r in met]
    (run / "metrics" / ".compact-shard-00001-of-00002-1").mkdir()
    write_part(run, "metrics", stale, folder=".compact-shard-00001-of-00002-1")
    hidden = write_part(run, "metrics", stale, folder="shard-00001-of-00002")
    hidden.rename(hidden.with_name(".tmp-" + hidden.name))
    summary = _report(run)
    assert summary["failed_sections"] == []
    rows = pd.read_csv(run / "report" / "tables" / "table_rows.csv").set_index("table")["rows"]
    assert rows["metrics"] == len(met) == 12 and rows["samples"] == len(samples)
    s = pd.read_csv(run / "report" / "tables" / "scores_keywords.csv")
    ref = pd.DataFrame(met)
    for m, g in ref.groupby("method"):
        row = s[(s["method"] == m) & (s["score"] == "inside_body_ratio")].iloc[0]
        assert row["n"] == len(g) and row["mean"] == pytest.approx(g["inside_body_ratio"].mean())
        assert s[(s["method"] == m) & (s["score"] == "box_iou")].iloc[0]["n"] == 0  # null in every part


def test_pass_flags_are_derived_with_the_thresholds_in_force(tmp_path):
    """Stored pass_* columns (all True here) are ignored: flags come from the raw scores and the
    thresholds given to the report, so a stricter threshold fails more targets."""
    run = tmp_path / "run"
    rng = np.random.default_rng(1)
    samples = sample_rows({"p1": 4, "p2": 4, "p3": 4})
    write_part(run, "samples", samples)
    met = metric_rows(samples, rng, per_image=2)
    write_part(run, "metrics", [dict(r, pass_inside_body=True, pass_border=True, pass_entropy=True,
                                     pass_laterality_balance=True) for r in met], extra=OLD_FLAGS)
    sens = [{"image_id": s["image_id"], "target_kind": "keywords", "target_label": "Nodule", "method": "chefer",
             "prompt_a": "a", "prompt_b": "b", "js_divergence": f32(js), "js_distance": f32(np.sqrt(js)),
             "answers_agree": True, "pass_js": True, "shard": 0}
            for s, js in zip(samples, np.linspace(0.05, 0.6, len(samples)))]
    write_part(run, "sensitivity", sens, extra=[("pass_js", pa.bool_())])
    ref = pd.DataFrame(met)
    for thr in (0.7, 0.99):
        _report(run, thresholds={"min_inside_body_ratio": thr, "max_js_divergence": 0.3})
        p = pd.read_csv(run / "report" / "tables" / "pass_rates.csv")
        for m, g in ref.groupby("method"):
            row = p[(p["method"] == m) & (p["check"] == "pass_inside_body")].iloc[0]
            assert row["n"] == len(g)
            assert row["passed"] == (g["inside_body_ratio"] >= thr).sum()
            assert row["fraction"] == pytest.approx((g["inside_body_ratio"] >= thr).mean())
            border = p[(p["method"] == m) & (p["check"] == "pass_border")].iloc[0]
            assert border["passed"] == (g["border_fraction"] <= 0.05).sum()  # default kept for keys not given
        md = (run / "report" / "report.md").read_text()
        assert f"min_inside_body_ratio={thr}" in md
    assert p["passed"].sum() < p["n"].sum()  # the stored flags were all True
    js = pd.read_csv(run / "report" / "tables" / "js_by_finding.csv").iloc[0]
    assert js["pass_js"] == pytest.approx(np.mean([r["js_divergence"] <= 0.3 for r in sens]))


def test_every_flag_of_metrics_quality_is_derived(tmp_path):
    """The engine hands map_flags every column it reads (here the attention-sink scores too):
    the report's flags equal metrics.quality.map_flags on the rows."""
    from metrics.quality import MAP_FLAGS, Thresholds, map_flags

    run = tmp_path / "run"
    rng = np.random.default_rng(12)
    samples = sample_rows({"p1": 3, "p2": 3})
    samples[0]["view_position"] = "LATERAL"
    write_part(run, "samples", samples)
    met = metric_rows(samples, rng, per_image=2)
    for i, r in enumerate(met):
        r["view_position"] = samples[i // 4]["view_position"]
        if i % 3:  # the others lack the sink scores (scored before they existed)
            r["first_token_fraction"], r["corner_fraction"] = f32(rng.uniform(0, 0.8)), f32(rng.uniform(0, 0.3))
    write_part(run, "metrics", met)
    _report(run, thresholds={"max_sink_fraction": 0.4})
    p = pd.read_csv(run / "report" / "tables" / "pass_rates.csv")
    ref = pd.DataFrame(met)
    for col in ("first_token_fraction", "corner_fraction"):
        ref[col] = ref[col].astype(float) if col in ref else np.nan
    want = map_flags({c: ref[c].to_numpy() for c in ref.columns}, Thresholds(max_sink_fraction=0.4))
    assert set(p["check"]) == set(MAP_FLAGS)
    for flag in MAP_FLAGS:
        for m in ("chefer", "random"):
            f = want[flag][(ref["method"] == m).to_numpy()]
            row = p[(p["method"] == m) & (p["check"] == flag)].iloc[0]
            assert (row["n"], row["passed"]) == (np.isfinite(f).sum(), np.nansum(f)), flag


def test_report_stage_passes_its_metrics_config(run_dir):
    """End to end: `metrics.min_inside_body_ratio=0.99` on the report invocation makes every
    target with inside_body_ratio < 0.99 fail, whatever the scoring run's thresholds were."""
    from test_report import make_report

    make_report(run_dir, "metrics.min_inside_body_ratio=0.99")
    met = pd.read_parquet(run_dir / "metrics")
    p = pd.read_csv(run_dir / "report" / "tables" / "pass_rates.csv")
    kw = met[met["target_kind"] == "keywords"]
    for m, g in kw.groupby("method"):
        row = p[(p["target_kind"] == "keywords") & (p["method"] == m) & (p["check"] == "pass_inside_body")].iloc[0]
        assert row["passed"] == (g["inside_body_ratio"] >= 0.99).sum() == 0 and row["n"] == len(g)


@pytest.fixture
def run_dir(tmp_path_factory, tmp_path):
    """A private copy of test_report's synthetic run (reported with default thresholds)."""
    import shutil

    from test_report import build_run

    d = tmp_path / "run"
    shutil.copytree(build_run(tmp_path_factory.mktemp("streaming_template") / "run"), d)
    return d


# ---------------------------------------------------------------------------------------------
# cluster bootstrap


def test_cluster_bootstrap_hand_checked():
    """Patient A: four rows of 0, patient B: one row of 1. The mean is 1/5; drawing two patients
    gives 0 (AA, p 1/4), 1/5 (AB or BA, p 1/2) or 1 (BB, p 1/4): the 95% interval is [0, 1]."""
    from reports.stats import bootstrap_mean_ci, cluster_ratio_ci

    lo, hi = cluster_ratio_ci(np.array([0.0, 1.0]), np.array([4.0, 1.0]), 4000, np.random.default_rng(0))
    assert (lo[0], hi[0]) == (0.0, 1.0)
    assert bootstrap_mean_ci([0, 0, 0, 0, 1], 4000, np.random.default_rng(0), clusters=list("AAAAB")) == (0.0, 1.0)
    # one patient: every resample is that patient
    assert bootstrap_mean_ci([0.1, 0.5, 0.9], 500, np.random.default_rng(0), clusters=["p"] * 3) == \
        pytest.approx((0.5, 0.5))


def test_rows_of_one_patient_do_not_narrow_the_interval():
    """Repeating every patient's row 50 times leaves the cluster interval unchanged; a bootstrap
    of rows would shrink it about sqrt(50)-fold."""
    from reports.stats import summarise

    rng = np.random.default_rng(3)
    one = pd.DataFrame({"patient": [f"p{i:02d}" for i in range(20)], "x": rng.normal(0.0, 1.0, 20), "g": "a"})
    many = one.loc[one.index.repeat(50)].reset_index(drop=True)
    a = summarise(one, ["x"], ["g"], 2000, seed=0, cluster="patient").iloc[0]
    b = summarise(many, ["x"], ["g"], 2000, seed=0, cluster="patient").iloc[0]
    assert b["n"] == 50 * a["n"] and b["mean"] == pytest.approx(a["mean"])
    assert (b["ci_low"], b["ci_high"]) == pytest.approx((a["ci_low"], a["ci_high"]))
    rows = summarise(many, ["x"], ["g"], 2000, seed=0).iloc[0]  # every row its own cluster
    assert (rows["ci_high"] - rows["ci_low"]) < (a["ci_high"] - a["ci_low"]) / 4


def test_cluster_interval_of_independent_rows_is_the_usual_one():
    """One row per patient: the interval of a mean is close to mean +- 1.96 SE."""
    from reports.stats import cluster_ratio_ci

    x = np.random.default_rng(5).normal(1.0, 1.0, 400)
    lo, hi = cluster_ratio_ci(x, np.ones_like(x), 3000, np.random.default_rng(6))
    se = x.std(ddof=1) / np.sqrt(x.size)
    assert lo[0] == pytest.approx(x.mean() - 1.96 * se, abs=0.03)
    assert hi[0] == pytest.approx(x.mean() + 1.96 * se, abs=0.03)


def test_engine_summary_equals_the_in_memory_reference(tmp_path):
    """The engine's per-(group, patient) aggregates give the numbers the in-memory cluster
    bootstrap gives on the rows (same seeds, same patients), and exact medians."""
    from reports import data as D
    from reports.stats import summarise

    run = tmp_path / "run"
    rng = np.random.default_rng(2)
    samples = sample_rows({"p1": 5, "p2": 1, "p3": 3, "p4": 2})
    samples[3]["subject_id"] = ""  # unknown patient: its image is the cluster
    write_part(run, "samples", samples)
    met = metric_rows(samples, rng, per_image=3)
    for r in met[::5]:
        r["inside_body_ratio"] = float("nan")  # not applicable: dropped (Parquet statistics leave NaN out)
    write_part(run, "metrics", met)
    ref = pd.DataFrame(met).merge(pd.DataFrame(samples)[["image_id", "subject_id"]], on="image_id")
    ref["patient"] = ref["subject_id"].where(ref["subject_id"] != "", ref["image_id"])
    want = summarise(ref, ["inside_body_ratio", "entropy_norm"], ["method"], 300, 11, cluster="patient")
    with D.load_run(run, settings=D.EngineSettings(batch_rows=5)) as data:  # groups span record batches
        got = D.summarise(data, D.metrics_rows(), {"method": "method"},
                          {"inside_body_ratio": D.num("inside_body_ratio"), "entropy_norm": D.num("entropy_norm")},
                          300, 11)
    for c in ("n", "mean", "median", "ci_low", "ci_high"):
        assert got[c].to_numpy(dtype=float) == pytest.approx(want[c].to_numpy(dtype=float), rel=1e-9), c


# ---------------------------------------------------------------------------------------------
# aggregates only


def test_quantiles_in_batches_and_box_stats(tmp_path):
    """Medians stay exact when the groups are queried in batches under a value budget; a group
    larger than the budget alone gets an estimate, flagged; box statistics match matplotlib's."""
    from matplotlib import cbook

    from reports import data as D

    run = tmp_path / "run"
    rng = np.random.default_rng(4)
    samples = sample_rows({f"p{i}": 2 for i in range(30)})
    write_part(run, "samples", samples)
    met = metric_rows(samples, rng, per_image=4, methods=("chefer", "random", "rollout"))
    write_part(run, "metrics", met)
    ref = pd.DataFrame(met)
    src = D.project(D.metrics_rows(), {"method": "method"}, {"x": D.num("inside_body_ratio")})
    for budget, exact in ((10**6, True), (300, True), (100, False)):
        with D.load_run(run, settings=D.EngineSettings(quantile_values=budget)) as data:
            q = D.quantiles(data, src, ["method"], ["x"], (0.5,)).set_index("method")
        assert bool(q["exact"].all()) is exact
        for m, g in ref.groupby("method"):
            assert q.loc[m, "q50"] == pytest.approx(g["inside_body_ratio"].median(), abs=0 if exact else 0.02)
    with D.load_run(run) as data:
        box = D.box_stats(data, src, ["method"], ["x"]).set_index("method")
    for m, g in ref.groupby("method"):
        want = cbook.boxplot_stats(g["inside_body_ratio"].to_numpy())[0]
        for k in ("q1", "med", "q3", "whislo", "whishi"):
            assert box.loc[m, k] == pytest.approx(want[k]), k
        assert sorted(box.loc[m, "fliers"]) == pytest.approx(sorted(want["fliers"]))


def test_curve_means_streamed_equal_mean_curve(tmp_path):
    from reports import data as D
    from reports.stats import mean_curve

    run = tmp_path / "run"
    rng = np.random.default_rng(8)
    rows = []
    for i in range(30):
        fr = np.linspace(0, 1, 5 if i % 3 else 9)
        y = rng.normal(size=fr.size)
        if i == 4:
            y[2] = np.nan  # skipped
        rows.append({"sample_id": f"s{i}", "target_kind": "keywords", "target_label": "x", "token_start": 1,
                     "method": "chefer", "fractions": fr.tolist(), "deletion": y.tolist(), "shard": 0})
    write_part(run, "faithfulness", rows)
    with D.load_run(run, settings=D.EngineSettings(batch_rows=7)) as data:
        got = D.curve_means(data, "SELECT * FROM faithfulness", "method", "fractions", ["deletion"])
    x, y, n = got["chefer"]["deletion"].result()
    wx, wy, wn = mean_curve([r["fractions"] for r in rows], [r["deletion"] for r in rows])
    assert n == wn == 29 and x == pytest.approx(wx) and y == pytest.approx(wy)


def test_report_reads_aggregates_only(tmp_path, monkeypatch):
    """No whole-table reader is used, and no DataFrame reaching pandas has more rows than a
    few per (group, patient): here 20,000 metrics rows of 4 patients."""
    import pyarrow.dataset as ds

    import pipeline.store
    import reports.data as D

    run = tmp_path / "run"
    rng = np.random.default_rng(9)
    samples = sample_rows({"p1": 50, "p2": 50, "p3": 50, "p4": 50})
    write_part(run, "samples", samples)
    met = metric_rows(samples, rng, per_image=50)
    for k in range(4):
        write_part(run, "metrics", met[k::4], folder=f"shard-{k:05d}-of-00004")
    sens = [{"image_id": s["image_id"], "target_kind": "keywords", "target_label": "Nodule", "method": m,
             "prompt_a": "a", "prompt_b": "b", "js_divergence": float(rng.uniform(0, 0.5)), "answers_agree": True,
             "shard": 0} for s in samples for m in ("chefer", "random")]
    write_part(run, "sensitivity", sens)

    def forbidden(*a, **k):
        raise AssertionError("a whole table was read")

    monkeypatch.setattr(pd, "read_parquet", forbidden)
    monkeypatch.setattr(pq, "read_table", forbidden)
    monkeypatch.setattr(ds, "dataset", forbidden)
    monkeypatch.setattr(pipeline.store.Table, "read", forbidden)
    seen: list[int] = []
    real = D._to_pandas

    def spy(table: pa.Table) -> pd.DataFrame:
        seen.append(table.num_rows)
        return real(table)

    monkeypatch.setattr(D, "_to_pandas", spy)
    summary = _report(run)
    assert summary["failed_sections"] == [] and len(met) == 20_000
    assert seen and max(seen) <= 500, max(seen)
    s = pd.read_csv(run / "report" / "tables" / "scores_keywords.csv")
    assert s.loc[(s["method"] == "chefer") & (s["score"] == "inside_body_ratio"), "n"].item() == 10_000


def test_engine_settings_reach_duckdb(tmp_path):
    """The engine runs with the memory limit and threads asked for, spilling into a private
    folder that is removed on close; a small limit still builds the report."""
    from reports import data as D

    run = tmp_path / "run"
    samples = sample_rows({"p1": 3, "p2": 3})
    write_part(run, "samples", samples)
    write_part(run, "metrics", metric_rows(samples, np.random.default_rng(0), per_image=20))
    with D.load_run(run, settings=D.EngineSettings(memory_limit="100MB", threads=1)) as data:
        assert data.scalar("SELECT current_setting('threads')") == 1
        limit = data.scalar("SELECT current_setting('memory_limit')")
        assert limit.endswith("MiB") and float(limit.split()[0]) < 100
        spill = data.spill_dir
        assert spill is not None and spill.is_dir() and spill.name.startswith(".")
    assert not spill.exists()
    assert _report(run, engine_memory_limit="100MB", engine_threads=1)["failed_sections"] == []
    assert not [p for p in run.iterdir() if p.name.startswith(".report-engine")]


def test_gallery_choice_prefers_boxed_keywords_on_distinct_images(tmp_path):
    """Boxed keyword targets first, one per image before a second of the same image; answer
    tokens only when nothing else is left; the choice is seeded."""
    from reports import data as D
    from reports.gallery import select_targets

    run = tmp_path / "run"
    samples = sample_rows({"a": 1, "b": 1})
    samples[0]["boxes"] = [{"finding": "Nodule", "x": 1.0, "y": 1.0, "w": 5.0, "h": 5.0}]
    write_part(run, "samples", samples)
    rel = []
    for s in samples:
        for ts in (10, 11, 12):
            rel += [{"sample_id": s["sample_id"], "target_kind": "keywords", "target_label": "Nodule",
                     "token_start": ts, "method": m, "status": "ok", "shard": 0} for m in ("chefer", "random")]
        rel += [{"sample_id": s["sample_id"], "target_kind": "answer_tokens", "target_label": "w", "token_start": ts,
                 "method": "chefer", "status": "ok", "shard": 0} for ts in range(20, 40)]
    write_part(run, "relevancy", rel)
    with D.load_run(run) as data:
        two = select_targets(data, 2, seed=0)
        three = select_targets(data, 3, seed=0)
        assert select_targets(data, 3, seed=0) == three
        every = select_targets(data, 8, seed=1)
    assert [(i.sample_id.split(":")[1], i.finding) for i in two] == [("a_0", "Nodule"), ("b_0", "Nodule")]
    assert three[:2] == two and three[2].sample_id == two[0].sample_id  # boxed before unboxed
    assert [i.target_kind for i in every] == ["keywords"] * 6 + ["answer_tokens"] * 2
