"""Scores of one relevancy map on its image (pure numpy; no model).

Geometry: a gh x gw grid is placed on the original W x H image by non-uniform scaling (the
processor resizes the image to a square): cell (i, j) covers x in [j*W/gw, (j+1)*W/gw) and
y in [i*H/gh, (i+1)*H/gh), pixel (y, x) covering [x, x+1) x [y, y+1). Overlaps are exact areas,
so a cell is covered fractionally by the body or a box, never thresholded.

Definitions (m = the raw map, non-negative; M = sum of m; every fraction is of M):
- inside_body_ratio = sum(m * body coverage of each cell) / M (not after renormalising the
  masked map, which would always give 1).
- border_fraction = mass of the outer ring of cells / M (each corner counted once).
- entropy_bits = -sum p log2 p with p = m / M (0 log 0 = 0); entropy_norm = entropy_bits / log2(gh*gw).
- patient_left_fraction = mass on the patient's left / M, for frontal views only: radiographs are
  displayed with the patient's left on the image's RIGHT, so it is the mass right of x = W/2
  (a cell straddling it is split by area). NaN for lateral or unknown views.
- apical / middle / basal_fraction: the mass in the top / middle / bottom third of the body's
  vertical extent (first to last image row holding body pixels), each as a fraction of the mass
  within that extent (they sum to 1; NaN when no mass lies within it).
- with boxes (x, y, w, h in pixels): pointing_hit = 1 if the centre of the map's maximal cell
  (first in row-major order) lies inside a box, else 0; box_mass_fraction = sum(m * box
  coverage) / M (coverage by the union of boxes); box_area_fraction = union area / image area,
  the expected box_mass_fraction of a uniform map (the random floor); box_iou = intersection over
  union, at image resolution, of the boxes' union and the map binarised by Otsu's threshold over
  its cell values (exact, over sorted values; each pixel takes the cell containing its centre). NaN without boxes.
- mass = M; body_area_fraction = body pixels / image pixels.
Every score is NaN for a map with no mass (M <= 0) or non-finite values.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np

__all__ = ["FRONTAL_VIEWS", "MapScorer", "boxes_to_mask", "cell_coverage", "is_frontal", "overlap_matrix", "score_map"]

FRONTAL_VIEWS = frozenset({"PA", "AP", "AP AXIAL", "AP LLD", "AP RLD", "PA LLD", "PA RLD", "FRONTAL"})

Box = Sequence[float]  # x, y, w, h in pixels

_NAN_BOX = {"pointing_hit": math.nan, "box_mass_fraction": math.nan, "box_area_fraction": math.nan, "box_iou": math.nan}


def is_frontal(view_position: str | None) -> bool:
    """PA, AP and their decubitus / axial variants (MIMIC-CXR's ViewPosition spellings)."""
    return view_position is not None and " ".join(str(view_position).upper().split()) in FRONTAL_VIEWS


def overlap_matrix(n_cells: int, n_pixels: int, lo: float = 0.0, hi: float | None = None) -> np.ndarray:
    """(n_cells, n_pixels) exact overlap lengths of cell c = [c*P/G, (c+1)*P/G) with pixel k = [k, k+1),
    optionally restricted to [lo, hi)."""
    hi = float(n_pixels) if hi is None else hi
    edges = np.arange(n_cells + 1) * (n_pixels / n_cells)
    a = np.clip(edges[:-1], lo, hi)[:, None]
    b = np.clip(edges[1:], lo, hi)[:, None]
    k = np.arange(n_pixels)[None, :]
    return np.clip(np.minimum(b, k + 1) - np.maximum(a, k), 0.0, None)


def cell_coverage(mask: np.ndarray, gh: int, gw: int) -> np.ndarray:
    """(gh, gw) fraction of each cell's area covered by the True pixels of an H x W mask."""
    m = np.asarray(mask, dtype=np.float64)
    h, w = m.shape
    cy, cx = overlap_matrix(gh, h), overlap_matrix(gw, w)
    return (cy @ m @ cx.T) / ((h / gh) * (w / gw))


def boxes_to_mask(boxes: Sequence[Box], h: int, w: int) -> np.ndarray:
    """Union of boxes (x, y, w, h in pixels) as an H x W bool mask (pixels whose centre is inside)."""
    out = np.zeros((h, w), bool)
    ys, xs = np.arange(h) + 0.5, np.arange(w) + 0.5
    for x, y, bw, bh in boxes:
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
    maximising the between-class variance w0 * w1 * (mu0 - mu1)^2. Values above the returned
    threshold are the foreground. None when all values are equal."""
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


class _Geometry:
    """Per grid shape: everything about the image that scoring a map needs, precomputed."""

    def __init__(self, body: np.ndarray, gh: int, gw: int, boxes: Sequence[Box] | None):
        h, w = body.shape
        cy, cx = overlap_matrix(gh, h), overlap_matrix(gw, w)
        area = (h / gh) * (w / gw)
        self.coverage = ((cy @ body.astype(np.float64) @ cx.T) / area).ravel()
        ring = np.ones((gh, gw), bool)
        ring[1:-1, 1:-1] = False
        self.border = ring.ravel().astype(np.float64)
        # patient's left = image right half, split by area
        right = overlap_matrix(gw, w, lo=w / 2).sum(axis=1) / (w / gw)
        self.left_weight = np.tile(right, gh)
        rows = np.flatnonzero(body.any(axis=1))
        self.thirds = None
        if rows.size:
            y0, y1 = float(rows[0]), float(rows[-1] + 1)
            e = (y1 - y0) / 3
            cell_h = h / gh
            self.thirds = np.stack([
                np.repeat(overlap_matrix(gh, h, lo=y0 + k * e, hi=y0 + (k + 1) * e).sum(axis=1) / cell_h, gw)
                for k in range(3)
            ])  # (3, gh*gw): fraction of each cell in each third
        self.gh, self.gw, self.h, self.w = gh, gw, h, w
        self.has_boxes = bool(boxes)
        if self.has_boxes:
            bmask = boxes_to_mask(boxes, h, w)
            self.box_cov = ((cy @ bmask.astype(np.float64) @ cx.T) / area).ravel()
            self.box_area_fraction = float(bmask.mean())
            self.box_pixels = float(bmask.sum())
            # nearest-cell assignment of pixels (by pixel centre) for the IoU
            ry = np.minimum(((np.arange(h) + 0.5) * gh / h).astype(int), gh - 1)
            rx = np.minimum(((np.arange(w) + 0.5) * gw / w).astype(int), gw - 1)
            oy = np.zeros((gh, h))
            oy[ry, np.arange(h)] = 1
            ox = np.zeros((gw, w))
            ox[rx, np.arange(w)] = 1
            self.cell_pixels = np.outer(oy.sum(1), ox.sum(1)).ravel()
            self.box_pixels_per_cell = (oy @ bmask.astype(np.float64) @ ox.T).ravel()
            centres_x = (np.arange(gw) + 0.5) * (w / gw)
            centres_y = (np.arange(gh) + 0.5) * (h / gh)
            inside = np.zeros((gh, gw), bool)
            for x, y, bw, bh in boxes:
                inside |= ((centres_y >= y) & (centres_y < y + bh))[:, None] & ((centres_x >= x) & (centres_x < x + bw))[None, :]
            self.centre_in_box = inside.ravel()


class MapScorer:
    """Scores maps on one image; the body mask, view and boxes are fixed, geometry is cached per
    grid shape, so scoring a map is O(cells). See the module docstring for the definitions."""

    def __init__(self, body_mask: np.ndarray, view_position: str | None, boxes: Sequence[Box] | None = None):
        self.body = np.asarray(body_mask, dtype=bool)
        if self.body.ndim != 2:
            raise ValueError(f"body_mask must be H x W, got shape {self.body.shape}")
        self.frontal = is_frontal(view_position)
        self.boxes = [tuple(map(float, b)) for b in boxes] if boxes else None
        self.body_area_fraction = float(self.body.mean())
        self._geometry: dict[tuple[int, int], _Geometry] = {}

    def _geo(self, gh: int, gw: int) -> _Geometry:
        key = (gh, gw)
        if key not in self._geometry:
            self._geometry[key] = _Geometry(self.body, gh, gw, self.boxes)
        return self._geometry[key]

    def score(self, grid: np.ndarray) -> dict[str, float]:
        """Every score of one map (dict of floats; NaN where undefined)."""
        g = np.asarray(grid, dtype=np.float64)
        if g.ndim != 2:
            raise ValueError(f"grid must be 2-D, got shape {g.shape}")
        if (g < 0).any():
            raise ValueError("relevancy maps must be non-negative")
        geo = self._geo(*g.shape)
        m = g.ravel()
        total = float(m.sum())
        out = {"mass": total, "body_area_fraction": self.body_area_fraction}
        if not (math.isfinite(total) and total > 0):
            nan = math.nan
            out.update({k: nan for k in ("inside_body_ratio", "border_fraction", "entropy_bits", "entropy_norm",
                                         "patient_left_fraction", "apical_fraction", "middle_fraction",
                                         "basal_fraction")})
            out.update(_NAN_BOX)
            if geo.has_boxes:
                out["box_area_fraction"] = geo.box_area_fraction
            return out
        p = m / total
        nz = p[p > 0]
        entropy = float(-(nz * np.log2(nz)).sum())
        cells = m.size
        out["inside_body_ratio"] = float(p @ geo.coverage)
        out["border_fraction"] = float(p @ geo.border)
        out["entropy_bits"] = entropy
        out["entropy_norm"] = entropy / math.log2(cells) if cells > 1 else math.nan
        out["patient_left_fraction"] = float(p @ geo.left_weight) if self.frontal else math.nan
        if geo.thirds is not None:
            t = geo.thirds @ p
            s = float(t.sum())
            fr = (t / s) if s > 0 else np.full(3, math.nan)
        else:
            fr = np.full(3, math.nan)
        out["apical_fraction"], out["middle_fraction"], out["basal_fraction"] = map(float, fr)
        if geo.has_boxes:
            out["pointing_hit"] = float(geo.centre_in_box[int(np.argmax(m))])
            out["box_mass_fraction"] = float(p @ geo.box_cov)
            out["box_area_fraction"] = geo.box_area_fraction
            t = _otsu_threshold(m)
            if t is None:
                out["box_iou"] = math.nan
            else:
                sel = m > t
                inter = float(geo.box_pixels_per_cell[sel].sum())
                union = float(geo.cell_pixels[sel].sum()) + geo.box_pixels - inter
                out["box_iou"] = inter / union if union > 0 else math.nan
        else:
            out.update(_NAN_BOX)
        return out


def score_map(grid: np.ndarray, body_mask: np.ndarray, view_position: str | None,
              boxes: Sequence[Box] | None = None) -> dict[str, float]:
    """Every score of one map on its image (see the module docstring). For many maps on one
    image, build a MapScorer once and call `.score(grid)`."""
    return MapScorer(body_mask, view_position, boxes).score(grid)
