"""Dataset loaders: NIH ChestX-ray14 on real files, MIMIC-CXR-JPG on a fixture laid out like it,
manifests; the shared vocabulary; deterministic shards."""
from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import NIH_SUBSET, compose, run_pipeline
from pipeline.datasets import get_dataset, select, shard_of
from pipeline.vocabulary import CHEXPERT_FINDINGS, canonical_finding, label_column, label_state


def _cfg(overrides):
    return compose(overrides).dataset


# ----------------------------------------------------------------------------- vocabulary


def test_vocabulary_maps_source_spellings():
    assert canonical_finding("Effusion") == "Pleural Effusion"
    assert canonical_finding("Infiltrate") == "Infiltration"
    assert canonical_finding("Pleural_Thickening") == "Pleural Thickening"
    assert canonical_finding("pleural effusion") == "Pleural Effusion"
    assert label_column("Pleural Effusion") == "label_pleural_effusion"
    with pytest.raises(KeyError, match="Pleural Efusion"):
        canonical_finding("Pleural Efusion")
    assert [label_state(v) for v in (1, "0.0", -1.0, "", None, float("nan"))] == [1.0, 0.0, -1.0, None, None, None]
    with pytest.raises(ValueError):
        label_state(2)


# ----------------------------------------------------------------------------- NIH


def test_nih_subset_labels_boxes_and_rgba(tmp_path):
    ds = get_dataset(_cfg(["dataset=nih_cxr14", f"dataset.root={NIH_SUBSET}"]))
    recs = {r.image_id: r for r in ds.records()}
    assert set(recs) == {"00000100_000", "00001369_000", "00008386_000"}  # 00000001_000 has no image
    r = recs["00000100_000"]
    assert r.labels["Pleural Effusion"] == 1.0 and r.labels["Infiltration"] == 1.0
    assert r.labels["Cardiomegaly"] == 0.0 and r.labels["No Finding"] == 0.0
    assert r.labels["Lung Opacity"] is None  # NIH does not label it: not mentioned
    b = recs["00008386_000"].boxes
    assert len(b) == 1 and b[0].finding == "Nodule" and b[0].x == pytest.approx(711.92380952381)
    assert recs["00001369_000"].boxes[0].finding == "Cardiomegaly"


def test_nih_full_shared_load_stage(tmp_path, shared_real_cxr):
    """The command from the issue: 58 images' samples with the 12 boxes."""
    run_pipeline(["stages=[load]", "dataset=nih_cxr14", f"dataset.root={shared_real_cxr / 'nih_cxr14'}",
                  f"run_dir={tmp_path}"])
    df = pd.read_parquet(tmp_path / "samples")
    images = df.drop_duplicates("image_id")
    assert len(images) == 58
    assert (images["boxes"].map(len) > 0).sum() == 12
    assert images["boxes"].map(len).sum() == 12
    assert set(images["view_position"]) == {"PA", "AP"}
    assert (images[["width", "height"]] == 1024).all().all()
    assert df["sample_id"].is_unique
    assert not (tmp_path / "errors").exists()
    infiltr = images[images["boxes"].map(lambda bs: any(b["finding"] == "Infiltration" for b in bs))]
    assert len(infiltr) == 1  # NIH's "Infiltrate" box spelling mapped to the label vocabulary


# ----------------------------------------------------------------------------- MIMIC-CXR-JPG fixture


def _write_csv_gz(path: Path, df: pd.DataFrame) -> None:
    with gzip.GzipFile(path, "wb", mtime=0) as fh:
        fh.write(df.to_csv(index=False).encode())


def make_mimic_fixture(root: Path) -> dict:
    """A tiny MIMIC-CXR-JPG 2.x tree with real NIH pixels saved as JPG (two studies of one subject,
    one with PA + lateral, one AP), CheXpert/NegBIO labels in all four states, splits, a report and
    MS-CXR boxes drawn on a DICOM twice the JPG's size."""
    src = sorted((NIH_SUBSET / "images").glob("*.png"))
    rows = [  # dicom_id, subject, study, view, source image
        ("aaaaaaaa-11111111-22222222-33333333-44444444", "10000032", "50000001", "PA", src[0]),
        ("bbbbbbbb-11111111-22222222-33333333-44444444", "10000032", "50000001", "LATERAL", src[1]),
        ("cccccccc-11111111-22222222-33333333-44444444", "10000032", "50000002", "AP", src[2]),
    ]
    meta = []
    for dicom, subject, study, view, png in rows:
        d = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        d.mkdir(parents=True, exist_ok=True)
        img = Image.open(png).convert("L").resize((256, 200))
        img.save(d / f"{dicom}.jpg", quality=90)
        meta.append({"dicom_id": dicom, "subject_id": subject, "study_id": study,
                     "PerformedProcedureStepDescription": "CHEST (PA AND LAT)", "ViewPosition": view,
                     "Rows": 200, "Columns": 256, "StudyDate": 21800506, "StudyTime": 213014.531})
    (root / "files" / "p10" / "p10000032" / "s50000001.txt").write_text("FINDINGS: Small left effusion.\n")
    _write_csv_gz(root / "mimic-cxr-2.0.0-metadata.csv.gz", pd.DataFrame(meta))
    lab = {c: [np.nan, np.nan] for c in CHEXPERT_FINDINGS}
    lab["Pleural Effusion"] = [1.0, 0.0]
    lab["Cardiomegaly"] = [-1.0, np.nan]
    lab["Edema"] = [0.0, 1.0]
    labels = pd.DataFrame({"subject_id": ["10000032"] * 2, "study_id": ["50000001", "50000002"], **lab})
    _write_csv_gz(root / "mimic-cxr-2.0.0-chexpert.csv.gz", labels)
    negbio = labels.copy()
    negbio["Pleural Effusion"] = [-1.0, 0.0]
    _write_csv_gz(root / "mimic-cxr-2.0.0-negbio.csv.gz", negbio)
    _write_csv_gz(root / "mimic-cxr-2.0.0-split.csv.gz", pd.DataFrame(
        {"dicom_id": [r[0] for r in rows], "study_id": [r[2] for r in rows], "subject_id": [r[1] for r in rows],
         "split": ["train", "train", "test"]}))
    pd.DataFrame([{"dicom_id": rows[0][0], "category_name": "Pleural Effusion", "label_text": "left effusion",
                   "path": "x", "x": 300, "y": 200, "w": 100, "h": 80, "image_width": 512, "image_height": 400}]
                 ).to_csv(root / "MS_CXR_Local_Alignment_v1.1.0.csv", index=False)
    return {"rows": rows}


def test_mimic_fixture_loader(tmp_path):
    fx = make_mimic_fixture(tmp_path / "mimic")
    cfg = _cfg(["dataset=mimic_cxr", f"dataset.root={tmp_path / 'mimic'}", "dataset.views=[]", "dataset.reports=true"])
    recs = {r.image_id: r for r in get_dataset(cfg).records()}
    pa_id, lat_id, ap_id = (r[0] for r in fx["rows"])
    pa = recs[pa_id]
    assert pa.view_position == "PA" and pa.split == "train" and pa.study_id == "50000001"
    assert Path(pa.image_path).is_file() and "/files/p10/p10000032/s50000001/" in pa.image_path
    # four label states stay distinct
    assert pa.labels["Pleural Effusion"] == 1.0 and pa.labels["Cardiomegaly"] == -1.0
    assert pa.labels["Edema"] == 0.0 and pa.labels["Pneumonia"] is None
    assert recs[lat_id].labels == pa.labels  # study-level labels
    assert "left effusion" in pa.report_text.lower()
    box = pa.boxes[0].scaled_to(256, 200)  # MS-CXR box drawn on 512 x 400 -> JPG 256 x 200
    assert box == {"finding": "Pleural Effusion", "x": 150.0, "y": 100.0, "w": 50.0, "h": 40.0}
    negbio = get_dataset(_cfg(["dataset=mimic_cxr", f"dataset.root={tmp_path / 'mimic'}", "dataset.labeler=negbio"]))
    assert {r.image_id: r for r in negbio.records()}[pa_id].labels["Pleural Effusion"] == -1.0


def test_mimic_filters_and_load_stage(tmp_path):
    fx = make_mimic_fixture(tmp_path / "mimic")
    base = ["dataset=mimic_cxr", f"dataset.root={tmp_path / 'mimic'}"]
    ds = get_dataset(_cfg(base))
    assert {r.view_position for r in select(ds.records(), _cfg(base))} == {"PA", "AP"}  # default views
    only_test = select(ds.records(), _cfg(base + ["dataset.splits=[test]"]))
    assert [r.image_id for r in only_test] == [fx["rows"][2][0]]
    pos = select(ds.records(), _cfg(base + ["dataset.findings=[Edema]"]))
    assert [r.image_id for r in pos] == [fx["rows"][2][0]]
    per_study = select(ds.records(), _cfg(base + ["dataset.views=[]", "dataset.one_image_per_study=true"]))
    assert sorted(r.view_position for r in per_study) == ["AP", "PA"]
    run_pipeline(base + ["stages=[load]", f"run_dir={tmp_path / 'run'}", "prompts=findings"])
    df = pd.read_parquet(tmp_path / "run" / "samples")
    assert len(df) == 2 and set(df["view_position"]) == {"PA", "AP"}
    pa = df[df["view_position"] == "PA"].iloc[0]
    assert (pa["width"], pa["height"]) == (256, 200)
    assert pa["label_pleural_effusion"] == 1.0 and pa["label_cardiomegaly"] == -1.0
    assert np.isnan(pa["label_pneumonia"])
    assert pa["boxes"][0]["x"] == pytest.approx(150.0)


def test_mimic_missing_files_fail_clearly(tmp_path):
    make_mimic_fixture(tmp_path / "mimic")
    (tmp_path / "mimic" / "mimic-cxr-2.0.0-split.csv.gz").unlink()
    with pytest.raises(ValueError, match="mimic-cxr-2.0.0-split"):
        get_dataset(_cfg(["dataset=mimic_cxr", f"dataset.root={tmp_path / 'mimic'}"]))


def test_malformed_csv_names_file_and_columns(tmp_path):
    make_mimic_fixture(tmp_path / "mimic")
    _write_csv_gz(tmp_path / "mimic" / "mimic-cxr-2.0.0-metadata.csv.gz", pd.DataFrame({"dicom": ["x"]}))
    ds = get_dataset(_cfg(["dataset=mimic_cxr", f"dataset.root={tmp_path / 'mimic'}"]))
    with pytest.raises(ValueError, match="metadata.*lacks column"):
        ds.records()


# ----------------------------------------------------------------------------- manifest


def test_manifest_csv_with_boxes_and_labels(tmp_path):
    shutil.copy(NIH_SUBSET / "images" / "00008386_000.png", tmp_path / "a.png")
    shutil.copy(NIH_SUBSET / "images" / "00000100_000.png", tmp_path / "b.png")
    pd.DataFrame([
        {"image_path": "a.png", "image_id": "A", "view_position": "pa", "Pleural Effusion": "1",
         "label_cardiomegaly": "", "box_finding": "Nodule", "box_x": 10, "box_y": 20, "box_w": 30, "box_h": 40},
        {"image_path": "a.png", "image_id": "A", "view_position": "pa", "Pleural Effusion": "1",
         "label_cardiomegaly": "", "box_finding": "Effusion", "box_x": 1, "box_y": 2, "box_w": 3, "box_h": 4},
        {"image_path": str(tmp_path / "b.png"), "image_id": "B", "view_position": "AP", "Pleural Effusion": "-1",
         "label_cardiomegaly": "0", "prompt_text": "Is the heart enlarged?"},
    ]).to_csv(tmp_path / "m.csv", index=False)
    recs = {r.image_id: r for r in get_dataset(_cfg(["dataset=manifest", f"dataset.path={tmp_path / 'm.csv'}"])).records()}
    a, b = recs["A"], recs["B"]
    assert a.view_position == "PA" and [x.finding for x in a.boxes] == ["Nodule", "Pleural Effusion"]
    assert a.labels["Pleural Effusion"] == 1.0 and a.labels["Cardiomegaly"] is None
    assert b.labels["Pleural Effusion"] == -1.0 and b.labels["Cardiomegaly"] == 0.0
    run_pipeline(["stages=[load]", "dataset=manifest", f"dataset.path={tmp_path / 'm.csv'}", f"run_dir={tmp_path / 'r'}"])
    df = pd.read_parquet(tmp_path / "r" / "samples")
    assert (df["image_id"] == "B").sum() == 1  # the per-image prompt replaces the prompt set
    assert df.loc[df["image_id"] == "B", "prompt_text"].item() == "Is the heart enlarged?"


def test_manifest_without_image_path_fails(tmp_path):
    pd.DataFrame({"path": ["a.png"]}).to_csv(tmp_path / "m.csv", index=False)
    ds = get_dataset(_cfg(["dataset=manifest", f"dataset.path={tmp_path / 'm.csv'}"]))
    with pytest.raises(ValueError, match="image_path"):
        ds.records()


# ----------------------------------------------------------------------------- shards


def test_shards_are_deterministic_and_partition_the_limited_set(tmp_path):
    ds = get_dataset(_cfg(["dataset=nih_cxr14", f"dataset.root={NIH_SUBSET}"]))
    recs = ds.records()
    assert shard_of("00000100_000", 7) == shard_of("00000100_000", 7)
    full = [r.image_id for r in select(recs, _cfg(["dataset=nih_cxr14", "dataset.root=x", "dataset.limit=2"]))]
    parts = [[r.image_id for r in select(recs, _cfg(["dataset=nih_cxr14", "dataset.root=x", "dataset.limit=2",
                                                     f"dataset.shard={i}", "dataset.num_shards=2"]))]
             for i in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(full) and not set(parts[0]) & set(parts[1])
