"""An image's body geometry in one call: the body mask, the polarity it was read with and the
patient's midline, as the pipeline stores them per image (body_masks/) and as laterality needs
them; and `score_image`, every score of a map given the image itself."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from metrics.body import body_mask_and_polarity, to_grey01
from metrics.maps import Box, MapScorer
from metrics.midline import Midline, patient_midline

__all__ = ["BodyGeometry", "body_geometry", "score_image"]


@dataclass(frozen=True)
class BodyGeometry:
    """`mask`: H x W bool body mask; `inverted`: whether the image was read as inverted (tissue
    dark); `midline`: the patient's midline (`midline.source` says whether it was found on the
    image or is the image's centre column, with `midline.reason`)."""

    mask: np.ndarray
    inverted: bool
    midline: Midline


def body_geometry(image: np.ndarray, *, inverted: bool | None = None) -> BodyGeometry:
    """The body mask (`body_mask_and_polarity`: `inverted=None` detects the polarity) and the
    patient's midline found on the grey values brought to the display convention. Raises
    ValueError where `body_mask` does (a constant image, no body)."""
    mask, flipped = body_mask_and_polarity(image, inverted=inverted)
    grey = to_grey01(image)
    return BodyGeometry(mask, flipped, patient_midline(1.0 - grey if flipped else grey, mask))


def score_image(grid: np.ndarray, image: np.ndarray, view_position: str | None, boxes: Sequence[Box] | None = None,
                *, top_fraction: float = 0.1, inverted: bool | None = None) -> dict[str, float]:
    """Every score of one map (`metrics.SCORE_KEYS`) on `image` itself: its body mask and its
    patient's midline are computed here (`body_geometry`), so laterality splits at the patient.
    For many maps on one image, compute `body_geometry` once and use `MapScorer`."""
    geo = body_geometry(image, inverted=inverted)
    return MapScorer(geo.mask, view_position, boxes, top_fraction, geo.midline.per_row()).score(grid)
