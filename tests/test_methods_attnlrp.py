"""AttnLRP rules (tiny Gemma 3): forward unchanged, relevance conserved where the rules say so."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


from pipeline.relevancy import SequenceInputs, Target, explain  # noqa: E402
from pipeline.relevancy.attnlrp import attnlrp_rules  # noqa: E402


def _relevance_in(module, inputs: torch.Tensor, upstream: torch.Tensor) -> tuple[float, float]:
    """(sum of input x gradient, sum of output x upstream) through ``module`` with the rules."""
    inp = inputs.clone().requires_grad_(True)
    out = module(inp)
    (g,) = torch.autograd.grad((out * upstream).sum(), inp)
    return float((inp * g).sum().detach()), float((out * upstream).sum().detach())


def test_forward_is_unchanged_and_everything_is_restored(model, x):
    lm = model.model.language_model
    impl = lm.config._attn_implementation
    kwargs = dict(input_ids=x.input_ids, pixel_values=x.pixel_values, token_type_ids=x.token_type_ids)
    with torch.no_grad():
        plain = model(**kwargs).logits
        with attnlrp_rules(model):
            ruled = model(**kwargs).logits
    torch.testing.assert_close(ruled, plain, rtol=1e-5, atol=1e-5)
    assert lm.config._attn_implementation == impl
    assert not any(m._forward_hooks for m in model.modules())


def test_norm_and_mlp_rules_conserve_relevance(model):
    layer = model.model.language_model.layers[0]
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(1, 5, 64, generator=gen)
    up = torch.randn(1, 5, 64, generator=gen)
    with attnlrp_rules(model), torch.enable_grad():
        for module in (layer.input_layernorm, layer.mlp):
            r_in, r_out = _relevance_in(module, h, up)
            assert r_in == pytest.approx(r_out, rel=1e-4)
    with torch.enable_grad():  # without the rules plain gradient x input does not conserve
        r_in, r_out = _relevance_in(layer.mlp, h, up)
    assert abs(r_in - r_out) > 1e-3 * abs(r_out)


def test_attention_rule_gives_the_values_half(model):
    """With q and k held, the values' input x gradient is half the output relevance (the
    uniform rule on ``A @ v``); q and k get the other half through the softmax."""
    from pipeline.relevancy.attnlrp import _lrp_attention

    attn = model.model.language_model.layers[1].self_attn
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4 if i == 0 else 2, 6, 16, generator=gen) for i in range(3))
    mask = torch.triu(torch.full((6, 6), torch.finfo(torch.float32).min), 1)[None, None]
    v = v.requires_grad_(True)
    out, _ = _lrp_attention(attn, q, k, v, mask, scaling=0.25)
    up = torch.randn(out.shape, generator=gen)
    (g,) = torch.autograd.grad((out * up).sum(), v)
    assert float((v * g).sum().detach()) == pytest.approx(0.5 * float((out * up).sum().detach()), rel=1e-5)


def test_attnlrp_maps_and_conservation(model, x):
    n = x.input_ids.shape[1]
    targets = [Target(n - 6, n - 5), Target(n - 1, n), Target(n - 6, n)]
    out = explain(model, SequenceInputs(x.input_ids, x.pixel_values, x.token_type_ids), targets, ["attnlrp"])
    for res in out.results:
        mm = res.maps["attnlrp"]
        assert mm.text_map.shape == (n,) and (mm.image_map >= 0).all() and mm.image_map.sum() > 0
        ex = mm.extras
        assert ex["conservation_error"] == pytest.approx(abs(ex["relevance_sum"] - res.score), rel=1e-4, abs=1e-5)
        np.testing.assert_allclose(mm.image_map.ravel(), mm.text_map[out.image_positions], rtol=1e-6)
