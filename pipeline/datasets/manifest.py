"""Any collection listed in a CSV or Parquet manifest (`dataset=manifest dataset.path=FILE`).

Columns: `image_path` (required; a relative path is relative to the manifest's folder and is
stored absolute) and optionally `image_id` (default: the `image_path` text), `study_id`,
`subject_id`, `view_position`, `split`, `prompt_text` (a per-image prompt that replaces the
prompt set's variants for that image), `report_text`, label columns named after a finding
(`Pleural Effusion`) or its label column (`label_pleural_effusion`) with 1 / 0 / -1 / blank, and
boxes either as a JSON list in `boxes` ([{"finding": ..., "x": ..., "y": ..., "w": ..., "h": ...}],
pixels of the image) or as one row per box with `box_finding, box_x, box_y, box_w, box_h`.

Several rows of one image_id that name the same file are one image (one row per box): its
boxes are merged, the other columns come from its first row (a later row that gives a different
non-blank value is noted as a problem). One image_id naming DIFFERENT files is an error: each
of its files becomes a record with `error` naming all its rows, and none is loaded.

What is wrong in one row stays with its image (messages name "FILE row N", the header being
row 1; see pipeline.datasets.tables): a blank image_path rejects the image; a label value
outside 1 / 0 / -1 / blank is dropped (not mentioned), and a box with an unknown finding or a
coordinate that is not a number is dropped, each with a problem. Whole-file problems raise
DatasetError: an unreadable file, no `image_path` column, some but not all `box_*` columns, a
`label_*` column that names no finding of the vocabulary (`label_text`, MS-CXR's phrase, is not
a label column).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.datasets.base import Box, CXRDataset, ImageRecord
from pipeline.datasets.tables import (DatasetError, absolute, groups, read_box, read_labels, read_table, row_number,
                                      rows_text, text, where)
from pipeline.vocabulary import FINDINGS, LABEL_COLUMNS, label_column

_BOX_COLS = ["box_finding", "box_x", "box_y", "box_w", "box_h"]
_FIELDS = ["study_id", "subject_id", "view_position", "split", "report_text", "prompt_text"]
_NOT_LABELS = {"label_text"}


class ManifestDataset(CXRDataset):
    name = "manifest"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.path = absolute(cfg.path)
        if not self.path.is_file():
            raise DatasetError(f"dataset.path={self.path} does not exist")

    def source_files(self) -> list[Path]:
        return [self.path]

    def _read(self) -> pd.DataFrame:
        if self.path.suffix.lower() not in (".parquet", ".pq"):
            return read_table(self.path, ["image_path"], "manifest")
        try:
            df = pd.read_parquet(self.path)
        except Exception as e:
            raise DatasetError(f"cannot parse manifest {self.path}: {e}") from e
        if "image_path" not in df.columns:
            raise DatasetError(f"manifest {self.path} lacks the required column 'image_path'; found {list(df.columns)}")
        return df.reset_index(drop=True)

    def _label_columns(self, df: pd.DataFrame) -> dict[str, str]:
        """{finding: column}; DatasetError for a label_* column that names no finding."""
        unknown = [c for c in df.columns if str(c).startswith("label_") and c not in LABEL_COLUMNS
                   and c not in _NOT_LABELS]
        if unknown:
            raise DatasetError(f"manifest {self.path}: column(s) {unknown} name no finding of the vocabulary; "
                               f"expected label columns among {list(LABEL_COLUMNS)} (or the names {list(FINDINGS)})")
        return {f: col for f in FINDINGS for col in (f, label_column(f)) if col in df.columns}

    def _check_box_columns(self, df: pd.DataFrame) -> bool:
        """Whether the one-row-per-box columns are there; DatasetError when only some are."""
        present = [c for c in _BOX_COLS if c in df.columns]
        if present and len(present) < len(_BOX_COLS):
            raise DatasetError(f"manifest {self.path} has box column(s) {present} but lacks "
                               f"{[c for c in _BOX_COLS if c not in present]}; expected all of {_BOX_COLS}")
        return bool(present)

    def records(self) -> list[ImageRecord]:
        df = self._read()
        self.label_cols = self._label_columns(df)
        self.box_cols = self._check_box_columns(df)
        rows = df.to_dict("index")
        by_id = groups((i, self._image_id(i, row)) for i, row in rows.items())
        return [rec for image_id, idx in by_id.items() for rec in self._images(image_id, idx, rows)]

    def _image_id(self, index: int, row: dict[str, Any]) -> str:
        return text(row.get("image_id")) or text(row.get("image_path")) or f"row-{row_number(index)}"

    def _file(self, row: dict[str, Any]) -> str:
        raw = text(row.get("image_path"))
        return os.path.normpath(self.path.parent / raw) if raw else ""

    def _images(self, image_id: str, indices: list[int], rows: dict[int, dict]) -> list[ImageRecord]:
        """The record(s) of one image_id: one image, or one rejected record per file it names."""
        by_file = groups((i, self._file(rows[i])) for i in indices)
        if len(by_file) == 1:
            return [self._record(image_id, indices, rows)]
        listed = "; ".join(f"{rows_text(idx)}: {text(rows[idx[0]].get('image_path')) or '(blank)'}"
                           for idx in by_file.values())
        error = (f"{self.path} {rows_text(indices)}: image_id {image_id!r} names {len(by_file)} different files "
                 f"({listed}); expected one file per image_id (rows of one image must name the same file)")
        out = []
        for idx in by_file.values():
            rec = self._record(image_id, idx, rows)
            rec.error = "; ".join(e for e in (error, rec.error) if e)
            out.append(rec)
        return out

    def _record(self, image_id: str, indices: list[int], rows: dict[int, dict]) -> ImageRecord:
        first = rows[indices[0]]
        origin = where(self.path, indices[0])
        labels, problems = read_labels(origin, first, self.label_cols)
        rec = ImageRecord(
            dataset=self.name, image_id=image_id, image_path=self._file(first),
            study_id=text(first.get("study_id")), subject_id=text(first.get("subject_id")),
            view_position=text(first.get("view_position")).upper(), split=text(first.get("split")),
            labels=labels, report_text=text(first.get("report_text")) or None,
            prompt_text=text(first.get("prompt_text")) or None, problems=problems,
        )
        if not rec.image_path:
            rec.error = (f"{origin}: image_path is blank; expected the image file's path (absolute or "
                         f"relative to {self.path.parent})")
        seen_json: set[str] = set()
        for i in indices:
            self._add_boxes(rec, i, rows[i], seen_json)
            if i != indices[0]:
                rec.problems.extend(self._disagreements(image_id, indices[0], i, first, rows[i]))
        return rec

    def _disagreements(self, image_id: str, i0: int, i: int, first: dict, row: dict) -> list[str]:
        cols = [c for c in [*_FIELDS, *self.label_cols.values()] if c in row]
        return [f"{where(self.path, i)}: {c} {text(row[c])!r} differs from row {row_number(i0)}'s "
                f"{text(first.get(c))!r} for image_id {image_id!r}; row {row_number(i0)}'s is used"
                for c in cols if text(row[c]) and not _same(row[c], first.get(c))]

    def _add_boxes(self, rec: ImageRecord, i: int, row: dict, seen_json: set[str]) -> None:
        cell = row.get("boxes")
        key = json.dumps(cell, default=str) if isinstance(cell, (list, np.ndarray)) else text(cell)
        if key and key not in seen_json:  # the same JSON repeated on an image's rows is read once
            seen_json.add(key)
            self._json_boxes(rec, i, cell)
        if self.box_cols and any(text(row.get(c)) for c in _BOX_COLS):
            box, problem = read_box(where(self.path, i), row.get("box_finding"),
                                    [row.get(c) for c in _BOX_COLS[1:]], _BOX_COLS[1:])
            _keep(rec, box, problem)

    def _json_boxes(self, rec: ImageRecord, i: int, cell: object) -> None:
        """Boxes of a `boxes` cell: a JSON list of {finding, x, y, w, h} objects (Parquet: a list)."""
        origin = where(self.path, i)
        try:
            items = json.loads(cell) if isinstance(cell, str) else list(cell)  # type: ignore[arg-type]
            if not isinstance(items, list):
                raise ValueError(f"found a JSON {type(items).__name__}")
        except (ValueError, TypeError) as e:
            rec.problems.append(f"{origin}: boxes dropped: not a JSON list of {{\"finding\", \"x\", \"y\", \"w\", "
                                f"\"h\"}} objects ({e})")
            return
        for k, item in enumerate(items):
            where_k = f"{origin} boxes[{k}]"
            if not isinstance(item, dict):
                _keep(rec, None, f"{where_k}: box dropped: expected an object with finding, x, y, w, h; found {item!r}")
                continue
            absent = [f for f in ("finding", "x", "y", "w", "h") if f not in item]
            if absent:
                _keep(rec, None, f"{where_k}: box dropped: lacks {absent} (expected finding, x, y, w, h)")
                continue
            _keep(rec, *read_box(where_k, item["finding"], [item[f] for f in ("x", "y", "w", "h")]))


def _same(a: object, b: object) -> bool:
    """Equal cells: the same text, or the same number ("1" and "1.0")."""
    try:
        return text(a) == text(b) or float(text(a)) == float(text(b))
    except ValueError:
        return False


def _keep(rec: ImageRecord, box: Box | None, problem: str | None) -> None:
    if box is not None:
        rec.boxes.append(box)
    if problem:
        rec.problems.append(problem)
