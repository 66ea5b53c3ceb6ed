"""Names of the relevancy methods (config values; stable across versions). No torch here, so the
configuration can validate them cheaply."""
from __future__ import annotations

#: Methods computed from the one captured forward / backward pass of a sequence.
CAPTURED_METHODS: tuple[str, ...] = (
    "chefer",
    "raw_attention",
    "rollout",
    "layer_weighted",
    "head_importance",
    "attention_flow",
    "consensus",
    "gradcam",
    "activation_norm",
    "random",
)
#: Methods that re-run the model on perturbed inputs.
PERTURBATION_METHODS: tuple[str, ...] = ("occlusion",)
ALL_METHODS: tuple[str, ...] = CAPTURED_METHODS + PERTURBATION_METHODS
