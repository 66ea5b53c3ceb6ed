"""Integrated gradients over the image soft tokens: a plain per-step loop, completeness (tiny model)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_gemma_config import IMAGE_ID  # noqa: E402

from pipeline.relevancy import SequenceInputs, Target, explain  # noqa: E402


def _seq(x) -> SequenceInputs:
    return SequenceInputs(x.input_ids, x.pixel_values, x.token_type_ids)


def plain_ig(model, x, target: Target, steps: int, baseline: str) -> tuple[np.ndarray, float]:
    """Signed attributions (M,) and s(x) - s(x') by hand: inputs_embeds built from the image
    features, one forward and backward per midpoint step."""
    with torch.no_grad():
        feats = model.model.get_image_features(x.pixel_values).pooler_output[0].float()  # (M, D)
        emb = model.get_input_embeddings()(x.input_ids).clone()
    img = torch.nonzero(x.input_ids[0] == IMAGE_ID).flatten()
    base = feats.mean(0, keepdim=True).expand_as(feats) if baseline == "mean" else torch.zeros_like(feats)

    def score(image_rows: torch.Tensor) -> torch.Tensor:
        e = emb.clone()
        e[0, img] = image_rows
        logits = model(inputs_embeds=e, token_type_ids=x.token_type_ids).logits[0]
        return sum(logits[p - 1, x.input_ids[0, p]] for p in target.positions)

    total = torch.zeros_like(feats)
    for k in range(steps):
        point = (base + (k + 0.5) / steps * (feats - base)).requires_grad_(True)
        (g,) = torch.autograd.grad(score(point), point)
        total += g / steps
    with torch.no_grad():
        delta = float(score(feats) - score(base))
    return ((feats - base) * total).sum(-1).numpy(), delta


@pytest.mark.parametrize("baseline", ["mean", "zero"])
def test_equals_the_plain_loop(model, x, baseline):
    n = x.input_ids.shape[1]
    targets = [Target(n - 6, n - 5), Target(n - 4, n - 1)]
    out = explain(model, _seq(x), targets, ["integrated_gradients"], ig_steps=4, ig_baseline=baseline,
                  perturbation_batch_size=3)
    for res, t in zip(out.results, targets):
        attr, delta = plain_ig(model, x, t, 4, baseline)
        got = res.maps["integrated_gradients"]
        assert got.text_map is None and got.image_map.dtype == np.float32
        np.testing.assert_allclose(got.image_map.ravel(), np.maximum(attr, 0), rtol=1e-4, atol=1e-5)
        assert got.extras["completeness_error"] == pytest.approx(abs(attr.sum() - delta), rel=1e-3, abs=1e-5)


def test_completeness_error_falls_with_steps(model, x):
    n = x.input_ids.shape[1]
    targets = [Target(n - 6, n - 5), Target(n - 1, n), Target(n - 6, n)]
    errors = []
    for steps in (1, 4, 32):
        out = explain(model, _seq(x), targets, ["integrated_gradients"], ig_steps=steps, perturbation_batch_size=32)
        errors.append([r.maps["integrated_gradients"].extras["completeness_error"] for r in out.results])
    e1, e4, e32 = map(np.asarray, errors)
    assert (e4 < e1).all() and (e32 < e4).all()
    _, delta = plain_ig(model, x, targets[2], 1, "mean")
    assert e32[2] < 0.01 * abs(delta)


def test_batch_size_does_not_change_attributions(model, x):
    n = x.input_ids.shape[1]
    targets = [Target(n - 6, n - 5), Target(n - 1, n)]
    a = explain(model, _seq(x), targets, ["integrated_gradients"], ig_steps=5, perturbation_batch_size=1)
    b = explain(model, _seq(x), targets, ["integrated_gradients"], ig_steps=5, perturbation_batch_size=16)
    for i in range(2):
        np.testing.assert_allclose(a.map(i, "integrated_gradients").image_map,
                                   b.map(i, "integrated_gradients").image_map, rtol=1e-4, atol=1e-6)
