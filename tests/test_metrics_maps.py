"""Map scores against values worked out by hand on small grids, and against a brute-force
pixel-level reference on supersampled images (where every cell edge falls on a pixel edge)."""
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
    np.testing.assert_allclose(o.sum(axis=0), np.ones(7))  # every pixel is shared out in full
    np.testing.assert_allclose(o[0], [1, 1, 1 / 3, 0, 0, 0, 0])
    np.testing.assert_allclose(o[1], [0, 0, 2 / 3, 1, 2 / 3, 0, 0])
    np.testing.assert_allclose(overlap_matrix(2, 5, lo=2.5).sum(axis=1), [0.0, 2.5])


def test_cell_coverage_fractional():
    mask = np.zeros((7, 10), bool)
    mask[:, :5] = True  # left half of a 10 x 7 (W x H) image
    cov = metrics.cell_coverage(mask, 3, 3)  # cells 10/3 px wide: middle column straddles x = 5
    np.testing.assert_allclose(cov[:, 0], 1.0)
    np.testing.assert_allclose(cov[:, 1], (5 - 10 / 3) / (10 / 3))  # = 0.5
    np.testing.assert_allclose(cov[:, 2], 0.0)


def test_fractional_cells_by_hand_3x3_on_10x7():
    # One body pixel, (y, x) = (2, 3): rows [2, 3) and columns [3, 4). Cells are 10/3 x 7/3 px.
    # Cell (0, 0) covers x < 10/3, y < 7/3: overlap (1/3 in x) * (1/3 in y) = 1/9 px^2;
    # cell (0, 1): (2/3)(1/3) = 2/9; cell (1, 0): (1/3)(2/3) = 2/9; cell (1, 1): (2/3)(2/3) = 4/9.
    body = np.zeros((7, 10), bool)
    body[2, 3] = True
    cov = metrics.cell_coverage(body, 3, 3)
    area = (10 / 3) * (7 / 3)
    expect = np.zeros((3, 3))
    expect[:2, :2] = np.array([[1, 2], [2, 4]]) / 9 / area
    np.testing.assert_allclose(cov, expect, atol=1e-12)
    grid = np.zeros((3, 3))
    grid[1, 1] = 2.0
    grid[2, 2] = 2.0
    s = metrics.score_map(grid, body, "PA")
    assert s["inside_body_ratio"] == pytest.approx(0.5 * (4 / 9) / area)
    assert s["body_area_fraction"] == pytest.approx(1 / 70)
    assert s["mass"] == 4.0


def test_inside_body_and_border_by_hand():
    body = np.zeros((4, 4), bool)
    body[:2, :2] = True  # top-left quarter = cell (0, 0) of a 2 x 2 grid
    grid = np.array([[3.0, 1.0], [0.0, 0.0]])
    s = metrics.score_map(grid, body, "PA")
    assert s["inside_body_ratio"] == pytest.approx(0.75)  # 3 of 4 units in the body cell
    assert s["border_fraction"] == pytest.approx(1.0)  # every cell of a 2 x 2 grid is border
    assert s["body_area_fraction"] == pytest.approx(0.25)
    g4 = np.zeros((4, 4))
    g4[1:3, 1:3] = 1.0
    g4[0, 0] = 4.0
    s4 = metrics.score_map(g4, np.ones((8, 8), bool), "PA")
    assert s4["border_fraction"] == pytest.approx(0.5)  # 4 of 8 units in the 12-cell ring
    ring = metrics.score_map(np.pad(np.zeros((2, 2)), 1, constant_values=1.0), np.ones((8, 8), bool), "PA")
    assert ring["border_fraction"] == 1.0  # 12 ring cells of 16, corners once
    assert ring["entropy_bits"] == pytest.approx(math.log2(12))


def test_inside_body_is_not_renormalised():
    body = np.zeros((8, 8), bool)
    body[:, :4] = True
    s = metrics.score_map(np.ones((4, 4)), body, "AP")
    assert s["inside_body_ratio"] == pytest.approx(0.5)  # a uniform map is half inside, not 1
    # scaling a map changes its mass and nothing else
    s3 = metrics.score_map(3 * np.ones((4, 4)), body, "AP")
    assert s3["mass"] == 3 * s["mass"]
    assert {k: v for k, v in s3.items() if k != "mass"} == pytest.approx(
        {k: v for k, v in s.items() if k != "mass"}, nan_ok=True)


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
    assert math.isnan(metrics.score_map(np.array([[2.0]]), np.ones((2, 2), bool), "PA")["entropy_norm"])


def test_laterality_radiological_convention():
    grid = np.zeros((4, 4))
    grid[:, 2:] = 1.0  # mass on the IMAGE's right half = the PATIENT's left
    body = np.ones((10, 12), bool)
    for view in ("PA", "AP", "ap", "AP AXIAL", "pa  lld", "FRONTAL"):
        assert metrics.score_map(grid, body, view)["patient_left_fraction"] == pytest.approx(1.0), view
    assert metrics.score_map(grid[:, ::-1].copy(), body, "PA")["patient_left_fraction"] == 0.0
    for view in ("LATERAL", "LL", "RL", "", "SWIMMERS", None):
        assert math.isnan(metrics.score_map(grid, body, view)["patient_left_fraction"]), view
    odd = np.array([[0.0, 2.0, 0.0]])  # the middle column straddles the midline: half and half
    assert metrics.score_map(odd, np.ones((3, 9), bool), "PA")["patient_left_fraction"] == pytest.approx(0.5)
    # 3 columns on a 10 px wide image: the middle cell [10/3, 20/3) is split at x = 5 into halves
    odd2 = np.array([[0.0, 1.0, 1.0]])
    assert metrics.score_map(odd2, np.ones((4, 10), bool), "AP")["patient_left_fraction"] == pytest.approx(0.75)
    assert metrics.is_frontal("ap axial") and not metrics.is_frontal("LL") and not metrics.is_frontal(None)


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
    outside = np.zeros((6, 1))
    outside[5, 0] = 1.0  # rows [10, 12): below the body
    s3 = metrics.score_map(outside, body, "PA")
    assert all(math.isnan(s3[k]) for k in ("apical_fraction", "middle_fraction", "basal_fraction"))
    s4 = metrics.score_map(grid, np.zeros((12, 4), bool), "PA")  # no body at all
    assert math.isnan(s4["apical_fraction"]) and s4["inside_body_ratio"] == 0.0


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
    for no_boxes in (None, [], np.zeros((0, 4))):
        none = metrics.score_map(grid, body, "PA", no_boxes)
        assert all(math.isnan(none[k]) for k in ("pointing_hit", "box_mass_fraction", "box_area_fraction", "box_iou"))
    as_array = metrics.score_map(grid, body, "PA", np.array(box, dtype=float))
    assert as_array == pytest.approx(s, nan_ok=True)


def test_pointing_takes_the_first_maximum_in_row_major_order():
    grid = np.zeros((2, 2))
    grid[0, 1] = grid[1, 0] = 1.0  # tie: (0, 1) comes first
    body = np.ones((4, 4), bool)
    assert metrics.score_map(grid, body, "PA", [(2, 0, 2, 2)])["pointing_hit"] == 1.0  # box on cell (0, 1)
    assert metrics.score_map(grid, body, "PA", [(0, 2, 2, 2)])["pointing_hit"] == 0.0  # box on cell (1, 0)


def test_non_uniform_placement_of_boxes():
    # a 2 x 2 grid on a 20 x 10 (W x H) image: cells are 10 x 5 px; a box on the right half
    grid = np.array([[0.0, 1.0], [0.0, 0.0]])
    s = metrics.score_map(grid, np.ones((10, 20), bool), "PA", [(10, 0, 10, 5)])
    assert s["pointing_hit"] == 1.0 and s["box_mass_fraction"] == pytest.approx(1.0)
    assert s["box_iou"] == pytest.approx(1.0)
    assert s["box_area_fraction"] == pytest.approx(0.25)
    flat = metrics.score_map(np.ones((2, 2)), np.ones((10, 20), bool), "PA", [(10, 0, 10, 5)])
    assert math.isnan(flat["box_iou"])  # Otsu undefined on a constant map
    assert flat["box_mass_fraction"] == pytest.approx(flat["box_area_fraction"])  # the random floor


def test_boxes_to_mask_and_bad_boxes():
    m = metrics.boxes_to_mask([(1, 1, 2, 3), (-5, -5, 6, 6)], 6, 5)
    expect = np.zeros((6, 5), bool)
    expect[1:4, 1:3] = True
    expect[0, 0] = True  # the second box reaches [ -5, 1) x [-5, 1): pixel (0, 0) only
    np.testing.assert_array_equal(m, expect)
    with pytest.raises(ValueError):
        metrics.boxes_to_mask([(0, 0, -1, 2)], 4, 4)
    with pytest.raises(ValueError):
        metrics.score_map(np.ones((2, 2)), np.ones((4, 4), bool), "PA", [(0, 0, 1)])


def test_zero_mass_and_bad_maps():
    s = metrics.score_map(np.zeros((2, 2)), np.ones((4, 4), bool), "PA", [(0, 0, 1, 1)])
    assert s["mass"] == 0.0 and math.isnan(s["inside_body_ratio"]) and math.isnan(s["pointing_hit"])
    assert s["box_area_fraction"] == pytest.approx(1 / 16) and s["body_area_fraction"] == 1.0
    assert list(s) == list(metrics.SCORE_KEYS)
    with pytest.raises(ValueError):
        metrics.score_map(-np.ones((2, 2)), np.ones((4, 4), bool), "PA")
    with pytest.raises(ValueError):
        metrics.score_map(np.ones(4), np.ones((4, 4), bool), "PA")
    with pytest.raises(ValueError):
        metrics.MapScorer(np.ones(4, bool), "PA")
    inf = np.ones((2, 2))
    inf[0, 0] = np.inf
    assert math.isnan(metrics.score_map(inf, np.ones((4, 4), bool), "PA")["inside_body_ratio"])


def _reference(grid, body, view, boxes):
    """Brute force: supersample the image so that every cell edge, the midline and the thirds of
    the body extent fall on pixel edges, spread each cell's mass over its pixels, and count."""
    gh, gw = grid.shape
    h, w = body.shape
    sy, sx = 3 * gh, 2 * gw
    big = np.kron(body, np.ones((sy, sx), bool))
    cell = np.kron(grid / grid.sum(), np.ones((h * sy // gh, w * sx // gw))) / (h * sy // gh * w * sx // gw)
    out = {"inside_body_ratio": cell[big].sum()}
    ring = np.ones((gh, gw), bool)
    ring[1:-1, 1:-1] = False
    out["border_fraction"] = grid[ring].sum() / grid.sum()
    out["patient_left_fraction"] = cell[:, w * sx // 2:].sum() if metrics.is_frontal(view) else math.nan
    rows = np.flatnonzero(body.any(axis=1))
    y0, y1 = rows[0] * sy, (rows[-1] + 1) * sy
    e = (y1 - y0) // 3
    thirds = np.array([cell[y0 + k * e: y0 + (k + 1) * e].sum() for k in range(3)])
    out["apical_fraction"], out["middle_fraction"], out["basal_fraction"] = thirds / thirds.sum()
    bigbox = np.kron(metrics.boxes_to_mask(boxes, h, w), np.ones((sy, sx), bool))
    out["box_mass_fraction"] = cell[bigbox].sum()
    return out


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_reference(seed):
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(7, 40)), int(rng.integers(7, 40))
    gh, gw = int(rng.integers(2, 7)), int(rng.integers(2, 7))
    body = rng.random((h, w)) > 0.4
    grid = rng.random((gh, gw)) ** 3
    boxes = [(rng.uniform(0, w / 2), rng.uniform(0, h / 2), rng.uniform(1, w / 2), rng.uniform(1, h / 2))]
    got = metrics.score_map(grid, body, "AP", boxes)
    for k, v in _reference(grid, body, "AP", boxes).items():
        assert got[k] == pytest.approx(v, abs=1e-9), k


def test_score_many_equals_score():
    rng = np.random.default_rng(0)
    body = rng.random((50, 70)) > 0.3
    grids = rng.random((40, 16, 16)) ** 4
    grids[3] = 0.0
    grids[4] = 1.0
    for boxes, view in (([(5, 5, 20, 10)], "PA"), (None, "LATERAL")):
        scorer = metrics.MapScorer(body, view, boxes)
        many = scorer.score_many(grids)
        for i, g in enumerate(grids):
            one = scorer.score(g)
            assert {k: many[k][i] for k in metrics.SCORE_KEYS} == pytest.approx(one, nan_ok=True, rel=1e-12)


def test_scorer_caches_geometry_and_matches_score_map():
    rng = np.random.default_rng(0)
    body = rng.random((50, 70)) > 0.3
    scorer = metrics.MapScorer(body, "PA", [(5, 5, 20, 10)])
    for shape in ((16, 16), (8, 12), (16, 16)):
        g = rng.random(shape)
        assert scorer.score(g) == pytest.approx(metrics.score_map(g, body, "PA", [(5, 5, 20, 10)]), nan_ok=True)
    assert set(scorer._geometry) == {(16, 16), (8, 12)}


def test_js_divergence_and_distance():
    assert metrics.js_divergence([1, 1], [2, 2]) == 0.0
    assert metrics.js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)
    assert metrics.js_divergence(np.eye(4), 1 - np.eye(4)) == pytest.approx(1.0)  # disjoint: 1 bit
    # p = (1/2, 1/2), q = (1, 0): m = (3/4, 1/4)
    kl_p = 0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25)
    kl_q = 1.0 * math.log2(1 / 0.75)
    expect = 0.5 * kl_p + 0.5 * kl_q  # = 0.31128 bits
    assert expect == pytest.approx(0.311278, abs=1e-6)
    assert metrics.js_divergence([1, 1], [1, 0]) == pytest.approx(expect)
    assert metrics.js_divergence([1, 0], [1, 1]) == pytest.approx(expect)  # symmetric
    assert metrics.js_distance([1, 1], [1, 0]) == pytest.approx(math.sqrt(expect))
    assert math.isnan(metrics.js_divergence([0, 0], [1, 0])) and math.isnan(metrics.js_distance([0, 0], [1, 0]))
    with pytest.raises(ValueError):
        metrics.js_divergence([1, 2], [1, 2, 3])
    with pytest.raises(ValueError):
        metrics.js_divergence([1, -2], [1, 2])


def _pixel_map(grid, h, w):
    """Each pixel takes the value of the cell holding its centre (the placement of the protocols)."""
    gh, gw = grid.shape
    ry = np.minimum(((np.arange(h) + 0.5) * gh / h).astype(int), gh - 1)
    rx = np.minimum(((np.arange(w) + 0.5) * gw / w).astype(int), gw - 1)
    return grid[np.ix_(ry, rx)]


@pytest.mark.parametrize("seed", range(4))
def test_cnr_and_top_fraction_iou_match_pixel_level_definitions(seed):
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(20, 60)), int(rng.integers(20, 60))
    grid = rng.random((5, 7)) ** 2
    boxes = [(rng.uniform(0, w / 2), rng.uniform(0, h / 2), rng.uniform(3, w / 2), rng.uniform(3, h / 2))]
    s = metrics.score_map(grid, np.ones((h, w), bool), "PA", boxes, top_fraction=0.2)
    pix = _pixel_map(grid, h, w)
    inside = metrics.boxes_to_mask(boxes, h, w)
    a, b = pix[inside], pix[~inside]
    assert s["cnr"] == pytest.approx(abs(a.mean() - b.mean()) / math.sqrt(a.var() + b.var()), rel=1e-9)
    # top 20 % of the image by value, whole cells in value order
    order = np.argsort(-grid.ravel(), kind="stable")
    cell_of = _pixel_map(np.arange(grid.size).reshape(grid.shape), h, w)
    counts = np.bincount(cell_of.ravel(), minlength=grid.size)
    on_cells = order[: int(np.searchsorted(np.cumsum(counts[order]), 0.2 * h * w)) + 1]
    on = np.isin(cell_of, on_cells)
    assert s["iou_top"] == pytest.approx((on & inside).sum() / (on | inside).sum(), rel=1e-9)
    many = metrics.MapScorer(np.ones((h, w), bool), "PA", boxes, top_fraction=0.2).score_many(grid[None])
    assert many["cnr"][0] == pytest.approx(s["cnr"]) and many["iou_top"][0] == pytest.approx(s["iou_top"])


def test_cnr_and_sink_diagnostics_by_hand():
    body = np.ones((40, 40), bool)
    grid = np.zeros((4, 4))
    grid[0, 0] = 3.0  # all mass on the first image token: a sink
    grid[3, 3] = 1.0
    s = metrics.score_map(grid, body, "PA", [(0, 0, 10, 10)])
    assert s["first_token_fraction"] == pytest.approx(0.75) and s["corner_fraction"] == pytest.approx(1.0)
    out = np.r_[np.zeros(1400), np.ones(100)]  # the other 15 cells of 100 pixels
    assert s["cnr"] == pytest.approx((3.0 - out.mean()) / math.sqrt(0.0 + out.var()))
    uniform = metrics.score_map(np.ones((16, 16)), body, "PA", [(0, 0, 10, 10)])
    assert uniform["corner_fraction"] == pytest.approx(4 / 256) and math.isnan(uniform["cnr"])
    assert math.isnan(metrics.score_map(grid, body, "PA")["cnr"])  # no boxes
    with pytest.raises(ValueError, match="top_fraction"):
        metrics.MapScorer(body, "PA", top_fraction=0.0)


@pytest.mark.parametrize("seed", range(4))
def test_laterality_about_a_midline_matches_brute_force(seed):
    """patient_left_fraction splits each row at its own midline x (exact areas); the centre
    column value stays in patient_left_fraction_centre."""
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(9, 40)), int(rng.integers(9, 40))
    gh, gw = int(rng.integers(2, 9)), int(rng.integers(2, 9))
    grid = rng.random((gh, gw)) ** 2
    split = rng.uniform(0.2 * w, 0.8 * w) + rng.uniform(-0.2, 0.2) * (np.arange(h) + 0.5 - h / 2)
    got = metrics.score_map(grid, np.ones((h, w), bool), "PA", midline_x=split)
    ss = 40  # supersampled columns: the cell mass spread uniformly, each row split at its x
    xs = (np.arange(w * ss) + 0.5) / ss
    cy = overlap_matrix(gh, h)  # (gh, h): each pixel row's overlap with each cell row
    cj = np.minimum((xs * gw / w).astype(int), gw - 1)
    dens = grid / grid.sum() / ((h / gh) * (w / gw))  # mass per unit area in each cell
    right = xs[None, :] >= split[:, None]  # (h, w*ss)
    mass = (cy.T @ dens)[:, cj] / ss  # (h, w*ss): mass of each sub-pixel
    assert got["patient_left_fraction"] == pytest.approx(mass[right].sum(), abs=2e-3)
    assert got["patient_left_fraction_centre"] == pytest.approx(
        metrics.score_map(grid, np.ones((h, w), bool), "PA")["patient_left_fraction"], abs=1e-12)


def test_midline_split_off_centre_patient():
    """A patient lying right of the frame's centre: the centre split calls part of the right lung
    "patient left"; the midline split does not."""
    h, w = 64, 100
    body = np.ones((h, w), bool)
    grid = np.zeros((8, 10))
    grid[2:6, 3:6] = 1.0  # the patient's right lung: x in [30, 60), left of the midline at x = 62
    s = metrics.score_map(grid, body, "PA", midline_x=np.full(h, 62.0))
    assert s["patient_left_fraction"] == 0.0
    assert s["patient_left_fraction_centre"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="midline_x"):
        metrics.MapScorer(body, "PA", midline_x=np.full(h - 1, 50.0))
    lateral = metrics.score_map(grid, body, "LATERAL", midline_x=np.full(h, 62.0))
    assert math.isnan(lateral["patient_left_fraction"]) and math.isnan(lateral["patient_left_fraction_centre"])
    many = metrics.MapScorer(body, "PA", midline_x=np.full(h, 62.0)).score_many(grid[None])
    assert many["patient_left_fraction"][0] == 0.0 and many["patient_left_fraction_centre"][0] == pytest.approx(1 / 3)
