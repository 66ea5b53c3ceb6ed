"""Per-shard work touches only its shard; resume is exact per (sample, target kind, method);
one process per shard; shards sharing images do not race."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pandas as pd
import pytest

from conftest import NIH_SUBSET, REPO, run_pipeline
from pipeline.datasets import shard_of
from pipeline.locks import LockBusyError, shard_lock
from pipeline.store import RunStore

KEY = ["sample_id", "target_kind", "target_label", "token_start", "method"]
BASE = ["dataset=nih_cxr14", f"dataset.root={NIH_SUBSET}", "prompts=default",
        "prompts.only_findings=[Pleural Effusion]", "generate.max_new_tokens=8", "model.device=cpu",
        "explain.explorer_samples=0"]


def _run(run_dir, tiny, *extra):
    run_pipeline([*BASE, f"run_dir={run_dir}", f"model.name_or_path={tiny}", *extra])


def _rows(run_dir, table):
    return RunStore(run_dir).table(table).read()


def test_adding_a_method_and_a_kind_computes_only_the_missing_units(tmp_path, tiny_model_dir):
    stages = "stages=[load,generate,explain,score]"
    _run(tmp_path, tiny_model_dir, stages, "explain.targets=[answer_span]", "explain.methods=[chefer]")
    before = _rows(tmp_path, "relevancy")
    parts_before = set(RunStore(tmp_path).table("relevancy").parts())
    n_samples = len(_rows(tmp_path, "generations"))
    assert set(before["method"]) == {"chefer"} and set(before["target_kind"]) == {"answer_span"}

    _run(tmp_path, tiny_model_dir, stages, "explain.targets=[answer_span,answer_token]",
         "explain.methods=[chefer,random]")
    after = _rows(tmp_path, "relevancy")
    assert not after.duplicated(KEY).any()
    assert parts_before <= set(RunStore(tmp_path).table("relevancy").parts())  # nothing rewritten
    new = after.merge(before[KEY], on=KEY, how="left", indicator=True).query("_merge == 'left_only'")
    units = set(zip(new["sample_id"], new["target_kind"], new["method"]))
    expected = {(s, k, m) for s in set(after["sample_id"]) for k, m in
                [("answer_span", "random"), ("answer_token", "chefer"), ("answer_token", "random")]}
    assert units == expected and len(set(after["sample_id"])) == n_samples
    # free-text prompts have no answer token: the unit is recorded as done, not left open
    assert (new.loc[new["target_kind"] == "answer_token", "status"] != "").all()
    metrics = _rows(tmp_path, "metrics")
    assert len(metrics) == (after["status"] == "ok").sum() and not metrics.duplicated(KEY).any()

    # nothing left to do; removing a method deletes nothing
    _run(tmp_path, tiny_model_dir, stages, "explain.targets=[answer_span]", "explain.methods=[random]")
    assert len(_rows(tmp_path, "relevancy")) == len(after)


def test_a_shard_never_reads_other_shards_files(tmp_path, tiny_model_dir):
    stages = ["stages=[load,generate,explain,score]", "explain.targets=[answer_span]",
              "explain.methods=[chefer,random]", "dataset.num_shards=3"]  # one NIH image per shard
    for k in (0, 1, 2):
        _run(tmp_path, tiny_model_dir, *stages, f"dataset.shard={k}")
    n = len(_rows(tmp_path, "metrics"))
    # break every file of shards 1 and 2: shard 0's resume, and a new method on shard 0, still work
    broken = [p for p in tmp_path.glob("*/shard-0000[12]-of-00003/part-*.parquet")]
    assert len(broken) >= 10
    for p in broken:
        p.write_bytes(b"not parquet")
    _run(tmp_path, tiny_model_dir, *stages, "dataset.shard=0", "explain.methods=[chefer,random,raw_attention]")
    own = RunStore(tmp_path).shard(0, 3)
    rel = own.read("relevancy")
    assert set(rel["method"]) == {"chefer", "random", "raw_attention"}
    assert len(own.read("metrics")) == (rel["status"] == "ok").sum() and n > 0


def test_a_shard_started_twice_is_refused_naming_the_holder(tmp_path, tiny_model_dir):
    with shard_lock(tmp_path, 0, 1):
        with pytest.raises(LockBusyError, match=r"shard 0 of 1 .* held by another process \(host .*pid"):
            _run(tmp_path, tiny_model_dir, "stages=[load]")
    _run(tmp_path, tiny_model_dir, "stages=[load]")  # released with its holder
    assert not _rows(tmp_path, "samples").duplicated("sample_id").any()


def test_two_processes_on_one_shard_write_each_key_once(tmp_path, tiny_model_dir):
    cmd = [sys.executable, "run_pipeline.py", *BASE, f"run_dir={tmp_path}", f"model.name_or_path={tiny_model_dir}",
           "stages=[load,generate]", "progress=false"]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results)[0] == 0
    refused = [err for rc, err in results if rc != 0]
    assert all("held by another process" in err for err in refused)
    gens = _rows(tmp_path, "generations")
    assert len(gens) > 0 and not gens.duplicated("sample_id").any()


def test_shards_sharing_images_do_not_race(tmp_path, tiny_model_dir):
    """Two shards whose images are copies of one file (same pixels, same digest), run at once."""
    src = sorted((NIH_SUBSET / "images").glob("*.png"))[0]
    ids = [f"copy{i}" for i in range(40)]
    by_shard = {k: [i for i in ids if shard_of(i, 2) == k][:2] for k in (0, 1)}
    rows = []
    for k, chosen in by_shard.items():
        for i in chosen:
            shutil.copy(src, tmp_path / f"{i}.png")
            rows.append({"image_id": i, "image_path": str(tmp_path / f"{i}.png"), "view_position": "PA"})
    manifest = tmp_path / "images.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    run_dir = tmp_path / "run"
    base = [sys.executable, "run_pipeline.py", "dataset=manifest", f"dataset.path={manifest}", f"run_dir={run_dir}",
            f"model.name_or_path={tiny_model_dir}", "model.device=cpu", "prompts=findings",
            "generate.max_new_tokens=6", "explain.targets=[answer_span]", "explain.methods=[chefer]",
            "explain.explorer_samples=0",
            "stages=[load,generate,explain,score]", "dataset.num_shards=2", "progress=false"]
    procs = [subprocess.Popen([*base, f"dataset.shard={k}"], cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for k in (0, 1)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-3000:]
    assert _rows(run_dir, "errors").empty
    assert sorted(_rows(run_dir, "body_masks")["image_id"]) == sorted(by_shard[0] + by_shard[1])
    assert len(_rows(run_dir, "metrics")) == len(_rows(run_dir, "generations"))


def test_a_bad_row_is_an_error_row_and_score_completes(tmp_path, tiny_model_dir):
    stages = ["explain.targets=[answer_span]", "explain.methods=[chefer]"]
    _run(tmp_path, tiny_model_dir, "stages=[load,generate,explain]", *stages)
    rel = _rows(tmp_path, "relevancy")
    bad = {k: None if isinstance(v, float) and v != v else v  # NaN of a null column -> null
           for k, v in rel[rel["status"] == "ok"].iloc[0].to_dict().items()}
    n_ok = (rel["status"] == "ok").sum()
    # a malformed map (grid of 4 x 4 with 5 values) under a new method name, in this shard's folder
    RunStore(tmp_path).shard(0, 1).write_rows("relevancy", [{**bad, "method": "random", "image_map": [1.0] * 5}])
    for _ in range(2):  # the failure is recorded once, not again on resume
        _run(tmp_path, tiny_model_dir, "stages=[score]", *stages)
    errors = _rows(tmp_path, "errors")
    assert list(errors["stage"]) == ["score"] and list(errors["sample_id"]) == [bad["sample_id"]]
    assert "reshape" in errors["message"].iloc[0]
    scored = _rows(tmp_path, "metrics")  # every other row, the bad sample's chefer row included
    assert len(scored) == n_ok and set(scored["method"]) == {"chefer"}


def test_a_finished_shards_score_resume_reads_no_map(tmp_path, tiny_model_dir, monkeypatch):
    from pipeline.store import ShardView

    stages = ["explain.targets=[answer_span]", "explain.methods=[chefer]"]
    _run(tmp_path, tiny_model_dir, "stages=[load,generate,explain,score]", *stages)
    asked = []
    real = ShardView.read

    def spy(self, name, columns=None, **kw):
        asked.append((name, tuple(columns or ())))
        return real(self, name, columns, **kw)

    monkeypatch.setattr(ShardView, "read", spy)
    _run(tmp_path, tiny_model_dir, "stages=[score]", *stages)
    assert asked and not [a for a in asked if a[0] == "relevancy" and "image_map" in a[1]]
