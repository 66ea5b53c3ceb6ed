"""Bad dataset files never crash a stage or vanish silently.

Each class of bad input is tried for every source it applies to (manifest CSV, the MIMIC-CXR-JPG
layout, the NIH layout; files built in tmp_path from the real NIH PNGs): through the loader
(records' `error` / `problems` name the file and "row N", the header being row 1) and, for a few,
end to end through the load stage (errors/ rows of stage "dataset" or "load", the good images
loaded). The demo generator is tried on many seeds.
"""
from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import NIH_SUBSET, compose, run_pipeline
from pipeline.datasets import DatasetError, fingerprint, get_dataset, select
from pipeline.datasets.checks import check_boxes
from pipeline.phantoms import LEFT_LUNG, demo_plan, lung_zone_bounds, make_phantom
from pipeline.store import RunStore
from test_datasets import make_mimic_fixture

PNG = NIH_SUBSET / "images" / "00008386_000.png"  # the smallest of the real PNGs (1024 x 1024)
MS_CXR = "MS_CXR_Local_Alignment_v1.1.0.csv"
META = "mimic-cxr-2.0.0-metadata.csv.gz"
BAD_NUMBERS = ["abc", "", "1,5", "12px", "None"]
BAD_LABELS = ["2", "yes", "1.5", "nan", "NaN", "-2", "inf", "TRUE"]


def _records(overrides: list[str]):
    return get_dataset(compose(overrides).dataset).records()


def _one(recs, image_id: str):
    found = [r for r in recs if r.image_id == image_id]
    assert len(found) == 1, [r.image_id for r in recs]
    return found[0]


def _run_load(tmp_path: Path, overrides: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(samples, errors) of a load-stage run with `overrides`."""
    run_dir = tmp_path / "run"
    run_pipeline([*overrides, "stages=[load]", "prompts=findings", f"run_dir={run_dir}"])
    store = RunStore(run_dir)
    return store.table("samples").read(), store.table("errors").read()


def _mentions(messages, *parts: str) -> list[str]:
    return [m for m in messages if all(p in m for p in parts)]


# ----------------------------------------------------------------------------- manifest


def _manifest(tmp_path: Path, rows: list[dict], name: str = "m.csv") -> Path:
    """A manifest CSV in tmp_path beside copies a.png, b.png, c.png of a real PNG."""
    for f in ("a.png", "b.png", "c.png"):
        if not (tmp_path / f).exists():
            shutil.copy(PNG, tmp_path / f)
    path = tmp_path / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _manifest_records(path: Path):
    return _records(["dataset=manifest", f"dataset.path={path}"])


def _box_row(image_id, finding="Nodule", x="10", y="20", w="30", h="40", path="a.png"):
    return {"image_path": path, "image_id": image_id, "box_finding": finding, "box_x": x, "box_y": y,
            "box_w": w, "box_h": h}


@pytest.mark.parametrize("column", ["box_x", "box_y", "box_w", "box_h"])
@pytest.mark.parametrize("value", BAD_NUMBERS)
def test_manifest_box_cell_not_a_number_drops_that_box(tmp_path, column, value):
    bad = _box_row("A", x="1", y="2")
    bad[column] = value
    path = _manifest(tmp_path, [_box_row("A"), bad, _box_row("B", path="b.png")])
    recs = _manifest_records(path)
    a = _one(recs, "A")
    assert a.error is None and [b.origin for b in a.boxes] == [f"{path} row 2"]
    assert len(a.problems) == 1 and _mentions(a.problems, "m.csv row 3", column, "expected a number")
    assert _one(recs, "B").boxes[0].origin == f"{path} row 4"


@pytest.mark.parametrize("finding", ["Foo", "Pleural Efusion", ""])
def test_manifest_box_finding_outside_vocabulary_drops_that_box(tmp_path, finding):
    path = _manifest(tmp_path, [_box_row("A"), _box_row("A", finding=finding)])
    a = _one(_manifest_records(path), "A")
    assert len(a.boxes) == 1 and len(a.problems) == 1
    assert _mentions(a.problems, "m.csv row 3", "finding", "Pleural Effusion")  # the vocabulary is listed


@pytest.mark.parametrize("cell, what", [
    ("[oops", "not a JSON list"),
    ('{"finding": "Nodule", "x": 1, "y": 2, "w": 3, "h": 4}', "not a JSON list"),
    ("[7]", "expected an object"),
    ('[{"finding": "Nodule", "x": 1}]', "lacks"),
    ('[{"finding": "Nodule", "x": "q", "y": 2, "w": 3, "h": 4}]', "'q' is not a number"),
    ('[{"finding": "Nodule", "x": null, "y": 2, "w": 3, "h": 4}]', "x is blank"),
    ('[{"finding": "Foo", "x": 1, "y": 2, "w": 3, "h": 4}]', "'Foo' is not in the vocabulary"),
])
def test_manifest_bad_boxes_json_is_a_problem_of_that_image(tmp_path, cell, what):
    path = _manifest(tmp_path, [{"image_path": "b.png", "image_id": "B", "boxes": ""},
                                {"image_path": "a.png", "image_id": "A", "boxes": cell}])
    recs = _manifest_records(path)
    a = _one(recs, "A")
    assert a.error is None and a.boxes == []
    assert len(a.problems) == 1 and _mentions(a.problems, "m.csv row 3", what), a.problems
    assert _one(recs, "B").problems == []


def test_manifest_json_and_row_boxes_carry_their_origin(tmp_path):
    boxes = json.dumps([{"finding": "Nodule", "x": 1, "y": 2, "w": 3, "h": 4},
                        {"finding": "Effusion", "x": 5, "y": 6, "w": 7, "h": 8}])
    path = _manifest(tmp_path, [{**_box_row("A"), "boxes": boxes}, {**_box_row("A", finding="Mass"), "boxes": boxes}])
    a = _one(_manifest_records(path), "A")
    assert [b.origin for b in a.boxes] == [f"{path} row 2 boxes[0]", f"{path} row 2 boxes[1]", f"{path} row 2",
                                           f"{path} row 3"]  # the JSON repeated on row 3 is read once
    assert [b.finding for b in a.boxes] == ["Nodule", "Pleural Effusion", "Nodule", "Mass"]


def test_manifest_boxes_that_are_numbers_reach_the_box_checks_with_their_origin(tmp_path):
    path = _manifest(tmp_path, [_box_row("A", w="0"), _box_row("A", w="-3"), _box_row("A", x="nan"),
                                _box_row("A", x="5000"), _box_row("A", x="1000", w="100"), _box_row("A")])
    a = _one(_manifest_records(path), "A")
    assert a.problems == [] and len(a.boxes) == 6
    kept, notes = check_boxes(a.boxes, 1024, 1024)
    assert len(kept) == 2 and len(notes) == 5
    for row, word in ((2, "dropped"), (3, "dropped"), (4, "dropped"), (5, "dropped"), (6, "clipped")):
        assert _mentions(notes, f"m.csv row {row}:", word), notes


@pytest.mark.parametrize("column", ["Pleural Effusion", "label_cardiomegaly"])
@pytest.mark.parametrize("value", BAD_LABELS)
def test_manifest_label_outside_the_four_states_is_dropped_with_a_problem(tmp_path, column, value):
    path = _manifest(tmp_path, [{"image_path": "a.png", "image_id": "A", column: "1"},
                                {"image_path": "b.png", "image_id": "B", column: value}])
    recs = _manifest_records(path)
    finding = "Pleural Effusion" if column == "Pleural Effusion" else "Cardiomegaly"
    assert _one(recs, "A").labels[finding] == 1.0
    b = _one(recs, "B")
    assert b.error is None and b.labels[finding] is None
    assert len(b.problems) == 1 and _mentions(b.problems, "m.csv row 3", repr(column), repr(value), "1, 0, -1 or blank")


def test_manifest_good_label_spellings_are_read(tmp_path):
    path = _manifest(tmp_path, [{"image_path": "a.png", "image_id": str(i), "Edema": v}
                                for i, v in enumerate(["1", "1.0", "-1", "-1.0", " 0 ", "0.0", "", "+1"])])
    recs = sorted(_manifest_records(path), key=lambda r: int(r.image_id))
    assert [r.labels["Edema"] for r in recs] == [1.0, 1.0, -1.0, -1.0, 0.0, 0.0, None, 1.0]
    assert all(not r.problems for r in recs)


def test_parquet_manifest_rows_are_numbered_like_its_csv(tmp_path):
    _manifest(tmp_path, [{"image_path": "a.png"}])
    pd.DataFrame({"image_path": ["a.png", "b.png", "c.png"], "image_id": ["A", "B", "C"],
                  "label_edema": [1.0, np.nan, 2.0], "box_finding": ["Nodule", None, "Mass"],
                  "box_x": [1.0, np.nan, np.nan], "box_y": [2.0, np.nan, 3.0], "box_w": [3.0, np.nan, 4.0],
                  "box_h": [4.0, np.nan, 5.0]}).to_parquet(tmp_path / "m.parquet")
    recs = _manifest_records(tmp_path / "m.parquet")
    a, b, c = (_one(recs, i) for i in "ABC")
    assert a.labels["Edema"] == 1.0 and a.boxes[0].origin == f"{tmp_path / 'm.parquet'} row 2" and not a.problems
    assert b.labels["Edema"] is None and b.boxes == [] and not b.problems
    assert c.labels["Edema"] is None and c.boxes == []
    assert _mentions(c.problems, "m.parquet row 4", "label value 2.0") and _mentions(c.problems, "m.parquet row 4",
                                                                                    "box_x is blank")


def test_manifest_label_column_outside_the_vocabulary_is_a_file_error(tmp_path):
    path = _manifest(tmp_path, [{"image_path": "a.png", "label_pleural_efusion": "1", "label_text": "x"}])
    with pytest.raises(DatasetError, match=r"m\.csv.*'label_pleural_efusion'.*label_pleural_effusion"):
        _manifest_records(path)


def test_manifest_some_box_columns_is_a_file_error(tmp_path):
    path = _manifest(tmp_path, [{"image_path": "a.png", "box_finding": "Nodule", "box_x": 1, "box_y": 2}])
    with pytest.raises(DatasetError, match=r"m\.csv.*lacks \['box_w', 'box_h'\]"):
        _manifest_records(path)


@pytest.mark.parametrize("content", [b"\x00\x01\x02 not a table \xff\xfe", b'image_path\n"unterminated\n'])
def test_manifest_unparseable_is_a_file_error_naming_it(tmp_path, content):
    (tmp_path / "m.csv").write_bytes(content)
    with pytest.raises(DatasetError, match=r"m\.csv"):
        _manifest_records(tmp_path / "m.csv")


def test_manifest_blank_image_path_rejects_that_image(tmp_path):
    path = _manifest(tmp_path, [{"image_path": "a.png", "image_id": "A"}, {"image_path": "", "image_id": "B"},
                                {"image_path": "", "image_id": "", "view_position": "PA"}])
    recs = _manifest_records(path)
    assert _one(recs, "A").error is None
    assert "m.csv row 3: image_path is blank" in _one(recs, "B").error
    assert "m.csv row 4: image_path is blank" in _one(recs, "row-4").error


def test_manifest_same_id_on_different_files_is_an_error_naming_both_rows(tmp_path):
    path = _manifest(tmp_path, [_box_row("A"), _box_row("B", path="b.png"), _box_row("A", path="c.png")])
    recs = _manifest_records(path)
    dup = [r for r in recs if r.image_id == "A"]
    assert sorted(Path(r.image_path).name for r in dup) == ["a.png", "c.png"]
    for r in dup:
        assert "m.csv rows 2 and 4" in r.error and "a.png" in r.error and "c.png" in r.error
    assert _one(recs, "B").error is None


def test_manifest_rows_of_one_image_on_one_file_merge(tmp_path):
    path = _manifest(tmp_path, [{**_box_row("A"), "view_position": "PA"},
                                {**_box_row("A", path=str(tmp_path / "a.png")), "view_position": "PA"},
                                {**_box_row("A", path="./a.png"), "view_position": "AP"}])
    a = _one(_manifest_records(path), "A")
    assert a.error is None and len(a.boxes) == 3 and a.view_position == "PA"
    assert len(a.problems) == 1 and _mentions(a.problems, "m.csv row 4", "view_position", "'AP'", "row 2")


def test_manifest_relative_paths_are_absolute_and_the_fingerprint_ignores_the_working_directory(tmp_path, monkeypatch):
    lists, work, other = tmp_path / "data" / "lists", tmp_path / "work", tmp_path / "other"
    for d in (lists, tmp_path / "data" / "img", work, other):
        d.mkdir(parents=True, exist_ok=True)
    shutil.copy(PNG, tmp_path / "data" / "img" / "a.png")
    shutil.copy(PNG, lists / "b.png")
    pd.DataFrame({"image_path": ["../img/a.png", "b.png", "./sub/../b.png"], "image_id": ["A", "B", "B"]}
                 ).to_csv(lists / "m.csv", index=False)
    cfg = compose(["dataset=manifest", "dataset.path=../data/lists/m.csv"]).dataset
    monkeypatch.chdir(work)
    ds = get_dataset(cfg)
    recs = ds.records()
    assert {r.image_id: r.image_path for r in recs} == {"A": str(tmp_path / "data" / "img" / "a.png"),
                                                        "B": str(lists / "b.png")}
    assert all(r.error is None for r in recs)
    fp = fingerprint(ds, select(recs, cfg))
    assert list(fp["source_files"]) == [str(lists / "m.csv")]
    monkeypatch.chdir(other)
    ds2 = get_dataset(compose(["dataset=manifest", f"dataset.path={lists / 'm.csv'}"]).dataset)
    assert fingerprint(ds2, select(ds2.records(), cfg)) == fp
    assert all(Path(r.image_path).is_file() for r in recs)  # still found from another directory


def test_manifest_bad_rows_end_to_end(tmp_path, monkeypatch):
    rows = [
        {**_box_row("good"), "Edema": "1"},
        {**_box_row("good", w="0"), "Edema": ""},  # dropped by the box checks at load
        {**_box_row("labels", path="b.png", x="abc"), "Edema": "yes"},  # box and label dropped
        _box_row("dup", path="b.png"), _box_row("dup", path="c.png"),
        {**_box_row("nofile", path=""), "Edema": ""},
    ]
    (tmp_path / "files").mkdir()
    _manifest(tmp_path / "files", rows)
    monkeypatch.chdir(tmp_path)
    samples, errors = _run_load(tmp_path, ["dataset=manifest", "dataset.path=files/m.csv"])
    assert set(samples["image_id"]) == {"good", "labels"}
    assert all(Path(p).is_absolute() for p in samples["image_path"])
    load = errors[errors["stage"] == "load"]
    assert sorted(load["image_id"]) == ["dup", "nofile"]  # one row per image id (its key)
    assert all("rows 5 and 6" in m for m in load.loc[load["image_id"] == "dup", "message"])
    notes = errors[errors["stage"] == "dataset"]
    assert _mentions(notes.loc[notes["image_id"] == "good", "message"], "m.csv row 3:", "dropped")
    labels_notes = notes.loc[notes["image_id"] == "labels", "message"]
    assert _mentions(labels_notes, "m.csv row 4", "box_x 'abc'") and _mentions(labels_notes, "m.csv row 4", "'yes'")
    assert samples.loc[samples["image_id"] == "labels", "label_edema"].isna().all()


# ----------------------------------------------------------------------------- MIMIC-CXR-JPG


def _csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _write(path: Path, df: pd.DataFrame) -> None:
    if path.suffix == ".gz":
        with gzip.GzipFile(path, "wb", mtime=0) as fh:
            fh.write(df.to_csv(index=False).encode())
    else:
        df.to_csv(path, index=False)


def _mimic(tmp_path: Path, edit=None, name: str = META) -> tuple[Path, list[str]]:
    """The MIMIC fixture of test_datasets with `edit(df) -> df` applied to file `name`."""
    root = tmp_path / "mimic"
    fx = make_mimic_fixture(root)
    if edit is not None:
        _write(root / name, edit(_csv(root / name)))
    return root, [r[0] for r in fx["rows"]]


def _mimic_records(root: Path, *extra: str):
    return _records(["dataset=mimic_cxr", f"dataset.root={root}", "dataset.views=[]", *extra])


def _add_box_rows(df: pd.DataFrame, **changes: str) -> pd.DataFrame:
    """The fixture's MS-CXR row (row 2) and a copy (row 3) with `changes`."""
    return pd.concat([df, df.iloc[[0]].assign(**changes)], ignore_index=True)


@pytest.mark.parametrize("column", ["image_width", "image_height"])
@pytest.mark.parametrize("value", ["0", "", "abc", "-400", "nan", "0.0"])
def test_ms_cxr_reference_size_never_crashes_and_is_named(tmp_path, column, value):
    root, ids = _mimic(tmp_path, lambda df: _add_box_rows(df, **{column: value}), MS_CXR)
    rec = _one(_mimic_records(root), ids[0])
    assert all(b.origin.endswith(f"{MS_CXR} row {n}") for b, n in zip(rec.boxes, (2, 3)))
    kept, notes = check_boxes(rec.boxes, 256, 200)
    assert len(kept) == 1 and kept[0]["x"] == pytest.approx(150.0)  # the good row
    messages = rec.problems + notes
    assert len(messages) == 1 and _mentions(messages, f"{MS_CXR} row 3", "dropped"), messages
    assert "reference" in messages[0] or column in messages[0]


@pytest.mark.parametrize("changes, what", [
    ({"x": "abc"}, "x 'abc' is not a number"), ({"w": ""}, "w is blank"), ({"h": "1,5"}, "h '1,5'"),
    ({"category_name": "Foo"}, "'Foo' is not in the vocabulary"), ({"category_name": ""}, "finding is blank"),
])
def test_ms_cxr_box_not_numbers_or_unknown_finding_is_dropped_with_a_problem(tmp_path, changes, what):
    root, ids = _mimic(tmp_path, lambda df: _add_box_rows(df, **changes), MS_CXR)
    rec = _one(_mimic_records(root), ids[0])
    assert len(rec.boxes) == 1 and rec.error is None
    assert len(rec.problems) == 1 and _mentions(rec.problems, f"{MS_CXR} row 3", "box dropped", what)


def test_ms_cxr_without_required_columns_is_a_file_error(tmp_path):
    root, _ = _mimic(tmp_path, lambda df: df.drop(columns=["image_width"]), MS_CXR)
    with pytest.raises(DatasetError, match=r"MS_CXR.*lacks column\(s\) \['image_width'\]"):
        _mimic_records(root)


@pytest.mark.parametrize("labeler", ["chexpert", "negbio"])
@pytest.mark.parametrize("value", BAD_LABELS)
def test_mimic_label_outside_the_four_states_is_dropped_with_a_problem(tmp_path, labeler, value):
    name = f"mimic-cxr-2.0.0-{labeler}.csv.gz"
    root, ids = _mimic(tmp_path, lambda df: df.assign(Edema=["0.0", value]), name)
    recs = _mimic_records(root, f"dataset.labeler={labeler}")
    assert _one(recs, ids[0]).labels["Edema"] == 0.0 and _one(recs, ids[0]).problems == []
    ap = _one(recs, ids[2])  # the second study's image
    assert ap.error is None and ap.labels["Edema"] is None
    assert len(ap.problems) == 1 and _mentions(ap.problems, f"{name} row 3", "'Edema'", repr(value))


@pytest.mark.parametrize("column, value", [(c, v) for c in ("subject_id", "study_id") for v in ("", "10000032.0", "p1")]
                         + [("dicom_id", "")])  # any other text is a DICOM id
def test_mimic_bad_ids_reject_that_image_naming_the_row(tmp_path, column, value):
    def edit(df):
        df.loc[2, column] = value
        return df

    root, ids = _mimic(tmp_path, edit)
    recs = _mimic_records(root)
    bad = [r for r in recs if r.error]
    assert len(bad) == 1 and _mentions([bad[0].error], f"{META} row 4", column, "expected")
    assert {r.image_id for r in recs if not r.error} == set(ids[:2])


def test_mimic_duplicate_dicom_id_is_one_image_or_an_error(tmp_path):
    root, ids = _mimic(tmp_path, lambda df: pd.concat([df, df.iloc[[0]], df.iloc[[1]].assign(ViewPosition="PA")],
                                                      ignore_index=True))
    recs = _mimic_records(root)
    same = _one(recs, ids[0])
    assert same.error is None and _mentions(same.problems, META, "rows 2 and 5", "read once")
    differ = [r for r in recs if r.image_id == ids[1]]  # LATERAL on row 3, PA on row 6: both rejected
    assert sorted(r.view_position for r in differ) == ["LATERAL", "PA"]
    assert all("rows 3 and 6" in r.error and "LATERAL" in r.error and "'PA'" in r.error for r in differ)
    cfg = compose(["dataset=mimic_cxr", f"dataset.root={root}"]).dataset  # views PA, AP: the error stays in view
    assert [r.error is not None for r in select(recs, cfg) if r.image_id == ids[1]] == [True]


def test_mimic_duplicate_study_labels_and_splits(tmp_path):
    def labels(df):
        return pd.concat([df, df.iloc[[0]].assign(Edema="1.0"), df.iloc[[1]]], ignore_index=True)

    root, ids = _mimic(tmp_path, labels, "mimic-cxr-2.0.0-chexpert.csv.gz")
    _write(root / "mimic-cxr-2.0.0-split.csv.gz", pd.concat(
        [_csv(root / "mimic-cxr-2.0.0-split.csv.gz"), _csv(root / "mimic-cxr-2.0.0-split.csv.gz").iloc[[2]]
         .assign(split="validate")], ignore_index=True))
    recs = _mimic_records(root)
    for image_id in ids[:2]:  # the first study's labels differ between rows 2 and 4
        assert "chexpert.csv.gz rows 2 and 4" in _one(recs, image_id).error
    ap = _one(recs, ids[2])
    assert _mentions(ap.problems, "chexpert.csv.gz rows 3 and 5", "read once")
    assert "split.csv.gz rows 4 and 5" in ap.error and "validate" in ap.error


def test_mimic_bad_rows_end_to_end(tmp_path):
    """A duplicated metadata file (every image twice), a blank subject_id, MS-CXR boxes with a
    zero, a blank and a text reference size, a label 'yes': the good images load once each."""
    def meta(df):
        df = pd.concat([df, df], ignore_index=True)
        df.loc[2, "subject_id"] = ""  # the AP image's first row
        return df

    root, ids = _mimic(tmp_path, meta)
    _write(root / MS_CXR, pd.concat([_csv(root / MS_CXR).assign(image_width=w) for w in ("512", "0", "", "abc")],
                                    ignore_index=True))
    _write(root / "mimic-cxr-2.0.0-chexpert.csv.gz", _csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz")
           .assign(Atelectasis=["yes", ""]))
    samples, errors = _run_load(tmp_path, ["dataset=mimic_cxr", f"dataset.root={root}", "dataset.views=[]"])
    assert sorted(samples["image_id"]) == sorted(ids[:2]) and samples["sample_id"].is_unique
    load = errors[errors["stage"] == "load"]
    assert list(load["image_id"]) == [ids[2]]  # its two rows differ (a blank subject_id): rejected, one row
    assert len(_mentions(load["message"], META, "rows 4 and 7", "subject_id")) == 1
    pa = errors.loc[(errors["stage"] == "dataset") & (errors["image_id"] == ids[0]), "message"]
    for row in (3, 4, 5):
        assert len(_mentions(pa, f"{MS_CXR} row {row}", "dropped")) == 1, list(pa)
    assert _mentions(pa, "chexpert.csv.gz row 2", "'yes'") and _mentions(pa, META, "rows 2 and 5", "read once")
    assert samples.loc[samples["image_id"] == ids[0], "boxes"].map(len).tolist() == [1]


# ----------------------------------------------------------------------------- NIH ChestX-ray14

NIH_NAMES = ["00000100_000.png", "00001369_000.png", "00008386_000.png"]
ENTRY_COLS = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "View Position"]


def _nih(tmp_path: Path, entries: list[list[str]], bbox_lines: list[str]) -> Path:
    """An NIH layout: images/ with copies of a real PNG, Data_Entry_2017_v2020.csv and
    BBox_List_2017.csv (lines after NIH's header, written as given)."""
    root = tmp_path / "nih"
    (root / "images").mkdir(parents=True)
    for name in NIH_NAMES:
        shutil.copy(PNG, root / "images" / name)
    pd.DataFrame(entries, columns=ENTRY_COLS).to_csv(root / "Data_Entry_2017_v2020.csv", index=False)
    (root / "BBox_List_2017.csv").write_text("\n".join(["Image Index,Finding Label,Bbox [x,y,w,h],,,", *bbox_lines]) + "\n")
    return root


def _entries() -> list[list[str]]:
    return [[NIH_NAMES[0], "Effusion|Infiltration", "0", "100", "PA"], [NIH_NAMES[1], "Cardiomegaly", "0", "1369", "PA"],
            [NIH_NAMES[2], "Nodule", "0", "8386", "AP"], ["00009999_000.png", "Mass", "0", "9999", "PA"]]


def _nih_records(root: Path):
    return _records(["dataset=nih_cxr14", f"dataset.root={root}", "dataset.views=[]"])


GOOD_BOX = f"{NIH_NAMES[2]},Nodule,711.9,357.5,58.5,47.6"


@pytest.mark.parametrize("line, what", [
    (f"{NIH_NAMES[2]},Nodule,abc,357.5,58.5,47.6", "x 'abc' is not a number"),
    (f"{NIH_NAMES[2]},Nodule,711.9,,58.5,47.6", "y is blank"),
    (f"{NIH_NAMES[2]},Nodule,711.9,357.5", "w is blank"),
    (f"{NIH_NAMES[2]},Nodules?,711.9,357.5,58.5,47.6", "'Nodules?' is not in the vocabulary"),
    (f"{NIH_NAMES[2]},,711.9,357.5,58.5,47.6", "finding is blank"),
])
def test_nih_bbox_not_numbers_or_unknown_finding_is_dropped_with_a_problem(tmp_path, line, what):
    root = _nih(tmp_path, _entries(), [GOOD_BOX, "", line])
    rec = _one(_nih_records(root), "00008386_000")
    assert [b.origin for b in rec.boxes] == [f"{root / 'BBox_List_2017.csv'} row 2"]
    assert len(rec.problems) == 1 and _mentions(rec.problems, "BBox_List_2017.csv row 4", what)  # row 3 is blank


def test_nih_bbox_numbers_that_make_no_box_reach_the_checks_with_their_origin(tmp_path):
    lines = [GOOD_BOX, f"{NIH_NAMES[2]},Nodule,711.9,357.5,0,47.6", f"{NIH_NAMES[2]},Nodule,2000,357.5,5,5",
             f"{NIH_NAMES[2]},Nodule,1000,357.5,50,5,,,"]
    rec = _one(_nih_records(_nih(tmp_path, _entries(), lines)), "00008386_000")
    kept, notes = check_boxes(rec.boxes, 1024, 1024)
    assert len(kept) == 2 and rec.problems == []
    assert [m.split(":")[0].rsplit("/", 1)[-1] for m in notes] == ["BBox_List_2017.csv row 3", "BBox_List_2017.csv row 4",
                                                                   "BBox_List_2017.csv row 5"]


def test_nih_bbox_file_with_too_few_columns_is_a_file_error(tmp_path):
    root = _nih(tmp_path, _entries(), [f"{NIH_NAMES[2]},Nodule,1,2"])
    with pytest.raises(DatasetError, match=r"BBox_List_2017\.csv.*six columns"):
        _nih_records(root)


@pytest.mark.parametrize("labels, what", [("Effusion|Pleural Efusion", "'Pleural Efusion' is not in the vocabulary"),
                                          ("", "Finding Labels is blank"), ("nan", "'nan' is not in the vocabulary")])
def test_nih_finding_labels_outside_the_vocabulary_reject_that_image(tmp_path, labels, what):
    entries = _entries()
    entries[1][1] = labels
    recs = _nih_records(_nih(tmp_path, entries, []))
    bad = _one(recs, "00001369_000")
    assert _mentions([bad.error], "Data_Entry_2017_v2020.csv row 3", what)
    assert all(r.error is None for r in recs if r is not bad)


def test_nih_duplicate_image_index_is_one_image_or_an_error(tmp_path):
    entries = _entries()
    entries += [list(entries[0]), [NIH_NAMES[1], "No Finding", "0", "1369", "PA"]]
    recs = _nih_records(_nih(tmp_path, entries, []))
    same = _one(recs, "00000100_000")
    assert same.error is None and _mentions(same.problems, "Data_Entry_2017_v2020.csv rows 2 and 6", "read once")
    differ = [r for r in recs if r.image_id == "00001369_000"]
    assert len(differ) == 2 and all("rows 3 and 7" in r.error and "No Finding" in r.error for r in differ)
    assert sorted(r.labels["Cardiomegaly"] for r in differ) == [0.0, 1.0]  # each row's labels, for the filters


def test_nih_bad_rows_end_to_end(tmp_path):
    entries = _entries() + [list(_entries()[0])]
    entries[1][1] = "Cardiomegaly|Heart Big"
    lines = [GOOD_BOX, f"{NIH_NAMES[2]},Nodule,abc,1,2,3", f"{NIH_NAMES[2]},Nodule,1000,357.5,50,5",
             f"{NIH_NAMES[0]},Efusion,1,2,3,4"]
    root = _nih(tmp_path, entries, lines)
    samples, errors = _run_load(tmp_path, ["dataset=nih_cxr14", f"dataset.root={root}", "dataset.views=[]"])
    assert set(samples["image_id"]) == {"00000100_000", "00008386_000"} and samples["sample_id"].is_unique
    load = errors[errors["stage"] == "load"]
    assert list(load["image_id"]) == ["00001369_000"] and _mentions(load["message"], "Data_Entry_2017_v2020.csv row 3",
                                                                    "'Heart Big'")
    notes = errors[errors["stage"] == "dataset"]
    nodule = notes.loc[notes["image_id"] == "00008386_000", "message"]
    assert _mentions(nodule, "BBox_List_2017.csv row 3", "'abc'") and _mentions(nodule, "BBox_List_2017.csv row 4",
                                                                               "clipped")
    first = notes.loc[notes["image_id"] == "00000100_000", "message"]
    assert _mentions(first, "BBox_List_2017.csv row 5", "'Efusion'") and _mentions(first, "rows 2 and 6", "read once")


def test_relative_roots_are_absolute(tmp_path, monkeypatch):
    root = _nih(tmp_path, _entries(), [GOOD_BOX])
    mimic, _ = _mimic(tmp_path)
    monkeypatch.chdir(tmp_path)
    for recs, folder in ((_nih_records(Path("nih")), root), (_mimic_records(Path("mimic")), mimic)):
        assert recs and all(r.image_path.startswith(str(folder) + "/") and Path(r.image_path).is_file() for r in recs)
    ds = get_dataset(compose(["dataset=nih_cxr14", "dataset.root=./nih/../nih"]).dataset)
    assert all(Path(p).is_absolute() and ".." not in str(p) for p in ds.source_files())


# ----------------------------------------------------------------------------- demo phantoms


def _effusion_ok(ph) -> None:
    les = next(le for le in ph.lesions if le.finding == "Pleural Effusion")
    x, y, w, h = les.box
    cx, cy = x + w / 2, y + h / 2
    lung = ph.lung_mask == (LEFT_LUNG if les.side == "left" else 3 - LEFT_LUNG)
    assert lung[int(cy), int(cx)], les
    y0, y1 = lung_zone_bounds(lung)["lower"]
    assert y0 <= cy < y1 and w >= 1 and h >= 1


@pytest.mark.parametrize("seed, i", [(424242, 36), (2026, 22)])
def test_demo_images_that_failed_to_place_an_effusion(seed, i):
    args = {k: v for k, v in demo_plan(40, seed, 0.1)[i].items() if k != "split"}
    assert args["findings"] == ["Pleural Effusion", "Cardiomegaly"] and args["side"] == "left"
    _effusion_ok(make_phantom(np.random.default_rng([seed, i]), **args))


def test_effusion_beside_a_large_heart_is_placed_for_every_seed():
    """The failing layout (left effusion, cardiomegaly, AP, 256 x 320) failed for about 7 % of
    seeds; every one now places the effusion on the lung's lower third."""
    for seed in range(200):
        ph = make_phantom(np.random.default_rng([seed, 36]), width=256, height=320, view="AP",
                          findings=["Pleural Effusion", "Cardiomegaly"], side="left")
        _effusion_ok(ph)


def test_demo_seed_2026_loads(tmp_path):
    samples, errors = _run_load(tmp_path, ["dataset=demo", "dataset.seed=2026", "dataset.n=40",
                                           f"dataset.root={tmp_path / 'demo'}"])
    assert samples["image_id"].nunique() == 36 and errors.empty  # the 40 less the 4 lateral views
