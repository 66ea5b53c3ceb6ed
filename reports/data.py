"""Reading a whole run directory for the report: every shard's part files, manifests, model facts.

Tables are read whole (all part files of all shards) with their explicit schemas; a table that
is missing or has no rows is an empty DataFrame with the schema's columns, never an error. The
two list-valued map columns of ``relevancy/`` (``image_map``, ``text_map``) can be large, so the
summary read leaves them out and :meth:`RunData.relevancy_maps` reads them for chosen samples.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from pipeline.schemas import TABLES
from pipeline.store import RunStore

log = logging.getLogger(__name__)

MAP_COLUMNS = ("image_map", "text_map")
TABLE_NAMES = ("samples", "generations", "relevancy", "metrics", "sensitivity", "answers", "faithfulness", "errors")


@dataclass
class RunData:
    """The tables, manifests and identity of one run directory, as the report needs them."""

    root: Path
    tables: dict[str, pd.DataFrame]
    run_manifest: dict[str, Any]  # manifest.json (identity, config hash); {} if absent
    manifests: list[dict[str, Any]]  # manifests/*.json, oldest first, each with "_file"
    unreadable: dict[str, str] = field(default_factory=dict)  # table -> why it could not be read

    def table(self, name: str) -> pd.DataFrame:
        return self.tables.get(name, pd.DataFrame())

    def has(self, name: str) -> bool:
        return not self.table(name).empty

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

    def relevancy_maps(self, sample_ids: Iterable[str], columns: Iterable[str] | None = None) -> pd.DataFrame:
        """relevancy/ rows (with their maps) of the given samples, read with a pushed-down filter."""
        import pyarrow.compute as pc
        import pyarrow.dataset as ds

        store = RunStore(self.root)
        tab = store.table("relevancy")
        parts = tab.parts()
        ids = sorted(set(sample_ids))
        if not parts or not ids:
            return tab.spec.schema.empty_table().to_pandas()
        dset = ds.dataset([str(p) for p in parts], schema=tab.spec.schema, format="parquet")
        cols = None if columns is None else list(dict.fromkeys(["sample_id", *columns]))
        return dset.to_table(columns=cols, filter=pc.field("sample_id").isin(ids)).to_pandas()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log.warning("report: could not read %s: %s", path, e)
        return {}


def load_run(root: str | Path) -> RunData:
    """Read every table (maps of relevancy/ left out) and every manifest of a run directory."""
    root = Path(root)
    store = RunStore(root)
    tables: dict[str, pd.DataFrame] = {}
    unreadable: dict[str, str] = {}
    for name in TABLE_NAMES:
        tab = store.table(name)
        cols = [f.name for f in TABLES[name].schema if not (name == "relevancy" and f.name in MAP_COLUMNS)]
        try:
            tables[name] = tab.read(columns=cols)
        except Exception as e:  # a broken part file must not stop the report; it is reported
            log.warning("report: table %s could not be read: %s", name, e)
            unreadable[name] = f"{type(e).__name__}: {e}"
            tables[name] = TABLES[name].schema.empty_table().select(cols).to_pandas()
    run_manifest = _read_json(root / "manifest.json") if (root / "manifest.json").is_file() else {}
    manifests = []
    for p in sorted((root / "manifests").glob("*.json")) if (root / "manifests").is_dir() else []:
        d = _read_json(p)
        if d:
            d["_file"] = p.name
            manifests.append(d)
    manifests.sort(key=lambda d: (str(d.get("started_utc", "")), d["_file"]))
    return RunData(root=root, tables=tables, run_manifest=run_manifest, manifests=manifests, unreadable=unreadable)
