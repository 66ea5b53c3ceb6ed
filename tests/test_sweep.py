"""A 2-shard Hydra multirun sweep with the submitit_local launcher writes into one run directory;
the merged tables equal an unsharded run's."""
from __future__ import annotations

import subprocess
import sys

import pandas as pd

from conftest import REPO, run_pipeline

COMMON = ["stages=[load,generate,explain]", "dataset=demo", "dataset.n=6", "prompts=findings",
          "generate.max_new_tokens=8", "explain.targets=[answer_span]", "explain.methods=[chefer,random]"]
KEYS = {"samples": ["sample_id"], "generations": ["sample_id"],
        "relevancy": ["sample_id", "target_kind", "target_label", "token_start", "method"]}


def _table(run_dir, name):
    df = pd.read_parquet(run_dir / name).drop(columns=["seconds", "shard"], errors="ignore")
    return df.sort_values(KEYS[name]).reset_index(drop=True)


def test_two_shard_submitit_local_sweep_equals_unsharded_run(tmp_path):
    sweep, single = tmp_path / "sweep", tmp_path / "single"
    proc = subprocess.run(
        [sys.executable, "run_pipeline.py", "-m", "hydra/launcher=local", f"run_dir={sweep}", *COMMON,
         "dataset.num_shards=2", "dataset.shard=range(0,2)", "progress=false"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folders = {p.parent.name for p in (sweep / "samples").glob("shard-*/part-*.parquet")}
    assert folders == {"shard-00000-of-00002", "shard-00001-of-00002"}  # both shards, one run directory
    assert len(list((sweep / "manifests").glob("*.json"))) == 2
    run_pipeline([f"run_dir={single}", *COMMON])
    for name in KEYS:
        a, b = _table(single, name), _table(sweep, name)
        assert not b.duplicated(KEYS[name]).any()
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-5, obj=name)
