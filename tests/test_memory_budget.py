"""Target chunks sized to a memory budget give the same maps as unbounded chunks."""
from __future__ import annotations

import numpy as np
import torch
from transformers import Gemma3Config

from pipeline.relevancy.engine import chunk_for_budget, gradient_bytes_per_target


class _Stub(torch.nn.Module):
    def __init__(self, config, dtype=torch.bfloat16):
        super().__init__()
        self.config = config
        self.w = torch.nn.Parameter(torch.zeros(1, dtype=dtype))


def test_budget_arithmetic_for_medgemma_shape():
    cfg = Gemma3Config(text_config={"num_hidden_layers": 34, "num_attention_heads": 8, "hidden_size": 2560,
                                    "head_dim": 256, "num_key_value_heads": 4})
    n = 300
    per = gradient_bytes_per_target(_Stub(cfg), n)
    assert per == 34 * 8 * n * n * 2 + n * n * 4 + n * 2560 * 2
    assert chunk_for_budget(_Stub(cfg), n, 2**30, cap=64) == 2**30 // per
    assert chunk_for_budget(_Stub(cfg), n, 1.0, cap=8) == 1  # never below one target
    assert chunk_for_budget(_Stub(cfg), n, 2**40, cap=8) == 8  # never above the cap


def test_explain_stage_with_tiny_budget_equals_unbounded(tmp_path, tiny_model_dir):
    import pandas as pd

    from conftest import run_pipeline

    common = [f"model.name_or_path={tiny_model_dir}", "model.device=cpu", "dataset.n=4", "dataset.limit=1",
              "prompts=findings", "generate.max_new_tokens=6", "explain.targets=[answer_tokens]",
              "explain.methods=[chefer]", "stages=[load,generate,explain]"]
    run_pipeline([*common, f"run_dir={tmp_path / 'a'}"])
    run_pipeline([*common, f"run_dir={tmp_path / 'b'}", "explain.memory_budget_gb=0.000001"])
    key = ["sample_id", "token_start", "method"]
    a = pd.read_parquet(tmp_path / "a" / "relevancy").sort_values(key).reset_index(drop=True)
    b = pd.read_parquet(tmp_path / "b" / "relevancy").sort_values(key).reset_index(drop=True)
    assert len(a) == len(b) > 1
    for x, y in zip(a["image_map"], b["image_map"]):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-9)
