"""Engine access for the report: the run's tables as DuckDB views, and the aggregate queries.

Tables. A table is the folder ``RUN/<table>/``; its Parquet part files lie directly inside it
(``part-*.parquet``) or one level down in per-shard folders (``shard-*/part-*.parquet``), as
:meth:`pipeline.store.Table.parts` lists them; no file or folder whose name starts with "." is
ever read. Each table is one view over all its parts read with union-by-name semantics: a column
of the schema (:mod:`pipeline.schemas`) that no part file has reads as NULL, and the stored
``pass_*`` columns of earlier versions are never exposed (see below). A table with no part file
is an empty view with the schema's columns; a table whose parts cannot be opened is empty too
and named in :attr:`RunData.unreadable`.

Memory. Nothing reads a whole table into pandas. The engine (an in-process DuckDB connection with
a ``memory_limit`` and a spill folder) scans the part files and returns aggregates: counts and
per-group statistics, per-(group, patient) sums streamed in Arrow record batches sorted by group,
so that at most one group's patients are held at a time, and the map columns of
``relevancy/`` (``image_map``, ``text_map``) only for the few samples the gallery and the token
explorer show (:meth:`RunData.relevancy_maps`, a filter pushed down to the scan).

Pass flags. The SQL functions ``map_flags(...)`` (over the metrics/ columns that
``metrics.quality.map_flags`` reads, :func:`flag_inputs`) and ``pair_flags(...)`` (sensitivity/)
return structs of the flags of :mod:`metrics.quality` (``MAP_FLAGS``, ``PAIR_FLAGS``; 1.0 pass,
0.0 fail, NULL not applicable) computed by ``map_flags`` / ``pair_flags`` themselves, per vector
of rows, with the thresholds given to :func:`load_run` (the thresholds in force when the report
is built).

Patients. ``patient`` is ``samples.subject_id``, or the ``image_id`` where that is null or
empty (and for rows whose image has no samples/ row): the cluster of the report's bootstrap.
"""
from __future__ import annotations

import inspect
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from metrics.quality import MAP_FLAGS, PAIR_FLAGS, Thresholds, map_flags, pair_flags
from pipeline.schemas import TABLES
from pipeline.store import RunStore
from reports.stats import CurveMean, summarise_groups

log = logging.getLogger(__name__)

MAP_COLUMNS = ("image_map", "text_map")
TABLE_NAMES = ("samples", "generations", "relevancy", "metrics", "sensitivity", "answers", "faithfulness", "errors",
               "body_masks")
FLAG_COLUMNS = frozenset(MAP_FLAGS) | frozenset(PAIR_FLAGS)
TARGET_KEY = ("sample_id", "target_kind", "target_label", "token_start")


@dataclass
class EngineSettings:
    """DuckDB resources: ``memory_limit`` (DuckDB size string, e.g. "2GB"), ``threads`` (0: the
    machine's cores, at most 8), ``quantile_values`` (the most values whose exact quantiles one
    query may hold; a single group above it gets a t-digest estimate), ``batch_rows`` (rows per
    Arrow record batch streamed to Python)."""

    memory_limit: str = "2GB"
    threads: int = 0
    quantile_values: int = 16_000_000
    batch_rows: int = 65_536

    def thread_count(self) -> int:
        return int(self.threads) if self.threads and int(self.threads) > 0 else max(1, min(8, os.cpu_count() or 1))


# ---------------------------------------------------------------------------------------------
# SQL helpers


def ident(name: str) -> str:
    """A quoted SQL identifier."""
    return '"' + str(name).replace('"', '""') + '"'


def num(expr: str) -> str:
    """`expr` as DOUBLE with NaN read as NULL (aggregates skip it, as pandas skips NaN)."""
    return f"(CASE WHEN isnan(CAST({expr} AS DOUBLE)) THEN NULL ELSE CAST({expr} AS DOUBLE) END)"


def mean_aggs(values: Mapping[str, str]) -> dict[str, str]:
    """Aggregates of the mean of each value expression: ``s__<name>`` (sum) and ``n__<name>``
    (count of non-null values); see :func:`reports.stats.summarise_groups`."""
    out: dict[str, str] = {}
    for name, expr in values.items():
        out[f"s__{name}"] = f"coalesce(sum({expr}), 0)"
        out[f"n__{name}"] = f"count({expr})"
    return out


def ratio_aggs(name: str, numerator: str, denominator: str) -> dict[str, str]:
    """Aggregates of a ratio of per-row 0/1 (or count) expressions: sum(numerator) / sum(denominator)."""
    return {f"s__{name}": f"coalesce(sum(CAST({numerator} AS DOUBLE)), 0)",
            f"n__{name}": f"coalesce(sum(CAST({denominator} AS DOUBLE)), 0)"}


def finding_key_sql(alias: str = "") -> str:
    """The finding a metrics row is summarised under: its ``finding``; else a keyword target's
    label; else ``(<target kind>)``."""
    a = f"{alias}." if alias else ""
    return (f"(CASE WHEN {a}finding IS NOT NULL AND {a}finding <> '' THEN {a}finding "
            f"WHEN {a}target_kind = 'keywords' THEN {a}target_label "
            f"ELSE '(' || coalesce({a}target_kind, 'None') || ')' END)")


def view_key_sql(alias: str = "") -> str:
    """``view_position``, ``(unknown)`` where null or empty."""
    a = f"{alias}." if alias else ""
    return f"(CASE WHEN {a}view_position IS NOT NULL AND {a}view_position <> '' THEN {a}view_position ELSE '(unknown)' END)"


def in_list(column: str, values: Sequence[Any]) -> tuple[str, list[Any]]:
    """``column IN (?, ...)`` with its parameters (FALSE for no values)."""
    if not values:
        return "FALSE", []
    return f"{column} IN ({', '.join('?' for _ in values)})", list(values)


def _duck_type(t: pa.DataType) -> str:
    """The DuckDB type name of an Arrow type of the schemas."""
    simple = {pa.string(): "VARCHAR", pa.float32(): "FLOAT", pa.float64(): "DOUBLE", pa.int32(): "INTEGER",
              pa.int64(): "BIGINT", pa.bool_(): "BOOLEAN", pa.binary(): "BLOB"}
    if t in simple:
        return simple[t]
    if pa.types.is_list(t):
        return _duck_type(t.value_type) + "[]"
    if pa.types.is_struct(t):
        return "STRUCT(" + ", ".join(f"{ident(f.name)} {_duck_type(f.type)}" for f in t) + ")"
    return "VARCHAR"


def _to_pandas(table: pa.Table) -> pd.DataFrame:
    """Arrow to pandas; decimals (DuckDB's HUGEINT sums) become float64."""
    cols = {}
    for name, col in zip(table.column_names, table.columns):
        cols[name] = col.cast(pa.float64()) if pa.types.is_decimal(col.type) else col
    return pa.table(cols).to_pandas() if cols else table.to_pandas()


def iter_groups(batches: Iterable[pa.RecordBatch], by: Sequence[str]) -> Iterator[tuple[tuple, pd.DataFrame]]:
    """(group key, rows) from record batches sorted by `by`; a group may span batches. With no
    `by` everything is one group with key ()."""
    by = list(by)
    parts: list[pd.DataFrame] = []
    key: tuple = ()
    for batch in batches:
        df = _to_pandas(pa.Table.from_batches([batch]))
        if df.empty:
            continue
        chunks = [((), df)] if not by else [(k if isinstance(k, tuple) else (k,), g)
                                            for k, g in df.groupby(by, sort=False, dropna=False)]
        for k, g in chunks:
            if parts and not _same_key(k, key):
                yield key, pd.concat(parts, ignore_index=True)
                parts = []
            parts.append(g)
            key = k
    if parts:
        yield key, pd.concat(parts, ignore_index=True)


def _same_key(a: tuple, b: tuple) -> bool:
    """Group keys equal, a missing value equal to a missing value."""
    return len(a) == len(b) and all(x == y or (pd.isna(x) and pd.isna(y)) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------
# the run


@dataclass
class RunData:
    """One run directory as the report reads it: an engine with a view per table, the manifests,
    the row counts, and the thresholds the pass flags are derived with. Close it (or use it as a
    context manager) to release the engine and its spill folder."""

    root: Path
    con: Any  # duckdb connection
    run_manifest: dict[str, Any]  # manifest.json (identity, config hash); {} if absent
    manifests: list[dict[str, Any]]  # manifests/*.json, oldest first, each with "_file"
    thresholds: Thresholds
    settings: EngineSettings
    rows: dict[str, int] = field(default_factory=dict)  # table -> rows
    columns: dict[str, set[str]] = field(default_factory=dict)  # table -> columns some part file has
    unreadable: dict[str, str] = field(default_factory=dict)  # table -> why it could not be read
    spill_dir: Path | None = None

    # -- engine -------------------------------------------------------------------------------

    def close(self) -> None:
        try:
            if self.con is not None:
                self.con.close()
        finally:
            if self.spill_dir is not None:
                shutil.rmtree(self.spill_dir, ignore_errors=True)

    def __enter__(self) -> "RunData":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def sql(self, query: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> pd.DataFrame:
        """The (small) result of a query as a DataFrame."""
        rel = self.con.sql(query, params=params) if params else self.con.sql(query)
        if rel is None:
            return pd.DataFrame()
        to_table = getattr(rel, "to_arrow_table", None) or getattr(rel, "fetch_arrow_table")
        return _to_pandas(to_table())

    def scalar(self, query: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> Any:
        rel = self.con.sql(query, params=params) if params else self.con.sql(query)
        rows = rel.fetchall()
        return rows[0][0] if rows else None

    def batches(self, query: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> Iterator[pa.RecordBatch]:
        """The result of a query as Arrow record batches of ``settings.batch_rows`` rows."""
        rel = self.con.sql(query, params=params) if params else self.con.sql(query)
        reader_of = getattr(rel, "to_arrow_reader", None) or getattr(rel, "fetch_record_batch")
        yield from reader_of(self.settings.batch_rows)

    def has(self, name: str) -> bool:
        return self.rows.get(name, 0) > 0

    # -- manifests ------------------------------------------------------------------------------

    def newest_manifest(self, with_key: str | None = None, stage: str | None = None) -> dict[str, Any]:
        """The newest invocation manifest holding `with_key` (and having run `stage`); {} if none."""
        for m in reversed(self.manifests):
            if with_key is not None and not m.get(with_key):
                continue
            if stage is not None and stage not in (m.get("stages") or {}) and \
                    stage not in ((m.get("config") or {}).get("stages") or []):
                continue
            return m
        return {}

    @property
    def model(self) -> dict[str, Any]:
        """The newest manifest's "model" entry (written when a stage loaded the model); {} if none."""
        return dict(self.newest_manifest("model").get("model") or {})

    def config(self, stage: str | None = None) -> dict[str, Any]:
        """Resolved config of the newest invocation that ran `stage` (any invocation if None)."""
        m = self.newest_manifest("config", stage=stage) if stage else self.newest_manifest("config")
        return dict(m.get("config") or {})

    # -- small row reads ----------------------------------------------------------------------

    def rows_where(self, table: str, column: str, values: Iterable[Any],
                   columns: Sequence[str] | None = None) -> pd.DataFrame:
        """Rows of `table` whose `column` is one of `values` (a few: the filter is pushed down)."""
        vals = sorted(set(values))
        cols = "*" if columns is None else ", ".join(ident(c) for c in dict.fromkeys([column, *columns]))
        cond, params = in_list(ident(column), vals)
        return self.sql(f"SELECT {cols} FROM {ident(table)} WHERE {cond}", params)

    def relevancy_maps(self, sample_ids: Iterable[str], columns: Iterable[str] | None = None) -> pd.DataFrame:
        """relevancy/ rows (with their maps) of the given samples, read with a pushed-down filter."""
        return self.rows_where("relevancy", "sample_id", sample_ids, None if columns is None else list(columns))

    def distinct(self, table: str, column: str) -> list[Any]:
        """The non-null distinct values of a column (a small domain: methods, kinds)."""
        df = self.sql(f"SELECT DISTINCT {ident(column)} AS v FROM {ident(table)} WHERE {ident(column)} IS NOT NULL")
        return sorted(df["v"].tolist()) if len(df) else []


# ---------------------------------------------------------------------------------------------
# opening a run


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log.warning("report: could not read %s: %s", path, e)
        return {}


def part_files(root: Path, name: str) -> list[Path]:
    """Part files of table `name`: flat and in per-shard folders, nothing under a "." name."""
    tab = RunStore(root).table(name) if (root / name).is_dir() else None
    if tab is None:
        return []
    found = set(tab.parts())
    found.update(tab.dir.glob("part-*.parquet"))
    found.update(tab.dir.glob("*/part-*.parquet"))
    return sorted(p for p in found if not any(s.startswith(".") for s in p.relative_to(tab.dir).parts))


def _connect(settings: EngineSettings, spill_dir: Path | None) -> Any:
    import duckdb

    config = {"memory_limit": settings.memory_limit, "threads": str(settings.thread_count()),
              "preserve_insertion_order": "false"}
    if spill_dir is not None:
        config["temp_directory"] = str(spill_dir)
    con = duckdb.connect(config=config)
    # Parquet min/max statistics leave NaN out; propagated, they let the optimizer fold isnan()
    # of a column that holds NaN (a score not applicable to a row) to false.
    con.execute("SET disabled_optimizers = 'statistics_propagation'")
    return con


def _spill_folder(root: Path) -> Path | None:
    """A private spill folder inside the run directory (else the system's temporary folder)."""
    for base in (root, None):
        try:
            return Path(tempfile.mkdtemp(prefix=".report-engine-", dir=base))
        except OSError:
            continue
    return None


def _register_table(data: RunData, name: str) -> None:
    """View `name` over the table's part files (see the module docstring)."""
    schema = TABLES[name].schema
    files = part_files(data.root, name)
    present: set[str] = set()
    source = "(SELECT 1) AS nothing WHERE FALSE"
    if files:
        try:
            rel = data.con.read_parquet([str(p) for p in files], union_by_name=True)
            rel.create_view(f"raw__{name}", replace=True)
            present = set(rel.columns)
            source = ident(f"raw__{name}")
        except Exception as e:  # a broken part file must not stop the report; it is reported
            log.warning("report: table %s could not be read: %s", name, e)
            data.unreadable[name] = f"{type(e).__name__}: {e}"
    cols = [ident(f.name) if f.name in present else f"CAST(NULL AS {_duck_type(f.type)}) AS {ident(f.name)}"
            for f in schema if f.name not in FLAG_COLUMNS]
    data.con.execute(f"CREATE OR REPLACE VIEW {ident(name)} AS SELECT {', '.join(cols)} FROM {source}")
    data.columns[name] = present - FLAG_COLUMNS
    try:
        data.rows[name] = int(data.scalar(f"SELECT count(*) FROM {ident(name)}")) if present else 0
    except Exception as e:
        log.warning("report: table %s could not be counted: %s", name, e)
        data.unreadable[name] = f"{type(e).__name__}: {e}"
        data.con.execute(f"CREATE OR REPLACE VIEW {ident(name)} AS SELECT {', '.join(_null_columns(schema))} "
                         "FROM (SELECT 1) AS nothing WHERE FALSE")
        data.rows[name] = 0


def _null_columns(schema: pa.Schema) -> list[str]:
    return [f"CAST(NULL AS {_duck_type(f.type)}) AS {ident(f.name)}" for f in schema if f.name not in FLAG_COLUMNS]


class _Probe(dict):
    """A row of dummy scores that records which columns a flag function reads."""

    def __init__(self, values: dict[str, np.ndarray]):
        super().__init__(values)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> np.ndarray:
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.read.add(str(key))
        return super().__contains__(key)


def flag_inputs(kind: str) -> list[str]:
    """The columns of metrics/ (kind "map") or sensitivity/ (kind "pair") that
    ``metrics.quality.map_flags`` / ``pair_flags`` read: found by calling it on one dummy row,
    so the flags' inputs are never listed a second time here."""
    fn, table = (map_flags, "metrics") if kind == "map" else (pair_flags, "sensitivity")
    dummy = {f.name: np.array(["PA"], dtype=object) if pa.types.is_string(f.type) else np.array([np.nan])
             for f in TABLES[table].schema if f.name not in FLAG_COLUMNS}
    probe = _Probe(dummy)
    fn(probe, Thresholds())
    return [f.name for f in TABLES[table].schema if f.name in probe.read]


def flags_call(kind: str, alias: str) -> str:
    """SQL call of the flag function of `kind` on the columns of table alias `alias`."""
    return f"{kind}_flags({', '.join(f'{alias}.{ident(c)}' for c in flag_inputs(kind))})"


def _register_flags(con: Any, thresholds: Thresholds) -> None:
    """SQL functions map_flags(...) and pair_flags(...) bound to `thresholds` (module docstring)."""

    def as_struct(flags: dict[str, np.ndarray], names: Sequence[str]) -> pa.StructArray:
        return pa.StructArray.from_arrays([pa.array(flags[k], type=pa.float64(), from_pandas=True) for k in names],
                                          names=list(names))

    def register(kind: str, fn: Any, names: Sequence[str]) -> None:
        cols = flag_inputs(kind)
        types = {f.name: f.type for f in TABLES["metrics" if kind == "map" else "sensitivity"].schema}

        def udf(*arrays: pa.Array) -> pa.StructArray:
            scores = {c: a.to_numpy(zero_copy_only=False) for c, a in zip(cols, arrays)}
            return as_struct(fn(scores, thresholds), names)

        udf.__signature__ = inspect.Signature(  # one parameter per input column (DuckDB checks the arity)
            [inspect.Parameter(c, inspect.Parameter.POSITIONAL_ONLY) for c in cols])

        params = ["VARCHAR" if pa.types.is_string(types[c]) else "DOUBLE" for c in cols]
        struct = "STRUCT(" + ", ".join(f"{n} DOUBLE" for n in names) + ")"
        con.create_function(f"{kind}_flags", udf, params, struct, type="arrow", null_handling="special")

    register("map", map_flags, MAP_FLAGS)
    register("pair", pair_flags, PAIR_FLAGS)


def thresholds_of(mapping: Mapping[str, Any] | None) -> Thresholds:
    """Thresholds from a `metrics` config mapping; keys it lacks keep their defaults."""
    merged = {**asdict(Thresholds()), **{k: v for k, v in dict(mapping or {}).items() if v is not None}}
    return Thresholds.from_config(merged)


def _register_patients(data: RunData) -> None:
    """Table patient_of_image(image_id, patient): subject_id, else the image id."""
    data.con.execute(
        "CREATE OR REPLACE TEMP TABLE patient_of_image AS SELECT image_id, "
        "coalesce(min(nullif(subject_id, '')), image_id) AS patient FROM samples WHERE image_id IS NOT NULL "
        "GROUP BY image_id")


def read_manifests(root: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(manifest.json or {}, manifests/*.json oldest first, each with "_file")."""
    run_manifest = _read_json(root / "manifest.json") if (root / "manifest.json").is_file() else {}
    manifests = []
    for p in sorted((root / "manifests").glob("*.json")) if (root / "manifests").is_dir() else []:
        d = _read_json(p)
        if d:
            d["_file"] = p.name
            manifests.append(d)
    manifests.sort(key=lambda d: (str(d.get("started_utc", "")), d["_file"]))
    return run_manifest, manifests


def load_run(root: str | os.PathLike, thresholds: Mapping[str, Any] | Thresholds | None = None,
             settings: EngineSettings | None = None) -> RunData:
    """Open a run directory: a view per table, the manifests, row counts (nothing read whole).

    `thresholds`: the metrics config in force (or :class:`Thresholds`) the pass flags are
    derived with; None: the metrics config of the newest invocation that ran the score stage,
    else the defaults of :class:`metrics.quality.Thresholds` (missing keys keep their defaults)."""
    root = Path(root)
    settings = settings or EngineSettings()
    run_manifest, manifests = read_manifests(root)
    data = RunData(root=root, con=None, run_manifest=run_manifest, manifests=manifests, thresholds=Thresholds(),
                   settings=settings)
    if thresholds is None:
        thresholds = (data.config("score") or {}).get("metrics")
    data.thresholds = thresholds if isinstance(thresholds, Thresholds) else thresholds_of(thresholds)
    data.spill_dir = _spill_folder(root)
    try:
        data.con = _connect(settings, data.spill_dir)
        _register_flags(data.con, data.thresholds)
        for name in TABLE_NAMES:
            _register_table(data, name)
        _register_patients(data)
    except Exception:
        data.close()
        raise
    return data


# ---------------------------------------------------------------------------------------------
# row sources: SQL relations with the columns the sections group and summarise by


def metrics_rows(kinds: Sequence[str] | None = None) -> str:
    """metrics/ rows with ``finding_group``, ``view_group``, ``patient`` and ``flags`` (the derived
    map flags, a struct); only target kinds `kinds` when given."""
    where = "" if kinds is None else "WHERE m.target_kind IN (" + ", ".join(_lit(k) for k in kinds) + ")"
    return (f"SELECT m.*, {finding_key_sql('m')} AS finding_group, {view_key_sql('m')} AS view_group, "
            "coalesce(p.patient, m.image_id, m.sample_id) AS patient, "
            f"{flags_call('map', 'm')} AS flags "
            f"FROM metrics m LEFT JOIN patient_of_image p ON p.image_id = m.image_id {where}")


def sensitivity_rows() -> str:
    """sensitivity/ rows with ``finding`` (target label, "(none)" if null), ``comparison`` (same
    style / format or not), ``patient`` and ``flags`` (the derived pair flag)."""
    return ("SELECT s.*, coalesce(s.target_label, '(none)') AS finding, "
            "(CASE WHEN coalesce(s.style_a, '') = coalesce(s.style_b, '') THEN 'same style' ELSE 'style differs' END)"
            " || ' / ' || "
            "(CASE WHEN coalesce(s.format_a, FALSE) = coalesce(s.format_b, FALSE) THEN 'same format' "
            "ELSE 'format differs' END) AS comparison, "
            f"coalesce(p.patient, s.image_id) AS patient, {flags_call('pair', 's')} AS flags "
            "FROM sensitivity s LEFT JOIN patient_of_image p ON p.image_id = s.image_id")


def answer_pairs() -> str:
    """One row per pair of prompts (image, target, prompt_a, prompt_b), counted once over
    methods: ``agree`` (1/0, NULL unless both answers parsed), ``comparison``, ``patient``, the
    prompts' style and format."""
    return ("SELECT image_id, target_kind, target_label, prompt_a, prompt_b, min(comparison) AS comparison, "
            "min(patient) AS patient, min(CAST(answers_agree AS INTEGER)) AS agree, "
            "min(style_a) AS style_a, min(style_b) AS style_b, min(format_a) AS format_a, "
            "min(format_b) AS format_b "
            f"FROM ({sensitivity_rows()}) GROUP BY image_id, target_kind, target_label, prompt_a, prompt_b")


def answers_rows() -> str:
    """answers/ rows with ``parsed`` ("unparsed" if null), ``label_state`` ("not_mentioned" if
    null), ``finding`` and ``prompt`` ("(none)" if null) and ``patient``."""
    return ("SELECT coalesce(a.parsed, 'unparsed') AS parsed, coalesce(a.label_state, 'not_mentioned') AS label_state, "
            "coalesce(a.finding, '(none)') AS finding, coalesce(a.prompt_id, '(none)') AS prompt, "
            "coalesce(p.patient, a.image_id, a.sample_id) AS patient "
            "FROM answers a LEFT JOIN patient_of_image p ON p.image_id = a.image_id")


def faithfulness_rows() -> str:
    """faithfulness/ rows with ``patient`` (through the sample's image)."""
    return ("SELECT f.*, coalesce(p.patient, s.image_id, f.sample_id) AS patient FROM faithfulness f "
            "LEFT JOIN (SELECT sample_id, min(image_id) AS image_id FROM samples GROUP BY sample_id) s "
            "ON s.sample_id = f.sample_id LEFT JOIN patient_of_image p ON p.image_id = s.image_id")


def _lit(v: Any) -> str:
    """A SQL string literal."""
    return "'" + str(v).replace("'", "''") + "'"


# ---------------------------------------------------------------------------------------------
# aggregates


def patient_groups(data: RunData, source: str, by: Sequence[str], aggs: Mapping[str, str],
                   params: Sequence[Any] | None = None) -> Iterator[tuple[tuple, pd.DataFrame]]:
    """Per group of `by`, one row per patient with the aggregates `aggs` (name -> SQL aggregate)
    over that patient's rows of `source` (a relation with the `by` columns and ``patient``).
    Streamed sorted by group: one group's patients at a time."""
    keys = [ident(b) for b in by]
    sel = ", ".join([*keys, "patient", *(f"{a} AS {ident(n)}" for n, a in aggs.items())])
    gb = ", ".join([*keys, "patient"])
    query = f"SELECT {sel} FROM ({source}) AS src GROUP BY {gb} ORDER BY {gb}"
    yield from iter_groups(data.batches(query, params), by)


def group_counts(data: RunData, source: str, by: Sequence[str], columns: Sequence[str]) -> pd.DataFrame:
    """Per group: count of non-null values of each column (named as the column)."""
    keys = [ident(b) for b in by]
    sel = ", ".join([*keys, *(f"count({ident(c)}) AS {ident(c)}" for c in columns)])
    gb = f" GROUP BY {', '.join(keys)}" if keys else ""
    return data.sql(f"SELECT {sel} FROM ({source}) AS src{gb}")


def quantiles(data: RunData, source: str, by: Sequence[str], columns: Sequence[str],
              probs: Sequence[float] = (0.5,)) -> pd.DataFrame:
    """Long table: `by`..., ``score`` (column), ``n`` and one column ``q<p>`` per probability.

    Exact (linear interpolation between order statistics, as numpy's default) for every group;
    the values held at once stay under ``settings.quantile_values`` by querying groups in
    batches, and a single group larger than that gets a t-digest estimate (``exact`` False)."""
    counts = group_counts(data, source, by, columns)
    out = []
    budget = max(1, int(data.settings.quantile_values))
    total = int(counts[list(columns)].to_numpy().sum()) if len(counts) else 0
    if total <= budget:
        return _quantile_query(data, source, by, columns, probs, None, exact=True)
    for col in columns:
        sizes = counts[[*by, col]].rename(columns={col: "n"})
        sizes = sizes[sizes["n"] > 0]
        for keys, exact in _quantile_batches(sizes, by, budget):
            out.append(_quantile_query(data, source, by, [col], probs, keys, exact))
    return pd.concat(out, ignore_index=True) if out else _quantile_query(data, source, by, columns, probs, None, True)


def _quantile_batches(sizes: pd.DataFrame, by: Sequence[str], budget: int) -> Iterator[tuple[pd.DataFrame, bool]]:
    """Groups (rows of `sizes`) in batches of at most `budget` values; an oversized group alone."""
    batch, held = [], 0
    for i, n in enumerate(sizes["n"].to_numpy()):
        if n > budget:
            yield sizes.iloc[[i]][list(by)], False
            continue
        if held + n > budget and batch:
            yield sizes.iloc[batch][list(by)], True
            batch, held = [], 0
        batch.append(i)
        held += int(n)
    if batch:
        yield sizes.iloc[batch][list(by)], True


def _quantile_query(data: RunData, source: str, by: Sequence[str], columns: Sequence[str], probs: Sequence[float],
                    keys: pd.DataFrame | None, exact: bool) -> pd.DataFrame:
    fn = "quantile_cont" if exact else "approx_quantile"
    plist = "[" + ", ".join(repr(float(p)) for p in probs) + "]"
    kcols = [ident(b) for b in by]
    sel = [*(f"src.{k}" for k in kcols)]
    for c in columns:
        sel += [f"count(src.{ident(c)}) AS {ident('n__' + c)}", f"{fn}(src.{ident(c)}, {plist}) AS {ident('q__' + c)}"]
    join = ""
    if keys is not None and by:
        name = f"qkeys_{id(keys)}"
        data.con.register(name, pa.Table.from_pandas(keys.reset_index(drop=True), preserve_index=False))
        cond = " AND ".join(f"src.{k} IS NOT DISTINCT FROM kk.{k}" for k in kcols)
        join = f" SEMI JOIN {name} kk ON {cond}"
    gb = f" GROUP BY {', '.join(f'src.{k}' for k in kcols)}" if kcols else ""
    try:
        wide = data.sql(f"SELECT {', '.join(sel)} FROM ({source}) AS src{join}{gb}")
    finally:
        if join:
            data.con.unregister(name)
    return _long_quantiles(wide, by, columns, probs, exact)


def _long_quantiles(wide: pd.DataFrame, by: Sequence[str], columns: Sequence[str], probs: Sequence[float],
                    exact: bool) -> pd.DataFrame:
    rows = []
    for r in wide.to_dict("records"):
        for c in columns:
            q = r[f"q__{c}"]
            qs = [np.nan] * len(probs) if q is None or (isinstance(q, float) and np.isnan(q)) else list(q)
            rows.append({**{b: r[b] for b in by}, "score": c, "n": int(r[f"n__{c}"]),
                         **{qname(p): float(v) if v is not None else np.nan for p, v in zip(probs, qs)},
                         "exact": exact})
    cols = [*by, "score", "n", *(qname(p) for p in probs), "exact"]
    return pd.DataFrame(rows, columns=cols)


def qname(p: float) -> str:
    """Column name of quantile `p` (0.5 -> q50, 0.25 -> q25)."""
    return "q" + f"{100 * p:g}".replace(".", "_")


def box_stats(data: RunData, source: str, by: Sequence[str], columns: Sequence[str],
              max_fliers: int = 100) -> pd.DataFrame:
    """Box-plot statistics per group and column (long: `by`..., ``score``): ``n``, quartiles
    ``q1`` / ``med`` / ``q3``, whisker ends ``whislo`` / ``whishi`` (the most extreme values within
    1.5 IQR of the quartiles, as matplotlib draws them) and ``fliers`` (the values beyond the
    whiskers: all of them up to `max_fliers`, else `max_fliers` of them evenly spaced in rank,
    the extremes included)."""
    q = quantiles(data, source, by, columns, (0.25, 0.5, 0.75))
    q = q[q["n"] > 0].drop(columns="exact").rename(columns={"q25": "q1", "q50": "med", "q75": "q3"})
    cols = [*by, "score", "n", "q1", "med", "q3", "whislo", "whishi", "fliers"]
    if q.empty:
        return pd.DataFrame(columns=cols)
    iqr = q["q3"] - q["q1"]
    fences = q.assign(lo_fence=q["q1"] - 1.5 * iqr, hi_fence=q["q3"] + 1.5 * iqr)[[*by, "score", "lo_fence", "hi_fence"]]
    name = f"fences_{id(fences)}"
    data.con.register(name, pa.Table.from_pandas(fences.reset_index(drop=True), preserve_index=False))
    try:
        whisk, fl = _whiskers(data, source, by, columns, name, max_fliers)
    finally:
        data.con.unregister(name)
    keys = [*by, "score"]
    out = q.merge(whisk, on=keys, how="left")
    found = {} if fl.empty else {(k if isinstance(k, tuple) else (k,)): g["x"].to_numpy(dtype=np.float64)
                                 for k, g in fl.groupby(keys, sort=False, dropna=False)}
    out["fliers"] = [found.get(tuple(r), np.array([])) for r in out[keys].itertuples(index=False, name=None)]
    return out[cols].reset_index(drop=True)


def _whiskers(data: RunData, source: str, by: Sequence[str], columns: Sequence[str], fences: str,
              max_fliers: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Whisker ends and fliers per group and column (see :func:`box_stats`)."""
    k = [ident(b) for b in by]
    on = " AND ".join([f"src.{x} IS NOT DISTINCT FROM f.{x}" for x in k] + ["f.score = {score}"])
    ksel = "".join(f"src.{x}, " for x in k)
    parts = [f"SELECT {ksel}{_lit(c)} AS score, src.{ident(c)} AS x, f.lo_fence, f.hi_fence FROM ({source}) AS src "
             f"JOIN {fences} f ON {on.format(score=_lit(c))} WHERE src.{ident(c)} IS NOT NULL" for c in columns]
    joined = " UNION ALL ".join(parts)
    keys = ", ".join([*k, "score"])
    whisk = data.sql(f"SELECT {keys}, min(x) FILTER (WHERE x >= lo_fence) AS whislo, "
                     f"max(x) FILTER (WHERE x <= hi_fence) AS whishi FROM ({joined}) GROUP BY {keys}")
    m = int(max_fliers)
    fl = data.sql(
        f"SELECT {keys}, x FROM (SELECT *, row_number() OVER (PARTITION BY {keys} ORDER BY x) AS r, "
        f"count(*) OVER (PARTITION BY {keys}) AS m FROM ({joined}) WHERE x < lo_fence OR x > hi_fence) "
        f"WHERE m <= {m} OR r = 1 OR r = m OR (r - 1) % CAST(ceil(m / {m}) AS BIGINT) = 0 ORDER BY {keys}, x")
    return whisk, fl


def project(source: str, keys: Mapping[str, str], values: Mapping[str, str]) -> str:
    """``SELECT <key expr> AS <key>, ..., <value expr> AS <value>, ..., patient FROM (source)``."""
    sel = [f"{expr} AS {ident(name)}" for name, expr in {**keys, **values}.items()]
    return f"SELECT {', '.join([*sel, 'patient'])} FROM ({source}) AS src"


def summarise(data: RunData, source: str, keys: Mapping[str, str], values: Mapping[str, str], n_resamples: int,
            seed: int, medians: Sequence[str] | None = None) -> pd.DataFrame:
    """Long table per group of `keys` x value: n, mean, median, ci_low, ci_high (and total).

    `source`: a relation with ``patient``; `keys` / `values`: name -> SQL expression over it.
    Means and intervals from per-(group, patient) sums streamed group by group (patient-level
    cluster bootstrap, :func:`reports.stats.summarise_groups`, seeded by `seed` and the group
    key); medians of the values in `medians` (default all) from :func:`quantiles` (exact unless
    one group alone exceeds ``settings.quantile_values`` values)."""
    proj = project(source, keys, values)
    by = list(keys)
    groups = patient_groups(data, proj, by, mean_aggs({v: ident(v) for v in values}))
    s = summarise_groups(groups, list(values), by, n_resamples, seed)
    med_cols = list(values) if medians is None else [v for v in medians if v in values]
    if med_cols:
        med = quantiles(data, proj, by, med_cols, (0.5,))[[*by, "score", "q50"]].rename(columns={"q50": "median"})
        s = s.merge(med, on=[*by, "score"], how="left")
    else:
        s["median"] = math.nan
    return s[[*by, "score", "n", "total", "mean", "median", "ci_low", "ci_high"]]


def curve_means(data: RunData, source: str, by: str, x_col: str, y_cols: Sequence[str]) -> dict[Any, dict[str, Any]]:
    """Mean curves per value of column `by`: {group: {y column: CurveMean}} over the rows of
    `source` (list columns `x_col` and `y_cols`), streamed in record batches."""
    acc: dict[Any, dict[str, Any]] = {}
    cols = ", ".join(ident(c) for c in [by, x_col, *y_cols])
    for batch in data.batches(f"SELECT {cols} FROM ({source}) AS src"):
        groups = batch.column(by).to_pylist()
        for g in dict.fromkeys(groups):
            rows = [i for i, v in enumerate(groups) if v == g]
            sub = batch.take(pa.array(rows, type=pa.int64()))
            per = acc.setdefault(g, {y: CurveMean() for y in y_cols})
            x = _list_rows(sub.column(x_col))
            for y in y_cols:
                _add_curves(per[y], x, _list_rows(sub.column(y)))
    return acc


def _list_rows(col: pa.Array) -> list[np.ndarray | None]:
    """A list column as one float64 array per row (None for a null row)."""
    import pyarrow.compute as pc

    flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
    lengths = pc.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False)
    ends = np.cumsum(lengths)
    valid = col.is_valid().to_numpy(zero_copy_only=False)
    return [flat[e - n:e] if v else None for e, n, v in zip(ends, lengths, valid)]


def _add_curves(acc: Any, xs: Sequence[np.ndarray | None], ys: Sequence[np.ndarray | None]) -> None:
    """Feed curves to a CurveMean, stacking those that share their x values."""
    stacks: dict[bytes, tuple[np.ndarray, list[np.ndarray]]] = {}
    for x, y in zip(xs, ys):
        if x is None or y is None or x.size == 0 or x.size != y.size or np.isnan(x).any() or np.isnan(y).any():
            continue
        stacks.setdefault(x.tobytes(), (x, []))[1].append(y)
    for x, ylist in stacks.values():
        acc.add_stack(x, np.vstack(ylist))


# ---------------------------------------------------------------------------------------------
# choices of the gallery and the token explorer

GALLERY_ORDER = "tier, u, sample_id, target_kind, target_label, token_start"


def gallery_candidates(data: RunData, n: int, seed: int) -> pd.DataFrame:
    """At most 2n explained targets from which :func:`reports.gallery.select_targets` picks n.

    Each distinct explained target (status ok) gets its ``finding`` (the score stage's metrics
    finding; else a keyword's label; else the finding a yes/no prompt asks about, for
    answer_token and answer_span targets), a ``tier`` (keywords 0, answer_token / answer_span 2,
    others 4; +1 when the sample has no box of that finding) and a seeded pseudo-random ``u``.
    answer_tokens targets are left out when at least n other targets exist. Returned: the n
    first targets of their image (``first`` 1) and the n first targets overall (``first`` 0),
    both in (tier, u) order.
    """
    key = "sample_id, target_kind, target_label, token_start"
    query = f"""
    WITH ok AS (SELECT {key} FROM relevancy WHERE status = 'ok' GROUP BY {key}),
    pool AS (SELECT * FROM ok WHERE target_kind IS DISTINCT FROM 'answer_tokens'
             OR (SELECT count(*) FROM ok WHERE target_kind IS DISTINCT FROM 'answer_tokens') < $n),
    mf AS (SELECT {key}, min(finding) AS mfinding FROM metrics WHERE finding <> '' GROUP BY {key}),
    smp AS (SELECT sample_id, min(image_id) AS image_id, min(prompt_finding) AS prompt_finding
            FROM samples GROUP BY sample_id),
    t AS (SELECT p.*, smp.image_id,
            CASE WHEN mf.mfinding IS NOT NULL THEN mf.mfinding
                 WHEN p.target_kind = 'keywords' AND coalesce(p.target_label, '') <> '' THEN p.target_label
                 WHEN p.target_kind IN ('answer_token', 'answer_span') AND coalesce(smp.prompt_finding, '') <> ''
                 THEN smp.prompt_finding END AS finding
          FROM pool p LEFT JOIN smp USING (sample_id) LEFT JOIN mf USING ({key})),
    boxed AS (SELECT DISTINCT sample_id, b.finding AS finding
              FROM (SELECT sample_id, unnest(boxes) AS b FROM samples) AS ub WHERE b.finding IS NOT NULL),
    ranked AS (SELECT t.*, coalesce(t.image_id, t.sample_id) AS image,
                 (CASE t.target_kind WHEN 'keywords' THEN 0 WHEN 'answer_token' THEN 2 WHEN 'answer_span' THEN 2
                  ELSE 4 END) + (CASE WHEN bx.sample_id IS NULL THEN 1 ELSE 0 END) AS tier,
                 hash($seed, t.sample_id, t.target_kind, t.target_label, t.token_start) AS u
               FROM t LEFT JOIN boxed bx ON bx.sample_id = t.sample_id AND bx.finding = t.finding),
    firsts AS (SELECT * FROM ranked QUALIFY row_number() OVER (PARTITION BY image ORDER BY {GALLERY_ORDER}) = 1)
    (SELECT *, 1 AS first FROM firsts ORDER BY {GALLERY_ORDER} LIMIT $n)
    UNION ALL
    (SELECT *, 0 AS first FROM ranked ORDER BY {GALLERY_ORDER} LIMIT $n)
    """
    return data.sql(query, {"n": int(n), "seed": int(seed)})


def answer_token_samples(data: RunData, positions: Sequence[int] | None = None) -> list[str] | int:
    """Samples with an explained answer_tokens target, in sample_id order: their number (no
    `positions`), or the ids at the given 0-based positions of that order."""
    ids = "SELECT DISTINCT sample_id FROM relevancy WHERE target_kind = 'answer_tokens' AND status = 'ok'"
    if positions is None:
        return int(data.scalar(f"SELECT count(*) FROM ({ids})"))
    cond, params = in_list("pos", [int(p) for p in positions])
    df = data.sql(f"SELECT sample_id FROM (SELECT sample_id, row_number() OVER (ORDER BY sample_id) - 1 AS pos "
                  f"FROM ({ids})) WHERE {cond} ORDER BY sample_id", params)
    return df["sample_id"].tolist()
