"""Map scores against values worked out by hand on small grids."""
from __future__ import annotations

import math

import numpy as np
import pytest

import metrics
from metrics.maps import overlap_matrix


def test_overlap_matrix_fractional_cells():
    # 3 cells over 7 pixels: edges 0, 7/3, 14/3, 7
    o = overlap_matrix(3, 7)
    np.testing.assert_allclose(o.sum(axis=1), [7 / 3] * 3)
    np.testing.assert_allclose(o[0], [1, 1, 1 / 3, 0, 0, 0, 0])
    np.testing.assert_allclose(o[1], [0, 0, 2 / 3, 1, 2 / 3, 0, 0])


def test_cell_coverage_fractional():
    mask = np.zeros((7, 10), bool)
    mask[:, :5] = True  # left half of a 10 x 7 (W x H) image
    cov = metrics.cell_coverage(mask, 3, 3)  # cells 10/3 px wide: middle column straddles x = 5
    np.testing.assert_allclose(cov[:, 0], 1.0)
    np.testing.assert_allclose(cov[:, 1], (5 - 10 / 3) / (10 / 3))  # = 0.5
    np.testing.assert_allclose(cov[:, 2], 0.0)


def test_inside_body_and_border_by_hand():
    body = np.zeros((4, 4), bool)
    body[:2, :2] = True  # top-left quarter = cell (0, 0) of a 2 x 2 grid
    grid = np.array([[3.0, 1.0], [0.0, 0.0]])
    s = metrics.score_map(grid, body, "PA")
    assert s["inside_body_ratio"] == pytest.approx(0.75)  # 3 of 4 units in the body cell
    assert s["border_fraction"] == pytest.approx(1.0)  # every cell of a 2 x 2 grid is border
    g4 = np.zeros((4, 4))
    g4[1:3, 1:3] = 1.0
    g4[0, 0] = 4.0
    s4 = metrics.score_map(g4, np.ones((8, 8), bool), "PA")
    assert s4["border_fraction"] == pytest.approx(0.5)  # 4 of 8 units in the 12-cell ring
    assert (np.ones((4, 4), bool).sum() - 4) == 12


def test_inside_body_is_not_renormalised():
    body = np.zeros((8, 8), bool)
    body[:, :4] = True
    s = metrics.score_map(np.ones((4, 4)), body, "AP")
    assert s["inside_body_ratio"] == pytest.approx(0.5)  # a uniform map is half inside, not 1


def test_entropy():
    n = 16
    uni = metrics.score_map(np.ones((4, 4)), np.ones((4, 4), bool), "PA")
    assert uni["entropy_bits"] == pytest.approx(math.log2(n)) and uni["entropy_norm"] == pytest.approx(1.0)
    delta = np.zeros((4, 4))
    delta[2, 1] = 5.0
    d = metrics.score_map(delta, np.ones((4, 4), bool), "PA")
    assert d["entropy_bits"] == 0.0 and d["entropy_norm"] == 0.0
    two = metrics.score_map(np.array([[1.0, 3.0]]), np.ones((2, 2), bool), "PA")
    assert two["entropy_bits"] == pytest.approx(-(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75)))


def test_laterality_radiological_convention():
    grid = np.zeros((4, 4))
    grid[:, 2:] = 1.0  # mass on the IMAGE's right half = the PATIENT's left
    body = np.ones((10, 12), bool)
    assert metrics.score_map(grid, body, "PA")["patient_left_fraction"] == pytest.approx(1.0)
    assert metrics.score_map(grid, body, "AP")["patient_left_fraction"] == pytest.approx(1.0)
    assert math.isnan(metrics.score_map(grid, body, "LATERAL")["patient_left_fraction"])
    assert math.isnan(metrics.score_map(grid, body, None)["patient_left_fraction"])
    odd = np.array([[0.0, 2.0, 0.0]])  # the middle column straddles the midline: half and half
    assert metrics.score_map(odd, np.ones((3, 9), bool), "PA")["patient_left_fraction"] == pytest.approx(0.5)
    assert metrics.is_frontal("ap axial") and not metrics.is_frontal("LL")


def test_apical_middle_basal_within_body_extent():
    body = np.zeros((12, 4), bool)
    body[3:9] = True  # body rows 3..8: thirds [3,5), [5,7), [7,9)
    grid = np.zeros((6, 1))  # cells 2 px tall: rows [0,2) [2,4) [4,6) [6,8) [8,10) [10,12)
    grid[1, 0] = 1.0  # [2,4): half in no third, half in the apical third
    grid[3, 0] = 1.0  # [6,8): half middle, half basal
    s = metrics.score_map(grid, body, "PA")
    # within-extent mass: apical 0.5, middle 0.5, basal 0.5 -> a third each
    assert s["apical_fraction"] == pytest.approx(1 / 3)
    assert s["middle_fraction"] == pytest.approx(1 / 3)
    assert s["basal_fraction"] == pytest.approx(1 / 3)
    top = np.zeros((6, 1))
    top[2, 0] = 1.0  # [4,6): half apical, half middle
    s2 = metrics.score_map(top, body, "PA")
    assert (s2["apical_fraction"], s2["middle_fraction"], s2["basal_fraction"]) == pytest.approx((0.5, 0.5, 0.0))


def test_box_scores_by_hand():
    body = np.ones((8, 8), bool)
    grid = np.zeros((4, 4))  # cells 2 x 2 px
    grid[0, 0] = 2.0
    grid[3, 3] = 1.0
    box = [(0, 0, 3, 3)]  # covers cell (0,0) fully and 1/2 of (0,1), (1,0), 1/4 of (1,1)
    s = metrics.score_map(grid, body, "PA", box)
    assert s["pointing_hit"] == 1.0
    assert s["box_mass_fraction"] == pytest.approx(2 / 3)
    assert s["box_area_fraction"] == pytest.approx(9 / 64)
    # Otsu over cell values {2, 1, 0...}: threshold between 0 and 1 selects cells (0,0) and (3,3):
    # 8 px; box 9 px; intersection 4 px -> 4 / 13
    assert s["box_iou"] == pytest.approx(4 / 13)
    miss = metrics.score_map(grid[::-1, ::-1].copy(), body, "PA", box)
    assert miss["pointing_hit"] == 0.0
    none = metrics.score_map(grid, body, "PA")
    assert all(math.isnan(none[k]) for k in ("pointing_hit", "box_mass_fraction", "box_area_fraction", "box_iou"))


def test_non_uniform_placement_of_boxes():
    # a 2 x 2 grid on a 20 x 10 (W x H) image: cells are 10 x 5 px; a box on the right half
    grid = np.array([[0.0, 1.0], [0.0, 0.0]])
    s = metrics.score_map(grid, np.ones((10, 20), bool), "PA", [(10, 0, 10, 5)])
    assert s["pointing_hit"] == 1.0 and s["box_mass_fraction"] == pytest.approx(1.0)
    assert s["box_iou"] == pytest.approx(1.0)


def test_zero_mass_and_bad_maps():
    s = metrics.score_map(np.zeros((2, 2)), np.ones((4, 4), bool), "PA", [(0, 0, 1, 1)])
    assert s["mass"] == 0.0 and math.isnan(s["inside_body_ratio"]) and math.isnan(s["pointing_hit"])
    with pytest.raises(ValueError):
        metrics.score_map(-np.ones((2, 2)), np.ones((4, 4), bool), "PA")


def test_scorer_caches_geometry_and_matches_score_map():
    rng = np.random.default_rng(0)
    body = rng.random((50, 70)) > 0.3
    scorer = metrics.MapScorer(body, "PA", [(5, 5, 20, 10)])
    for _ in range(3):
        g = rng.random((16, 16))
        assert scorer.score(g) == pytest.approx(metrics.score_map(g, body, "PA", [(5, 5, 20, 10)]), nan_ok=True)


def test_js_divergence_and_distance():
    assert metrics.js_divergence([1, 1], [2, 2]) == 0.0
    assert metrics.js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)
    # p = (1/2, 1/2), q = (1, 0): m = (3/4, 1/4)
    kl_p = 0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25)
    kl_q = 1.0 * math.log2(1 / 0.75)
    expect = 0.5 * kl_p + 0.5 * kl_q
    assert metrics.js_divergence([1, 1], [1, 0]) == pytest.approx(expect)
    assert metrics.js_distance([1, 1], [1, 0]) == pytest.approx(math.sqrt(expect))
    assert math.isnan(metrics.js_divergence([0, 0], [1, 0])) and math.isnan(metrics.js_distance([0, 0], [1, 0]))
    with pytest.raises(ValueError):
        metrics.js_divergence([1, 2], [1, 2, 3])
