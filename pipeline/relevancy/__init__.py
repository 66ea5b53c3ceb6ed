"""Relevancy maps for Gemma 3 style vision-language models (MedGemma).

Public API:

- :func:`explain_sequence` -- one forward pass per sequence, Chefer et al. (2021) relevancy and
  attention / gradient baselines for several targets at once (see :mod:`.engine`).
- :class:`Target`, :class:`ExplainOutput`, :class:`TargetResult`, :class:`MethodMap`.
- :data:`METHODS` -- the method names; :data:`GRADIENT_METHODS`, :data:`TEXT_MAP_METHODS`.
- :func:`capture` -- context manager recording every language-model layer's attention
  probabilities via a registered transformers attention function (see :mod:`.capture`).
"""

from .capture import CAPTURE_ATTN_NAME, AttentionRecorder, capture, find_language_model, register_capture_attention
from .engine import (
    GRADIENT_METHODS,
    METHODS,
    TEXT_MAP_METHODS,
    ExplainOutput,
    MethodMap,
    Target,
    TargetResult,
    explain_sequence,
)

__all__ = [
    "CAPTURE_ATTN_NAME",
    "AttentionRecorder",
    "ExplainOutput",
    "GRADIENT_METHODS",
    "METHODS",
    "MethodMap",
    "TEXT_MAP_METHODS",
    "Target",
    "TargetResult",
    "capture",
    "explain_sequence",
    "find_language_model",
    "register_capture_attention",
]
