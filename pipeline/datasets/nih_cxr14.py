"""NIH ChestX-ray14.

Files read (relative to `dataset.root`)::

    Data_Entry_2017*.csv(.gz)     Image Index, Finding Labels (pipe-separated), Follow-up #, Patient ID,
                                  Patient Age, Patient Gender, View Position, OriginalImage[Width,Height], ...
    BBox_List_2017.csv(.gz)       Image Index, Finding Label, x, y, w, h (header "Bbox [x,y,w,h],,,")
    images/*.png  or  images_0NN/images/*.png
    train_val_list.txt, test_list.txt (optional): the official split

Only rows whose image file exists are kept (the release is split over 12 archives). Labels: the 14
NIH findings are 1.0 when listed and 0.0 otherwise ("No Finding" likewise); findings NIH does not
label stay not mentioned (None). Boxes are in the 1024 x 1024 pixel space of the released PNGs.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.datasets.base import Box, CXRDataset, ImageRecord
from pipeline.datasets.mimic_cxr import DatasetError
from pipeline.vocabulary import FINDINGS, canonical_finding

NIH_FINDINGS: tuple[str, ...] = tuple(
    canonical_finding(f)
    for f in (
        "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
        "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
        "Hernia", "No Finding",
    )
)


def _find(root: Path, pattern: str, what: str) -> Path:
    found = sorted(p for p in root.glob(pattern) if p.is_file())
    if not found:
        raise DatasetError(f"no {what} ({pattern}) in {root}")
    return found[-1]


class NIHChestXray14(CXRDataset):
    name = "nih_cxr14"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.root = Path(cfg.root)
        if not self.root.is_dir():
            raise DatasetError(f"dataset.root={self.root} is not a directory")
        self.entry_file = _find(self.root, "Data_Entry_2017*.csv*", "label file")
        boxes = sorted(self.root.glob("BBox_List_2017.csv*"))
        self.boxes_file = Path(cfg.boxes_file) if cfg.boxes_file else (boxes[-1] if boxes else None)

    def source_files(self) -> list[Path]:
        return [p for p in (self.entry_file, self.boxes_file) if p]

    def _image_paths(self) -> dict[str, Path]:
        paths: dict[str, Path] = {}
        for pattern in ("images/*.png", "images_*/images/*.png", "images_*/*.png"):
            for p in self.root.glob(pattern):
                paths.setdefault(p.name, p)
        return paths

    def _split(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for fname, split in (("train_val_list.txt", "train_val"), ("test_list.txt", "test")):
            p = self.root / fname
            if p.is_file():
                out.update({line.strip(): split for line in p.read_text().splitlines() if line.strip()})
        return out

    def _boxes(self) -> dict[str, list[Box]]:
        if self.boxes_file is None:
            return {}
        try:  # NIH's header is "Image Index,Finding Label,Bbox [x,y,w,h],,,": read by position
            df = pd.read_csv(self.boxes_file, header=None, skiprows=1, usecols=range(6), dtype={0: str, 1: str})
        except Exception as e:
            raise DatasetError(f"cannot parse {self.boxes_file}: {e}") from e
        out: dict[str, list[Box]] = {}
        for name, finding, x, y, w, h in df.itertuples(index=False, name=None):
            out.setdefault(str(name), []).append(
                Box(canonical_finding(finding), float(x), float(y), float(w), float(h), 1024.0, 1024.0)
            )
        return out

    def records(self) -> list[ImageRecord]:
        try:
            df = pd.read_csv(self.entry_file, dtype=str)
        except Exception as e:
            raise DatasetError(f"cannot parse {self.entry_file}: {e}") from e
        need = ["Image Index", "Finding Labels", "Patient ID", "View Position"]
        missing = [c for c in need if c not in df.columns]
        if missing:
            raise DatasetError(f"{self.entry_file} lacks column(s) {missing}")
        paths = self._image_paths()
        boxes = self._boxes()
        split = self._split()
        out = []
        for row in df[need].itertuples(index=False, name=None):
            name, findings, patient, view = row
            path = paths.get(name)
            if path is None:
                continue
            present = {canonical_finding(f) for f in str(findings).split("|") if f.strip()}
            labels: dict[str, float | None] = {f: None for f in FINDINGS}
            labels.update({f: (1.0 if f in present else 0.0) for f in NIH_FINDINGS})
            out.append(
                ImageRecord(
                    dataset=self.name,
                    image_id=Path(name).stem,
                    image_path=str(path),
                    study_id=Path(name).stem,
                    subject_id=str(patient),
                    view_position=str(view).upper(),
                    split=split.get(name, ""),
                    labels=labels,
                    boxes=boxes.get(name, []),
                )
            )
        return out
