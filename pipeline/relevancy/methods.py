"""Relevancy and attention-baseline formulas on captured tensors (pure torch, float32).

Conventions shared by every function here:

- ``L`` language-model layers indexed ``l = 0..L-1`` from the input side, ``H`` heads, ``N``
  (forwarded) sequence positions, ``T`` targets, ``M`` image-token positions ``img``.
- ``A_l`` (H, N, N): post-softmax attention of layer ``l``, row = query, column = key.
- Read-out weights ``w`` (T, N): for a target explaining tokens ``p in [start, end)``,
  ``w = mean_p e_{p-1}`` (the logit at ``p-1`` predicts token ``p``).
- "Read-out attention" of layer ``l``, head ``h``: ``r_{l,h} = w @ A_{l,h}`` (T, N), i.e. the mean
  of the attention rows ``p-1``; ``r_l = mean_h r_{l,h}``. Its image part is ``r[..., img]``.

All maps returned are raw (not normalised) and non-negative.
"""

from __future__ import annotations

import torch

__all__ = [
    "abar",
    "chefer_rows",
    "rollout_rows",
    "rollout_step",
    "raw_attention_map",
    "layer_weighted_map",
    "head_importance_map",
    "attention_flow_map",
    "consensus_map",
    "gradcam_map",
    "legrad_layer",
    "activation_norm_map",
    "normalise_mass",
]


def abar(grad: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Chefer's gradient-weighted head mean ``Abar = mean_h max(0, grad * A)`` in float32.

    ``grad``: (..., H, N, N) gradient of the score w.r.t. ``probs`` (H, N, N). Returns (..., N, N).
    """
    return (grad.float() * probs.float()).clamp_(min=0).mean(dim=-3)


def chefer_rows(v: torch.Tensor, abar_l: torch.Tensor) -> torch.Tensor:
    """One step of row-only relevancy propagation: ``v + v @ Abar_l`` for a batch of rows.

    Derivation. Chefer et al. start from ``R^0 = I`` and update ``R^l = R^{l-1} + Abar_l R^{l-1}``
    for ``l = 1..L`` (input side first), so ``R^L = (I + Abar_L)(I + Abar_{L-1}) ... (I + Abar_1)``.
    Row ``q`` of it is ``e_q^T R^L = ((e_q^T (I + Abar_L)) (I + Abar_{L-1})) ... (I + Abar_1)``: start
    from ``v = e_q^T`` and apply ``v <- v + v @ Abar_l`` for ``l = L, L-1, ..., 1`` (output side
    first). By linearity, starting from ``v = w`` (a mean of unit rows) gives the mean of the rows.
    Cost O(N^2) per layer and row instead of O(N^3) for the full matrix.

    ``v``: (T, N) float32, ``abar_l``: (T, N, N) or (N, N) float32. Returns (T, N).
    """
    if abar_l.dim() == 2:
        return v + v @ abar_l
    return v + torch.bmm(v.unsqueeze(1), abar_l).squeeze(1)


def legrad_layer(grad: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """One layer's LeGrad term ``sum_i mean_h max(0, dS/dA_{l,h}[i, j]) * [A_{l,h}[i, j] > 0]`` over keys ``j``.

    ``grad``: (..., H, N, N) gradient of the score w.r.t. ``A_l`` (rows = queries ``i``);
    ``probs``: (H, N, N) ``A_l``. Entries the mask removes (future keys, keys beyond a sliding
    window: ``A = 0`` whatever the scores) are left out: their gradient is not a sensitivity of
    anything the model can change. Returns (..., N) float32. LeGrad (Bousselham et al. 2024)
    averages over the query rows; the sum differs by the constant ``1/N`` (see
    :func:`pipeline.relevancy.library.legrad`).
    """
    return (grad.clamp(min=0) * (probs > 0)).float().sum(dim=-2).mean(dim=-2)


def rollout_step(v: torch.Tensor, mean_probs_l: torch.Tensor) -> torch.Tensor:
    """One step of row-only attention rollout: ``v @ rownorm(0.5 * mean_h A_l + 0.5 * I)``.

    ``v``: (T, N) float32; ``mean_probs_l``: (N, N) head-mean attention of one layer. Rows of
    the head mean already sum to 1 for unmasked queries, so the row normalisation only matters
    for fully masked (padding) rows.
    """
    ahat = 0.5 * mean_probs_l.float()
    ahat.diagonal().add_(0.5)
    ahat = ahat / ahat.sum(dim=-1, keepdim=True)
    return v @ ahat


def rollout_rows(w: torch.Tensor, mean_probs: list[torch.Tensor]) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020), read-out rows only.

    Per layer ``Ahat_l = rownorm(0.5 * mean_h A_l + 0.5 * I)``; the rollout matrix is
    ``Ahat_{L-1} ... Ahat_0`` (product through the layers, input side rightmost) and its read-out
    row is ``w Ahat_{L-1} ... Ahat_0``, computed as ``v <- v @ Ahat_l`` for ``l = L-1..0``.
    ``w``: (T, N); ``mean_probs[l]``: (N, N) head-mean attention. Returns (T, N).
    """
    v = w.float()
    for a in reversed(mean_probs):
        v = rollout_step(v, a)
    return v


def raw_attention_map(read_mean: torch.Tensor) -> torch.Tensor:
    """Last layer's head-mean read-out attention ``r_{L-1}`` over all positions.

    ``read_mean``: (L, T, N) head-mean read-out attention per layer. Returns (T, N).
    """
    return read_mean[-1]


def layer_weighted_map(read_mean_img: torch.Tensor) -> torch.Tensor:
    """Depth-weighted mean of the read-out attention to image tokens.

    ``map = (1/L) * sum_l ((l + 1) / L) * r_l[img]`` with ``l = 0..L-1`` (the earlier tools' mean
    over layers of the layer-weighted attention; the last layer gets weight 1).
    ``read_mean_img``: (L, T, M). Returns (T, M).
    """
    n_layers = read_mean_img.shape[0]
    weights = torch.arange(1, n_layers + 1, device=read_mean_img.device, dtype=torch.float32) / n_layers
    return (weights[:, None, None] * read_mean_img.float()).mean(dim=0)


def head_importance_map(read_heads_img: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Head-importance weighted read-out attention to image tokens.

    For each layer ``l`` and head ``h`` let ``a = r_{l,h}[img]`` (raw attention mass, not
    renormalised). Importance ``s_{l,h} = max(a) / (1 + H(a))`` with
    ``H(a) = -sum_i a_i ln(a_i + eps)`` (natural log, eps = 1e-10), as in the earlier tools.
    Weights ``s / sum_{l,h} s``; map ``= sum_{l,h} (s_{l,h} / sum s) * a_{l,h}``.
    ``read_heads_img``: (L, T, H, M). Returns (T, M). Raises when every importance is zero.
    """
    a = read_heads_img.float()
    entropy = -(a * torch.log(a + eps)).sum(dim=-1)  # (L, T, H)
    importance = a.amax(dim=-1) / (1.0 + entropy)
    total = importance.sum(dim=(0, 2))  # (T,)
    if not bool(torch.all(torch.isfinite(total) & (total > 0))):
        raise RuntimeError("head_importance: all head importances are zero or non-finite")
    weights = importance / total[None, :, None]
    return torch.einsum("lth,lthm->tm", weights, a)


def attention_flow_map(read_mean_img: torch.Tensor) -> torch.Tensor:
    """Decayed layer mix of head-mean read-out attention to image tokens (no matrix products).

    With layers numbered ``1..L``: ``map = 0.5 * r_L[img] + 0.5 * sum_{i=0}^{L-2} 0.5^i * r_{L-1-i}[img]``,
    i.e. the last layer gets 0.5 and the earlier layers, walking back from the penultimate one,
    get ``0.5, 0.25, 0.125, ...`` times 0.5. ``read_mean_img``: (L, T, M). Returns (T, M).
    """
    a = read_mean_img.float()
    out = 0.5 * a[-1]
    earlier = a[:-1].flip(0)  # penultimate layer first
    if earlier.shape[0]:
        decay = 0.5 ** torch.arange(earlier.shape[0], device=a.device, dtype=torch.float32)
        out = out + 0.5 * (decay[:, None, None] * earlier).sum(dim=0)
    return out


def normalise_mass(m: torch.Tensor, name: str) -> torch.Tensor:
    """Divide each row of ``m`` (T, M) by its sum; raise when a sum is zero or non-finite."""
    total = m.sum(dim=-1, keepdim=True)
    if not bool(torch.all(torch.isfinite(total) & (total > 0))):
        raise RuntimeError(f"{name}: map has zero or non-finite mass, cannot normalise")
    return m / total


def consensus_map(layer_weighted: torch.Tensor, head_importance: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Mean of the three maps after normalising each to sum 1 over the image tokens (T, M)."""
    return (
        normalise_mass(layer_weighted, "layer_weighted")
        + normalise_mass(head_importance, "head_importance")
        + normalise_mass(flow, "attention_flow")
    ) / 3.0


def gradcam_map(grad_img: torch.Tensor, embeds_img: torch.Tensor) -> torch.Tensor:
    """Gradient x activation of the image soft tokens entering the language model.

    ``map_i = max(0, sum_d grad[i, d] * E[i, d])`` where ``E`` (M, D) are the projected image
    embeddings at the image positions of the language model's ``inputs_embeds`` and ``grad``
    (T, M, D) the gradients of each target score w.r.t. them. Returns (T, M).
    """
    return (grad_img.float() * embeds_img.float().unsqueeze(0)).sum(dim=-1).clamp_(min=0)


def activation_norm_map(embeds_img: torch.Tensor) -> torch.Tensor:
    """L2 norm over hidden dims of each image soft token's embedding (M,); gradient-free."""
    return torch.linalg.vector_norm(embeds_img.float(), dim=-1)
