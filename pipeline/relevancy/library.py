"""The built-in relevancy methods, each registered by name (see :mod:`.registry`).

Conventions (see :mod:`.methods`): ``L`` layers from the input side, ``H`` heads, ``N``
forwarded positions, ``C`` targets of the call, ``M`` image tokens; ``w = x.readout`` (C, N)
read-out weights (the mean of the unit rows ``p - 1`` of a target's tokens). Every map is raw
(not normalised), float32 and non-negative. The first line of each docstring is the method's
row in the methods table (docs/methods.md).
"""

from __future__ import annotations

import numpy as np
import torch

from .attnlrp import attnlrp_relevance
from .integrated_gradients import integrated_gradients as _integrated_gradients
from .methods import (
    abar,
    activation_norm_map,
    attention_flow_map,
    chefer_rows,
    consensus_map,
    gradcam_map,
    head_importance_map,
    layer_weighted_map,
    legrad_layer,
    rollout_step,
)
from .perturbation import occlusion_maps
from .registry import MethodInputs, MethodOutput, register_method

# --------------------------------------------------------------------------------------------
# gradient


@register_method("chefer", family="gradient", needs=("attention", "attention_grads"), text_map=True)
def chefer(x: MethodInputs) -> torch.Tensor:
    """Chefer et al. (2021): per layer `Abar = mean_h max(0, dA * A)`, `R <- R + Abar R` from `R = I`; the read-out row(s) of R.

    "Transformer Interpretability Beyond Attention Visualization", CVPR 2021, rule for
    self-attention: ``R^l = R^{l-1} + Abar_l R^{l-1}`` with ``Abar_l = E_h[(grad A_l * A_l)^+]``;
    here only the read-out rows are propagated (:func:`.methods.chefer_rows`), output side first.
    """
    v = x.readout
    for layer in reversed(range(len(x.attention))):
        v = chefer_rows(v, abar(x.attention_grads[layer], x.attention[layer]))
    return v


@register_method("legrad", family="gradient", needs=("attention", "attention_grads"), text_map=True)
def legrad(x: MethodInputs) -> torch.Tensor:
    """LeGrad (Bousselham et al. 2024): `sum_l sum_i mean_h max(0, dS/dA_l[h, i, :])` over attended entries, the attention gradients' positive part.

    "LeGrad: An Explainability Method for Vision Transformers via Feature Formation Sensitivity"
    (arXiv:2404.03214): layer map ``E^l = (1/(h n)) sum_h sum_i ReLU(dS^l/dA^l)_{h,i,:}``,
    explanation ``E = sum_l E^l`` (the authors' code sums the layers; the paper's mean over
    layers is the same map up to ``1/L``). Adaptations to a masked decoder, stated here:

    - the score ``S`` of every layer is the target score (:mod:`.scores`) at the model's output,
      whose gradients w.r.t. every ``A_l`` the engine has already computed (no extra backward);
      LeGrad reads a per-layer score ``S^l`` off each layer's intermediate representation
      through the final head;
    - entries the attention mask removes (``A = 0``: future keys, keys beyond a sliding window)
      are left out: ViTs have none, and the gradient w.r.t. a probability the model cannot move
      is no sensitivity;
    - the query rows are summed, not averaged: ``1/n`` would make a raw map depend on how long
      the forwarded prefix is; the paper min-max normalises its maps, so the ranking is the same.

    Map: the key columns ``j`` (all N positions; the image map reads the image positions).
    """
    return sum(legrad_layer(g, a) for g, a in zip(x.attention_grads, x.attention))


@register_method("gradcam", family="gradient", needs=("embeddings", "embedding_grads"))
def gradcam(x: MethodInputs) -> torch.Tensor:
    """Gradient x activation of the image soft tokens entering the language model, summed over channels, clamped at 0.

    ``map_i = max(0, sum_d dS/dE[i, d] * E[i, d])`` (Grad-CAM's weighting at token resolution;
    see :func:`.methods.gradcam_map`).
    """
    return gradcam_map(x.embedding_grads, x.embeddings)


@register_method("integrated_gradients", family="gradient", needs=("passes",))
def integrated_gradients(x: MethodInputs) -> MethodOutput:
    """Integrated gradients (Sundararajan et al. 2017) over the image soft-token embeddings, `explain.ig_steps` midpoint steps from a mean-token (or zero) baseline; `max(0, a_i)`.

    See :mod:`.integrated_gradients`. Extras per target: ``completeness_error`` =
    ``|sum_i a_i - (S(x) - S(x'))|`` and ``score_delta`` = ``S(x) - S(x')`` (units of the score).
    """
    p = x.passes
    attr, error, delta = _integrated_gradients(
        p.model, p.embeds, p.prefix, p.keep, p.score, x.targets, x.image_positions,
        steps=int(x.options["ig_steps"]), baseline=x.options["ig_baseline"],
        batch_size=int(x.options["perturbation_batch_size"]),
    )
    return MethodOutput(attr.clamp(min=0), {"completeness_error": error, "score_delta": delta})


@register_method("attnlrp", family="gradient", needs=("passes",), text_map=True)
def attnlrp(x: MethodInputs) -> MethodOutput:
    """AttnLRP (Achtibat et al. 2024): layer-wise relevance of the input embeddings (identity rule on norms and activations, uniform rule on products, softmax linearised), `max(0, R_i)`.

    See :mod:`.attnlrp`. One forward and one backward per target of its own. Extras per
    target: ``conservation_error`` = ``|sum_i R_i - S|`` and ``relevance_sum`` = ``sum_i R_i``
    over every forwarded position (units of the score).
    """
    p = x.passes
    rel, error, _ = attnlrp_relevance(p.model, p.embeds, p.prefix, p.keep, p.score)
    return MethodOutput(rel.clamp(min=0), {"conservation_error": error, "relevance_sum": rel.sum(-1)})


# --------------------------------------------------------------------------------------------
# attention


@register_method("raw_attention", family="attention", needs=("attention_readout",), text_map=True)
def raw_attention(x: MethodInputs) -> torch.Tensor:
    """Last layer, mean over heads, the read-out rows' attention (to every position; the image map at the image tokens).

    ``r_{L-1} = mean_h w A_{L-1,h}``.
    """
    return x.attention_readout.mean[-1]


@register_method("rollout", family="attention", needs=("attention",), text_map=True)
def rollout(x: MethodInputs) -> torch.Tensor:
    """Attention rollout (Abnar and Zuidema 2020): `0.5 A + 0.5 I`, row-normalised, multiplied through the layers.

    ``w Ahat_{L-1} ... Ahat_0`` with ``Ahat_l = rownorm(0.5 mean_h A_l + 0.5 I)``
    (:func:`.methods.rollout_rows`).
    """
    v = x.readout.clone()
    for a in reversed(x.attention):
        v = rollout_step(v, a.float().mean(dim=0))
    return v


@register_method("layer_weighted", family="attention", needs=("attention_readout",))
def layer_weighted(x: MethodInputs) -> torch.Tensor:
    """Depth-weighted mean over layers of the head-mean read-out attention to the image tokens (the earlier tools' mix).

    See :func:`.methods.layer_weighted_map`.
    """
    return layer_weighted_map(x.attention_readout.mean[:, :, x.image_positions])


@register_method("head_importance", family="attention", needs=("attention_readout",))
def head_importance(x: MethodInputs) -> torch.Tensor:
    """Read-out attention to the image tokens, heads weighted by `max / (1 + entropy)` (the earlier tools' mix).

    See :func:`.methods.head_importance_map`.
    """
    return head_importance_map(x.attention_readout.heads[..., x.image_positions])


@register_method("attention_flow", family="attention", needs=("attention_readout",))
def attention_flow(x: MethodInputs) -> torch.Tensor:
    """Decayed layer mix of the head-mean read-out attention (last layer 0.5, then 0.5 x 0.5^i walking down; the earlier tools' mix).

    See :func:`.methods.attention_flow_map`.
    """
    return attention_flow_map(x.attention_readout.mean[:, :, x.image_positions])


@register_method("consensus", family="attention", needs=("attention_readout",))
def consensus(x: MethodInputs) -> torch.Tensor:
    """Mean of `layer_weighted`, `head_importance` and `attention_flow`, each normalised to mass 1.

    See :func:`.methods.consensus_map`.
    """
    return consensus_map(layer_weighted(x), head_importance(x), attention_flow(x))


# --------------------------------------------------------------------------------------------
# perturbation and floors


@register_method("occlusion", family="perturbation", needs=("passes",))
def occlusion(x: MethodInputs) -> torch.Tensor:
    """Per image token (or k x k block), the drop in the target's log-probability when it is replaced by a baseline embedding: the perturbation reference.

    ``max(0, log P(original) - log P(occluded))`` per ``explain.occlusion_block`` square, baseline
    ``explain.occlusion_baseline`` (see :mod:`.perturbation`). Its score is always the
    log-probability, whatever ``explain.score``.
    """
    occ = occlusion_maps(
        x.passes.model, x.passes.sequence, x.targets, grid=x.grid, block=int(x.options["occlusion_block"]),
        baseline=x.options["occlusion_baseline"], batch_size=int(x.options["perturbation_batch_size"]),
    )
    return torch.from_numpy(occ.reshape(len(x.targets), -1))


@register_method("activation_norm", family="floor", needs=("embeddings",))
def activation_norm(x: MethodInputs) -> torch.Tensor:
    """L2 norm of the image soft-token embeddings entering the language model (no gradient, no target).

    See :func:`.methods.activation_norm_map`.
    """
    return activation_norm_map(x.embeddings).expand(len(x.targets), -1)


@register_method("random", family="floor")
def random(x: MethodInputs) -> torch.Tensor:
    """A seeded uniform random map: the floor.

    Per target ``numpy.random.default_rng([seed, start, end]).random((grid_h, grid_w))``, float32
    in [0, 1); the explain stage derives ``seed`` from ``explain.seed`` and the sample id.
    """
    gh, gw = x.grid
    maps = [np.random.default_rng([int(x.seed), int(t.start), int(t.end)]).random((gh, gw), dtype=np.float32)
            for t in x.targets]
    return torch.from_numpy(np.stack(maps).reshape(len(x.targets), gh * gw))
