"""Capture of language-model attention probabilities through transformers' AttentionInterface.

An attention function computing plain eager attention is registered under
:data:`CAPTURE_ATTN_NAME` with ``transformers.AttentionInterface``; transformers' own eager mask
builder is registered under the same name with ``AttentionMaskInterface``. The second
registration matters: transformers 5 builds *no* mask at all for an attention implementation
without a registered mask function (rows would see future tokens and sliding windows would
vanish).

Inside ``with capture(model) as rec:`` the language model's config is switched to that
implementation (the vision tower keeps its own) and every language-model layer's post-softmax
probabilities ``A_l`` (batch x heads x N x N, model dtype, exactly the tensor multiplied with the
values) are stored in ``rec.probs[l]``; the language model's input ``inputs_embeds`` is kept in
``rec.inputs_embeds``. On exit the previous implementation is restored. The recorder is held in
a context variable (so other threads' forward passes are not recorded), but the implementation
switch is a setting of the model: do not run two captures on one model object concurrently.

Gradients. Parameters stay frozen, so by default nothing in a forward pass requires grad. With
``rec = capture(model, grad=True)`` a forward pre-hook on the language model replaces its
``inputs_embeds`` (text embeddings with the projected image soft tokens already merged) by a
detached copy that requires grad. Every ``A_l`` then lies on
the autograd graph (each depends on the embeddings), and ``torch.autograd.grad(score, rec.probs)``
returns the full gradient of the score with respect to each ``A_l`` through all later layers --
the same quantity as ``A_l.retain_grad()`` followed by ``score.backward()``. The vision tower is
upstream of every language-model layer, so detaching there changes none of these gradients and
keeps the vision tower out of the graph.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

__all__ = [
    "CAPTURE_ATTN_NAME",
    "AttentionRecorder",
    "capture",
    "capture_attention_forward",
    "find_language_model",
    "register_capture_attention",
]

CAPTURE_ATTN_NAME = "relevancy_capture"

_ACTIVE: contextvars.ContextVar[AttentionRecorder | None] = contextvars.ContextVar(
    "relevancy_attention_recorder", default=None
)


@dataclass
class AttentionRecorder:
    """Per-forward storage of captured attention probabilities.

    ``probs[l]`` is layer ``l``'s (0-based, input side first) post-softmax attention of shape
    (batch, heads, q_len, kv_len) in the model's dtype, or ``None`` before the layer ran.
    ``inputs_embeds`` is the language model's input (batch, N, hidden): text embeddings with the
    projected image soft tokens merged in; a grad-requiring leaf when ``grad=True``.
    """

    layer_of: dict[int, int]
    probs: list[torch.Tensor | None]
    grad: bool = False
    inputs_embeds: torch.Tensor | None = None
    calls: int = 0

    @property
    def num_layers(self) -> int:
        """Number of language-model layers being recorded."""
        return len(self.probs)

    def complete(self) -> bool:
        """True when every layer's probabilities were recorded."""
        return all(p is not None for p in self.probs)

    def reset(self) -> None:
        """Forget what was recorded (before another forward pass)."""
        self.probs = [None] * len(self.probs)
        self.inputs_embeds = None
        self.calls = 0


def _repeat_kv(states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(batch, kv_heads, N, d) -> (batch, kv_heads * n_rep, N, d), each kv head repeated n_rep times."""
    if n_rep == 1:
        return states
    b, h, n, d = states.shape
    return states[:, :, None].expand(b, h, n_rep, n, d).reshape(b, h * n_rep, n, d)


def capture_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention that also records the probabilities of recorded modules.

    Same computation as transformers' ``eager_attention_forward``: grouped-query key/value
    repeat, ``q k^T * scaling``, optional tanh soft-capping (when the caller passes ``softcap``,
    as Gemma 2 does; Gemma 3's attention passes none), additive float mask, softmax in float32
    cast back to the query dtype, ``probs @ v``. Dropout is never applied (inference only).
    Returns ``(output (batch, N, heads, d), probs (batch, heads, N, N))``.
    """
    if scaling is None:
        scaling = module.head_dim**-0.5
    n_rep = int(getattr(module, "num_key_value_groups", 1))
    key_states = _repeat_kv(key, n_rep)
    value_states = _repeat_kv(value, n_rep)
    scores = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key_states.shape[-2]]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    recorder = _ACTIVE.get()
    if recorder is not None:
        layer = recorder.layer_of.get(id(module))
        if layer is not None:
            recorder.probs[layer] = probs
            recorder.calls += 1
    output = torch.matmul(probs, value_states).transpose(1, 2).contiguous()
    return output, probs


_REGISTERED = False


def register_capture_attention() -> str:
    """Register the capture attention and eager mask functions (idempotent); return their name."""
    global _REGISTERED
    if not _REGISTERED:
        AttentionInterface.register(CAPTURE_ATTN_NAME, capture_attention_forward)
        AttentionMaskInterface.register(CAPTURE_ATTN_NAME, eager_mask)
        _REGISTERED = True
    return CAPTURE_ATTN_NAME


def find_language_model(model: nn.Module) -> nn.Module:
    """Return the text decoder (the module holding ``layers`` and ``embed_tokens``).

    Handles ``Gemma3ForConditionalGeneration`` (``model.model.language_model``), ``Gemma3Model``
    (``model.language_model``), ``Gemma3ForCausalLM`` (``model.model``) and the decoder itself.
    """
    candidates = [
        getattr(getattr(model, "model", None), "language_model", None),
        getattr(model, "language_model", None),
        getattr(model, "model", None),
        model,
    ]
    for cand in candidates:
        if cand is not None and hasattr(cand, "layers") and hasattr(cand, "embed_tokens"):
            return cand
    raise TypeError(f"cannot find a text decoder with .layers and .embed_tokens in {type(model).__name__}")


def _attention_modules(language_model: nn.Module) -> list[nn.Module]:
    mods = []
    for i, layer in enumerate(language_model.layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None:
            raise TypeError(f"decoder layer {i} has no self_attn")
        mods.append(attn)
    return mods


def _set_text_implementation(model: nn.Module, language_model: nn.Module, name: str) -> None:
    """Switch only the language model's attention implementation to ``name``."""
    cfg = getattr(model, "config", None)
    text_cfg = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else None
    if cfg is not None and text_cfg is not None and text_cfg is not cfg and hasattr(model, "set_attn_implementation"):
        key = next((k for k in getattr(cfg, "sub_configs", {}) if getattr(cfg, k, None) is text_cfg), None)
        if key is not None:
            model.set_attn_implementation({key: name})
    elif hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    if language_model.config._attn_implementation != name:
        # Fallback for models whose set_attn_implementation did not reach the text config.
        language_model.config._attn_implementation_internal = name
    if language_model.config._attn_implementation != name:
        raise RuntimeError(f"could not switch the language model to attention implementation {name!r}")


@contextmanager
def no_grad_attention(model: nn.Module) -> Iterator[None]:
    """For forward passes that need no attention probabilities (perturbations): a language model
    on plain "eager" attention runs on "sdpa" instead (the same masks, fused kernels; about 1.5x
    faster on a CPU for the demo model), restored afterwards. Other implementations are kept."""
    language_model = find_language_model(model)
    previous = language_model.config._attn_implementation
    if previous != "eager":
        yield
        return
    _set_text_implementation(model, language_model, "sdpa")
    try:
        yield
    finally:
        _set_text_implementation(model, language_model, previous)


@contextmanager
def capture(model: nn.Module, *, grad: bool = False) -> Iterator[AttentionRecorder]:
    """Record every language-model layer's attention probabilities during forward passes.

    ``grad=True`` makes the language model's ``inputs_embeds`` a leaf requiring grad (see the
    module docstring) so that gradients with respect to the captured probabilities exist while
    all parameters stay frozen. Not re-entrant: nesting raises ``RuntimeError``.
    """
    if _ACTIVE.get() is not None:
        raise RuntimeError("attention capture is already active in this context")
    name = register_capture_attention()
    language_model = find_language_model(model)
    modules = _attention_modules(language_model)
    recorder = AttentionRecorder(
        layer_of={id(m): i for i, m in enumerate(modules)}, probs=[None] * len(modules), grad=grad
    )
    previous = language_model.config._attn_implementation
    handle = language_model.register_forward_pre_hook(_embeds_hook(recorder), with_kwargs=True)
    try:
        _set_text_implementation(model, language_model, name)
        token = _ACTIVE.set(recorder)
        try:
            yield recorder
        finally:
            _ACTIVE.reset(token)
    finally:
        handle.remove()
        if previous is not None and language_model.config._attn_implementation != previous:
            _set_text_implementation(model, language_model, previous)


def _embeds_hook(recorder: AttentionRecorder) -> Callable[[nn.Module, tuple, dict], tuple[tuple, dict]]:
    """Forward pre-hook on the text decoder that records (and, for ``grad``, re-leafs) its input.

    Composite models call the decoder with ``inputs_embeds`` (image features merged); plain
    decoders are called with ``input_ids``, which are embedded here with the decoder's own
    ``embed_tokens`` (the same computation the decoder would do).
    """

    def hook(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs = dict(kwargs)
        embeds = kwargs.get("inputs_embeds")
        ids = kwargs.get("input_ids")
        if ids is None and args:
            ids, args = args[0], args[1:]
        if embeds is None:
            if ids is None:
                raise RuntimeError("the language model was called with neither input_ids nor inputs_embeds")
            embeds = mod.embed_tokens(ids)
        if recorder.grad:
            embeds = embeds.detach().requires_grad_(True)
        recorder.inputs_embeds = embeds
        kwargs["inputs_embeds"] = embeds
        kwargs["input_ids"] = None
        return args, kwargs

    return hook
