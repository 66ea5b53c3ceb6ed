"""AttnLRP (Achtibat et al., ICML 2024) for Gemma 3 decoders, as modified gradient x input.

"AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for Transformers" (Achtibat,
Hatefi, Dreyer, Jain, Wiegand, Lapuschkin, Samek; ICML 2024). Layer-wise relevance propagation
from the target score ``S`` back to the language model's input embeddings ``E`` (N, D); a
position's relevance is ``R_i = sum_d E[i, d] * g[i, d]`` where ``g`` is the gradient of ``S``
computed with these rules (their "efficient" formulation: every rule below is a change of the
backward pass only; the forward values are the model's):

- RMSNorm (every ``Gemma3RMSNorm``: input, post-attention, pre / post feed-forward, final, and
  the q / k norms): the identity rule, i.e. ``y = x * c * (1 + w)`` with the normaliser
  ``c = rsqrt(mean(x^2) + eps)`` treated as a constant (Eq. 9 of the paper: normalisation is
  linear in its input for the relevance);
- the gated MLP ``down(act(gate(x)) * up(x))``: the identity rule on the element-wise
  activation (its gradient is replaced by ``act(z) / z``, so ``z * grad = act(z)``) and the
  uniform rule on the element-wise product (Eq. 7: each factor gets half the relevance: the
  gradient into the product is halved);
- attention ``softmax(q k^T s + mask) v``: the uniform rule on both matrix products (the value
  path gets 1/2, the attention path 1/2 of which each of ``q`` and ``k`` gets half: gradients of
  ``q`` and ``k`` divided by 4, of ``v`` by 2), and the softmax by gradient x input, which is the
  paper's linearisation rule (Prop. 3.1: ``R_i = x_i (R_i^out - s_i sum_j R_j^out)``);
- linear layers (no biases in Gemma 3), residual sums, rotary embeddings (linear in q, k) and the
  embedding scale: plain gradient x input (the epsilon rule with epsilon -> 0).

Conservation. With these rules the relevance is conserved through every layer except the
softmax (whose rule drops the bias term of its linearisation) and non-zero normaliser epsilons,
so ``sum_i R_i`` approximates the target logit; :func:`attnlrp_relevance` returns
``|sum_i R_i - S|`` per target as ``conservation_error``. Soft-capping (Gemma 2) is not covered:
a model with attention or final-logit soft-capping raises.

The rules are installed on the model object for the duration of :func:`attnlrp_rules` (forward
hooks on the norms and MLPs, the language model switched to an attention function with the
gradient divisions) and removed afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from .capture import (
    _set_text_implementation,
    capture_attention_forward,
    find_language_model,
)
from .perturbation import forward_embeddings
from .scores import ScoreSelection, target_scores

__all__ = ["LRP_ATTN_NAME", "attnlrp_relevance", "attnlrp_rules"]

LRP_ATTN_NAME = "relevancy_attnlrp"


class _DivideGradient(torch.autograd.Function):
    """Identity forward; backward divides the gradient by ``factor`` (the uniform rule)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad / ctx.factor, None


class _IdentityRule(torch.autograd.Function):
    """``fn(z)`` forward; backward ``grad * fn(z) / (z + eps)`` (the identity rule), so that
    ``z * grad_z = fn(z) * grad_out``."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, fn: Any) -> torch.Tensor:
        out = fn(z)
        ctx.save_for_backward(out / (z + 1e-10))
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (ratio,) = ctx.saved_tensors
        return grad * ratio, None


def _lrp_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention (:func:`.capture.capture_attention_forward`) with the matmul uniform rule."""
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("AttnLRP with attention soft-capping is not implemented")
    q, k = _DivideGradient.apply(query, 4.0), _DivideGradient.apply(key, 4.0)
    return capture_attention_forward(module, q, k, _DivideGradient.apply(value, 2.0), attention_mask, **kwargs)


def _norm_hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    """Gemma3RMSNorm with the normaliser held constant (same forward values)."""
    x = args[0].float()
    scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + mod.eps).detach()
    return (x * scale * (1.0 + mod.weight.float())).type_as(args[0])


def _mlp_hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    """The gated MLP with the identity rule on the activation and the uniform rule on the product."""
    x = args[0]
    gated = _IdentityRule.apply(mod.gate_proj(x), mod.act_fn) * mod.up_proj(x)
    return mod.down_proj(_DivideGradient.apply(gated, 2.0))


def _is_rmsnorm(mod: nn.Module) -> bool:
    return type(mod).__name__.endswith("RMSNorm") and hasattr(mod, "eps") and hasattr(mod, "weight")


def _is_gated_mlp(mod: nn.Module) -> bool:
    return all(hasattr(mod, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn"))


@contextmanager
def attnlrp_rules(model: nn.Module) -> Iterator[None]:
    """Install the AttnLRP rules on ``model``'s language model for the duration (see the module
    docstring); everything is restored afterwards. Not re-entrant."""
    lm = find_language_model(model)
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(text, "final_logit_softcapping", None) is not None or getattr(text, "attn_logit_softcapping", None):
        raise NotImplementedError("AttnLRP with soft-capping is not implemented")
    AttentionInterface.register(LRP_ATTN_NAME, _lrp_attention)
    AttentionMaskInterface.register(LRP_ATTN_NAME, eager_mask)
    hooks = [m.register_forward_hook(_norm_hook) for m in lm.modules() if _is_rmsnorm(m)]
    hooks += [m.register_forward_hook(_mlp_hook) for m in lm.modules() if _is_gated_mlp(m)]
    previous = lm.config._attn_implementation
    try:
        _set_text_implementation(model, lm, LRP_ATTN_NAME)
        yield
    finally:
        for h in hooks:
            h.remove()
        _set_text_implementation(model, lm, previous)


def attnlrp_relevance(model: nn.Module, embeds: torch.Tensor, prefix: dict, keep: torch.Tensor,
                      score: ScoreSelection) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per target: relevance (T, n) of every forwarded position, float32; the conservation error
    ``|sum_i R_i - S|`` (T,); and ``S`` (T,) as computed in this pass.

    ``embeds`` (1, n, D): the language model's input embeddings of the forwarded prefix;
    ``prefix``, ``keep``, ``score`` as in :class:`.registry.OwnPasses`. One forward pass with
    the rules, one backward per target.
    """
    leaf = embeds.detach().clone().requires_grad_(True)
    with attnlrp_rules(model), torch.enable_grad():
        scores = target_scores(forward_embeddings(model, find_language_model(model), leaf, prefix, keep).logits,
                               score)[0]
        rel = []
        for t in range(scores.shape[0]):
            (g,) = torch.autograd.grad(scores[t], leaf, retain_graph=t + 1 < scores.shape[0])
            rel.append((leaf.detach().float() * g.float()).sum(-1)[0])
    relevance = torch.stack(rel)
    s = scores.detach()
    return relevance, (relevance.sum(-1) - s).abs(), s
