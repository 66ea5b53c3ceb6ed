"""LeGrad against a plain per-target loop over layers and heads (autograd, float64, tiny model)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


from pipeline.relevancy import SequenceInputs, Target, explain  # noqa: E402


def plain_legrad(model, x, targets: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Per target: eager forward with output_attentions, one backward, then
    ``sum_l sum_i (1/H) sum_h max(0, dS/dA_l[h, i, j])`` over attended entries (``A > 0``) with
    explicit loops (float64)."""
    ref = copy.deepcopy(model).float()
    ref.set_attn_implementation("eager")
    ref.requires_grad_(True)
    out = ref(input_ids=x.input_ids, pixel_values=x.pixel_values, token_type_ids=x.token_type_ids,
              output_attentions=True, use_cache=False)
    attentions = list(out.attentions)
    for a in attentions:
        a.retain_grad()
    maps = []
    for start, end in targets:
        for a in attentions:
            a.grad = None
        score = sum(out.logits[0, p - 1, x.input_ids[0, p]] for p in range(start, end))
        score.backward(retain_graph=True)
        n = x.input_ids.shape[1]
        total = torch.zeros(n, dtype=torch.float64)
        for a in attentions:
            heads, attended = a.grad[0].double(), a.detach()[0] > 0
            for h in range(heads.shape[0]):
                for i in range(n):
                    total += torch.where(attended[h, i], heads[h, i].clamp(min=0), 0.0) / heads.shape[0]
        maps.append(total)
    return maps


def test_legrad_equals_the_plain_loop(model, x):
    n = x.input_ids.shape[1]
    spans = [(n - 6, n - 5), (n - 1, n), (n - 5, n - 2)]
    seq = SequenceInputs(x.input_ids, x.pixel_values, x.token_type_ids)
    out = explain(model, seq, [Target(*s) for s in spans], ["legrad", "chefer"], chunk_size=2)
    img = out.image_positions
    for res, expected in zip(out.results, plain_legrad(model, x, spans)):
        got = res.maps["legrad"]
        assert got.text_map.shape == (n,) and (got.image_map >= 0).all()
        scale = float(expected.abs().max())
        np.testing.assert_allclose(got.text_map, expected.numpy(), rtol=1e-4, atol=1e-6 * scale)
        np.testing.assert_allclose(got.image_map.ravel(), expected[img].numpy(), rtol=1e-4, atol=1e-6 * scale)
        assert got.image_map.sum() > 0 and not np.allclose(got.image_map, res.maps["chefer"].image_map)


def test_legrad_does_not_depend_on_truncation(model, x):
    n = x.input_ids.shape[1]
    seq = SequenceInputs(x.input_ids, x.pixel_values, x.token_type_ids)
    a = explain(model, seq, [Target(n - 5, n - 4)], ["legrad"], truncate=True)
    b = explain(model, seq, [Target(n - 5, n - 4)], ["legrad"], truncate=False)
    assert a.forward_len < b.forward_len
    np.testing.assert_allclose(a.map(0, "legrad").text_map, b.map(0, "legrad").text_map, rtol=1e-5, atol=1e-9)
