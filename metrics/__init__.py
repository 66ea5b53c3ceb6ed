"""Scores of relevancy maps: pure numpy / scipy / OpenCV functions, no torch, no model.

Public API:
- body masks: `body_mask`, `body_mask_and_polarity` (and their helpers `to_grey01`,
  `tissue_is_dark`, `polarity_cues`, `content_box`); the patient's midline: `patient_midline`,
  `Midline`, `left_of_midline_mask`; all three at once: `body_geometry`, and `score_image`
  (every score of a map given the image itself);
- map scores: `score_map`, `MapScorer` (cached per image; `.score`, `.score_many`), `SCORE_KEYS`,
  `cell_coverage`, `boxes_to_mask`, `is_frontal`, `FRONTAL_VIEWS`;
- map comparison: `js_divergence` (bits, 0..1), `js_distance` (its square root);
- quality checks (pass flags, derived where reported): `Thresholds`, `map_flags`, `pair_flags`,
  `MAP_FLAGS`, `PAIR_FLAGS`;
- answers: `parse_yes_no`, `classification_summary`, `ANSWER_STATES`.

Conventions (stated in each docstring): maps are raw non-negative grids placed on the original
image by non-uniform scaling (cell (i, j) covers x in [j W/gw, (j+1) W/gw), y in [i H/gh,
(i+1) H/gh)); "left" is the patient's left, the image's RIGHT half on a frontal radiograph;
entropies and divergences are in bits; boxes are (x, y, w, h) in original-image pixels.
"""
from metrics.answers import ANSWER_STATES, classification_summary, parse_yes_no
from metrics.body import body_mask, body_mask_and_polarity, content_box, polarity_cues, tissue_is_dark, to_grey01
from metrics.divergence import js_distance, js_divergence
from metrics.quality import MAP_FLAGS, PAIR_FLAGS, Thresholds, map_flags, pair_flags
from metrics.midline import Midline, left_of_midline_mask, patient_midline
from metrics.geometry import BodyGeometry, body_geometry, score_image
from metrics.maps import (FRONTAL_VIEWS, SCORE_KEYS, MapScorer, boxes_to_mask, cell_coverage, is_frontal,
                          score_map)

__all__ = ["ANSWER_STATES", "FRONTAL_VIEWS", "MAP_FLAGS", "PAIR_FLAGS", "Thresholds", "map_flags", "pair_flags", "SCORE_KEYS", "MapScorer", "body_mask",
           "body_mask_and_polarity", "content_box", "polarity_cues", "boxes_to_mask", "BodyGeometry", "body_geometry",
           "score_image", "Midline", "left_of_midline_mask", "patient_midline",
           "cell_coverage", "classification_summary", "is_frontal", "js_distance", "js_divergence", "parse_yes_no",
           "score_map", "tissue_is_dark", "to_grey01"]
