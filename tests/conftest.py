"""Shared fixtures: paths, running the pipeline in-process with overrides."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
SHARED = REPO.parent / "shared" / "data" / "real_cxr"
NIH_SUBSET = DATA / "real_cxr" / "nih_cxr14"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def compose(overrides: list[str]):
    """The resolved config for `overrides`, exactly as run_pipeline.py would build it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from pipeline.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def run_pipeline(overrides: list[str]):
    """Run the pipeline in-process (no subprocess) and return the RunContext."""
    from pipeline.runner import run

    return run(compose(["progress=false", *overrides]))


@pytest.fixture
def shared_real_cxr() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared/data/real_cxr is not beside the checkout")
    return SHARED


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Gemma 3 directory (4 x 4 image tokens), built once per test session."""
    from pipeline.tiny_model import build_tiny_gemma3

    return build_tiny_gemma3(tmp_path_factory.mktemp("tiny_gemma3_session"), seed=0)


@pytest.fixture(scope="module")
def model():
    """A tiny random Gemma 3 (4 layers, one global, sliding window 8) for engine and method tests."""
    from tiny_gemma_config import make_tiny_gemma3

    return make_tiny_gemma3(seed=0, num_layers=4, sliding_window=8)


@pytest.fixture(scope="module")
def x(model):
    """One sequence of `model` (prefix, image, suffix, a 6-token greedy answer)."""
    from tiny_gemma_config import make_tiny_inputs

    return make_tiny_inputs(model, seed=1, prefix_len=3, suffix_len=4, answer_len=6, greedy_answer=True)
