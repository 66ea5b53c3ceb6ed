"""NIH ChestX-ray14.

Files read (relative to `dataset.root`, made absolute)::

    Data_Entry_2017*.csv(.gz)     Image Index, Finding Labels (pipe-separated), Follow-up #, Patient ID,
                                  Patient Age, Patient Gender, View Position, OriginalImage[Width,Height], ...
    BBox_List_2017.csv(.gz)       Image Index, Finding Label, x, y, w, h (header "Bbox [x,y,w,h],,,")
    images/*.png  or  images_0NN/images/*.png
    train_val_list.txt, test_list.txt (optional): the official split

Only rows whose image file exists are kept (the release is split over 12 archives). Labels: the 14
NIH findings are 1.0 when listed and 0.0 otherwise ("No Finding" likewise); findings NIH does not
label stay not mentioned (None). Boxes are in the 1024 x 1024 pixel space of the released PNGs.

Bad rows stay with their image, named "FILE row N" (header = row 1; pipeline.datasets.tables):
a Finding Labels cell that is blank or lists a name outside the vocabulary rejects the image (the
other findings' 0.0 would be wrong); an Image Index on several rows is one image with a problem
when the rows agree; rows that differ give one record each, all rejected with an error naming
the rows (so a filter that keeps any of them shows it); a box whose finding is not in
the vocabulary or whose x, y, w or h is not a number is dropped with a problem. A bounding-box
file with fewer than six columns raises DatasetError.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.datasets.base import Box, CXRDataset, ImageRecord
from pipeline.datasets.tables import (DatasetError, absolute, duplicate_note, finding_name, groups, read_box,
                                      read_table, text, variants, where)
from pipeline.vocabulary import FINDINGS, canonical_finding

NIH_FINDINGS: tuple[str, ...] = tuple(
    canonical_finding(f)
    for f in (
        "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
        "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
        "Hernia", "No Finding",
    )
)
_ENTRY = ["Image Index", "Finding Labels", "Patient ID", "View Position"]
_VARIANT = ["Finding Labels", "Patient ID", "View Position"]  # Data_Entry fields that make an image
_BBOX = ["Image Index", "Finding Label", "x", "y", "w", "h"]


def _find(root: Path, pattern: str, what: str) -> Path:
    found = sorted(p for p in root.glob(pattern) if p.is_file())
    if not found:
        raise DatasetError(f"no {what} ({pattern}) in {root}")
    return found[-1]


def _labels(cell: object) -> tuple[dict[str, float | None], str | None]:
    """(NIH labels of a Finding Labels cell, a message when it is blank or names a finding
    outside the vocabulary). The labels of the names understood are kept for the filters."""
    names = [n for n in text(cell).split("|") if n.strip()]
    present, bad = set(), []
    for n in names:
        try:
            present.add(finding_name(n))
        except ValueError as e:
            bad.append(str(e))
    labels: dict[str, float | None] = {f: None for f in FINDINGS}
    labels.update({f: (1.0 if f in present else 0.0) for f in NIH_FINDINGS})
    if not names:
        return labels, "Finding Labels is blank (expected findings separated by '|', or 'No Finding')"
    return labels, "; ".join(bad) or None


class NIHChestXray14(CXRDataset):
    name = "nih_cxr14"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.root = absolute(cfg.root)
        if not self.root.is_dir():
            raise DatasetError(f"dataset.root={self.root} is not a directory")
        self.entry_file = _find(self.root, "Data_Entry_2017*.csv*", "label file")
        boxes = sorted(self.root.glob("BBox_List_2017.csv*"))
        self.boxes_file = absolute(cfg.boxes_file) if cfg.boxes_file else (boxes[-1] if boxes else None)
        if self.boxes_file is not None and not self.boxes_file.is_file():
            raise DatasetError(f"dataset.boxes_file={self.boxes_file} does not exist")

    def source_files(self) -> list[Path]:
        return [p for p in (self.entry_file, self.boxes_file) if p]

    def _image_paths(self) -> dict[str, Path]:
        paths: dict[str, Path] = {}
        for pattern in ("images/*.png", "images_*/images/*.png", "images_*/*.png"):
            for p in sorted(self.root.glob(pattern)):
                paths.setdefault(p.name, p)
        return paths

    def _split(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for fname, split in (("train_val_list.txt", "train_val"), ("test_list.txt", "test")):
            p = self.root / fname
            if p.is_file():
                out.update({line.strip(): split for line in p.read_text().splitlines() if line.strip()})
        return out

    def _boxes(self) -> tuple[dict[str, list[Box]], dict[str, list[str]]]:
        """({Image Index: boxes}, {Image Index: problems}); origins "FILE row N"."""
        boxes: dict[str, list[Box]] = {}
        problems: dict[str, list[str]] = {}
        if self.boxes_file is None:
            return boxes, problems
        for i, (name, finding, *coords) in self._box_rows().iterrows():
            box, problem = read_box(where(self.boxes_file, i), finding, coords, ref=[1024.0, 1024.0],
                                    ref_names=["reference width", "reference height"])
            if box is not None:
                boxes.setdefault(text(name), []).append(box)
            if problem:
                problems.setdefault(text(name), []).append(problem)
        return boxes, problems

    def _box_rows(self) -> pd.DataFrame:
        """The six columns of the bounding-box file, read by position (NIH's header is
        "Image Index,Finding Label,Bbox [x,y,w,h],,,"); none for a file without data rows;
        DatasetError when a row has fewer columns or the file cannot be parsed."""
        try:
            return read_table(self.boxes_file, [], "bounding-box file", header=None, skiprows=1, usecols=range(6))
        except DatasetError as e:
            if isinstance(e.__cause__, pd.errors.EmptyDataError):
                return pd.DataFrame(columns=range(6))
            raise DatasetError(f"{e}; expected six columns: {_BBOX}") from e

    def records(self) -> list[ImageRecord]:
        df = read_table(self.entry_file, _ENTRY, "label file")
        paths = self._image_paths()
        boxes, box_problems = self._boxes()
        split = self._split()
        rows = df.to_dict("index")
        out = []
        for name, idx in groups((i, text(r["Image Index"])) for i, r in rows.items()).items():
            if name not in paths:
                continue
            for rec in self._images(name, paths[name], idx, rows):
                rec.split = split.get(name, "")
                rec.boxes = list(boxes.get(name, []))
                rec.problems.extend(box_problems.get(name, []))
                out.append(rec)
        return out

    def _images(self, name: str, path: Path, indices: list[int], rows: dict[int, dict]) -> list[ImageRecord]:
        """The image of Data_Entry rows `indices` (one Image Index): identical rows are one record
        with a problem; differing rows give one record each, all with an error naming the rows."""
        problem, error = duplicate_note(self.entry_file, indices, f"Image Index {name!r}", [rows[i] for i in indices],
                                        _VARIANT, "one row per image")
        out = []
        for first in variants(indices, rows, _VARIANT):
            rec = self._record(name, path, first, rows[first])
            rec.problems.extend([problem] if problem else [])
            rec.error = "; ".join(e for e in (error, rec.error) if e) or None
            out.append(rec)
        return out

    def _record(self, name: str, path: Path, index: int, row: dict) -> ImageRecord:
        labels, bad = _labels(row["Finding Labels"])
        return ImageRecord(
            dataset=self.name, image_id=Path(name).stem, image_path=str(path), study_id=Path(name).stem,
            subject_id=text(row["Patient ID"]), view_position=text(row["View Position"]).upper(),
            labels=labels, error=f"{where(self.entry_file, index)}: {bad}" if bad else None,
        )
