"""An empty selection stops the run; a refused resume leaves the run directory untouched."""
from __future__ import annotations

import hashlib
import subprocess
import sys

import pandas as pd
import pytest

from conftest import NIH_SUBSET, REPO, run_pipeline
from pipeline.config import ConfigError

NIH = ["dataset=nih_cxr14", f"dataset.root={NIH_SUBSET}", "stages=[load]"]


def _snapshot(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("override,needle", [
    ("dataset.views=[LATERAL]", "selected none"),
    ("dataset.findings=[Fracture]", "selected none"),
    ("dataset.splits=[nosuchsplit]", "selected none"),
])
def test_filters_that_select_nothing_stop_the_run(tmp_path, override, needle):
    with pytest.raises(ConfigError, match=needle):
        run_pipeline([*NIH, f"run_dir={tmp_path}", override])


def test_header_only_manifest_stops_the_run_with_a_nonzero_exit(tmp_path):
    manifest = tmp_path / "empty.csv"
    manifest.write_text("image_id,image_path,view_position\n")
    proc = subprocess.run([sys.executable, "run_pipeline.py", "dataset=manifest", f"dataset.path={manifest}",
                           f"run_dir={tmp_path / 'run'}", "stages=[load]"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0 and "lists no images" in proc.stderr + proc.stdout


def test_a_shard_without_images_of_its_own_is_not_an_error(tmp_path):
    run_pipeline([*NIH, f"run_dir={tmp_path}", "dataset.num_shards=4", "dataset.shard=0"])  # all 3 in shard 3


def test_a_refused_resume_leaves_the_run_directory_untouched(tmp_path):
    run = tmp_path / "run"
    base = [sys.executable, "run_pipeline.py", *NIH, f"run_dir={run}", "progress=false"]
    assert subprocess.run(base, cwd=REPO, capture_output=True).returncode == 0
    before = _snapshot(run)
    assert any(k.startswith("logs/") for k in before) and not (run / ".hydra").exists()
    proc = subprocess.run([*base, "prompts=findings"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0 and "prompts.name: run has 'default', now 'findings'" in proc.stderr
    assert _snapshot(run) == before
    n = len(pd.read_parquet(run / "samples"))
    assert subprocess.run([*base, "prompts=findings", "allow_config_change=true"], cwd=REPO).returncode == 0
    assert len(pd.read_parquet(run / "samples")) == n  # same images: nothing to load again
