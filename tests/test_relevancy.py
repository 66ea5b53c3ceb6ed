"""Tests of the relevancy engine and attention capture on tiny random Gemma 3 models (CPU)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference_chefer import full_matrix_rows, reference_explain  # noqa: E402
from tiny_gemma_config import IMAGE_ID, make_tiny_gemma3, make_tiny_inputs  # noqa: E402
from transformers import AttentionInterface  # noqa: E402
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS  # noqa: E402

from pipeline.relevancy import (  # noqa: E402
    CAPTURE_ATTN_NAME,
    METHODS,
    TEXT_MAP_METHODS,
    Target,
    capture,
    explain_sequence,
)
from pipeline.relevancy.capture import capture_attention_forward  # noqa: E402
from pipeline.relevancy.methods import chefer_rows  # noqa: E402

WINDOW = 8
#: captured methods whose plain reference lives elsewhere (random: no reference; legrad:
#: tests/test_methods_legrad.py)
OWN_REFERENCE = {"random", "legrad"}


@pytest.fixture(scope="module")
def model():
    return make_tiny_gemma3(seed=0, num_layers=4, sliding_window=WINDOW)


@pytest.fixture(scope="module")
def inputs(model):
    return make_tiny_inputs(model, seed=1, prefix_len=3, suffix_len=4, answer_len=6, greedy_answer=True)


def _targets(n: int) -> list[Target]:
    """Single tokens and multi-token spans inside the answer, plus one in the prompt suffix."""
    return [
        Target(n - 6, n - 5, "first answer token"),
        Target(n - 1, n, "last token"),
        Target(n - 5, n - 2, "span of 3"),
        Target(n - 8, n - 7, "prompt token"),
        Target(n - 6, n, "whole answer"),
    ]


def _run(model, inputs, targets, methods, **kwargs):
    """``explain_sequence`` on the tiny inputs, with token types (bidirectional image attention)."""
    return explain_sequence(
        model, inputs.input_ids, inputs.pixel_values, inputs.token_type_ids, targets, methods, **kwargs
    )


def _assert_rel_close(actual, expected, rtol: float = 1e-5) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float64)
    actual = torch.as_tensor(np.asarray(actual), dtype=torch.float64).reshape(expected.shape)
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale * 1e-1)


# --------------------------------------------------------------------------------------------
# capture


def test_registration_and_implementation_restored(model, inputs):
    text_before = model.config.text_config._attn_implementation
    vision_before = model.config.vision_config._attn_implementation
    with capture(model) as rec:
        assert model.config.text_config._attn_implementation == CAPTURE_ATTN_NAME
        assert model.config.vision_config._attn_implementation == vision_before
        assert CAPTURE_ATTN_NAME in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
        assert CAPTURE_ATTN_NAME in AttentionInterface._global_mapping
        with torch.no_grad():
            model(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values, token_type_ids=inputs.token_type_ids)
    assert rec.complete() and rec.calls == 4
    assert model.config.text_config._attn_implementation == text_before
    with pytest.raises(RuntimeError):
        with capture(model):
            with capture(model):
                pass


@pytest.mark.parametrize("with_types", [True, False])
def test_capture_reproduces_model_logits(model, inputs, with_types):
    tt = inputs.token_type_ids if with_types else None
    kwargs = dict(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values, token_type_ids=tt)
    with torch.no_grad():
        plain = model(**kwargs).logits
        with capture(model):
            captured = model(**kwargs).logits
    torch.testing.assert_close(captured, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_types", [True, False])
def test_captured_probabilities_masks(model, inputs, with_types):
    tt = inputs.token_type_ids if with_types else None
    with torch.no_grad(), capture(model) as rec:
        model(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values, token_type_ids=tt)
    n = inputs.input_ids.shape[1]
    q = torch.arange(n)[:, None]
    k = torch.arange(n)[None, :]
    is_img = inputs.input_ids[0] == IMAGE_ID
    img_block = is_img[:, None] & is_img[None, :]
    future = k > q
    beyond_window = (q - k) >= WINDOW
    assert bool(beyond_window.any()), "the sliding window must cut the test sequence"
    layer_types = model.config.text_config.layer_types
    assert {"sliding_attention", "full_attention"} <= set(layer_types)
    for layer, probs in enumerate(rec.probs):
        a = probs[0]  # (H, N, N)
        torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:2]), rtol=1e-5, atol=1e-5)
        allowed_future = img_block if with_types else torch.zeros_like(img_block)
        assert bool((a[:, future & ~allowed_future] == 0).all()), f"layer {layer} attends to the future"
        if with_types:
            assert bool((a[:, future & img_block] > 0).all()), "image tokens must see each other both ways"
        if layer_types[layer] == "sliding_attention":
            assert bool((a[:, beyond_window] == 0).all()), f"layer {layer} ignores its sliding window"
        else:
            assert bool((a[:, beyond_window] > 0).any()), "global layer should see beyond the window"


def test_capture_function_matches_transformers_eager_with_softcap():
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups = 2
    module.head_dim = 8
    module.training = False
    q = torch.randn(1, 4, 10, 8)
    kv = torch.randn(1, 2, 10, 8)
    v = torch.randn(1, 2, 10, 8)
    mask = torch.triu(torch.full((10, 10), torch.finfo(torch.float32).min), 1)[None, None]
    ours = capture_attention_forward(module, q, kv, v, mask, scaling=0.3, softcap=5.0)
    theirs = eager_attention_forward(module, q, kv, v, mask, scaling=0.3, softcap=5.0)
    torch.testing.assert_close(ours[0], theirs[0])
    torch.testing.assert_close(ours[1], theirs[1])


# --------------------------------------------------------------------------------------------
# propagation order


def test_row_propagation_equals_full_matrix():
    gen = torch.Generator().manual_seed(3)
    n, n_layers = 12, 5
    abars = [torch.rand((n, n), generator=gen, dtype=torch.float64).tril() * 0.3 for _ in range(n_layers)]
    rows = [7, 8, 9]
    w = torch.zeros(1, n, dtype=torch.float64)
    w[0, rows] = 1.0 / len(rows)
    v = w.clone()
    for a in reversed(abars):  # output side first
        v = chefer_rows(v, a)
    expected = full_matrix_rows(abars, rows)
    torch.testing.assert_close(v[0], expected, rtol=1e-12, atol=1e-12)
    wrong = w.clone()
    for a in abars:  # the other order is a different quantity
        wrong = chefer_rows(wrong, a)
    assert not torch.allclose(wrong[0], expected, rtol=1e-3)


# --------------------------------------------------------------------------------------------
# engine against the plain reference


@pytest.mark.parametrize("with_types", [True, False])
def test_engine_matches_reference(model, inputs, with_types):
    tt = inputs.token_type_ids if with_types else None
    n = inputs.input_ids.shape[1]
    targets = _targets(n)
    out = explain_sequence(
        model, inputs.input_ids, inputs.pixel_values, tt, targets, METHODS,
        chunk_size=2, prompt_length=inputs.prompt_length,
    )
    ref = reference_explain(model, inputs.input_ids, inputs.pixel_values, tt, [(t.start, t.end) for t in targets])
    img = ref[0]["image_positions"]
    np.testing.assert_array_equal(out.image_positions, img.numpy())
    assert (out.grid_h, out.grid_w) == (4, 4) and out.image_tokens_ok and out.batched
    for res, r in zip(out.results, ref):
        assert res.score == pytest.approx(float(r["score"]), rel=1e-5, abs=1e-6)
        for method in METHODS:
            got = res.maps[method]
            assert got.image_map.dtype == np.float32 and got.image_map.shape == (4, 4)
            assert (got.image_map >= 0).all()
            if method not in r:
                assert method in OWN_REFERENCE, f"{method} has no plain reference"
                continue
            if method in TEXT_MAP_METHODS:
                assert got.text_map is not None and got.text_map.shape == (n,)
                _assert_rel_close(got.text_map, r[method])
                _assert_rel_close(got.image_map.ravel(), r[method][img])
            else:
                assert got.text_map is None
                _assert_rel_close(got.image_map.ravel(), r[method])


def test_chefer_differs_with_and_without_token_types(model, inputs):
    n = inputs.input_ids.shape[1]
    a = _run(model, inputs, [Target(n - 3, n - 2)], ["chefer"])
    b = explain_sequence(model, inputs.input_ids, inputs.pixel_values, None, [Target(n - 3, n - 2)], ["chefer"])
    assert not np.allclose(a.map(0, "chefer").image_map, b.map(0, "chefer").image_map, rtol=1e-3)


def test_sliding_only_window_model_matches_reference():
    """Three sliding layers and one global, window 5: the window cuts almost every row."""
    m = make_tiny_gemma3(
        seed=4,
        num_layers=4,
        sliding_window=5,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
    )
    x = make_tiny_inputs(m, seed=5, prefix_len=2, suffix_len=3, answer_len=4)
    n = x.input_ids.shape[1]
    targets = [Target(n - 4, n - 3), Target(n - 3, n)]
    out = explain_sequence(m, x.input_ids, x.pixel_values, x.token_type_ids, targets, ["chefer", "gradcam"])
    ref = reference_explain(m, x.input_ids, x.pixel_values, x.token_type_ids, [(t.start, t.end) for t in targets])
    for res, r in zip(out.results, ref):
        _assert_rel_close(res.maps["chefer"].text_map, r["chefer"])
        _assert_rel_close(res.maps["gradcam"].image_map.ravel(), r["gradcam"])


# --------------------------------------------------------------------------------------------
# batching, fallback, state


def test_batched_equals_per_target_loop(model, inputs):
    n = inputs.input_ids.shape[1]
    targets = _targets(n)
    a = _run(model, inputs, targets, ["chefer", "gradcam"], chunk_size=2, batched=True)
    b = _run(model, inputs, targets, ["chefer", "gradcam"], chunk_size=2, batched=False)
    c = _run(model, inputs, targets, ["chefer"], chunk_size=8)
    assert a.batched is True and b.batched is False
    for i in range(len(targets)):
        for m in ("chefer", "gradcam"):
            np.testing.assert_allclose(a.map(i, m).image_map, b.map(i, m).image_map, rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(a.map(i, "chefer").text_map, c.map(i, "chefer").text_map, rtol=1e-5, atol=1e-9)


def test_fallback_when_batched_vjp_fails(model, inputs, monkeypatch):
    n = inputs.input_ids.shape[1]
    targets = [Target(n - 2, n - 1), Target(n - 4, n - 2)]
    expected = _run(model, inputs, targets, ["chefer"])
    real_grad = torch.autograd.grad

    def failing_grad(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("simulated missing batching rule")
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", failing_grad)
    with pytest.warns(RuntimeWarning, match="falling back"):
        got = _run(model, inputs, targets, ["chefer"])
    assert got.batched is False
    for i in range(2):
        np.testing.assert_allclose(got.map(i, "chefer").text_map, expected.map(i, "chefer").text_map, rtol=1e-6)


def test_no_parameter_gradients_and_state_restored(inputs):
    m = make_tiny_gemma3(seed=0)
    m.train()
    m.lm_head.weight.requires_grad_(True)
    n = inputs.input_ids.shape[1]
    impl = m.config.text_config._attn_implementation
    out = _run(m, inputs, [Target(n - 1, n)], METHODS)
    assert all(p.grad is None for p in m.parameters())
    assert m.lm_head.weight.requires_grad and m.training
    assert sum(p.requires_grad for p in m.parameters()) == 1
    assert m.config.text_config._attn_implementation == impl
    assert out.results[0].maps["chefer"].image_map.sum() > 0


def test_truncation_does_not_change_maps(model, inputs):
    n = inputs.input_ids.shape[1]
    targets = [Target(n - 5, n - 4), Target(n - 4, n - 2)]
    methods = ["chefer", "rollout", "raw_attention", "gradcam", "consensus"]
    a = _run(model, inputs, targets, methods, truncate=True)
    b = _run(model, inputs, targets, methods, truncate=False)
    assert a.forward_len == n - 2 and b.forward_len == n
    for i in range(2):
        for m in methods:
            np.testing.assert_allclose(a.map(i, m).image_map, b.map(i, m).image_map, rtol=1e-5, atol=1e-9)
            if a.map(i, m).text_map is not None:
                np.testing.assert_allclose(a.map(i, m).text_map, b.map(i, m).text_map, rtol=1e-5, atol=1e-9)
                assert a.map(i, m).text_map.shape == (n,)
                # nothing after the read-out rows is relevant (the image block lies before them)
                assert np.all(a.map(i, m).text_map[targets[i].end - 1 :] == 0)


# --------------------------------------------------------------------------------------------
# self-checks and image positions


def test_argmax_check(model, inputs):
    n = inputs.input_ids.shape[1]
    ok = explain_sequence(
        model, inputs.input_ids, inputs.pixel_values, inputs.token_type_ids, [Target(n - 1, n)], ["raw_attention"],
        prompt_length=inputs.prompt_length,
    )
    assert ok.argmax_matches is True and ok.argmax_mismatches == [] and ok.argmax_checked == (inputs.prompt_length, n)
    bad_ids = inputs.input_ids.clone()
    pos = inputs.prompt_length + 2
    bad_ids[0, pos] = (bad_ids[0, pos] + 1) % 290 + 3
    bad = explain_sequence(
        model, bad_ids, inputs.pixel_values, inputs.token_type_ids, [Target(n - 1, n)], ["raw_attention"],
        prompt_length=inputs.prompt_length,
    )
    assert bad.argmax_matches is False and pos in bad.argmax_mismatches
    none = _run(model, inputs, [Target(n - 1, n)], ["chefer"])
    assert none.argmax_matches is None


def test_image_positions_come_from_config(model):
    x = make_tiny_inputs(model, seed=7, prefix_len=9, suffix_len=2, answer_len=3)
    n = x.input_ids.shape[1]
    out = explain_sequence(model, x.input_ids, x.pixel_values, x.token_type_ids, [Target(n - 1, n)], ["chefer"])
    expected = np.arange(x.image_start, x.image_start + 16)
    np.testing.assert_array_equal(out.image_positions, expected)
    assert x.input_ids[0, x.image_start - 1] == model.config.boi_token_id  # begin-of-image is not an image token
    text = out.map(0, "chefer").text_map
    np.testing.assert_allclose(out.map(0, "chefer").image_map.ravel(), text[expected])


def test_activation_norm_and_random(model, inputs):
    n = inputs.input_ids.shape[1]
    targets = [Target(n - 1, n), Target(n - 2, n - 1)]
    out = _run(model, inputs, targets, ["activation_norm", "random"], seed=11)
    with torch.no_grad():
        feats = model.model.get_image_features(inputs.pixel_values).pooler_output[0]
    np.testing.assert_allclose(out.map(0, "activation_norm").image_map.ravel(), feats.norm(dim=-1).numpy(), rtol=1e-5)
    again = _run(model, inputs, targets, ["random"], seed=11)
    other = _run(model, inputs, targets, ["random"], seed=12)
    r0 = out.map(0, "random").image_map
    assert r0.dtype == np.float32 and (r0 >= 0).all() and (r0 < 1).all()
    np.testing.assert_array_equal(r0, again.map(0, "random").image_map)
    assert not np.array_equal(r0, out.map(1, "random").image_map)
    assert not np.array_equal(r0, other.map(0, "random").image_map)
    assert out.batched is None


def test_bfloat16_model_gives_float32_maps(inputs):
    m32 = make_tiny_gemma3(seed=0)
    m16 = make_tiny_gemma3(seed=0, dtype=torch.bfloat16)
    n = inputs.input_ids.shape[1]
    targets = [Target(n - 3, n)]
    a = _run(m32, inputs, targets, ["chefer", "rollout"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the batched path must work in bf16 too
        b = _run(m16, inputs, targets, ["chefer", "rollout"])
    assert b.batched is True
    for m in ("chefer", "rollout"):
        x, y = a.map(0, m).image_map, b.map(0, m).image_map
        assert y.dtype == np.float32 and np.isfinite(y).all() and (y >= 0).all()
        assert np.corrcoef(x.ravel(), y.ravel())[0, 1] > 0.8


# --------------------------------------------------------------------------------------------
# errors


def test_invalid_arguments_raise(model, inputs):
    ids, pv, tt = inputs.input_ids, inputs.pixel_values, inputs.token_type_ids
    n = ids.shape[1]
    with pytest.raises(ValueError, match="unknown relevancy method"):
        explain_sequence(model, ids, pv, tt, [Target(n - 1, n)], ["grad_cam"])
    with pytest.raises(ValueError):
        Target(0, 1)
    with pytest.raises(ValueError):
        Target(5, 5)
    with pytest.raises(ValueError, match="exceeds"):
        explain_sequence(model, ids, pv, tt, [Target(n, n + 1)], ["chefer"])
    with pytest.raises(ValueError, match="image"):
        explain_sequence(model, ids, pv, tt, [Target(2, 3)], ["chefer"])  # ends before the image block
    with pytest.raises(ValueError, match="grid"):
        explain_sequence(model, ids, pv, tt, [Target(n - 1, n)], ["chefer"], grid=(3, 5))
    with pytest.raises(ValueError, match="no image tokens"):
        text_only = ids.clone()
        text_only[text_only == IMAGE_ID] = 5
        explain_sequence(model, text_only, pv, tt, [Target(n - 1, n)], ["chefer"])
    with pytest.raises(ValueError):
        explain_sequence(model, ids, pv, tt, [], ["chefer"])


def test_float32_plain_reference_agrees(model, inputs):
    """The benchmark's plain reference agrees with the float64 reference and with the engine."""
    from reference_chefer import reference_chefer

    n = inputs.input_ids.shape[1]
    targets = [(n - 4, n - 3), (n - 3, n)]
    plain = reference_chefer(model, inputs.input_ids, inputs.pixel_values, inputs.token_type_ids, targets)
    full = reference_explain(model, inputs.input_ids, inputs.pixel_values, inputs.token_type_ids, targets)
    out = _run(model, inputs, [Target(*t) for t in targets], ["chefer"])
    for i in range(2):
        _assert_rel_close(plain[i], full[i]["chefer"])
        _assert_rel_close(out.map(i, "chefer").text_map, full[i]["chefer"])
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert model.config.text_config._attn_implementation == "sdpa"


def test_attention_mask_and_left_padding(model, inputs):
    """An all-ones mask changes nothing; left padding only shifts positions (as in generate)."""
    n = inputs.input_ids.shape[1]
    methods = ["chefer", "rollout", "gradcam"]
    targets = [Target(n - 3, n - 2), Target(n - 2, n)]
    base = _run(model, inputs, targets, methods)
    ones = explain_sequence(
        model, inputs.input_ids, inputs.pixel_values, inputs.token_type_ids, targets, methods,
        attention_mask=torch.ones_like(inputs.input_ids),
    )
    pad = 3
    ids = torch.cat([torch.zeros((1, pad), dtype=torch.long), inputs.input_ids], dim=1)
    types = torch.cat([torch.zeros((1, pad), dtype=torch.long), inputs.token_type_ids], dim=1)
    mask = torch.cat([torch.zeros((1, pad), dtype=torch.long), torch.ones_like(inputs.input_ids)], dim=1)
    shifted = [Target(t.start + pad, t.end + pad) for t in targets]
    padded = explain_sequence(model, ids, inputs.pixel_values, types, shifted, methods, attention_mask=mask)
    for i in range(len(targets)):
        for m in methods:
            np.testing.assert_allclose(ones.map(i, m).image_map, base.map(i, m).image_map, rtol=1e-6, atol=1e-9)
            np.testing.assert_allclose(padded.map(i, m).image_map, base.map(i, m).image_map, rtol=1e-4, atol=1e-8)
        np.testing.assert_allclose(
            padded.map(i, "chefer").text_map[pad:], base.map(i, "chefer").text_map, rtol=1e-4, atol=1e-8
        )


def test_one_forward_pass_for_all_targets_and_methods(model, inputs):
    calls = []
    handle = model.model.language_model.register_forward_hook(lambda *a: calls.append(1))
    try:
        n = inputs.input_ids.shape[1]
        out = explain_sequence(
            model, inputs.input_ids, inputs.pixel_values, inputs.token_type_ids, _targets(n), METHODS,
            chunk_size=2, prompt_length=inputs.prompt_length,
        )
    finally:
        handle.remove()
    assert len(calls) == 1
    assert out.num_layers == 4 and len(out.results) == 5
