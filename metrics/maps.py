"""Scores of one relevancy map on its image (pure numpy; no model).

Geometry: a gh x gw grid is placed on the original W x H image by non-uniform scaling (the
processor resizes the image to a square): cell (i, j) covers x in [j*W/gw, (j+1)*W/gw) and
y in [i*H/gh, (i+1)*H/gh); pixel (y, x) covers [x, x+1) x [y, y+1). Overlaps are exact areas
(separable overlap matrices Cy: gh x H and Cx: gw x W of overlap lengths, coverage of a mask =
Cy @ mask @ Cx.T / cell area), so a cell is covered fractionally by the body or a box, partial
pixels at fractional cell edges included, never thresholded. The mass of a cell is taken to be
spread uniformly over the cell.

Definitions (m = the raw map, non-negative, not normalised; M = sum of m; each fraction is of M):
- inside_body_ratio = sum(m * body coverage of each cell) / M (not after renormalising the
  masked map, which would always give 1).
- border_fraction = mass of the outer ring of cells / M (each corner counted once; every cell of
  a grid with fewer than 3 rows or columns is on the ring).
- entropy_bits = -sum p log2 p with p = m / M (0 log 0 = 0); entropy_norm = entropy_bits /
  log2(gh*gw) (NaN for a single cell).
- patient_left_fraction = mass on the patient's left / M, for frontal views only (`FRONTAL_VIEWS`,
  case and spacing ignored). Radiographs are displayed with the patient's left on the image's
  RIGHT (PA and AP alike), so it is the mass right of the patient's midline: per pixel row y,
  right of x = midline_x[y] (`metrics.midline.patient_midline`, the mediastinum / spine line,
  given to `MapScorer` as one split position per row), each cell split by the exact area of its
  overlap with that region. Without a midline the split is the image's centre column x = W/2.
  NaN for lateral, other or unknown views.
- patient_left_fraction_centre = the same split at x = W/2, the image's centre column (for
  odd gw the middle column counts half): the value of a scorer given no midline, and the one to
  compare with tools that split the image in halves. A patient lying off-centre shifts it.
- apical / middle / basal_fraction: the mass in the top / middle / bottom third of the body's
  vertical extent (rows y0 = first to y1 = last + 1 holding body pixels, thirds of equal height
  (y1 - y0) / 3), cells split by the area of their overlap with each third, each as a fraction of
  the mass within the extent, so the three sum to 1; NaN when the body mask is empty or no mass
  lies within the extent.
- with boxes (x, y, w, h in pixels, x/y the top-left corner; a box covers the pixels whose centre
  lies in [x, x+w) x [y, y+h)): pointing_hit = 1.0 if the centre of the map's maximal cell (the
  first maximum in row-major order) lies in [x, x+w) x [y, y+h) of some box, else 0.0;
  box_mass_fraction = sum(m * coverage of each cell by the union of boxes) / M; box_area_fraction
  = union area / image area, the box_mass_fraction of a uniform map (the random floor);
  box_iou = intersection over union, at image resolution, of the boxes' union and the map
  binarised by Otsu's threshold over its cell values (exact, over the sorted values; cells above
  the threshold are on; each pixel takes the cell containing its centre); NaN when all cells are
  equal. All four are NaN without boxes (None or an empty list), and all but box_area_fraction
  are NaN for a map without mass.
- with boxes, the published pixel-space protocols (the map placed on the image with the geometry
  above, each pixel taking the value of the cell holding its centre): box_iou is cheXlocalize's
  IoU (Saporta et al., Nat. Mach. Intell. 2022: binarise by Otsu's threshold, IoU with the union
  of the boxes; its mean over targets is their mIoU; pointing_hit is their hit rate of the most
  representative point); iou_top = the same IoU with the map binarised as the cells of highest
  value covering `top_fraction` of the image (whole cells, in value order, until the covered
  pixels reach it; default 0.1); cnr = MS-CXR's contrast-to-noise ratio (Boecking et al., ECCV
  2022) |mean_in - mean_out| / sqrt(var_in + var_out) of the pixel values inside vs outside the
  boxes (population variances; NaN when there is no pixel on one side or both are constant).
  Where these differ from the published code: cheXlocalize min-max normalises the map before
  Otsu (the same threshold: Otsu is invariant to an affine change of values), upsamples
  bilinearly and takes the argmax PIXEL as the representative point, and averages IoU over
  images where the finding is present; here the map keeps its cells (the patch grid the model
  sees) and the argmax cell's centre is the point. MS-CXR's CNR is computed on similarity maps
  smoothed before upsampling; here on the raw relevancy map. Means over targets are the mIoU,
  hit rate and mean CNR the report prints beside published values of other models.
- attention-sink diagnostics: first_token_fraction = mass of the first image token (cell (0, 0),
  row-major) / M; corner_fraction = mass of the four corner cells / M (a sink-dominated map puts
  most of its mass there whatever the image shows).
- mass = M; body_area_fraction = body pixels / image pixels.
Every mass-based score is NaN for a map with no mass (M <= 0) or non-finite values. Negative
values raise ValueError.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np

__all__ = ["FRONTAL_VIEWS", "SCORE_KEYS", "MapScorer", "boxes_to_mask", "cell_coverage", "is_frontal",
           "overlap_matrix", "score_map"]

FRONTAL_VIEWS = frozenset({"PA", "AP", "AP AXIAL", "AP LLD", "AP RLD", "PA LLD", "PA RLD", "FRONTAL"})

SCORE_KEYS = ("mass", "inside_body_ratio", "border_fraction", "entropy_bits", "entropy_norm", "patient_left_fraction",
              "patient_left_fraction_centre", "apical_fraction", "middle_fraction", "basal_fraction", "pointing_hit",
              "box_mass_fraction", "box_area_fraction", "box_iou", "iou_top", "cnr", "first_token_fraction",
              "corner_fraction", "body_area_fraction")

Box = Sequence[float]  # x, y, w, h in pixels

_NAN = math.nan
_MASS_KEYS = ("inside_body_ratio", "border_fraction", "entropy_bits", "entropy_norm", "patient_left_fraction",
              "patient_left_fraction_centre", "apical_fraction", "middle_fraction", "basal_fraction", "pointing_hit",
              "box_mass_fraction", "box_iou", "iou_top", "cnr", "first_token_fraction", "corner_fraction")


def is_frontal(view_position: str | None) -> bool:
    """True for PA, AP and their decubitus / axial variants (`FRONTAL_VIEWS`, MIMIC-CXR's
    ViewPosition spellings, plus "FRONTAL"), compared upper-cased with runs of spaces collapsed."""
    return view_position is not None and " ".join(str(view_position).upper().split()) in FRONTAL_VIEWS


def overlap_matrix(n_cells: int, n_pixels: int, lo: float = 0.0, hi: float | None = None) -> np.ndarray:
    """(n_cells, n_pixels) float64 overlap lengths, in pixels, of cell c = [c*P/G, (c+1)*P/G) with
    pixel k = [k, k+1) (P = n_pixels, G = n_cells), both restricted to [lo, hi) (default [0, P))."""
    if n_cells < 1 or n_pixels < 1:
        raise ValueError(f"need at least one cell and one pixel, got {n_cells} cells over {n_pixels} pixels")
    hi = float(n_pixels) if hi is None else float(hi)
    edges = np.arange(n_cells + 1) * (n_pixels / n_cells)
    a = np.clip(edges[:-1], lo, hi)[:, None]
    b = np.clip(edges[1:], lo, hi)[:, None]
    k = np.arange(n_pixels)[None, :]
    return np.clip(np.minimum(b, k + 1) - np.maximum(a, k), 0.0, None)


def _coverage(mask: np.ndarray, cy: np.ndarray, cx: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    return (cy @ mask.astype(np.float64) @ cx.T) / ((h / cy.shape[0]) * (w / cx.shape[0]))


def cell_coverage(mask: np.ndarray, gh: int, gw: int) -> np.ndarray:
    """(gh, gw) float64 fraction (0..1) of each cell's area covered by the True pixels of an H x W
    mask, for a gh x gw grid placed on the image by non-uniform scaling (module docstring).
    Also the area average of a 0/1 (or any real-valued) image onto the grid."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be H x W, got shape {m.shape}")
    return _coverage(m, overlap_matrix(gh, m.shape[0]), overlap_matrix(gw, m.shape[1]))


def _check_boxes(boxes: Sequence[Box]) -> list[tuple[float, float, float, float]]:
    out = []
    for b in boxes:
        if len(b) != 4:
            raise ValueError(f"a box is (x, y, w, h), got {b!r}")
        x, y, bw, bh = (float(v) for v in b)
        if not all(math.isfinite(v) for v in (x, y, bw, bh)) or bw < 0 or bh < 0:
            raise ValueError(f"a box needs finite x, y and non-negative w, h, got {b!r}")
        out.append((x, y, bw, bh))
    return out


def boxes_to_mask(boxes: Sequence[Box], h: int, w: int) -> np.ndarray:
    """Union of boxes (x, y, w, h in pixels, top-left corner) as an h x w bool mask: the pixels
    whose centre (x + 0.5, y + 0.5) lies in [x, x+w) x [y, y+h) of some box; parts outside the
    image are dropped. Raises ValueError for negative or non-finite sizes."""
    out = np.zeros((h, w), bool)
    ys, xs = np.arange(h) + 0.5, np.arange(w) + 0.5
    for x, y, bw, bh in _check_boxes(boxes):
        rows = (ys >= y) & (ys < y + bh)
        cols = (xs >= x) & (xs < x + bw)
        out[np.ix_(rows, cols)] = True
    return out


@functools.lru_cache(maxsize=16)
def _split_weights(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    k = np.arange(1, n, dtype=np.float64)
    return k, n - k, (k / n) * (1 - k / n)


def _otsu_threshold(values: np.ndarray) -> float | None:
    """Otsu's threshold over a set of values, exact: the split between consecutive sorted values
    maximising the between-class variance w0 * w1 * (mu0 - mu1)^2 (first maximum). Values above
    the returned threshold are the foreground. None when all values are equal."""
    v = np.sort(values.ravel())
    n = v.size
    if n < 2 or not v[-1] > v[0]:
        return None
    csum = np.cumsum(v)
    k, n_minus_k, w0w1 = _split_weights(n)  # class 0 = the k smallest values
    mu0 = csum[:-1] / k
    mu1 = (csum[-1] - csum[:-1]) / n_minus_k
    between = w0w1 * (mu0 - mu1) ** 2
    between[v[1:] == v[:-1]] = -1.0  # only split between distinct values
    return float(v[int(np.argmax(between))])


def _otsu_thresholds(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`_otsu_threshold` of each row of an n x k array, vectorised: (thresholds, defined)."""
    v = np.sort(rows, axis=1)
    n, k_all = v.shape
    if k_all < 2:
        return np.zeros(n), np.zeros(n, bool)
    csum = np.cumsum(v, axis=1)
    k, n_minus_k, w0w1 = _split_weights(k_all)
    mu0 = csum[:, :-1] / k
    mu1 = (csum[:, -1:] - csum[:, :-1]) / n_minus_k
    between = w0w1 * (mu0 - mu1) ** 2
    between[v[:, 1:] == v[:, :-1]] = -1.0
    idx = np.argmax(between, axis=1)
    return v[np.arange(n), idx], v[:, -1] > v[:, 0]


def _top_cells(m: np.ndarray, cell_pixels: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean (cells,) mask: cells of highest value, in order, until they cover `fraction` of
    the image's pixels (the last one included whole)."""
    order = np.argsort(-m, kind="stable")
    covered = np.cumsum(cell_pixels[order])
    k = int(np.searchsorted(covered, fraction * cell_pixels.sum(), side="left")) + 1
    on = np.zeros(m.size, bool)
    on[order[: min(k, m.size)]] = True
    return on


def _cnr(m: np.ndarray, n_in: np.ndarray, n_out: np.ndarray) -> float:
    """MS-CXR contrast-to-noise ratio of cell values weighted by their pixel counts in / out."""
    a, b = float(n_in.sum()), float(n_out.sum())
    if a <= 0 or b <= 0:
        return _NAN
    mu_in, mu_out = float(n_in @ m) / a, float(n_out @ m) / b
    var = float(n_in @ (m - mu_in) ** 2) / a + float(n_out @ (m - mu_out) ** 2) / b
    return abs(mu_in - mu_out) / math.sqrt(var) if var > 0 else _NAN


# rows of the stacked weight matrix of a _Geometry
_INSIDE, _BORDER, _LEFT, _APICAL, _MIDDLE, _BASAL, _BOX, _FIRST, _CORNERS, _LEFT_CENTRE = range(10)


def left_of_split_coverage(split_x: np.ndarray, gh: int, gw: int, w: int) -> np.ndarray:
    """(gh, gw) fraction of each cell's area right of a per-row split (the patient's left).

    `split_x`: length-H positions in pixels; row y ([y, y+1)) is split at x = split_x[y] (clipped
    to [0, W]). Exact: the right part of row y overlaps cell column j by
    clip(hi_j - max(lo_j, split_x[y]), 0, hi_j - lo_j), and the rows' overlap with cell row i
    weights it (the module's geometry)."""
    xs = np.clip(np.asarray(split_x, dtype=np.float64), 0.0, float(w))
    h = xs.size
    edges = np.arange(gw + 1) * (w / gw)
    lo, hi = edges[:-1][None, :], edges[1:][None, :]
    right = np.clip(hi - np.maximum(lo, xs[:, None]), 0.0, None)  # (H, gw) lengths in pixels
    return (overlap_matrix(gh, h) @ right) / ((h / gh) * (w / gw))


class _Geometry:
    """Per grid shape: everything about the image that scoring a map needs, precomputed. The
    linear scores are rows of one (7, gh*gw) weight matrix, so scoring is one matrix-vector
    product: body coverage, outer ring, share right of the midline and of x = W/2, share in each
    third of the body's extent, box coverage, first token, corners."""

    def __init__(self, body: np.ndarray, gh: int, gw: int, boxes: list[tuple[float, float, float, float]] | None,
                 midline_x: np.ndarray | None = None):
        h, w = body.shape
        cy, cx = overlap_matrix(gh, h), overlap_matrix(gw, w)
        weights = np.zeros((10, gh * gw))
        weights[_INSIDE] = _coverage(body, cy, cx).ravel()
        ring = np.ones((gh, gw))
        ring[1:-1, 1:-1] = 0.0
        weights[_BORDER] = ring.ravel()
        right = overlap_matrix(gw, w, lo=w / 2).sum(axis=1) / (w / gw)  # the patient's left
        weights[_LEFT_CENTRE] = np.tile(right, gh)
        weights[_LEFT] = (weights[_LEFT_CENTRE] if midline_x is None
                          else left_of_split_coverage(midline_x, gh, gw, w).ravel())
        weights[_FIRST, 0] = 1.0
        corners = np.zeros((gh, gw))
        corners[[0, 0, -1, -1], [0, -1, 0, -1]] = 1.0
        weights[_CORNERS] = corners.ravel()
        rows = np.flatnonzero(body.any(axis=1))
        self.has_extent = bool(rows.size)
        if self.has_extent:
            y0, y1 = float(rows[0]), float(rows[-1] + 1)
            e = (y1 - y0) / 3
            for k in range(3):
                share = overlap_matrix(gh, h, lo=y0 + k * e, hi=y0 + (k + 1) * e).sum(axis=1) / (h / gh)
                weights[_APICAL + k] = np.repeat(share, gw)
        self.cells = gh * gw
        self.log2_cells = math.log2(self.cells) if self.cells > 1 else _NAN
        self.has_boxes = bool(boxes)
        if self.has_boxes:
            bmask = boxes_to_mask(boxes, h, w)
            weights[_BOX] = _coverage(bmask, cy, cx).ravel()
            self.box_area_fraction = float(bmask.mean())
            self.box_pixels = float(bmask.sum())
            # pixel -> the cell holding its centre, for the IoU at image resolution
            ry = np.minimum(((np.arange(h) + 0.5) * gh / h).astype(int), gh - 1)
            rx = np.minimum(((np.arange(w) + 0.5) * gw / w).astype(int), gw - 1)
            oy = np.zeros((gh, h))
            oy[ry, np.arange(h)] = 1.0
            ox = np.zeros((gw, w))
            ox[rx, np.arange(w)] = 1.0
            self.cell_pixels = np.outer(oy.sum(1), ox.sum(1)).ravel()
            self.box_pixels_per_cell = (oy @ bmask.astype(np.float64) @ ox.T).ravel()
            self.out_pixels_per_cell = self.cell_pixels - self.box_pixels_per_cell
            centres_x = (np.arange(gw) + 0.5) * (w / gw)
            centres_y = (np.arange(gh) + 0.5) * (h / gh)
            inside = np.zeros((gh, gw), bool)
            for x, y, bw, bh in boxes:
                inside |= (((centres_y >= y) & (centres_y < y + bh))[:, None]
                           & ((centres_x >= x) & (centres_x < x + bw))[None, :])
            self.centre_in_box = inside.ravel()
        self.weights = weights

    def box_iou(self, m: np.ndarray) -> float:
        t = _otsu_threshold(m)
        if t is None:
            return _NAN
        return self.iou_of(m > t)

    def iou_of(self, on: np.ndarray) -> float:
        """IoU, in pixels, of the cells `on` with the union of the boxes."""
        inter = float(self.box_pixels_per_cell[on].sum())
        union = float(self.cell_pixels[on].sum()) + self.box_pixels - inter
        return inter / union if union > 0 else _NAN


class MapScorer:
    """Scores maps on one image: the body mask, view and boxes are fixed; the geometry is cached
    per grid shape, so scoring a map is O(cells) work. See the module docstring for the
    definitions and conventions.

    `body_mask`: H x W bool (the original image's size); `view_position`: e.g. "PA", "AP",
    "LATERAL" or None; `boxes`: (x, y, w, h) in original-image pixels, or None / [] for none;
    `top_fraction`: the image share binarised for `iou_top` (0 < f <= 1); `midline_x`: the
    patient's midline as one x position (pixels) per image row (length H; `Midline.per_row`), or
    None to split laterality at the image's centre column.
    """

    def __init__(self, body_mask: np.ndarray, view_position: str | None, boxes: Sequence[Box] | None = None,
                 top_fraction: float = 0.1, midline_x: np.ndarray | None = None):
        if not 0 < top_fraction <= 1:
            raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
        self.top_fraction = float(top_fraction)
        self.body = np.asarray(body_mask).astype(bool, copy=False)
        if self.body.ndim != 2 or self.body.size == 0:
            raise ValueError(f"body_mask must be a non-empty H x W array, got shape {self.body.shape}")
        self.view_position = view_position
        self.frontal = is_frontal(view_position)
        self.boxes = _check_boxes(boxes) if boxes is not None and len(boxes) > 0 else None
        self.body_area_fraction = float(self.body.mean())
        self.midline_x = None
        if midline_x is not None:
            self.midline_x = np.asarray(midline_x, dtype=np.float64)
            if self.midline_x.shape != (self.body.shape[0],) or not np.isfinite(self.midline_x).all():
                raise ValueError(f"midline_x must be {self.body.shape[0]} finite x positions (one per row), "
                                 f"got shape {self.midline_x.shape}")
        self._geometry: dict[tuple[int, int], _Geometry] = {}

    def _geo(self, gh: int, gw: int) -> _Geometry:
        geo = self._geometry.get((gh, gw))
        if geo is None:
            geo = self._geometry[(gh, gw)] = _Geometry(self.body, gh, gw, self.boxes, self.midline_x)
        return geo

    @staticmethod
    def _as_grid(grid: np.ndarray, ndim: int) -> np.ndarray:
        g = np.asarray(grid, dtype=np.float64)
        if g.ndim != ndim or 0 in g.shape:
            raise ValueError(f"expected a non-empty {ndim}-D array of maps, got shape {g.shape}")
        if (g < 0).any():
            raise ValueError("relevancy maps must be non-negative")
        return g

    def _empty(self, geo: _Geometry, total: float) -> dict[str, float]:
        out = dict.fromkeys(SCORE_KEYS, _NAN)
        out["mass"] = total
        out["body_area_fraction"] = self.body_area_fraction
        if geo.has_boxes:
            out["box_area_fraction"] = geo.box_area_fraction
        return out

    def score(self, grid: np.ndarray) -> dict[str, float]:
        """Every score of one gh x gw map (dict of Python floats keyed by `SCORE_KEYS`; NaN where
        undefined). Raises ValueError for negative values or a map that is not 2-D."""
        g = self._as_grid(grid, 2)
        geo = self._geo(*g.shape)
        m = g.ravel()
        total = float(m.sum())
        if not (total > 0 and math.isfinite(total)):
            return self._empty(geo, total)
        v = (geo.weights @ m) / total
        nz = m[m > 0]
        entropy = max(0.0, math.log2(total) - float(nz @ np.log2(nz)) / total)
        if geo.has_extent:
            within = v[_APICAL] + v[_MIDDLE] + v[_BASAL]
            thirds = (v[_APICAL:_BASAL + 1] / within).tolist() if within > 0 else [_NAN] * 3
        else:
            thirds = [_NAN] * 3
        if geo.has_boxes:
            hit = float(geo.centre_in_box[int(np.argmax(m))])
            box_mass, box_area, iou = float(v[_BOX]), geo.box_area_fraction, geo.box_iou(m)
            iou_top = geo.iou_of(_top_cells(m, geo.cell_pixels, self.top_fraction))
            cnr = _cnr(m, geo.box_pixels_per_cell, geo.out_pixels_per_cell)
        else:
            hit = box_mass = box_area = iou = iou_top = cnr = _NAN
        return {
            "mass": total,
            "inside_body_ratio": float(v[_INSIDE]),
            "border_fraction": float(v[_BORDER]),
            "entropy_bits": entropy,
            "entropy_norm": entropy / geo.log2_cells,
            "patient_left_fraction": float(v[_LEFT]) if self.frontal else _NAN,
            "patient_left_fraction_centre": float(v[_LEFT_CENTRE]) if self.frontal else _NAN,
            "apical_fraction": thirds[0],
            "middle_fraction": thirds[1],
            "basal_fraction": thirds[2],
            "pointing_hit": hit,
            "box_mass_fraction": box_mass,
            "box_area_fraction": box_area,
            "box_iou": iou,
            "iou_top": iou_top,
            "cnr": cnr,
            "first_token_fraction": float(v[_FIRST]),
            "corner_fraction": float(v[_CORNERS]),
            "body_area_fraction": self.body_area_fraction,
        }

    def score_many(self, grids: np.ndarray) -> dict[str, np.ndarray]:
        """Every score of n maps of one shape (an n x gh x gw array), vectorised: a dict keyed by
        `SCORE_KEYS` of float64 arrays of length n, equal to calling `score` on each map."""
        g = self._as_grid(grids, 3)
        n, gh, gw = g.shape
        geo = self._geo(gh, gw)
        m = g.reshape(n, gh * gw)
        total = m.sum(axis=1)
        ok = np.isfinite(total) & (total > 0)
        safe = np.where(ok, total, 1.0)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            v = (m @ geo.weights.T) / safe[:, None]
            mlogm = np.where(m > 0, m * np.log2(np.where(m > 0, m, 1.0)), 0.0).sum(axis=1)
            entropy = np.maximum(0.0, np.log2(safe) - mlogm / safe)
            within = v[:, _APICAL] + v[:, _MIDDLE] + v[:, _BASAL]
            thirds = v[:, _APICAL:_BASAL + 1] / within[:, None]
        if not geo.has_extent:
            thirds = np.full((n, 3), _NAN)
        thirds[~(within > 0)] = _NAN
        nan = np.full(n, _NAN)
        out = {
            "mass": total.astype(np.float64),
            "inside_body_ratio": v[:, _INSIDE],
            "border_fraction": v[:, _BORDER],
            "entropy_bits": entropy,
            "entropy_norm": entropy / geo.log2_cells,
            "patient_left_fraction": v[:, _LEFT] if self.frontal else nan.copy(),
            "patient_left_fraction_centre": v[:, _LEFT_CENTRE] if self.frontal else nan.copy(),
            "apical_fraction": thirds[:, 0],
            "middle_fraction": thirds[:, 1],
            "basal_fraction": thirds[:, 2],
            "pointing_hit": nan.copy(),
            "box_mass_fraction": nan.copy(),
            "box_area_fraction": nan.copy(),
            "box_iou": nan.copy(),
            "iou_top": nan.copy(),
            "cnr": nan.copy(),
            "first_token_fraction": v[:, _FIRST],
            "corner_fraction": v[:, _CORNERS],
            "body_area_fraction": np.full(n, self.body_area_fraction),
        }
        if geo.has_boxes:
            out["pointing_hit"] = geo.centre_in_box[np.argmax(m, axis=1)].astype(np.float64)
            out["box_mass_fraction"] = v[:, _BOX]
            out["box_area_fraction"] = np.full(n, geo.box_area_fraction)
            t, defined = _otsu_thresholds(m)
            on = m > t[:, None]
            inter = on.astype(np.float64) @ geo.box_pixels_per_cell
            union = on.astype(np.float64) @ geo.cell_pixels + geo.box_pixels - inter
            with np.errstate(divide="ignore", invalid="ignore"):
                out["box_iou"] = np.where(defined & (union > 0), inter / np.where(union > 0, union, 1.0), _NAN)
            for i in range(n):  # per map: a sort each (cells are few)
                out["iou_top"][i] = geo.iou_of(_top_cells(m[i], geo.cell_pixels, self.top_fraction))
                out["cnr"][i] = _cnr(m[i], geo.box_pixels_per_cell, geo.out_pixels_per_cell)
        for k in _MASS_KEYS:
            out[k] = np.where(ok, out[k], _NAN)
        return out


def score_map(grid: np.ndarray, body_mask: np.ndarray, view_position: str | None,
              boxes: Sequence[Box] | None = None, top_fraction: float = 0.1,
              midline_x: np.ndarray | None = None) -> dict[str, float]:
    """Every score of one map on its image (dict keyed by `SCORE_KEYS`; definitions and
    conventions in the module docstring). `grid`: gh x gw non-negative raw map; `body_mask`: H x W
    bool of the original image; `view_position`: "PA", "AP", ... or None; `boxes`: (x, y, w, h)
    in original-image pixels; `midline_x`: the patient's midline, one x per row (None: the
    image's centre column). For many maps on one image build a `MapScorer` once and call
    `.score(grid)` or `.score_many(grids)`."""
    return MapScorer(body_mask, view_position, boxes, top_fraction, midline_x).score(grid)
