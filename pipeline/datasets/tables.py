"""Reading dataset tables cell by cell, with messages that name the file, the row and what was expected.

Conventions shared by every loader:

- "FILE row N" numbers the rows of a table file counting its header as row 1, so the i-th data
  row (0-based) is row i + 2: the line number of a CSV whose fields hold no line break, and the
  row number a spreadsheet shows. Blank lines count (they are kept while reading, then skipped).
  A Parquet table is numbered as the CSV holding it would be (its first record is row 2).
- Cells are read as text; only a blank cell is missing. "nan", "NA", "None" are text like any
  other, so a label "nan" is an unexpected value rather than a silent "not mentioned".
- A whole-file problem (unreadable file, missing columns) raises DatasetError naming the file and
  the columns expected. A problem with one row becomes the image's `error` (the image is not
  loaded) or one of its `problems` (a value or box dropped, the image loaded).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Hashable, Iterable, Sequence

import pandas as pd

from pipeline.datasets.base import Box
from pipeline.vocabulary import FINDINGS, canonical_finding, label_state

BOX_FIELDS: tuple[str, ...] = ("x", "y", "w", "h")


class DatasetError(ValueError):
    """A dataset's files are missing or malformed; the message names the file."""


def absolute(path: str | os.PathLike) -> Path:
    """`path` made absolute against the working directory (~ expanded, '..' folded, links
    kept), so records and fingerprints do not depend on where a run was started."""
    return Path(os.path.abspath(os.path.expanduser(str(path))))


def row_number(index: int) -> int:
    """The row number (header = row 1) of data row `index` (0-based)."""
    return int(index) + 2


def where(path: Path | str, index: int) -> str:
    """'FILE row N' for data row `index` (0-based) of a table file."""
    return f"{path} row {row_number(index)}"


def rows_text(indices: Sequence[int]) -> str:
    """'rows 3 and 9' / 'rows 3, 9 and 12' for data rows (0-based) `indices`."""
    nums = [str(row_number(i)) for i in indices]
    return "row " + nums[0] if len(nums) == 1 else "rows " + ", ".join(nums[:-1]) + " and " + nums[-1]


def read_table(path: Path, required: Sequence[str], what: str = "table", **kwargs: Any) -> pd.DataFrame:
    """A CSV (.csv or .csv.gz) read as text, blank cells missing, blank lines skipped; the
    DataFrame's index is the data row (0-based, see `where`). DatasetError naming the file when
    it cannot be parsed or lacks a `required` column."""
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""], skip_blank_lines=False, **kwargs)
    except Exception as e:  # malformed: parser errors, bad gzip, not a CSV, ...
        raise DatasetError(f"cannot parse {what} {path}: {e}") from e
    absent = [c for c in required if c not in df.columns]
    if absent:
        raise DatasetError(f"{what} {path} lacks column(s) {absent}; expected {list(required)}, found {list(df.columns)}")
    return df.dropna(how="all")


def missing(value: object) -> bool:
    """A missing cell: None, a NaN number, pandas' NA (Parquet), blank text."""
    if isinstance(value, str):
        return not value.strip()
    try:
        return value is None or bool(pd.api.types.is_scalar(value) and pd.isna(value))
    except (TypeError, ValueError):
        return False


def text(value: object) -> str:
    """A cell as stripped text; '' for a missing cell."""
    return "" if missing(value) else str(value).strip()


def number(value: object) -> float:
    """A cell as a float ('nan' and 'inf' text included: the box checks drop those); ValueError
    saying what was found for a missing cell (blank, None, a NaN number) or a non-number."""
    if missing(value):
        raise ValueError("is blank")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    s = text(value)
    try:
        return float(s)
    except ValueError:
        raise ValueError(f"{s!r} is not a number") from None


def finding_name(value: object) -> str:
    """The vocabulary name of a finding cell; ValueError listing the vocabulary otherwise."""
    s = text(value)
    if not s:
        raise ValueError(f"finding is blank (expected one of: {', '.join(FINDINGS)})")
    try:
        return canonical_finding(s)
    except KeyError:
        raise ValueError(f"finding {s!r} is not in the vocabulary (expected one of: {', '.join(FINDINGS)})") from None


def read_box(origin: str, finding: object, coords: Sequence[object], names: Sequence[str] = BOX_FIELDS,
             ref: Sequence[object] | None = None, ref_names: Sequence[str] = ()) -> tuple[Box | None, str | None]:
    """(a Box with `origin`, None) or (None, a message saying why the box was dropped).

    Here only cells that are not numbers (or an unknown finding) drop a box; numbers that make
    no box (negative, zero, non-finite, outside the image, a reference size of 0) pass through
    to pipeline.datasets.checks, which drops or clips them with a message at load."""
    try:
        name = finding_name(finding)
        values = [_cell_number(n, v, "pixels") for n, v in zip(names, coords)]
        refs = [_cell_number(n, v, "the reference image size in pixels") for n, v in zip(ref_names, ref or ())]
    except ValueError as e:
        return None, f"{origin}: box dropped: {e}"
    return Box(name, *values, *(refs or (None, None)), origin=origin), None


def _cell_number(name: str, value: object, expected: str) -> float:
    try:
        return number(value)
    except ValueError as e:
        raise ValueError(f"{name} {e}; expected a number ({expected})") from None


def read_labels(origin: str, row: dict[str, Any], columns: dict[str, str]) -> tuple[dict[str, float | None], list[str]]:
    """({finding: state}, problems) from `columns` ({finding: column}) of one row. A value
    outside 1 / 0 / -1 / blank is dropped (read as not mentioned) with a problem naming it."""
    labels: dict[str, float | None] = {}
    problems: list[str] = []
    for finding, col in columns.items():
        value = row.get(col)
        try:
            labels[finding] = None if missing(value) else label_state(value)
        except ValueError as e:
            labels[finding] = None
            problems.append(f"{origin}: column {col!r}: {e}; the value is dropped (read as not mentioned)")
    return labels, problems


def groups(keys: Iterable[tuple[int, Hashable]]) -> dict[Hashable, list[int]]:
    """{key: [data row indices]} from (index, key) pairs, keys in order of first appearance."""
    out: dict[Hashable, list[int]] = {}
    for index, key in keys:
        out.setdefault(key, []).append(index)
    return out


def variants(indices: Sequence[int], rows: dict[int, dict[str, Any]], fields: Sequence[str]) -> list[int]:
    """The first of `indices` for each distinct combination of `fields` among those rows."""
    return [idx[0] for idx in groups((i, tuple(text(rows[i].get(f)) for f in fields)) for i in indices).values()]


def duplicate_note(path: Path, indices: Sequence[int], key: str, rows: Sequence[dict[str, Any]],
                   fields: Sequence[str], expected: str) -> tuple[str | None, str | None]:
    """(problem, error) for `key` (e.g. "dicom_id 'abc'") listed on several rows of one file:
    identical `fields` make a problem (the rows are read once); differing ones an error naming
    the rows, the values and what was `expected`. (None, None) for a key on one row."""
    if len(indices) < 2:
        return None, None
    values = [tuple(text(r.get(f)) for f in fields) for r in rows]
    head = f"{path} {rows_text(indices)}: {key} is listed {len(indices)} times"
    if len(set(values)) == 1:
        return f"{head} with the same values; read once", None
    shown = " vs ".join(str(dict(zip(fields, v))) for v in dict.fromkeys(values))
    return None, f"{head} with different values ({shown}); expected {expected}"
