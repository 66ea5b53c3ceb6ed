"""Run store: explicit schemas, atomic parts, keys; run identity and manifests."""
from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from conftest import NIH_SUBSET, run_pipeline
from pipeline.config import ConfigError
from pipeline.store import PartWriter, RunStore


def test_parts_are_atomic_and_read_back_with_the_schema(tmp_path):
    store = RunStore(tmp_path)
    t = store.table("generations")
    empty = t.read()
    assert list(empty.columns) == [f.name for f in t.spec.schema] and len(empty) == 0
    with store.writer("generations", shard=3, num_shards=4, flush_mb=1e-9) as w:
        for i in range(5):
            w.add({"sample_id": f"s{i}", "answer": "no", "sequence_ids": [1, 2, i], "prompt_length": 2,
                   "n_new_tokens": 1, "stopped": "eos", "model_name": "m", "seconds": 0.1, "shard": 3})
            if i in (1, 3):  # unit boundaries: parts of rows 0-1, 2-3, then 4 on close
                w.maybe_flush()
    parts = t.parts()
    assert len(parts) == 3 and all(p.name.startswith("part-s00003-") for p in parts)
    assert {p.parent.name for p in parts} == {"shard-00003-of-00004"}
    assert not list(t.dir.rglob(".tmp-*"))
    df = t.read()
    assert sorted(df["sample_id"]) == [f"s{i}" for i in range(5)]
    assert t.keys() == {(f"s{i}",) for i in range(5)}
    assert str(df["sequence_ids"].iloc[0].dtype) == "int32" and list(df["sequence_ids"].iloc[0]) == [1, 2, 0]
    assert t.dataset().schema.field("sequence_ids").type.value_type == pa.int32()


def _gen_rows(ids, shard):
    return [{"sample_id": s, "answer": "no", "sequence_ids": [1], "prompt_length": 1, "n_new_tokens": 0,
             "stopped": "eos", "model_name": "m", "seconds": 0.0, "shard": shard} for s in ids]


def test_writer_flushes_by_size_and_time(tmp_path):
    t = RunStore(tmp_path).table("generations")
    w = PartWriter(t, "s00000", folder="shard-00000-of-00001", flush_mb=0.01, flush_seconds=3600)
    for i in range(2000):
        w.add(_gen_rows([f"s{i}"], 0))
        w.maybe_flush()
    w.flush()
    sizes = [len(pq.read_table(p)) for p in t.parts()]
    assert sum(sizes) == 2000 and 2 <= len(sizes) < 100  # a few parts of ~0.01 MiB, not one per row
    w = PartWriter(t, "s00000", flush_mb=1024, flush_seconds=0.0)
    w.add(_gen_rows(["late"], 0))
    w.maybe_flush()  # the time bound flushes even a tiny buffer
    assert not w.buffer


def test_shard_view_reads_only_its_own_folder(tmp_path):
    store = RunStore(tmp_path)
    for k in range(4):
        store.shard(k, 4).write_rows("generations", _gen_rows([f"a{k}", f"b{k}"], k))
    legacy = store.table("generations").write_rows(_gen_rows(["old1", "old2"], 0), tag="s00000")  # flat layout
    view = store.shard(1, 4)
    own, foreign = store.table("generations").shard_parts(1, 4)
    assert len(own) == 1 and foreign == [legacy]
    assert set(view.read("generations")["sample_id"]) == {"a1", "b1"}  # foreign skipped without a filter
    got = view.keys("generations", foreign_filter=ds.field("sample_id").isin(["old2"]))
    assert got == {("a1",), ("b1",), ("old2",)}
    assert len(store.table("generations").read()) == 10


def test_compact_merges_a_shard_atomically(tmp_path):
    store = RunStore(tmp_path)
    view = store.shard(2, 3)
    for i in range(6):
        view.write_rows("generations", _gen_rows([f"s{i}"], 2))
    store.shard(0, 3).write_rows("generations", _gen_rows(["other"], 0))
    before = store.table("generations").read().sort_values("sample_id").reset_index(drop=True)
    assert view.compact(target_mb=64) == {"generations": 6}
    own, _ = store.table("generations").shard_parts(2, 3)
    assert len(own) == 1 and not [p for p in (tmp_path / "generations").iterdir() if p.name.startswith(".")]
    after = store.table("generations").read().sort_values("sample_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(before, after)
    assert view.compact() == {}  # nothing left to merge


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


def test_compact_removes_what_a_killed_compact_left(tmp_path):
    store = RunStore(tmp_path)
    view = store.shard(0, 1)
    for i in range(3):
        view.write_rows("generations", _gen_rows([f"s{i}"], 0))
    stale = tmp_path / "generations" / ".compact-shard-00000-of-00001-123-abc"
    stale.mkdir()
    (stale / "part-c-1.parquet").write_bytes(b"half written")
    assert len(store.table("generations").read()) == 3  # hidden folders are never read
    view.compact()
    assert not stale.exists() and len(store.table("generations").read()) == 3
