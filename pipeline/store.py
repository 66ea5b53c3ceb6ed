"""The run store: one directory per run, one folder of Parquet part files per table.

Layout of a run directory::

    manifest.json            identity of the run (first invocation): config hash and the keys it covers
    manifests/*.json         one per invocation: resolved config, package versions, git commit, ...
    samples/ generations/ relevancy/ metrics/ sensitivity/ errors/   tables (part-*.parquet)
    report/                  the report stage's output

Each table is a folder of part files written atomically (temporary file, fsync, rename), so a
reader never sees half a file and a killed run loses at most the rows not yet flushed. Stages
skip keys already present, so a re-run resumes with nothing lost and nothing duplicated.
`pandas.read_parquet(run_dir / "samples")` reads a whole table.
"""
from __future__ import annotations

import os
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schemas
from pipeline.schemas import TableSpec


class Table:
    """A folder of Parquet part files with one explicit schema."""

    def __init__(self, root: Path, spec: TableSpec):
        self.spec = spec
        self.dir = Path(root) / spec.name

    @property
    def name(self) -> str:
        return self.spec.name

    def parts(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.glob("part-*.parquet") if not p.name.startswith("."))

    def read(self, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """The whole table (every shard's parts) as a DataFrame; empty with the schema's columns."""
        parts = self.parts()
        if not parts:
            return self.spec.schema.empty_table().to_pandas() if columns is None else (
                self.spec.schema.empty_table().select(list(columns)).to_pandas()
            )
        tables = [pq.read_table(p, columns=list(columns) if columns else None, schema=self.spec.schema) for p in parts]
        return pa.concat_tables(tables).to_pandas()

    def keys(self, where: dict[str, Any] | None = None) -> set[tuple]:
        """Key tuples already stored (optionally only rows whose columns equal `where`)."""
        cols = list(self.spec.key) + [c for c in (where or {}) if c not in self.spec.key]
        df = self.read(columns=cols)
        for c, v in (where or {}).items():
            df = df[df[c] == v]
        return set(map(tuple, df[list(self.spec.key)].itertuples(index=False, name=None)))

    def write_rows(self, rows: list[dict[str, Any]], tag: str) -> Path | None:
        """Write rows as one new part file, atomically. Returns its path (None if no rows)."""
        if not rows:
            return None
        self.dir.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist(rows, schema=self.spec.schema)
        name = f"part-{tag}-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        final = self.dir / name
        tmp = self.dir / f".tmp-{name}"
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        return final


class PartWriter:
    """Buffers rows for one table and flushes them as part files.

    Flushes when `flush_rows` rows are buffered or `flush_seconds` passed since the last flush,
    and on close. Call `maybe_flush()` only at a unit boundary (all rows of one sample added) so
    a part file never holds half a sample.
    """

    def __init__(self, table: Table, tag: str, flush_rows: int = 64, flush_seconds: float = 120.0):
        self.table = table
        self.tag = tag
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self.buffer: list[dict[str, Any]] = []
        self.last_flush = time.monotonic()
        self.rows_written = 0

    def add(self, rows: dict[str, Any] | Iterable[dict[str, Any]]) -> None:
        if isinstance(rows, dict):
            self.buffer.append(rows)
        else:
            self.buffer.extend(rows)

    def maybe_flush(self) -> None:
        if len(self.buffer) >= self.flush_rows or time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            self.table.write_rows(self.buffer, self.tag)
            self.rows_written += len(self.buffer)
            self.buffer = []
        self.last_flush = time.monotonic()

    def __enter__(self) -> "PartWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()


class RunStore:
    """All tables of one run directory."""

    def __init__(self, run_dir: str | os.PathLike):
        self.root = Path(run_dir)
        self.root.mkdir(parents=True, exist_ok=True)

    def table(self, name: str) -> Table:
        return Table(self.root, schemas.TABLES[name])

    def writer(self, name: str, shard: int, flush_rows: int = 64) -> PartWriter:
        return PartWriter(self.table(name), tag=f"s{shard:05d}", flush_rows=flush_rows)

    def record_error(
        self, stage: str, sample_id: str, exc: BaseException, *, image_id: str = "", shard: int = 0, detail: str = ""
    ) -> None:
        """Write one errors/ row at once (errors are rare; each is durable immediately)."""
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        row = {
            "stage": stage,
            "sample_id": sample_id,
            "image_id": image_id,
            "error_type": getattr(exc, "kind", None) or type(exc).__name__,
            "exception": type(exc).__name__,
            "message": (str(exc) or type(exc).__name__) + (f" [{detail}]" if detail else ""),
            "traceback": tb[-4000:],
            "time_utc": pd.Timestamp.now(tz="UTC").isoformat(),
            "shard": shard,
        }
        self.table("errors").write_rows([row], tag=f"s{shard:05d}")

    def error_keys(self, stage: str) -> set[str]:
        """sample_ids with an errors/ row for `stage`."""
        df = self.table("errors").read(columns=["stage", "sample_id"])
        return set(df.loc[df["stage"] == stage, "sample_id"])
