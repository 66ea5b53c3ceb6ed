"""Any collection listed in a CSV or Parquet manifest (`dataset=manifest dataset.path=FILE`).

Columns: `image_path` (required; relative paths are relative to the manifest's folder) and
optionally `image_id` (default: the path relative to that folder), `study_id`, `subject_id`,
`view_position`, `split`, `prompt_text` (a per-image prompt that replaces the prompt set's
variants for that image), `report_text`, label columns named after a finding (`Pleural Effusion`)
or its label column (`label_pleural_effusion`) with 1 / 0 / -1 / blank, and boxes either as a JSON
list in `boxes` ([{"finding": ..., "x": ..., "y": ..., "w": ..., "h": ...}], pixels of the image)
or as one row per box with `box_finding, box_x, box_y, box_w, box_h` (rows of one image_id merged).
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from pipeline.datasets.base import Box, CXRDataset, ImageRecord
from pipeline.datasets.mimic_cxr import DatasetError
from pipeline.vocabulary import FINDINGS, canonical_finding, label_column, label_state

_BOX_COLS = ["box_finding", "box_x", "box_y", "box_w", "box_h"]


def _text(value: object) -> str:
    return "" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value)


class ManifestDataset(CXRDataset):
    name = "manifest"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.path = Path(cfg.path)
        if not self.path.is_file():
            raise DatasetError(f"dataset.path={self.path} does not exist")

    def source_files(self) -> list[Path]:
        return [self.path]

    def _read(self) -> pd.DataFrame:
        try:
            if self.path.suffix.lower() in (".parquet", ".pq"):
                df = pd.read_parquet(self.path)
            else:
                df = pd.read_csv(self.path, dtype=str, keep_default_na=False, na_values=[""])
        except Exception as e:
            raise DatasetError(f"cannot parse manifest {self.path}: {e}") from e
        if "image_path" not in df.columns:
            raise DatasetError(f"manifest {self.path} lacks the required column 'image_path'; found {list(df.columns)}")
        return df

    def records(self) -> list[ImageRecord]:
        df = self._read()
        base = self.path.parent
        label_cols: dict[str, str] = {}
        for f in FINDINGS:
            for col in (f, label_column(f)):
                if col in df.columns:
                    label_cols[f] = col
        by_id: dict[str, ImageRecord] = {}
        for i, row in enumerate(df.to_dict("records")):
            raw_path = _text(row.get("image_path"))
            if not raw_path:
                raise DatasetError(f"manifest {self.path} row {i + 2}: empty image_path")
            path = Path(raw_path)
            if not path.is_absolute():
                path = base / path
            image_id = _text(row.get("image_id")) or raw_path
            rec = by_id.get(image_id)
            if rec is None:
                try:
                    labels = {f: label_state(row.get(c)) for f, c in label_cols.items()}
                except ValueError as e:
                    raise DatasetError(f"manifest {self.path} row {i + 2}: {e}") from e
                rec = ImageRecord(
                    dataset=self.name,
                    image_id=image_id,
                    image_path=str(path),
                    study_id=_text(row.get("study_id")),
                    subject_id=_text(row.get("subject_id")),
                    view_position=_text(row.get("view_position")).upper(),
                    split=_text(row.get("split")),
                    labels=labels,
                    report_text=_text(row.get("report_text")) or None,
                    prompt_text=_text(row.get("prompt_text")) or None,
                )
                by_id[image_id] = rec
                if _text(row.get("boxes")):
                    try:
                        for b in json.loads(row["boxes"]):
                            rec.boxes.append(Box(canonical_finding(b["finding"]), float(b["x"]), float(b["y"]),
                                                 float(b["w"]), float(b["h"])))
                    except (ValueError, KeyError, TypeError) as e:
                        raise DatasetError(f"manifest {self.path} row {i + 2}: bad boxes JSON: {e}") from e
            if all(c in df.columns for c in _BOX_COLS) and _text(row.get("box_finding")):
                try:
                    rec.boxes.append(Box(canonical_finding(row["box_finding"]), *(float(row[c]) for c in _BOX_COLS[1:])))
                except (ValueError, KeyError) as e:
                    raise DatasetError(f"manifest {self.path} row {i + 2}: bad box: {e}") from e
        return list(by_id.values())
