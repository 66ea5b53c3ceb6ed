"""MIMIC-CXR-JPG 2.x.

Layout read (relative to `dataset.root`, made absolute)::

    files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg
    files/pXX/pSUBJECT/sSTUDY.txt                      free-text report (optional)
    mimic-cxr-2.0.0-metadata.csv(.gz)                  dicom_id, subject_id, study_id, ViewPosition, Rows, Columns, ...
    mimic-cxr-2.0.0-chexpert.csv(.gz) / -negbio.csv(.gz)   study labels: 1.0, 0.0, -1.0, blank
    mimic-cxr-2.0.0-split.csv(.gz)                     dicom_id, study_id, subject_id, split
    MS_CXR_Local_Alignment_v1.*.csv (optional)         MS-CXR boxes in the DICOM's pixel space

Labels are per study (the labelers read the report), so every image of a study carries them.
MS-CXR boxes are rescaled from (image_width, image_height) to the decoded JPG's size at load.

Bad rows stay with their image, named "FILE row N" (header = row 1; pipeline.datasets.tables):
- metadata: a blank or non-numeric dicom_id / subject_id / study_id rejects the image (`error`);
  a dicom_id on several rows is one image with a problem when the rows agree; when they differ
  (subject, study or view) each differing row gives a record with an error naming the rows, all
  rejected (so a view filter that keeps any of them shows it);
- labels: a value outside 1 / 0 / -1 / blank is dropped (not mentioned) with a problem on each
  image of the study; a study on several rows: a problem when they agree, an error when not;
- split: a dicom_id on several rows with different splits is an error, identical ones a problem;
- MS-CXR: a box whose finding is not in the vocabulary, or whose x, y, w, h, image_width or
  image_height is not a number (blank included), is dropped with a problem; numbers that make
  no box (w <= 0, a reference size of 0, ...) are left to the box checks at load.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.datasets.base import Box, CXRDataset, ImageRecord
from pipeline.datasets.tables import (DatasetError, absolute, duplicate_note, groups, read_box, read_labels, read_table,
                                      row_number, text, variants, where)
from pipeline.vocabulary import CHEXPERT_FINDINGS

__all__ = ["DatasetError", "MimicCXR", "find_file", "read_csv"]

_META = ["dicom_id", "subject_id", "study_id", "ViewPosition"]
_VARIANT = ["subject_id", "study_id", "ViewPosition"]  # metadata fields that make an image
_MS_CXR = ["dicom_id", "category_name", "x", "y", "w", "h", "image_width", "image_height"]


def find_file(root: Path, stem: str) -> Path:
    """`stem` + .csv.gz or .csv in root; DatasetError naming both if neither exists."""
    for suffix in (".csv.gz", ".csv"):
        p = root / f"{stem}{suffix}"
        if p.is_file():
            return p
    raise DatasetError(f"missing {stem}.csv.gz (or .csv) in {root}")


def read_csv(path: Path, required: list[str], **kwargs) -> pd.DataFrame:
    """Read a CSV; DatasetError naming the file and the missing columns."""
    try:
        df = pd.read_csv(path, **kwargs)
    except Exception as e:  # malformed: parser errors, bad gzip, ...
        raise DatasetError(f"cannot parse {path}: {e}") from e
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DatasetError(f"{path} lacks column(s) {missing}; found {list(df.columns)}")
    return df


class _Notes:
    """Problems and errors gathered per key (dicom_id or study) while reading one file."""

    def __init__(self) -> None:
        self.problems: dict[Any, list[str]] = {}
        self.errors: dict[Any, list[str]] = {}

    def add(self, key: Any, problem: str | None = None, error: str | None = None) -> None:
        if problem:
            self.problems.setdefault(key, []).append(problem)
        if error:
            self.errors.setdefault(key, []).append(error)

    def apply(self, rec: ImageRecord, key: Any) -> None:
        rec.problems.extend(self.problems.get(key, []))
        errors = [e for e in (rec.error, *self.errors.get(key, [])) if e]
        rec.error = "; ".join(errors) if errors else None


class MimicCXR(CXRDataset):
    name = "mimic_cxr"

    def __init__(self, cfg, root: str | Path | None = None, name: str | None = None):
        super().__init__(cfg)
        self.root = absolute(root if root is not None else cfg.root)
        if name:
            self.name = name
        if not self.root.is_dir():
            raise DatasetError(f"dataset.root={self.root} is not a directory")
        self.metadata_file = find_file(self.root, "mimic-cxr-2.0.0-metadata")
        self.labels_file = find_file(self.root, f"mimic-cxr-2.0.0-{cfg.labeler}")
        self.split_file = find_file(self.root, "mimic-cxr-2.0.0-split")
        self.boxes_file = self._boxes_file()

    def _boxes_file(self) -> Path | None:
        if self.cfg.boxes_file:
            p = absolute(self.cfg.boxes_file)
            if not p.is_file():
                raise DatasetError(f"dataset.boxes_file={p} does not exist")
            return p
        found = sorted(self.root.glob("MS_CXR_Local_Alignment_v*.csv"))
        return found[-1] if found else None

    def source_files(self) -> list[Path]:
        return [p for p in (self.metadata_file, self.labels_file, self.split_file, self.boxes_file) if p]

    def records(self) -> list[ImageRecord]:
        meta = read_table(self.metadata_file, _META, "metadata")
        self._labels, self._label_notes = self._study_labels()
        self._split_of, self._split_notes = self._splits()
        self._box_of, self._box_notes = self._boxes()
        rows = meta.to_dict("index")
        by_dicom = groups((i, text(r["dicom_id"]) or f"row-{row_number(i)}") for i, r in rows.items())
        return [rec for dicom, idx in by_dicom.items() for rec in self._images(dicom, idx, rows)]

    def _images(self, dicom: str, indices: list[int], rows: dict[int, dict]) -> list[ImageRecord]:
        """The image of metadata rows `indices` (one dicom_id). Rows that differ in subject,
        study or view give one record each, all with the error (so a view filter that keeps any
        of them shows it); identical rows are one record with a problem."""
        problem, error = duplicate_note(self.metadata_file, indices, f"dicom_id {dicom!r}", [rows[i] for i in indices],
                                        _VARIANT, "one row per image")
        out = []
        for first in variants(indices, rows, _VARIANT):
            rec = self._record(dicom, first, rows[first])
            rec.problems.extend([problem] if problem else [])
            rec.error = "; ".join(e for e in (error, rec.error) if e) or None
            self._attach(rec)
            out.append(rec)
        return out

    def _attach(self, rec: ImageRecord) -> None:
        """Add the study's labels, the split and the boxes, with their files' notes."""
        key = (rec.subject_id, rec.study_id)
        rec.labels.update(self._labels.get(key, {}))
        rec.split = self._split_of.get(rec.image_id, "")
        rec.boxes = list(self._box_of.get(rec.image_id, []))
        self._label_notes.apply(rec, key)
        self._split_notes.apply(rec, rec.image_id)
        self._box_notes.apply(rec, rec.image_id)

    def _record(self, dicom: str, index: int, row: dict) -> ImageRecord:
        """The image of metadata row `index`; `error` when its ids cannot name a file."""
        subject, study = text(row["subject_id"]), text(row["study_id"])
        study_dir = self.root / "files" / f"p{subject[:2]}" / f"p{subject}"
        mask = self.root / "lung_masks" / f"{dicom}.png"
        return ImageRecord(
            dataset=self.name, image_id=dicom, image_path=str(study_dir / f"s{study}" / f"{dicom}.jpg"),
            study_id=study, subject_id=subject, view_position=text(row["ViewPosition"]).upper(),
            labels={c: None for c in CHEXPERT_FINDINGS}, report_text=self._report(study_dir, study),
            lung_mask_path=str(mask) if mask.is_file() else None, error=self._bad_ids(index, row),
        )

    def _bad_ids(self, index: int, row: dict) -> str | None:
        """A message when the row's ids cannot name an image file (blank or not digits)."""
        bad = []
        for col, what in (("dicom_id", "the image's DICOM id"), ("subject_id", "the patient's number, digits"),
                          ("study_id", "the study's number, digits")):
            value = text(row[col])
            if not value or (col != "dicom_id" and not value.isdigit()):
                bad.append(f"{col} {'is blank' if not value else repr(value) + ' is not a whole number'} "
                           f"(expected {what})")
        return f"{where(self.metadata_file, index)}: {'; '.join(bad)}" if bad else None

    def _report(self, study_dir: Path, study: str) -> str | None:
        if not self.cfg.reports:
            return None
        rp = study_dir / f"s{study}.txt"
        return rp.read_text(errors="replace") if rp.is_file() else None

    def _study_labels(self) -> tuple[dict[tuple[str, str], dict[str, float | None]], _Notes]:
        """{(subject, study): labels} from the first row of each study; notes per study."""
        df = read_table(self.labels_file, ["subject_id", "study_id"], "label file")
        cols = {c: c for c in df.columns if c in CHEXPERT_FINDINGS}
        rows = df.to_dict("index")
        notes, out = _Notes(), {}
        by_study = groups((i, (text(r["subject_id"]), text(r["study_id"]))) for i, r in rows.items())
        for key, idx in by_study.items():
            out[key], problems = read_labels(where(self.labels_file, idx[0]), rows[idx[0]], cols)
            for p in problems:
                notes.add(key, p)
            notes.add(key, *duplicate_note(self.labels_file, idx, f"study {key[1]!r} of subject {key[0]!r}",
                                           [rows[i] for i in idx], list(cols), "one row per study"))
        return out, notes

    def _splits(self) -> tuple[dict[str, str], _Notes]:
        df = read_table(self.split_file, ["dicom_id", "split"], "split file")
        rows = df.to_dict("index")
        notes, out = _Notes(), {}
        for dicom, idx in groups((i, text(r["dicom_id"])) for i, r in rows.items()).items():
            out[dicom] = text(rows[idx[0]]["split"])
            notes.add(dicom, *duplicate_note(self.split_file, idx, f"dicom_id {dicom!r}", [rows[i] for i in idx],
                                             ["split"], "one split per image"))
        return out, notes

    def _boxes(self) -> tuple[dict[str, list[Box]], _Notes]:
        """MS-CXR boxes per dicom_id (origin "FILE row N"); notes for the dropped ones."""
        notes, out = _Notes(), {}
        if self.boxes_file is None:
            return out, notes
        df = read_table(self.boxes_file, _MS_CXR, "MS-CXR box file")
        for i, r in df.to_dict("index").items():
            dicom = text(r["dicom_id"])
            box, problem = read_box(where(self.boxes_file, i), r["category_name"], [r[c] for c in "xywh"],
                                    ref=[r["image_width"], r["image_height"]], ref_names=["image_width", "image_height"])
            if box is not None:
                out.setdefault(dicom, []).append(box)
            notes.add(dicom, problem)
        return out, notes
