"""Relevancy maps for Gemma 3 style vision-language models (MedGemma).

Public API:

- :func:`explain` (a :class:`SequenceInputs`) and :func:`explain_sequence` (separate tensors):
  one captured forward pass per sequence, the requested methods for several targets at once
  (see :mod:`.engine`).
- :func:`register_method`, :func:`registered`, :class:`MethodInputs`, :class:`MethodOutput`: the
  method registry (see :mod:`.registry`); the built-in methods are in :mod:`.library`.
- :class:`Target`, :class:`SequenceInputs`, :class:`ExplainOutput`, :class:`TargetResult`,
  :class:`MethodMap`.
- :data:`ALL_METHODS` (built-in names), :data:`METHODS` (those computed from the one captured
  pass), :data:`PERTURBATION_METHODS`, :data:`GRADIENT_METHODS`, :data:`TEXT_MAP_METHODS`.
- :data:`SCORE_KINDS`, :func:`counterpart_id`: target scores (see :mod:`.scores`).
- :func:`faithfulness_curves`, :func:`faithfulness_curves_batch` -- deletion / insertion curves
  over image tokens; :func:`occlusion_maps`; :class:`ImagePerturber`, the batched machinery that
  replaces image soft-token embeddings by a baseline (see :mod:`.perturbation`).
- :func:`capture` -- context manager recording every language-model layer's attention
  probabilities via a registered transformers attention function (see :mod:`.capture`).
"""

from .capture import (
    CAPTURE_ATTN_NAME,
    AttentionRecorder,
    capture,
    find_language_model,
    register_capture_attention,
)
from .engine import (
    ALL_METHODS,
    GRADIENT_METHODS,
    METHODS,
    PERTURBATION_METHODS,
    TEXT_MAP_METHODS,
    ExplainOutput,
    MethodMap,
    TargetResult,
    explain,
    explain_sequence,
)
from .inputs import SequenceInputs, Target
from .perturbation import (
    BASELINES,
    FaithfulnessResult,
    ImagePerturber,
    faithfulness_curves,
    faithfulness_curves_batch,
    occlusion_maps,
)
from .registry import (
    MethodInputs,
    MethodOutput,
    register_method,
    registered,
    unregister_method,
)
from .scores import SCORE_KINDS, counterpart_id

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
    "MethodInputs",
    "MethodMap",
    "MethodOutput",
    "PERTURBATION_METHODS",
    "SCORE_KINDS",
    "SequenceInputs",
    "TEXT_MAP_METHODS",
    "Target",
    "TargetResult",
    "capture",
    "counterpart_id",
    "explain",
    "explain_sequence",
    "faithfulness_curves",
    "faithfulness_curves_batch",
    "find_language_model",
    "occlusion_maps",
    "register_capture_attention",
    "register_method",
    "registered",
    "unregister_method",
]
