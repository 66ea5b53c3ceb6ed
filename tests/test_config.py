"""Configuration: the public overrides work, mistakes fail at start naming the key."""
from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException

from conftest import REPO, compose
from pipeline.config import ConfigError, validate


def test_public_overrides_compose(tmp_path):
    cfg = compose([
        "stages=[load,generate]", f"run_dir={tmp_path}", "dataset=nih_cxr14", "dataset.root=/data/nih",
        "dataset.limit=5", "dataset.shard=1", "dataset.num_shards=3", "prompts=sensitivity", "model=medgemma_4b",
    ])
    validate(cfg)
    assert list(cfg.stages) == ["load", "generate"]
    assert cfg.run_dir == str(tmp_path)
    assert cfg.dataset.name == "nih_cxr14" and cfg.dataset.limit == 5
    assert (cfg.dataset.shard, cfg.dataset.num_shards) == (1, 3)
    assert cfg.model.name_or_path == "google/medgemma-4b-it"
    assert len(cfg.prompts.variants) > 10 and "Pleural Effusion" in cfg.prompts.synonyms


@pytest.mark.parametrize("override,key", [
    ("dataset.foo=1", "foo"),
    ("explain.nonsense=[a]", "nonsense"),
    ("model.revison=main", "revison"),
])
def test_unknown_key_fails_naming_it(override, key):
    with pytest.raises(ConfigCompositionException) as e:
        compose([override])
    assert key in str(e.value) + str(e.value.__cause__)


def test_wrong_type_fails_naming_it():
    with pytest.raises(ConfigCompositionException) as e:
        compose(["dataset.limit=abc"])
    assert "limit" in str(e.value) + str(e.value.__cause__)


@pytest.mark.parametrize("override,key", [
    ("stages=[load,explode]", "stages"),
    ("stages=[generate,load]", "stages"),
    ("dataset.shard=3", "dataset.shard"),
    ("explain.methods=[chefer,gradcamm]", "explain.methods"),
    ("explain.targets=[keyword]", "explain.targets"),
    ("dataset.side_markers=sometimes", "dataset.side_markers"),
    ("faithfulness.kinds=[keyword]", "faithfulness.kinds"),
    ("metrics.faithfulness_kinds=[keywords]", "moved to faithfulness.kinds"),
    ("model.dtype=fp8", "model.dtype"),
    ("model.attn_implementation=flash", "model.attn_implementation"),
    ("dataset=manifest", "dataset.path"),
    ("prompts.only_findings=[Pleural Efusion]", "Pleural Efusion"),
])
def test_bad_values_fail_naming_the_key(override, key):
    cfg = compose([override])
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert key in str(e.value)


def test_cli_unknown_key_fails_at_start(tmp_path):
    proc = subprocess.run([sys.executable, "run_pipeline.py", f"run_dir={tmp_path}/r", "dataset.colour=red"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "colour" in proc.stderr
    assert not (tmp_path / "r" / "samples").exists()


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")))
def test_experiments_compose_and_validate(name):
    cfg = compose([f"experiment={name}", "dataset.root=/data/mimic-cxr-jpg"] if name == "mimic_sweep"
                  else [f"experiment={name}"])
    validate(cfg)
    if name == "demo_shortcut":
        assert cfg.dataset.name == "demo" and cfg.dataset.side_markers == "lesion_side"
        assert "laterality" in cfg.explain.targets
        assert cfg.run_dir == "runs/shortcut/demo"
    if name == "model_comparison":
        assert cfg.run_dir == "runs/compare/demo"  # the sweep sets model=...
    assert cfg.stages[0] == "load"
