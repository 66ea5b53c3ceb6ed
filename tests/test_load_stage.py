"""Stage load on the bad/odd input corpus: one errors/ row per bad file, the rest processed;
resume skips what is done."""
from __future__ import annotations

import pandas as pd

from conftest import DATA, run_pipeline

CORPUS = DATA / "image_corpus"


def _corpus_manifest(tmp_path):
    corpus = pd.read_csv(CORPUS / "corpus.csv", dtype=str, keep_default_na=False)
    pd.DataFrame({"image_path": [str(CORPUS / f) for f in corpus["file"]], "image_id": corpus["file"],
                  "view_position": "PA"}).to_csv(tmp_path / "corpus_manifest.csv", index=False)
    return corpus


def test_bad_inputs_become_error_rows_and_the_run_completes(tmp_path):
    corpus = _corpus_manifest(tmp_path)
    assert len(corpus) >= 12 and (corpus["expect"] == "error").sum() >= 8
    overrides = ["stages=[load]", "dataset=manifest", f"dataset.path={tmp_path / 'corpus_manifest.csv'}",
                 f"run_dir={tmp_path / 'run'}", "prompts=findings"]
    run_pipeline(overrides)
    samples = pd.read_parquet(tmp_path / "run" / "samples")
    errors = pd.read_parquet(tmp_path / "run" / "errors")
    ok = set(corpus.loc[corpus["expect"] == "ok", "file"])
    bad = corpus[corpus["expect"] == "error"].set_index("file")
    assert set(samples["image_id"]) == ok
    assert sorted(errors["image_id"]) == sorted(bad.index)  # exactly one row per bad file
    for row in errors.itertuples():
        assert row.stage == "load"
        assert row.error_type == bad.loc[row.image_id, "kind"], row
        assert row.image_id in row.message  # the reason names the file
        assert row.sample_id.endswith(":*")
    # re-running skips everything: no new rows, no duplicate errors
    run_pipeline(overrides)
    assert len(pd.read_parquet(tmp_path / "run" / "samples")) == len(samples)
    assert len(pd.read_parquet(tmp_path / "run" / "errors")) == len(errors)
    # retry_errors=true re-attempts the failed images (they fail again: one more row each)
    run_pipeline(overrides + ["retry_errors=true"])
    assert len(pd.read_parquet(tmp_path / "run" / "errors")) == 2 * len(errors)
