"""What every part of the relevancy package shares: the sequence, its targets, model helpers.

Target convention (causal LM): a :class:`Target` ``(start, end)`` explains the tokens
``input_ids[0, start:end]``; the logit at position ``p - 1`` predicts the token at ``p``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "SequenceInputs",
    "Target",
    "as_target",
    "clock",
    "grid_shape",
    "inference_state",
    "model_device_dtype",
]


@dataclass(frozen=True)
class Target:
    """Explained tokens ``input_ids[0, start:end]`` (``1 <= start < end``), with an optional label.

    Score (``explain.score=logit``) ``sum_{p in [start, end)} logits[p-1, input_ids[p]]``;
    read-out rows ``p-1``, weight ``1 / (end - start)`` each.
    """

    start: int
    end: int
    label: str = ""

    def __post_init__(self) -> None:
        if not (isinstance(self.start, (int, np.integer)) and isinstance(self.end, (int, np.integer))):
            raise TypeError(f"Target start/end must be integers, got {self.start!r}, {self.end!r}")
        if self.start < 1:
            raise ValueError(f"Target start must be >= 1 (position 0 has no predicting logit), got {self.start}")
        if self.end <= self.start:
            raise ValueError(f"Target end must be > start, got [{self.start}, {self.end})")

    @property
    def positions(self) -> range:
        """Positions ``p`` of the explained tokens."""
        return range(int(self.start), int(self.end))

    @property
    def readout_rows(self) -> range:
        """Logit / relevancy rows ``p - 1``."""
        return range(int(self.start) - 1, int(self.end) - 1)


def as_target(t: Target | tuple[int, int]) -> Target:
    """A :class:`Target` from a Target or a ``(start, end)`` pair."""
    if isinstance(t, Target):
        return t
    if isinstance(t, (tuple, list)) and len(t) == 2:
        return Target(int(t[0]), int(t[1]))
    raise TypeError(f"expected a Target or a (start, end) pair, got {t!r}")


@dataclass(frozen=True)
class SequenceInputs:
    """One sequence's model inputs, exactly as given at generation.

    ``input_ids`` (1, N) prompt + answer; ``pixel_values`` the image tensor; ``token_type_ids``
    (1, N) (1 on image tokens switches on Gemma 3's bidirectional image attention) or ``None``;
    ``attention_mask`` (1, N) padding mask or ``None``; ``prompt_length`` the first generated
    position (enables the teacher-forced argmax check) or ``None``.
    """

    input_ids: torch.Tensor
    pixel_values: torch.Tensor | None = None
    token_type_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    prompt_length: int | None = None

    @classmethod
    def of(cls, inputs: Mapping[str, Any] | Any, prompt_length: int | None = None) -> SequenceInputs:
        """From a mapping or an object with those names (e.g.
        :func:`pipeline.generation.model_inputs_for_sequence`'s dict)."""
        if isinstance(inputs, SequenceInputs):
            return inputs if prompt_length is None else cls(**{**inputs.__dict__, "prompt_length": prompt_length})

        def get(name: str) -> Any:
            return inputs.get(name) if isinstance(inputs, Mapping) else getattr(inputs, name, None)

        plen = prompt_length if prompt_length is not None else get("prompt_length")
        return cls(get("input_ids"), get("pixel_values"), get("token_type_ids"), get("attention_mask"),
                   None if plen is None else int(plen))

    @property
    def seq_len(self) -> int:
        """``N``."""
        return int(self.input_ids.shape[1])

    def check(self) -> None:
        """Raise ``ValueError`` on a malformed sequence."""
        if self.input_ids.dim() != 2 or self.input_ids.shape[0] != 1:
            raise ValueError(f"input_ids must have shape (1, N), got {tuple(self.input_ids.shape)}")
        if self.prompt_length is not None and not (1 <= self.prompt_length <= self.seq_len):
            raise ValueError(f"prompt_length {self.prompt_length} outside [1, {self.seq_len}]")


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of the model's first parameter."""
    param = next(model.parameters())
    return param.device, param.dtype


def grid_shape(count: int, grid: tuple[int, int] | None) -> tuple[int, int]:
    """(grid_h, grid_w) of ``count`` image tokens: ``grid`` checked, else the square root."""
    if grid is not None:
        gh, gw = int(grid[0]), int(grid[1])
        if gh * gw != count:
            raise ValueError(f"grid {gh}x{gw} does not match the {count} image tokens")
        return gh, gw
    side = math.isqrt(count)
    if side * side != count:
        raise ValueError(f"{count} image tokens is not a perfect square; pass grid=(h, w)")
    return side, side


def clock(device: torch.device) -> float:
    """Wall seconds after the device's queued work has finished (CUDA runs asynchronously, so
    phase timings without the synchronisation would be charged to whichever phase waits next)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@contextmanager
def inference_state(model: nn.Module) -> Iterator[None]:
    """Eval mode and frozen parameters for the duration; both restored afterwards."""
    was_training = model.training
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)
        model.train(was_training)
