"""MIMIC-CXR-JPG 2.x.

Layout read (relative to `dataset.root`)::

    files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg
    files/pXX/pSUBJECT/sSTUDY.txt                      free-text report (optional)
    mimic-cxr-2.0.0-metadata.csv(.gz)                  dicom_id, subject_id, study_id, ViewPosition, Rows, Columns, ...
    mimic-cxr-2.0.0-chexpert.csv(.gz) / -negbio.csv(.gz)   study labels: 1.0, 0.0, -1.0, blank
    mimic-cxr-2.0.0-split.csv(.gz)                     dicom_id, study_id, subject_id, split
    MS_CXR_Local_Alignment_v1.*.csv (optional)         MS-CXR boxes in the DICOM's pixel space

Labels are per study (the labelers read the report), so every image of a study carries them.
MS-CXR boxes are rescaled from (image_width, image_height) to the decoded JPG's size at load.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.datasets.base import Box, CXRDataset, ImageRecord
from pipeline.vocabulary import CHEXPERT_FINDINGS, canonical_finding, label_state


class DatasetError(ValueError):
    """A dataset's files are missing or malformed; the message names the file."""


def find_file(root: Path, stem: str) -> Path:
    """`stem` + .csv.gz or .csv in root; DatasetError naming both if neither exists."""
    for suffix in (".csv.gz", ".csv"):
        p = root / f"{stem}{suffix}"
        if p.is_file():
            return p
    raise DatasetError(f"missing {stem}.csv.gz (or .csv) in {root}")


def read_csv(path: Path, required: list[str], **kwargs) -> pd.DataFrame:
    """Read a CSV with string ids; DatasetError naming the file and the missing columns."""
    try:
        df = pd.read_csv(path, **kwargs)
    except Exception as e:  # malformed: parser errors, bad gzip, ...
        raise DatasetError(f"cannot parse {path}: {e}") from e
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DatasetError(f"{path} lacks column(s) {missing}; found {list(df.columns)}")
    return df


class MimicCXR(CXRDataset):
    name = "mimic_cxr"

    def __init__(self, cfg, root: str | Path | None = None, name: str | None = None):
        super().__init__(cfg)
        self.root = Path(root if root is not None else cfg.root)
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
            p = Path(self.cfg.boxes_file)
            if not p.is_file():
                raise DatasetError(f"dataset.boxes_file={p} does not exist")
            return p
        found = sorted(self.root.glob("MS_CXR_Local_Alignment_v*.csv"))
        return found[-1] if found else None

    def source_files(self) -> list[Path]:
        return [p for p in (self.metadata_file, self.labels_file, self.split_file, self.boxes_file) if p]

    def records(self) -> list[ImageRecord]:
        ids = {"dicom_id": str, "subject_id": str, "study_id": str}
        meta = read_csv(self.metadata_file, ["dicom_id", "subject_id", "study_id", "ViewPosition"], dtype=ids)
        labels = read_csv(self.labels_file, ["subject_id", "study_id"], dtype=ids)
        split = read_csv(self.split_file, ["dicom_id", "split"], dtype=ids)
        label_cols = [c for c in labels.columns if c in CHEXPERT_FINDINGS]
        study_labels = {
            (row["subject_id"], row["study_id"]): {c: label_state(row[c]) for c in label_cols}
            for row in labels.to_dict("records")
        }
        split_of = dict(zip(split["dicom_id"], split["split"]))
        boxes = self._boxes()
        out = []
        for row in meta.to_dict("records"):
            subject, study, dicom = row["subject_id"], row["study_id"], row["dicom_id"]
            study_dir = self.root / "files" / f"p{subject[:2]}" / f"p{subject}"
            view = row["ViewPosition"]
            lab = {c: None for c in CHEXPERT_FINDINGS}
            lab.update(study_labels.get((subject, study), {}))
            report = None
            if self.cfg.reports:
                rp = study_dir / f"s{study}.txt"
                report = rp.read_text(errors="replace") if rp.is_file() else None
            mask = self.root / "lung_masks" / f"{dicom}.png"
            out.append(
                ImageRecord(
                    dataset=self.name,
                    image_id=dicom,
                    image_path=str(study_dir / f"s{study}" / f"{dicom}.jpg"),
                    study_id=study,
                    subject_id=subject,
                    view_position="" if pd.isna(view) else str(view).upper(),
                    split=str(split_of.get(dicom, "")),
                    labels=lab,
                    boxes=boxes.get(dicom, []),
                    report_text=report,
                    lung_mask_path=str(mask) if mask.is_file() else None,
                )
            )
        return out

    def _boxes(self) -> dict[str, list[Box]]:
        if self.boxes_file is None:
            return {}
        cols = ["dicom_id", "category_name", "x", "y", "w", "h", "image_width", "image_height"]
        df = read_csv(self.boxes_file, cols, dtype={"dicom_id": str})
        out: dict[str, list[Box]] = {}
        for r in df.to_dict("records"):
            out.setdefault(r["dicom_id"], []).append(
                Box(canonical_finding(r["category_name"]), float(r["x"]), float(r["y"]), float(r["w"]),
                    float(r["h"]), float(r["image_width"]), float(r["image_height"]))
            )
        return out
