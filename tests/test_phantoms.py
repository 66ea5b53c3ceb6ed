"""Synthetic phantoms: conventions (patient's left = image right), zones, masks, determinism, and
the MIMIC-CXR-JPG layout of the demo dataset."""
from __future__ import annotations

import gzip
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.phantoms import (
    CHEXPERT_COLUMNS,
    FOCAL_FINDINGS,
    LEFT_LUNG,
    RIGHT_LUNG,
    Lesion,
    contact_sheet,
    findings_sentence,
    lung_zone_bounds,
    make_phantom,
    write_demo_dataset,
)

SHAPES = [(256, 256), (320, 256), (256, 320)]  # (width, height)
_SIDED_ZONES = {"Consolidation": ("upper", "middle", "lower"), "Lung Opacity": ("upper", "middle", "lower"),
                "Nodule": ("upper", "middle", "lower"), "Pleural Effusion": ("lower",), "Pneumothorax": ("upper",)}


def _centre(box):
    x, y, w, h = box
    return x + w / 2.0, y + h / 2.0


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("demo_a")
    return root, write_demo_dataset(root, n=24, seed=0)


# ---------------------------------------------------------------- conventions


@pytest.mark.parametrize("view", ["PA", "AP"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("finding", FOCAL_FINDINGS)
def test_forced_side_and_zone(view, side, finding):
    """Patient's left is drawn on the image's right, inside lung_mask == 2 (right: left half, == 1),
    and the box centre lies in the requested third of that lung's vertical extent."""
    for k, zone in enumerate(_SIDED_ZONES[finding]):
        for s, (w, h) in enumerate(SHAPES):
            rng = np.random.default_rng([7, k, s, len(finding)])
            ph = make_phantom(rng, width=w, height=h, view=view, findings=[finding], side=side, zone=zone)
            les = ph.lesions[0]
            assert (les.finding, les.side, les.zone) == (finding, side, zone)
            cx, cy = _centre(les.box)
            lung_id = LEFT_LUNG if side == "left" else RIGHT_LUNG
            if side == "left":
                assert cx > w / 2
            else:
                assert cx < w / 2
            assert ph.lung_mask[int(cy), int(cx)] == lung_id
            y0, y1 = lung_zone_bounds(ph.lung_mask == lung_id)[zone]
            assert y0 <= cy < y1


def test_zone_thirds_upper_lower():
    lung = np.zeros((90, 10), bool)
    lung[30:60] = True
    b = lung_zone_bounds(lung)
    assert b == {"upper": (30.0, 40.0), "middle": (40.0, 50.0), "lower": (50.0, 60.0)}
    for zone, band in (("upper", (0.0, 1 / 3)), ("lower", (2 / 3, 1.0))):
        ph = make_phantom(np.random.default_rng(3), findings=["Consolidation"], side="left", zone=zone)
        rows = np.flatnonzero((ph.lung_mask == LEFT_LUNG).any(axis=1))
        top, ext = rows[0], rows[-1] + 1 - rows[0]
        frac = (_centre(ph.lesions[0].box)[1] - top) / ext
        assert band[0] <= frac < band[1]


def test_lungs_anatomy_right_lung_on_image_left_and_larger():
    for seed in range(10):
        ph = make_phantom(np.random.default_rng(seed), findings=[])
        W = ph.image.shape[1]
        xs_r = np.flatnonzero((ph.lung_mask == RIGHT_LUNG).any(axis=0))
        xs_l = np.flatnonzero((ph.lung_mask == LEFT_LUNG).any(axis=0))
        assert xs_r.max() < W / 2 < xs_l.min()
        assert (ph.lung_mask == RIGHT_LUNG).sum() > (ph.lung_mask == LEFT_LUNG).sum()
        # display convention: lungs (air) darker than the body's soft tissue, background darkest
        lung_mean = ph.image[ph.lung_mask > 0].mean()
        soft = ph.body_mask & (ph.lung_mask == 0)
        assert ph.image[~ph.body_mask].mean() < lung_mean < ph.image[soft].mean()
        assert ph.labels["No Finding"] == 1.0 and not ph.lesions


def test_boxes_inside_image_and_masks_inside_body():
    rng = np.random.default_rng(11)
    for i in range(60):
        w, h = SHAPES[i % 3]
        view = ("PA", "AP", "LATERAL")[i % 3]
        ph = make_phantom(rng, width=w, height=h, view=view, edge_to_edge=i % 5 == 0,
                          side_marker="auto" if i % 2 else None)
        assert ph.image.shape == (h, w) and ph.image.dtype == np.uint8
        assert ph.lung_mask.shape == (h, w) and ph.lung_mask.dtype == np.uint8
        assert ph.body_mask.dtype == bool
        assert set(np.unique(ph.lung_mask)) <= {0, 1, 2}
        assert not (ph.lung_mask > 0)[~ph.body_mask].any()
        for les in ph.lesions:
            x, y, bw, bh = les.box
            assert 0 <= x and 0 <= y and bw > 0 and bh > 0 and x + bw <= w and y + bh <= h
            assert all(float(v).is_integer() for v in les.box)
            if view == "LATERAL":
                assert les.side is None
        if view == "LATERAL":
            assert not ph.lung_mask.any()


def test_cardiomegaly_box_is_heart():
    ratios = []
    for seed in range(6):
        big = make_phantom(np.random.default_rng(seed), findings=["Cardiomegaly"])
        les = big.lesions[0]
        assert (les.side, les.zone) == (None, None)
        cols = np.flatnonzero((big.lung_mask > 0).any(axis=0))
        ratios.append(les.box[2] / (cols[-1] + 1 - cols[0]))  # cardiothoracic ratio
        # the heart straddles the midline with more of it on the image's right (patient's left)
        assert les.box[0] < big.image.shape[1] / 2 < _centre(les.box)[0]
        assert big.labels["Cardiomegaly"] == 1.0
    assert min(ratios) > 0.5


def test_effusion_and_pneumothorax_change_density():
    img_n = make_phantom(np.random.default_rng(5), findings=[]).image
    eff = make_phantom(np.random.default_rng(5), findings=["Pleural Effusion"], side="right")
    x, y, w, h = (int(v) for v in eff.lesions[0].box)
    lung = eff.lung_mask[y:y + h, x:x + w] == RIGHT_LUNG
    assert eff.image[y:y + h, x:x + w][lung].mean() > img_n[eff.lung_mask == RIGHT_LUNG].mean() + 40
    ptx = make_phantom(np.random.default_rng(5), findings=["Pneumothorax"], side="left")
    x, y, w, h = (int(v) for v in ptx.lesions[0].box)
    rest = (ptx.lung_mask == LEFT_LUNG).copy()
    rest[y:y + h, x:x + w] = False
    region = ptx.image[y:y + h, x:x + w][ptx.lung_mask[y:y + h, x:x + w] == LEFT_LUNG]
    assert np.percentile(region, 25) < ptx.image[rest].mean()


def test_marker_outside_body_and_on_its_side():
    for seed in range(20):
        letter = "L" if seed % 2 else "R"
        ph = make_phantom(np.random.default_rng(seed), side_marker=letter, edge_to_edge=seed % 7 == 0,
                          width=SHAPES[seed % 3][0], height=SHAPES[seed % 3][1])
        assert ph.marker is not None and ph.marker[0] == letter
        x, y, w, h = (int(v) for v in ph.marker_box)
        assert not ph.body_mask[y:y + h, x:x + w].any()
        assert ph.image[y:y + h, x:x + w].max() > 200
        # frontal: the patient's left (L) is on the image's right
        assert ph.marker[1].endswith("right" if letter == "L" else "left")
        assert (x + w / 2 > ph.image.shape[1] / 2) == (letter == "L")
    ph = make_phantom(np.random.default_rng(0), side_marker=None)
    assert ph.marker is None and ph.marker_box is None
    ph = make_phantom(np.random.default_rng(0), view="LATERAL", side_marker="auto")
    x, y, w, h = (int(v) for v in ph.marker_box)
    assert not ph.body_mask[y:y + h, x:x + w].any()


def test_edge_to_edge_body_touches_all_edges():
    for view in ("PA", "AP", "LATERAL"):
        ph = make_phantom(np.random.default_rng(1), view=view, edge_to_edge=True)
        b = ph.body_mask
        assert b[0].any() and b[-1].any() and b[:, 0].any() and b[:, -1].any()
        plain = make_phantom(np.random.default_rng(1), view=view)
        assert not plain.body_mask[:, 0].any() and not plain.body_mask[:, -1].any()


def test_labels_and_report_agree():
    rng = np.random.default_rng(4)
    seen = set()
    for _ in range(80):
        ph = make_phantom(rng)
        present = {les.finding for les in ph.lesions}
        for name, v in ph.labels.items():
            seen.add(v)
            if name in present:
                assert v == 1.0
        pathological = present - {"Support Devices"}
        if not pathological and not any(ph.labels[c] == -1.0 for c in CHEXPERT_COLUMNS):
            assert ph.labels["No Finding"] == 1.0
            assert "no acute cardiopulmonary abnormality." in ph.report
        if pathological:
            assert ph.labels["No Finding"] is None
        if "Consolidation" in present:
            assert ph.labels["Lung Opacity"] == 1.0
        if "Nodule" in present:
            assert ph.labels["Lung Lesion"] == 1.0
        for name in CHEXPERT_COLUMNS:
            if name == "No Finding":
                continue
            negated = f"no {name.lower()}." in ph.report
            assert negated == (ph.labels[name] == 0.0)
            assert (f"cannot exclude {name.lower()}." in ph.report) == (ph.labels[name] == -1.0)
    assert {1.0, 0.0, -1.0, None} <= seen


def test_findings_sentence_rule():
    les = [Lesion("Consolidation", "left", "lower", (1, 2, 3, 4)), Lesion("Pleural Effusion", "right", "lower", (0, 0, 1, 1)),
           Lesion("Pneumothorax", "left", "upper", (0, 0, 1, 1)), Lesion("Cardiomegaly", None, None, (0, 0, 1, 1))]
    assert findings_sentence(les, ["Edema"], ["Pneumonia"]) == (
        "left lower zone consolidation. right pleural effusion. left apical pneumothorax. cardiomegaly. "
        "cannot exclude pneumonia. no edema.")
    assert findings_sentence([], ["Pleural Effusion"]) == "no acute cardiopulmonary abnormality. no pleural effusion."


def test_invalid_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        make_phantom(rng, view="LATERAL", findings=["Nodule"], side="left")
    with pytest.raises(ValueError):
        make_phantom(rng, findings=["Pleural Effusion"], zone="upper")
    with pytest.raises(ValueError):
        make_phantom(rng, findings=["Cardiomegaly"], side="left")
    with pytest.raises(ValueError):
        make_phantom(rng, findings=["Mass"])
    with pytest.raises(ValueError):
        make_phantom(rng, view="oblique")


def test_random_draw_with_forced_placement():
    for seed in range(10):
        ph = make_phantom(np.random.default_rng(seed), side="left", zone="upper")
        focal = [les for les in ph.lesions if les.finding in FOCAL_FINDINGS]
        assert focal[0].side == "left" and focal[0].zone == "upper"
        assert ph.lung_mask[int(_centre(focal[0].box)[1]), int(_centre(focal[0].box)[0])] == LEFT_LUNG


def test_phantom_is_fast_and_seeded():
    a = make_phantom(np.random.default_rng(42), findings=["Nodule", "Pleural Effusion"], side_marker="auto")
    b = make_phantom(np.random.default_rng(42), findings=["Nodule", "Pleural Effusion"], side_marker="auto")
    assert np.array_equal(a.image, b.image) and a.lesions == b.lesions and a.labels == b.labels
    c = make_phantom(np.random.default_rng(43), findings=["Nodule", "Pleural Effusion"], side_marker="auto")
    assert not np.array_equal(a.image, c.image)
    rng = np.random.default_rng(0)
    make_phantom(rng)
    times = []
    for _ in range(30):
        t0 = time.perf_counter()
        make_phantom(rng)
        times.append(time.perf_counter() - t0)
    assert float(np.median(times)) < 0.020


def test_contact_sheet(tmp_path):
    phs = [make_phantom(np.random.default_rng(i), view=v) for i, v in enumerate(["PA", "AP", "LATERAL"])]
    sheet = contact_sheet(phs, cols=3, tile=128)
    assert sheet.ndim == 3 and sheet.shape[2] == 3 and sheet.shape[1] == 3 * 128
    Image.fromarray(sheet).save(tmp_path / "sheet.png")


# ---------------------------------------------------------------- demo dataset on disk


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_is_byte_identical_and_seeded(demo, tmp_path):
    root_a, summary = demo
    root_b = tmp_path / "b"
    write_demo_dataset(root_b, n=24, seed=0)
    fa, fb = _files(root_a), _files(root_b)
    assert fa.keys() == fb.keys()
    assert all(fa[k] == fb[k] for k in fa)
    root_c = tmp_path / "c"
    write_demo_dataset(root_c, n=24, seed=1)
    fc = _files(root_c)
    meta_a = pd.read_csv(root_a / "mimic-cxr-2.0.0-metadata.csv.gz", dtype=str)
    meta_c = pd.read_csv(root_c / "mimic-cxr-2.0.0-metadata.csv.gz", dtype=str)
    assert set(meta_a["dicom_id"]).isdisjoint(meta_c["dicom_id"])
    assert fa["phantom_truth.csv"] != fc["phantom_truth.csv"]
    # gzip headers carry mtime 0
    for name in ("metadata", "chexpert", "negbio", "split"):
        raw = fa[f"mimic-cxr-2.0.0-{name}.csv.gz"]
        assert raw[:2] == b"\x1f\x8b" and raw[4:8] == b"\x00\x00\x00\x00"
        gzip.decompress(raw)


def test_demo_is_quick(tmp_path):
    t0 = time.perf_counter()
    write_demo_dataset(tmp_path / "d", n=24, seed=3)
    assert time.perf_counter() - t0 < 3.0


def test_demo_layout_and_tables(demo):
    root, summary = demo
    meta = pd.read_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", dtype={"dicom_id": str, "subject_id": str,
                                                                       "study_id": str})
    assert list(meta.columns) == [
        "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows", "Columns",
        "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
        "PatientOrientationCodeSequence_CodeMeaning"]
    assert len(meta) == 24 and meta["study_id"].is_unique and meta["dicom_id"].is_unique
    assert set(meta["ViewPosition"]) == {"PA", "AP", "LATERAL"}
    assert (meta["ViewPosition"] == "LATERAL").sum() == round(24 * 0.1)
    hex8 = "[0-9a-f]{8}"
    for r in meta.itertuples():
        assert re.fullmatch(r"1\d{7}", r.subject_id) and re.fullmatch(r"5\d{7}", r.study_id)
        assert re.fullmatch("-".join([hex8] * 5), r.dicom_id)
        study_dir = root / "files" / f"p{r.subject_id[:2]}" / f"p{r.subject_id}"
        jpg = study_dir / f"s{r.study_id}" / f"{r.dicom_id}.jpg"
        with Image.open(jpg) as im:
            assert im.format == "JPEG" and im.mode == "L"
            assert im.size == (r.Columns, r.Rows)  # Columns = width, Rows = height
        report = (study_dir / f"s{r.study_id}.txt").read_text()
        assert report.startswith("FINDINGS: ") and "\n\nIMPRESSION: " in report
        with Image.open(root / "lung_masks" / f"{r.dicom_id}.png") as m:
            mask = np.array(m)
        assert mask.shape == (r.Rows, r.Columns) and set(np.unique(mask)) <= {0, 1, 2}
        assert mask.any() == (r.ViewPosition != "LATERAL")
    assert {(w, h) for w, h in zip(meta["Columns"], meta["Rows"])} == set(SHAPES)

    for name in ("chexpert", "negbio"):
        lab = pd.read_csv(root / f"mimic-cxr-2.0.0-{name}.csv.gz")
        assert list(lab.columns) == ["subject_id", "study_id", *CHEXPERT_COLUMNS]
        values = lab[list(CHEXPERT_COLUMNS)].to_numpy().ravel()
        assert set(values[~np.isnan(values)]) == {1.0, 0.0, -1.0} and np.isnan(values).any()
    split = pd.read_csv(root / "mimic-cxr-2.0.0-split.csv.gz", dtype=str)
    assert list(split.columns) == ["dicom_id", "study_id", "subject_id", "split"]
    assert set(split["split"]) == {"train", "validate", "test"}
    assert set(split["dicom_id"]) == set(meta["dicom_id"])

    boxes = pd.read_csv(root / "MS_CXR_Local_Alignment_v1.1.0.csv", dtype={"dicom_id": str})
    assert list(boxes.columns) == ["dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h",
                                   "image_width", "image_height"]
    size = {r.dicom_id: (r.Columns, r.Rows) for r in meta.itertuples()}
    for r in boxes.itertuples():
        assert (r.image_width, r.image_height) == size[r.dicom_id]
        assert 0 <= r.x and r.x + r.w <= r.image_width and 0 <= r.y and r.y + r.h <= r.image_height
        assert (root / r.path).is_file() and r.path.endswith(f"{r.dicom_id}.jpg")
        assert re.fullmatch(r"files/p1\d/p1\d{7}/s5\d{7}/[0-9a-f-]{44}\.jpg", r.path)


def test_demo_truth_mix_and_consistency(demo):
    root, summary = demo
    truth = pd.read_csv(root / "phantom_truth.csv", dtype=str, keep_default_na=False)
    assert list(truth.columns) == ["dicom_id", "finding", "side", "zone", "x", "y", "w", "h", "view",
                                   "marker_letter", "marker_corner"]
    meta = pd.read_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", dtype=str)
    assert set(truth["dicom_id"]) == set(meta["dicom_id"])
    assert (truth["finding"] == "").sum() >= 2  # some normals
    for f in ("Consolidation", "Nodule", "Pleural Effusion", "Pneumothorax"):
        sides = truth.loc[truth["finding"] == f, "side"]
        assert len(sides) >= 3 and {"left", "right"} <= set(sides)
    assert (truth["finding"] == "Cardiomegaly").sum() >= 3
    assert 1 <= truth.drop_duplicates("dicom_id")["marker_letter"].ne("").sum() < 24
    # sided truth on the right half of the image (patient's left) with the mask's lung there
    view = dict(zip(meta["dicom_id"], meta["ViewPosition"]))
    for r in truth[truth["side"] != ""].itertuples():
        assert view[r.dicom_id] in ("PA", "AP")
        x, y, w, h = (float(v) for v in (r.x, r.y, r.w, r.h))
        with Image.open(root / "lung_masks" / f"{r.dicom_id}.png") as m:
            mask = np.array(m)
        assert mask[int(y + h / 2), int(x + w / 2)] == (LEFT_LUNG if r.side == "left" else RIGHT_LUNG)
    # labels follow the truth (chexpert columns per study)
    lab = pd.read_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", dtype={"subject_id": str, "study_id": str})
    lab = lab.merge(meta[["dicom_id", "subject_id", "study_id"]], on=["subject_id", "study_id"])
    by_dicom = lab.set_index("dicom_id")
    for r in truth[truth["finding"] != ""].itertuples():
        col = {"Nodule": "Lung Lesion"}.get(r.finding, r.finding)
        assert by_dicom.loc[r.dicom_id, col] == 1.0
    normals = truth.loc[truth["finding"] == "", "dicom_id"]
    assert (by_dicom.loc[list(normals), "No Finding"] == 1.0).all()
    assert summary["n_images"] == 24 and summary["seconds"] < 3.0


def test_demo_readable_by_mimic_loader(demo):
    """The project's MIMIC-CXR loader reads the demo unchanged (skipped if that loader is absent)."""
    mimic = pytest.importorskip("pipeline.datasets.mimic_cxr")
    from types import SimpleNamespace

    root, _ = demo
    ds = mimic.MimicCXR(SimpleNamespace(labeler="chexpert", boxes_file=None, reports=True), root=root)
    recs = ds.records()
    assert len(recs) == 24
    for r in recs:
        assert Path(r.image_path).is_file() and r.report_text and r.lung_mask_path


def test_demo_side_marker_modes():
    from pipeline.phantoms import demo_plan

    default = demo_plan(24, 0, 0.1)
    assert [p["side_marker"] for p in default] == ["auto" if i % 5 == 1 else None for i in range(24)]
    assert demo_plan(24, 0, 0.1, "none") == [dict(p, side_marker=None) for p in default]
    for mode, flip in (("lesion_side", False), ("opposite", True)):
        plan = demo_plan(24, 0, 0.1, mode)
        assert [{k: v for k, v in p.items() if k != "side_marker"} for p in plan] == \
            [{k: v for k, v in p.items() if k != "side_marker"} for p in default]
        for p in plan:
            if p.get("side") is None:
                assert p["side_marker"] == "auto"
            else:
                same = "L" if p["side"] == "left" else "R"
                assert p["side_marker"] == ({"L": "R", "R": "L"}[same] if flip else same)
    with pytest.raises(ValueError, match="side_markers"):
        demo_plan(24, 0, 0.1, "sometimes")
