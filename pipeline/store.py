"""The run store: one directory per run, one folder of Parquet part files per table, one
sub-folder per shard.

Layout of a run directory::

    manifest.json            identity of the run (first invocation): config hash and the keys it covers
    manifests/*.json         one per invocation: resolved config, package versions, git commit, ...
    locks/                   one lock file per (shard, number of shards) and one for the run
    <table>/shard-KKKKK-of-NNNNN/part-*.parquet
                             samples/ generations/ relevancy/ body_masks/ metrics/ sensitivity/
                             answers/ faithfulness/ errors/: the rows shard K of N wrote
    report/                  the report stage's output

Each part file is written atomically (temporary file with a per-process unique name, fsync,
rename), so a reader never sees half a file and a killed run loses at most the rows not yet
flushed. A shard's stages read and write only their own shard folder (:class:`ShardView`): how
long a shard takes to find its done keys or its inputs does not depend on how large the run is.
Rows written under another sharding (another N, or part files directly in the table folder, the
layout of earlier versions) are still found: those "foreign" parts are scanned with a filter on
this shard's ids (a cost that grows with the run, paid only by mixed-sharding runs).

Part files: a writer flushes when its buffer reaches ``flush_mb`` MiB (estimated from the Arrow
size), ``flush_seconds`` have passed, or it closes; ``compact`` merges a finished shard's parts
into files of up to ``target_mb`` MiB by swapping the shard folder. Readers:
``pandas.read_parquet`` cannot read the nested layout with an explicit schema; use
``RunStore(run_dir).table(name).read()`` or ``pyarrow.dataset`` over ``table.parts()``.
"""
from __future__ import annotations

import os
import shutil
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipeline import schemas
from pipeline.schemas import TableSpec

PART_GLOB = "part-*.parquet"


def shard_folder(shard: int, num_shards: int) -> str:
    """Folder name of shard `shard` of `num_shards` inside a table folder."""
    return f"shard-{int(shard):05d}-of-{int(num_shards):05d}"


class Table:
    """A folder of Parquet part files (in per-shard sub-folders) with one explicit schema."""

    def __init__(self, root: Path, spec: TableSpec):
        self.spec = spec
        self.dir = Path(root) / spec.name

    @property
    def name(self) -> str:
        return self.spec.name

    def parts(self) -> list[Path]:
        """Every part file: in shard folders and (earlier layout) directly in the table folder."""
        if not self.dir.is_dir():
            return []
        flat = self.dir.glob(PART_GLOB)
        nested = self.dir.glob(f"shard-*/{PART_GLOB}")
        return sorted(p for p in [*flat, *nested] if not p.name.startswith("."))

    def shard_parts(self, shard: int, num_shards: int) -> tuple[list[Path], list[Path]]:
        """(parts of this shard's folder, foreign parts: other shardings' folders and flat parts).

        Folders of the same sharding but another shard are neither: they are never read."""
        own_dir = self.dir / shard_folder(shard, num_shards)
        own = sorted(p for p in own_dir.glob(PART_GLOB) if not p.name.startswith(".")) if own_dir.is_dir() else []
        if not self.dir.is_dir():
            return own, []
        suffix = f"-of-{int(num_shards):05d}"
        foreign = [p for p in self.dir.glob(PART_GLOB) if not p.name.startswith(".")]
        for sub in self.dir.iterdir():
            if sub.is_dir() and sub.name.startswith("shard-") and not sub.name.endswith(suffix):
                foreign.extend(p for p in sub.glob(PART_GLOB) if not p.name.startswith("."))
        return own, sorted(foreign)

    def dataset(self, parts: Sequence[Path] | None = None) -> ds.Dataset:
        """A pyarrow dataset over `parts` (default: every part) with the table's schema: columns
        missing from older files read as null, columns the schema no longer has are ignored."""
        files = [str(p) for p in (self.parts() if parts is None else parts)]
        return ds.dataset(files, schema=self.spec.schema, format="parquet")

    def read(self, columns: Sequence[str] | None = None, filter: ds.Expression | None = None,
             parts: Sequence[Path] | None = None) -> pd.DataFrame:
        """Rows of `parts` (default: the whole table) as a DataFrame; empty with the schema's
        columns when there is none. Column projection and `filter` are pushed down."""
        cols = list(columns) if columns is not None else None
        files = self.parts() if parts is None else list(parts)
        if not files:
            empty = self.spec.schema.empty_table()
            return (empty if cols is None else empty.select(cols)).to_pandas()
        return self.dataset(files).to_table(columns=cols, filter=filter).to_pandas()

    def keys(self, where: dict[str, Any] | None = None, parts: Sequence[Path] | None = None,
             filter: ds.Expression | None = None) -> set[tuple]:
        """Key tuples stored in `parts` (default: all), optionally only rows whose columns equal `where`."""
        cols = list(self.spec.key) + [c for c in (where or {}) if c not in self.spec.key]
        df = self.read(columns=cols, parts=parts, filter=filter)
        for c, v in (where or {}).items():
            df = df[df[c] == v]
        return set(map(tuple, df[list(self.spec.key)].itertuples(index=False, name=None)))

    def write_rows(self, rows: list[dict[str, Any]] | pa.Table, tag: str, folder: str | None = None) -> Path | None:
        """Write rows as one new part file in `folder` (a shard folder; None: the table folder),
        atomically. Returns its path (None if no rows)."""
        table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=self.spec.schema)
        if table.num_rows == 0:
            return None
        target = self.dir / folder if folder else self.dir
        target.mkdir(parents=True, exist_ok=True)
        name = f"part-{tag}-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        return _write_atomic(table, target / name)


def _write_atomic(table: pa.Table, final: Path) -> Path:
    tmp = final.with_name(f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{final.name}")
    pq.write_table(table, tmp, compression="zstd")
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    return final


class PartWriter:
    """Buffers rows for one table and flushes them as part files.

    Flushes when the buffered rows reach `flush_mb` MiB (Arrow size per row, estimated once from
    the first up to 64 rows) or `flush_seconds` passed since the last flush, and on close. Call `maybe_flush()` only
    at a unit boundary (all rows of one sample added) so a part file never holds half a sample.
    """

    def __init__(self, table: Table, tag: str, folder: str | None = None, flush_mb: float = 32.0,
                 flush_seconds: float = 300.0):
        self.table = table
        self.tag = tag
        self.folder = folder
        self.flush_bytes = flush_mb * 2**20
        self.flush_seconds = flush_seconds
        self.buffer: list[dict[str, Any]] = []
        self.bytes_per_row: float | None = None
        self.last_flush = time.monotonic()
        self.rows_written = 0

    def add(self, rows: dict[str, Any] | Iterable[dict[str, Any]]) -> None:
        if isinstance(rows, dict):
            self.buffer.append(rows)
        else:
            self.buffer.extend(rows)

    def _buffered_bytes(self) -> float:
        if self.bytes_per_row is None and self.buffer:
            sample = pa.Table.from_pylist(self.buffer[:64], schema=self.table.spec.schema)
            self.bytes_per_row = max(sample.nbytes / sample.num_rows, 1.0)
        return len(self.buffer) * (self.bytes_per_row or 0.0)

    def maybe_flush(self) -> None:
        if self._buffered_bytes() >= self.flush_bytes or time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            self.table.write_rows(self.buffer, self.tag, self.folder)
            self.rows_written += len(self.buffer)
            self.buffer = []
        self.last_flush = time.monotonic()

    def __enter__(self) -> "PartWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()


def error_row(stage: str, sample_id: str, exc: BaseException, image_id: str, shard: int, detail: str) -> dict[str, Any]:
    """One errors/ row: what failed, where, and the traceback's tail."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return {
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


class RunStore:
    """All tables of one run directory."""

    def __init__(self, run_dir: str | os.PathLike):
        self.root = Path(run_dir)
        self.root.mkdir(parents=True, exist_ok=True)

    def table(self, name: str) -> Table:
        return Table(self.root, schemas.TABLES[name])

    def writer(self, name: str, shard: int = 0, num_shards: int = 1, flush_mb: float = 32.0) -> PartWriter:
        """A writer into the folder of shard `shard` of `num_shards` of table `name`."""
        return self.shard(shard, num_shards, flush_mb=flush_mb).writer(name)

    def shard(self, shard: int, num_shards: int, flush_mb: float = 32.0, flush_seconds: float = 300.0) -> "ShardView":
        """The tables as shard `shard` of `num_shards` reads and writes them."""
        return ShardView(self, int(shard), int(num_shards), flush_mb, flush_seconds)

    def record_error(self, stage: str, sample_id: str, exc: BaseException, *, image_id: str = "", shard: int = 0,
                     num_shards: int = 1, detail: str = "") -> None:
        """Write one errors/ row at once into the folder of shard `shard` of `num_shards`."""
        self.shard(shard, num_shards).record_error(stage, sample_id, exc, image_id=image_id, detail=detail)

    def error_keys(self, stage: str) -> set[str]:
        """sample_ids with an errors/ row for `stage`, in the whole run."""
        return {k[1] for k in self.table("errors").keys(filter=ds.field("stage") == stage)}


class ShardView:
    """One shard's own part of every table (see the module docstring): reads that never touch
    other shards' folders, writers into its own folder."""

    def __init__(self, store: RunStore, shard: int, num_shards: int, flush_mb: float, flush_seconds: float):
        self.store = store
        self.shard = shard
        self.num_shards = num_shards
        self.folder = shard_folder(shard, num_shards)
        self.flush_mb = flush_mb
        self.flush_seconds = flush_seconds

    def read(self, name: str, columns: Sequence[str] | None = None, filter: ds.Expression | None = None,
             foreign_filter: ds.Expression | None = None) -> pd.DataFrame:
        """This shard's rows of table `name`. Foreign parts (other shardings) are read only with
        `foreign_filter` (a restriction to this shard's ids), and skipped when it is None."""
        table = self.store.table(name)
        own, foreign = table.shard_parts(self.shard, self.num_shards)
        frames = [table.read(columns, filter=filter, parts=own)]
        if foreign and foreign_filter is not None:
            f = foreign_filter if filter is None else foreign_filter & filter
            frames.append(table.read(columns, filter=f, parts=foreign))
        frames = [f for f in frames if len(f)] or frames[:1]
        return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)

    def keys(self, name: str, foreign_filter: ds.Expression | None = None,
             filter: ds.Expression | None = None) -> set[tuple]:
        """Key tuples of table `name` in this shard (see :meth:`read`)."""
        key = list(self.store.table(name).spec.key)
        df = self.read(name, key, filter=filter, foreign_filter=foreign_filter)
        return set(map(tuple, df[key].itertuples(index=False, name=None)))

    def error_keys(self, stage: str, foreign_filter: ds.Expression | None = None) -> set[str]:
        """sample_ids with an errors/ row for `stage` in this shard."""
        stage_is = ds.field("stage") == stage
        df = self.read("errors", ["stage", "sample_id"], filter=stage_is, foreign_filter=foreign_filter)
        return set(df["sample_id"])

    def writer(self, name: str) -> PartWriter:
        return PartWriter(self.store.table(name), tag=f"s{self.shard:05d}", folder=self.folder,
                          flush_mb=self.flush_mb, flush_seconds=self.flush_seconds)

    def write_rows(self, name: str, rows: list[dict[str, Any]]) -> Path | None:
        return self.store.table(name).write_rows(rows, tag=f"s{self.shard:05d}", folder=self.folder)

    def record_error(self, stage: str, sample_id: str, exc: BaseException, *, image_id: str = "",
                     detail: str = "") -> None:
        """Write one errors/ row at once (errors are rare; each is durable immediately)."""
        self.write_rows("errors", [error_row(stage, sample_id, exc, image_id, self.shard, detail)])

    def compact(self, target_mb: float = 256.0) -> dict[str, int]:
        """Merge this shard's part files of every table into files of up to `target_mb` MiB.

        Per table: the merged files are written into a new folder beside the shard folder, which
        then replaces it (two renames); the old parts are deleted last. Run it only while this
        shard holds its lock (no writer of this shard is running). Returns {table: parts before}
        for the tables that were merged."""
        merged: dict[str, int] = {}
        for name in schemas.TABLES:
            table = self.store.table(name)
            for stale in table.dir.glob(f".*-{self.folder}-*") if table.dir.is_dir() else []:
                shutil.rmtree(stale, ignore_errors=True)  # left by a compact that was killed
            own, _ = table.shard_parts(self.shard, self.num_shards)
            if len(own) < 2:
                continue
            _compact_folder(table, own, self.folder, target_mb)
            merged[name] = len(own)
        return merged


def _compact_folder(table: Table, parts: list[Path], folder: str, target_mb: float) -> None:
    """Rewrite `parts` (all of `table`'s `folder`) as few large files and swap the folder in."""
    final_dir = table.dir / folder
    stamp = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    new_dir = table.dir / f".compact-{folder}-{stamp}"
    new_dir.mkdir(parents=True)
    batch: list[pa.Table] = []
    size = 0
    for p in parts:
        t = pq.read_table(p, schema=table.spec.schema)
        batch.append(t)
        size += t.nbytes
        if size >= target_mb * 2**20:
            _write_atomic(pa.concat_tables(batch), new_dir / f"part-c-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet")
            batch, size = [], 0
    if batch:
        _write_atomic(pa.concat_tables(batch), new_dir / f"part-c-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet")
    old_dir = table.dir / f".old-{folder}-{stamp}"
    os.replace(final_dir, old_dir)
    os.replace(new_dir, final_dir)
    shutil.rmtree(old_dir, ignore_errors=True)
