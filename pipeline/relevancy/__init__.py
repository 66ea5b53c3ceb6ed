"""Relevancy maps for Gemma 3 style vision-language models (MedGemma).

Public API:

- :func:`explain_sequence` -- one forward pass per sequence, Chefer et al. (2021) relevancy and
  attention / gradient baselines for several targets at once (see :mod:`.engine`).
- :class:`Target`, :class:`ExplainOutput`, :class:`TargetResult`, :class:`MethodMap`.
- :data:`METHODS` -- the methods computed from the one captured forward pass;
  :data:`PERTURBATION_METHODS` (``occlusion``) re-run the model; :data:`ALL_METHODS` is both;
  :data:`GRADIENT_METHODS`, :data:`TEXT_MAP_METHODS`.
- :func:`faithfulness_curves`, :func:`faithfulness_curves_batch` -- deletion / insertion curves
  over image tokens; :func:`occlusion_maps`; :class:`ImagePerturber`, the batched machinery that
  replaces image soft-token embeddings by a baseline (see :mod:`.perturbation`).
- :func:`capture` -- context manager recording every language-model layer's attention
  probabilities via a registered transformers attention function (see :mod:`.capture`).
"""

from .capture import CAPTURE_ATTN_NAME, AttentionRecorder, capture, find_language_model, register_capture_attention
from .engine import (
    ALL_METHODS,
    GRADIENT_METHODS,
    METHODS,
    PERTURBATION_METHODS,
    TEXT_MAP_METHODS,
    ExplainOutput,
    MethodMap,
    Target,
    TargetResult,
    explain_sequence,
)
from .perturbation import (
    BASELINES,
    FaithfulnessResult,
    ImagePerturber,
    faithfulness_curves,
    faithfulness_curves_batch,
    occlusion_maps,
)

__all__ = [
    "ALL_METHODS",
    "BASELINES",
    "CAPTURE_ATTN_NAME",
    "AttentionRecorder",
    "ExplainOutput",
    "FaithfulnessResult",
    "GRADIENT_METHODS",
    "ImagePerturber",
    "METHODS",
    "MethodMap",
    "PERTURBATION_METHODS",
    "TEXT_MAP_METHODS",
    "Target",
    "TargetResult",
    "capture",
    "explain_sequence",
    "faithfulness_curves",
    "faithfulness_curves_batch",
    "find_language_model",
    "occlusion_maps",
    "register_capture_attention",
]
