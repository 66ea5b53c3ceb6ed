"""A run killed with SIGKILL in the middle of a stage resumes to exactly the tables of an
uninterrupted run: nothing lost, nothing duplicated."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pandas as pd

from conftest import NIH_SUBSET, REPO, run_pipeline

TIMING = ["seconds", "shard"]  # wall-clock columns differ between runs


def _overrides(run_dir):
    return ["stages=[load,generate,explain]", "dataset=nih_cxr14", f"dataset.root={NIH_SUBSET}", f"run_dir={run_dir}",
            "prompts=default", "prompts.only_findings=[Pleural Effusion]", "generate.batch_size=1",
            "generate.max_new_tokens=12", "explain.targets=[answer_tokens]", "explain.methods=[chefer,raw_attention]",
            "flush_mb=0.0001"]


def _table(run_dir, name, key):
    df = pd.read_parquet(run_dir / name).drop(columns=TIMING, errors="ignore")
    return df.sort_values(key).reset_index(drop=True)


def test_sigkill_mid_explain_then_resume_equals_uninterrupted(tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    run_pipeline(_overrides(ref))
    n_ref = len(pd.read_parquet(ref / "relevancy"))

    proc = subprocess.Popen([sys.executable, "run_pipeline.py", *_overrides(killed), "progress=false"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    rel = killed / "relevancy"
    while time.monotonic() < deadline and proc.poll() is None:
        if rel.is_dir() and len(list(rel.glob("shard-*/part-*.parquet"))) >= 2:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run finished before it could be killed"
    partial = len(pd.read_parquet(rel))
    assert 0 < partial < n_ref

    run_pipeline(_overrides(killed))  # resume
    for name, key in [("samples", ["sample_id"]), ("generations", ["sample_id"]),
                      ("relevancy", ["sample_id", "method", "target_kind", "token_start"])]:
        a, b = _table(ref, name, key), _table(killed, name, key)
        assert not b.duplicated(key).any(), name
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-5, obj=name)
