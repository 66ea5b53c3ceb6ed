"""Target scores (explain.score): logit, logprob, contrast; the stage records and guards them."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import REPO, run_pipeline  # noqa: E402

from pipeline.config import ConfigError  # noqa: E402
from pipeline.relevancy import (  # noqa: E402
    SequenceInputs,
    Target,
    counterpart_id,
    explain,
    register_method,
    unregister_method,
)


@pytest.fixture
def grad_probe():
    """A registered method that keeps the raw gradients it is given."""
    kept = []

    @register_method("grad_probe", family="gradient", needs=("attention_grads", "embedding_grads"))
    def grad_probe(x):
        """Test probe."""
        kept.append(([g.clone() for g in x.attention_grads], x.embedding_grads.clone()))
        return torch.zeros(len(x.targets), x.image_positions.numel())

    yield kept
    unregister_method("grad_probe")


def _explain(model, ids, x, targets, **kw):
    return explain(model, SequenceInputs(ids, x.pixel_values, x.token_type_ids), targets, ["grad_probe", "gradcam"], **kw)


def test_contrast_is_the_difference_of_two_logit_scores(model, x, grad_probe):
    """Token b at position p changes no logit row before p, so explaining b there gives
    logit[p-1, b]: the contrast of a against b is the difference of the two logit scores, and
    so are its gradients (the score is linear in the logits)."""
    n = x.input_ids.shape[1]
    p = n - 3
    a = int(x.input_ids[0, p])
    b = (a + 7) % 280 + 3
    ids_b = x.input_ids.clone()
    ids_b[0, p] = b
    t = [Target(p, p + 1), Target(n - 6, n)]
    contrast = _explain(model, x.input_ids, x, t, score="contrast", counterparts=[b, None])
    plain_a = _explain(model, x.input_ids, x, t)
    plain_b = _explain(model, ids_b, x, t)
    assert contrast.score_kind == "contrast" and plain_a.score_kind == "logit"
    assert contrast.results[0].counterpart == b and contrast.results[1].counterpart is None
    assert contrast.results[0].score == pytest.approx(plain_a.results[0].score - plain_b.results[0].score, abs=1e-4)
    assert contrast.results[1].score == pytest.approx(plain_a.results[1].score, abs=1e-5)  # no counterpart: logit
    (gc, ec), (ga, ea), (gb, eb) = grad_probe
    for lc, la, lb in zip(gc, ga, gb):
        torch.testing.assert_close(lc[0, :, : p, : p], (la - lb)[0, :, : p, : p], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ec[0], ea[0] - eb[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ec[1], ea[1])
    assert not np.allclose(contrast.map(0, "gradcam").image_map, plain_a.map(0, "gradcam").image_map)


def test_logprob_score(model, x):
    n = x.input_ids.shape[1]
    t = [Target(n - 5, n - 2)]
    out = explain(model, SequenceInputs(x.input_ids, x.pixel_values, x.token_type_ids), t, ["chefer"], score="logprob")
    with torch.no_grad():
        lp = model(input_ids=x.input_ids, pixel_values=x.pixel_values,
                   token_type_ids=x.token_type_ids).logits[0].double().log_softmax(-1)
    expected = sum(float(lp[p - 1, x.input_ids[0, p]]) for p in range(n - 5, n - 2))
    assert out.score_kind == "logprob" and out.results[0].score == pytest.approx(expected, abs=1e-4)
    with pytest.raises(ValueError, match="unknown score"):
        explain(model, SequenceInputs(x.input_ids, x.pixel_values, x.token_type_ids), t, ["chefer"], score="odds")
    with pytest.raises(ValueError, match="single-token"):
        explain(model, SequenceInputs(x.input_ids, x.pixel_values, x.token_type_ids), t, ["chefer"],
                score="contrast", counterparts=[5])


def test_counterparts_of_the_demo_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(REPO / "data" / "demo_model"))
    ids = tok.encode("yes. right upper zone consolidation.", add_special_tokens=False)
    names = tok.convert_ids_to_tokens(ids)
    got = {names[i]: counterpart_id(tok, ids[i]) for i in range(len(ids))}
    assert tok.convert_ids_to_tokens(got["yes"]) == "no"
    assert tok.convert_ids_to_tokens(got["\u2581right"]) == "\u2581left"
    assert got["\u2581zone"] is None and got["."] is None
    assert tok.convert_ids_to_tokens(counterpart_id(tok, got["yes"])) == "yes"  # either way round
    assert counterpart_id(tok, ids[0], [("yes", "definitely-not-a-token")]) is None


def _stage(model_dir, run_dir, *extra):
    return [f"model.name_or_path={model_dir}", "model.device=cpu", "dataset.n=4", "dataset.limit=1",
            "prompts=findings", "generate.max_new_tokens=4", "explain.targets=[answer_tokens]",
            "explain.methods=[gradcam,random]", "explain.explorer_samples=0", "stages=[load,generate,explain]",
            f"run_dir={run_dir}", *extra]


def test_stage_records_the_score_and_refuses_to_mix(tmp_path, tiny_model_dir):
    run = tmp_path / "r"
    run_pipeline(_stage(tiny_model_dir, run, "explain.score=logprob"))
    rel = pd.read_parquet(run / "relevancy")
    ok = rel[rel["status"] == "ok"]
    assert len(ok) and set(ok["score_kind"]) == {"logprob"} and ok["contrast_token"].isna().all()
    assert (ok["target_score"] <= 0).all()  # log-probabilities
    assert ok["completeness_error"].isna().all()
    with pytest.raises(ConfigError, match="explain.score=logit"):
        run_pipeline(_stage(tiny_model_dir, run, "explain.score=logit", "explain.methods=[gradcam,random,legrad]"))
    run_pipeline(_stage(tiny_model_dir, run, "explain.score=logprob", "explain.ig_steps=4",
                        "explain.methods=[gradcam,random,legrad,integrated_gradients,attnlrp]"))
    again = pd.read_parquet(run / "relevancy").query("status == 'ok'")
    assert set(again["method"]) == {"gradcam", "random", "legrad", "integrated_gradients", "attnlrp"}
    for column, method in (("completeness_error", "integrated_gradients"), ("conservation_error", "attnlrp")):
        own = again["method"] == method
        assert again.loc[own, column].notna().all() and again.loc[~own, column].isna().all()
