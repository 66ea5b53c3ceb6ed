"""Run store: explicit schemas, atomic parts, keys; run identity and manifests."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import NIH_SUBSET, run_pipeline
from pipeline.config import ConfigError
from pipeline.store import RunStore


def test_parts_are_atomic_and_read_back_with_the_schema(tmp_path):
    store = RunStore(tmp_path)
    t = store.table("generations")
    empty = t.read()
    assert list(empty.columns) == [f.name for f in t.spec.schema] and len(empty) == 0
    with store.writer("generations", shard=3, flush_rows=2) as w:
        for i in range(5):
            w.add({"sample_id": f"s{i}", "answer": "no", "sequence_ids": [1, 2, i], "prompt_length": 2,
                   "n_new_tokens": 1, "stopped": "eos", "model_name": "m", "seconds": 0.1, "shard": 3})
            w.maybe_flush()
    parts = t.parts()
    assert len(parts) == 3 and all(p.name.startswith("part-s00003-") for p in parts)
    assert not list(t.dir.glob(".tmp-*"))
    df = pd.read_parquet(t.dir)
    assert sorted(df["sample_id"]) == [f"s{i}" for i in range(5)]
    assert t.keys() == {(f"s{i}",) for i in range(5)}
    assert str(pd.read_parquet(t.dir)["sequence_ids"].iloc[0].dtype) == "int32"


def test_error_rows(tmp_path):
    store = RunStore(tmp_path)
    try:
        raise MemoryError("CUDA out of memory on sample x")
    except MemoryError as e:
        store.record_error("generate", "demo:x:p", e, image_id="x")
    df = store.table("errors").read()
    assert df.loc[0, "error_type"] == "MemoryError" and "out of memory" in df.loc[0, "message"]
    assert store.error_keys("generate") == {"demo:x:p"} and store.error_keys("explain") == set()


def test_manifest_and_identity(tmp_path):
    base = ["stages=[load]", "dataset=nih_cxr14", f"dataset.root={NIH_SUBSET}", f"run_dir={tmp_path}"]
    run_pipeline(base)
    ident = json.loads((tmp_path / "manifest.json").read_text())
    assert ident["identity"]["dataset.name"] == "nih_cxr14" and len(ident["config_hash"]) == 16
    (inv,) = list((tmp_path / "manifests").glob("*.json"))
    m = json.loads(inv.read_text())
    assert m["config"]["dataset"]["root"] == str(NIH_SUBSET)
    assert m["packages"]["pyarrow"] and m["packages"]["python"]
    assert "commit" in m["git"]
    assert m["dataset_fingerprint"]["selected_images"] == 3 and len(m["dataset_fingerprint"]["sha256"]) == 64
    assert m["stages"]["load"]["rows"] == 3 * len(m["config"]["prompts"]["variants"]) and "finished_utc" in m
    # the same run dir with another prompt set would mix incompatible rows: refused, naming the key
    with pytest.raises(ConfigError, match="prompts"):
        run_pipeline(base + ["prompts=findings"])
    # keys that only steer the work (limit, stages, methods) may change on resume
    run_pipeline(base + ["dataset.limit=1", "explain.methods=[chefer]"])
    run_pipeline(base + ["prompts=findings", "allow_config_change=true"])
