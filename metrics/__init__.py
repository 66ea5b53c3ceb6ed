"""Scores of relevancy maps: pure numpy / scipy / OpenCV functions, no torch, no model.

Public API: `body_mask`, `score_map`, `MapScorer`, `cell_coverage`, `boxes_to_mask`,
`js_divergence`, `js_distance`, `parse_yes_no`, `classification_summary`. Conventions (stated in
each docstring): maps are raw non-negative grids placed on the original image by non-uniform
scaling; "left" is the patient's left (the image's right on a frontal radiograph); entropies and
divergences are in bits.
"""
from metrics.answers import classification_summary, parse_yes_no
from metrics.body import body_mask, to_grey01
from metrics.divergence import js_distance, js_divergence
from metrics.maps import FRONTAL_VIEWS, MapScorer, boxes_to_mask, cell_coverage, is_frontal, score_map

__all__ = ["FRONTAL_VIEWS", "MapScorer", "body_mask", "boxes_to_mask", "cell_coverage", "classification_summary",
           "is_frontal", "js_distance", "js_divergence", "parse_yes_no", "score_map", "to_grey01"]
