"""Integrated gradients over the image soft-token embeddings (Sundararajan et al., ICML 2017).

Input ``x``: the ``M`` image soft-token embeddings entering the language model (rows of its
``inputs_embeds`` at the image positions; text embeddings stay fixed). Baseline ``x'``: every
image token replaced by the image's mean token embedding (``"mean"``, as the perturbation
baseline) or by zero (``"zero"``). For a target score ``s`` (:mod:`.scores`), token ``i``'s
attribution is

    ``a_i = sum_d (x_i - x'_i)_d * (1/S) sum_{k=0}^{S-1} ds/dx_{i,d} (x' + alpha_k (x - x'))``

with the midpoint rule ``alpha_k = (k + 1/2) / S`` over ``S = explain.ig_steps`` steps.
Completeness (the path integral's fundamental theorem) says ``sum_i a_i = s(x) - s(x')``; the
midpoint rule's error falls as ``O(1/S^2)`` for a smooth path. The method reports
``completeness_error = |sum_i a_i - (s(x) - s(x'))|`` per target (units of the score) and the map
``max(0, a_i)`` (the evidence for the target; like ``gradcam``, negative attributions are cut).

Passes. Every (step, target) pair is one variant of the sequence: ``x' + alpha_k (x - x')`` in
its image rows; variants run in batches of ``batch_size`` with gradients only w.r.t. the variant
embeddings (parameters stay frozen). Row ``b`` of a batch scores its own target, so one backward
of the sum of the batch's scores gives every variant its gradient. ``s(x)`` and ``s(x')`` come
from one more (no-grad) pass of the two end points. The forward is cut after the last explained
token; the language model runs as in :func:`.perturbation.forward_embeddings`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .capture import find_language_model
from .inputs import Target
from .perturbation import BASELINES, forward_embeddings
from .scores import ScoreSelection, target_scores

__all__ = ["integrated_gradients"]


def _endpoints(embeds: torch.Tensor, img: torch.Tensor, baseline: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (M, D), x' (M, D)) in float32 from the sequence's embeddings (1, n, D)."""
    x = embeds[0, img].float()
    if baseline == "mean":
        base = x.mean(dim=0, keepdim=True).expand_as(x)
    elif baseline == "zero":
        base = torch.zeros_like(x)
    else:
        raise ValueError(f"unknown integrated-gradients baseline {baseline!r}; known: {', '.join(BASELINES)}")
    return x, base.to(embeds.dtype).float()


def _variants(embeds: torch.Tensor, img: torch.Tensor, x: torch.Tensor, base: torch.Tensor,
              alphas: torch.Tensor) -> torch.Tensor:
    """(B, n, D) copies of ``embeds`` whose image rows are ``x' + alpha_b (x - x')`` (model dtype)."""
    out = embeds.expand(len(alphas), -1, -1).clone()
    path = base[None] + alphas[:, None, None] * (x - base)[None]
    out[:, img] = path.to(embeds.dtype)
    return out


def integrated_gradients(model: torch.nn.Module, embeds: torch.Tensor, prefix: dict, keep: torch.Tensor,
                         score: ScoreSelection, targets: Sequence[Target], img: torch.Tensor, *,
                         steps: int = 16, baseline: str = "mean", batch_size: int = 16
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Signed attributions (T, M), completeness errors (T,) and ``s(x) - s(x')`` (T,), float32.

    ``embeds`` (1, n, D): the forwarded prefix's language-model input embeddings (detached);
    ``prefix``: its ``input_ids`` / ``token_type_ids`` / ``attention_mask`` / ``position_ids``;
    ``keep``: the logit rows ``score`` indexes; ``img`` (M,) the image positions.
    """
    if int(steps) < 1:
        raise ValueError("ig_steps must be >= 1")
    if int(batch_size) < 1:
        raise ValueError("batch_size must be >= 1")
    lm = find_language_model(model)
    x, base = _endpoints(embeds, img, baseline)
    alphas = (torch.arange(int(steps), device=embeds.device, dtype=torch.float32) + 0.5) / int(steps)
    pairs = [(k, t) for t in range(len(targets)) for k in range(int(steps))]
    attr = torch.zeros((len(targets), img.numel()), device=embeds.device, dtype=torch.float32)
    for c0 in range(0, len(pairs), int(batch_size)):
        chunk = pairs[c0 : c0 + int(batch_size)]
        which = torch.tensor([t for _, t in chunk], device=embeds.device)
        variants = _variants(embeds, img, x, base, alphas[[k for k, _ in chunk]]).requires_grad_(True)
        with torch.enable_grad():
            scores = target_scores(forward_embeddings(model, lm, variants, prefix, keep).logits, score)
            own = scores.gather(1, which[:, None])[:, 0]
            (grad,) = torch.autograd.grad(own.sum(), variants)
        contrib = (grad[:, img].float() * (x - base)[None]).sum(dim=-1) / int(steps)  # (B, M)
        attr.index_add_(0, which, contrib)
    with torch.no_grad():
        ends = _variants(embeds, img, x, base, torch.tensor([1.0, 0.0], device=embeds.device))
        s = target_scores(forward_embeddings(model, lm, ends, prefix, keep).logits, score)
    delta = s[0] - s[1]
    return attr, (attr.sum(dim=-1) - delta).abs(), delta
