"""The patient's midline on a frontal chest radiograph, so that laterality can split at the
patient rather than at the image's centre column.

Conventions. Lengths are in pixels; coordinates are continuous: pixel (y, x) covers [x, x+1) x
[y, y+1). A radiograph is displayed with the patient's LEFT on the image's RIGHT (PA and AP
alike), so the patient's left is the side of larger x. The midline is a straight line
x(y) = x0 + slope * (y - H/2) in the original image's pixels (`Midline`; slope = dx/dy).
`left_of_midline_mask` gives each pixel's exact area fraction right of the line (the patient's
left). Inputs: grey values in [0, 1] in the display convention (bright = dense;
`metrics.to_grey01`, after any inversion has been undone) and the body mask
(`metrics.body_mask`).

Algorithm (`patient_midline`). Work on a copy area-averaged to 256 px on its long side (the
mask likewise, kept where >= 0.5). bw = the 90th percentile of the body's row widths there;
the lengths below scale with it. Rows used: 15 % to 75 % of the body's vertical extent (the
lungs on most films; the line search tolerates some neck or abdomen among them). Rows are
averaged over 8 px (1/32 of the working size) before steps 1 and 2.

1. Mediastinum cue M(y, x): the row profile smoothed across (Gaussian, sigma 1.5 px); the mean
   of a band 4 % bw wide centred at x minus the brighter of the two darkest points within
   [x - 35 %, x - 4 %] and [x + 4 %, x + 35 %] of bw, searched inside the body eroded by 3 % bw
   (so the fall-off at the skin line does not pass for a lung). M > 0 where a bright vertical
   band (mediastinum, spine) has dark fields (lungs) on BOTH sides.
2. Symmetry cue S(y, c) for every axis position c on a half-pixel grid: with a = the profile
   minus its mean over the row's body pixels, zero outside the body, S = sum_d a(c - d) a(c + d)
   / sum a^2 (the row's autoconvolution, by FFT): the thorax -- lung fields, chest walls, ribs --
   mirrors about the patient's midline wherever the patient lies in the frame. S = 0.3 S(a) +
   0.7 S(a band-passed: minus its Gaussian mean over the body, sigma 6.5 % bw), so edges count
   as well as the large dark fields, and large-scale density differences (the heart, one dense
   lung) weigh less.
3. Evidence C = max(S, 0) * clip((M - 0.03) / 0.07, 0, 1): a symmetry axis AND a bright band
   between dark fields (M below 0.03 grey units counts as noise, from 0.1 fully). C = 0 where the
   body does not extend at least 20 % bw on both sides of c (nothing to mirror near its edge).
4. Line search, robust to rows without evidence (a Hough accumulation): every line
   x(y) = xm + s (y - ym), s in [-0.2, 0.2] in steps of 0.01 (at most ~11 degrees), xm on the
   half-pixel grid, ym the middle of the rows used, collects the sum of C along it over those
   rows; that sum is weighted by exp(-s^2 / (2 * 0.1^2)), a weak prior for small tilts (tubes
   and wires are thin bright lines that mirror about themselves; the heart pulls single rows
   toward the patient's left). The best weighted line wins. score = its unweighted sum / the
   number of rows (0..1); margin = 1 - (the best weighted sum among lines that stay more than
   8 % bw away from it over all rows used) / its weighted sum (0: another place as good; 1: one
   clear place).

Result: the line (source="image") when score >= `MIN_SCORE` = 0.1, margin >= `MIN_MARGIN` = 0.1
and the tilt is not at the search limit. Otherwise -- and for an empty body mask or fewer than
8 working rows -- `Midline(W/2, 0, "image_centre", ..., reason=...)`: the image's centre column
with the reason recorded, never a silent guess. The parameters and thresholds were chosen on
half of the 40 Hannover films with lung masks (every other film of metadata.csv), the other
half held out; the thresholds are about 40 % (score) and 60 % (margin) of the smallest values
on the tuning films (0.24 and 0.16). Noise, a ramp, a plain body without lungs or spine and a
body with one lung beside no brighter band fall below them.

Accuracy (benchmarks/bench_midline.py): against the midpoint between the two lungs' medial edges
(lung masks), at mid-lung height, median error 5.5 px of 640 (0.9 %), max 22 px (3.5 %) over
the 40 Hannover films; a 16 x 16 map of the right lung puts at most 0.006 of its mass on the
patient's left, the left lung's map at least 0.985. The line moves with the patient when the
film is pasted off-centre into a larger frame, letterboxed or flipped (median 0.5 px, max 13 px
from where the patient moved). Time: ~15 ms per 1024 x 1024 film on one core.

Known limits: no check that the film is frontal (call it for PA / AP views only; a lateral view
can still give a line). The line is straight (scoliosis: its average course) and follows the
mediastinum between the lungs; in an oblique projection (rotated patient) that is not where the
spinous processes are. Over the lung rows it lies a few px toward the patient's left of the
medial-edge midpoint (mean +4.5 px of 640 on the Hannover films: the heart). Tilts are shrunk
toward 0 by the prior (a 0.08 tilt is found as 0.02 to 0.07 on phantoms). A film with no dark
lung fields on either side (both lungs white) has no mediastinum cue and falls back. The grey
values must be in the display convention: read with the wrong polarity, the mediastinum cue
finds the lung fields (bright bands between dark ones): on 65 of the 98 real films the flipped
reading gives a line, a median 150 px (of up to 1024) from the right one. The pipeline takes the
polarity from the body mask (`metrics.body_mask_and_polarity`, which misses 2 of the 98 inverted
real films) and a DICOM's MONOCHROME1 from its header.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage as ndi

__all__ = ["MIN_MARGIN", "MIN_SCORE", "Midline", "left_of_midline_mask", "patient_midline"]

WORK_SIZE = 256       # long side of the working copy, pixels
ROWS = (0.15, 0.75)   # rows used: fractions of the body's vertical extent
BAND = 8              # rows averaged, in pixels of the working copy (1/32 of WORK_SIZE)
FLANK = (0.04, 0.35)  # flank windows of the mediastinum cue, fractions of bw
CENTRE = 0.04         # width of the central band, fraction of bw
ERODE = 0.03          # body erosion for the flank search, fraction of bw
M_FLOOR = 0.03        # mediastinum contrast (grey units) below which the cue is 0 (noise)
M_REF = 0.1           # ... and at which it saturates
HIGHPASS = 0.065      # sigma of the band-pass of the symmetry cue, fraction of bw
MIX = 0.7             # weight of the band-passed symmetry
SUPPORT = 0.2         # body needed on both sides of an axis, fraction of bw
MAX_SLOPE = 0.2       # tilt searched: |dx/dy| <= MAX_SLOPE
SLOPE_STEP = 0.01
SLOPE_PRIOR = 0.1     # sigma of the tilt prior (dx/dy)
SEPARATION = 0.08     # "another place" for the margin: xm further than this, fraction of bw
MIN_SCORE = 0.1       # reliability thresholds (module docstring)
MIN_MARGIN = 0.1


@dataclass(frozen=True)
class Midline:
    """A straight midline x(y) = x0 + slope * (y - height / 2) on a height x width image, in
    that image's pixels (continuous coordinates: pixel x covers [x, x + 1)). Image right of the
    line = the patient's left.

    source: "image" (found on the image) or "image_centre" (no reliable line: x0 = width / 2,
    slope 0, and `reason` says why). score, margin: the evidence (module docstring; NaN for
    the fallback)."""

    x0: float
    slope: float
    source: str
    height: int
    width: int
    score: float = math.nan
    margin: float = math.nan
    reason: str = ""

    def x_at(self, y):
        """x of the line at height y (scalar or array; y in the same pixel coordinates)."""
        return self.x0 + self.slope * (np.asarray(y, dtype=np.float64) - self.height / 2)

    def per_row(self) -> np.ndarray:
        """(height,) float64: the line's x at each pixel row's centre y + 0.5 (a per-row split;
        within a row the area right of the line is the same as right of this x)."""
        return self.x_at(np.arange(self.height) + 0.5)


def _ramp_integral(u: np.ndarray) -> np.ndarray:
    """Integral from -inf to u of clip(v, 0, 1) dv."""
    v = np.clip(u, 0.0, 1.0)
    return 0.5 * v * v + np.maximum(u - 1.0, 0.0)


def left_of_midline_mask(midline: Midline, h: int | None = None, w: int | None = None) -> np.ndarray:
    """(h, w) float64 in [0, 1]: the exact fraction of each pixel's area on the image's RIGHT of
    the line, i.e. on the patient's left (1 well right of the line, 0 well left of it).

    h, w default to the midline's image size; other sizes scale the line with the image
    (non-uniformly: x by w / width, y by h / height), as a map placed on the image by scaling.
    Area-averaging the result onto a grid (`metrics.cell_coverage`) gives each cell's share on
    the patient's left; summed with a map's cell masses it gives the map's patient-left mass.
    """
    h = midline.height if h is None else int(h)
    w = midline.width if w is None else int(w)
    if h < 1 or w < 1:
        raise ValueError(f"need a positive size, got {h} x {w}")
    sx, sy = w / midline.width, h / midline.height
    x0 = midline.x0 * sx
    slope = midline.slope * sx / sy
    y = np.arange(h, dtype=np.float64)
    # where the line meets each row's middle: exact for every pixel the line does not cross
    # through its left or right side within the row (the area is then linear in x)
    out = np.clip(np.arange(1, w + 1, dtype=np.float64)[None, :] - (x0 + slope * (y + 0.5 - h / 2))[:, None], 0.0, 1.0)
    if abs(slope) >= 1e-9:
        x_top = x0 + slope * (y - h / 2)  # the line at each row's top and bottom edge
        x_bot = x_top + slope
        first = np.floor(np.minimum(x_top, x_bot)).astype(np.int64) - 1
        n = math.ceil(abs(slope)) + 3  # columns the line can cross within a row
        cols = first[:, None] + np.arange(n)[None, :]
        inside = (cols >= 0) & (cols < w)
        u_top = cols + 1 - x_top[:, None]  # pixel width right of the line at the row's top
        exact = np.clip((_ramp_integral(u_top) - _ramp_integral(u_top - slope)) / slope, 0.0, 1.0)
        rows = np.broadcast_to(np.arange(h)[:, None], cols.shape)
        out[rows[inside], cols[inside]] = exact[inside]
    return out


def _working_copy(grey01: np.ndarray, body: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h, w = grey01.shape
    scale = min(1.0, WORK_SIZE / max(h, w))
    sw, sh = max(8, round(w * scale)), max(8, round(h * scale))
    g = np.asarray(grey01, np.float32)
    b = body.astype(np.float32)
    if (sw, sh) != (w, h):
        g = cv2.resize(g, (sw, sh), interpolation=cv2.INTER_AREA)
        b = cv2.resize(b, (sw, sh), interpolation=cv2.INTER_AREA)
    return g, b >= 0.5


def _autosymmetry(a: np.ndarray) -> np.ndarray:
    """(h, 2w - 1): sum_d a(c - d) a(c + d) / sum a^2 per row, axis c = (k + 1) / 2 at column k."""
    w = a.shape[1]
    spec = np.fft.rfft(a, n=2 * w, axis=1)
    conv = np.fft.irfft(spec * spec, n=2 * w, axis=1)[:, : 2 * w - 1]
    return conv / np.maximum((a * a).sum(1), 1e-12)[:, None]


def _symmetry(rows: np.ndarray, body: np.ndarray, sigma: float) -> np.ndarray:
    """Step 2 of the module docstring, on row-averaged grey values."""
    bm = body.astype(np.float32)
    mean = (rows * bm).sum(1) / np.maximum(bm.sum(1), 1.0)
    a = (rows - mean[:, None]) * bm
    local = cv2.GaussianBlur(rows * bm, (0, 0), sigma) / np.maximum(cv2.GaussianBlur(bm, (0, 0), sigma), 1e-3)
    return (1 - MIX) * _autosymmetry(a) + MIX * _autosymmetry((rows - local) * bm)


def _mediastinum(rows: np.ndarray, body: np.ndarray, bw: float) -> np.ndarray:
    """Step 1 of the module docstring: (h, w) contrast of the band at x over its darker flanks."""
    w = rows.shape[1]
    prof = ndi.gaussian_filter1d(rows, 1.5, axis=1, mode="nearest")
    centre = ndi.uniform_filter1d(prof, max(3, round(CENTRE * bw)), axis=1, mode="nearest")
    r = max(1, round(ERODE * bw))
    inner = cv2.erode(body.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)),
                      borderType=cv2.BORDER_REPLICATE).astype(bool)
    dmin = max(2, round(FLANK[0] * bw))
    dmax = max(dmin + 2, round(FLANK[1] * bw))
    size = dmax - dmin + 1
    mins = ndi.minimum_filter1d(np.where(inner, prof, np.inf), size, axis=1, mode="constant", cval=np.inf)
    # minimum_filter1d's window at i is [i - size // 2, i + size - 1 - size // 2]
    x = np.arange(w)
    li = x - dmin - (size - 1 - size // 2)  # window [x - dmax, x - dmin]
    ri = x + dmin + size // 2               # window [x + dmin, x + dmax]
    left = np.where(((li >= 0) & (li < w))[None, :], mins[:, li.clip(0, w - 1)], np.inf)
    right = np.where(((ri >= 0) & (ri < w))[None, :], mins[:, ri.clip(0, w - 1)], np.inf)
    m = centre - np.maximum(left, right)
    m[~np.isfinite(m) | ~body] = -1.0
    return m


def _to_half_grid(m: np.ndarray) -> np.ndarray:
    """(h, w) values at pixel centres -> (h, 2w - 1) at the axes c = (k + 1) / 2."""
    out = np.empty((m.shape[0], 2 * m.shape[1] - 1), m.dtype)
    out[:, 0::2] = m
    out[:, 1::2] = 0.5 * (m[:, :-1] + m[:, 1:])
    return out


def patient_midline(grey01: np.ndarray, body: np.ndarray) -> Midline:
    """The patient's midline on a frontal chest radiograph (module docstring).

    grey01: H x W grey values in [0, 1], display convention (bright = dense), e.g.
    `metrics.to_grey01(image)`; body: H x W bool body mask (`metrics.body_mask(image)`).
    Returns a `Midline` in the image's pixels; source="image_centre" (the image's centre
    column, with `reason`) when no reliable line is found. Raises ValueError for inputs that are
    not 2-D, of different shapes, or grey values outside [0, 1] (NaN / inf are taken as 0 / 1).
    """
    grey01 = np.asarray(grey01)
    body = np.asarray(body, dtype=bool)
    if grey01.ndim != 2 or body.shape != grey01.shape:
        raise ValueError(f"need H x W grey values and a body mask of the same shape, "
                         f"got {grey01.shape} and {body.shape}")
    H, W = grey01.shape

    def centre(reason: str, score: float = math.nan, margin: float = math.nan) -> Midline:
        return Midline(W / 2, 0.0, "image_centre", H, W, score, margin, reason)

    if not body.any():
        return centre("empty body mask")
    g, b = _working_copy(grey01, body)
    if not np.isfinite(g).all():
        g = np.nan_to_num(g, nan=0.0, posinf=1.0, neginf=0.0)
    if float(g.min()) < -1e-3 or float(g.max()) > 1.001:
        raise ValueError(f"grey values must lie in [0, 1] (metrics.to_grey01), got {g.min():.3g} to {g.max():.3g}")
    h, w = g.shape
    body_rows = np.nonzero(b.any(1))[0]
    if body_rows.size == 0:
        return centre("body mask vanishes at the working size")
    top, bottom = int(body_rows[0]), int(body_rows[-1]) + 1
    ys = np.arange(int(top + ROWS[0] * (bottom - top)), math.ceil(top + ROWS[1] * (bottom - top)))
    if ys.size < 8:
        return centre(f"too few body rows ({ys.size} at the working size)")
    widths = b[top:bottom].sum(1)
    bw = float(np.percentile(widths[widths > 0], 90))

    band = max(1, round(BAND * max(h, w) / WORK_SIZE))
    rows = cv2.blur(g, (1, band), borderType=cv2.BORDER_REPLICATE) if band > 1 else g
    evidence = np.maximum(_symmetry(rows, b, HIGHPASS * bw), 0.0)
    evidence *= np.clip((_to_half_grid(_mediastinum(rows, b, bw)) - M_FLOOR) / (M_REF - M_FLOOR), 0.0, 1.0)
    axes = np.arange(1, 2 * w) / 2.0  # axis position of each half-grid column
    has = b.any(1)
    left_edge = np.where(has, np.argmax(b, 1), w)
    right_edge = np.where(has, w - np.argmax(b[:, ::-1], 1), 0)
    support = ((axes[None, :] - left_edge[:, None]) >= SUPPORT * bw) & \
              ((right_edge[:, None] - axes[None, :]) >= SUPPORT * bw)
    evidence = np.where(support, evidence, 0.0)[ys]

    # step 4: accumulate the evidence along every line (xm, s)
    K = axes.size
    ym = 0.5 * (ys[0] + ys[-1] + 1)
    dy = ys + 0.5 - ym
    n_s = round(MAX_SLOPE / SLOPE_STEP)
    slopes = np.arange(-n_s, n_s + 1) * SLOPE_STEP
    pad = math.ceil(2 * MAX_SLOPE * float(np.abs(dy).max())) + 1
    cum = np.zeros((ys.size + 1, K + 2 * pad))  # cumulative sums of the rows, zero-padded
    cum[1:, pad: pad + K] = np.cumsum(evidence, axis=0)
    acc = np.zeros((slopes.size, K))
    for i, s in enumerate(slopes):
        shift = np.rint(2 * s * dy).astype(np.int64)  # half-grid columns per row, monotonic in y
        starts = np.r_[0, np.nonzero(np.diff(shift))[0] + 1]
        ends = np.r_[starts[1:], ys.size]
        for a, e in zip(starts, ends):  # rows a..e-1 share one shift
            o = pad + int(shift[a])
            acc[i] += cum[e, o: o + K] - cum[a, o: o + K]
    weighted = acc * np.exp(-0.5 * (slopes / SLOPE_PRIOR) ** 2)[:, None]
    si, j = np.unravel_index(int(np.argmax(weighted)), acc.shape)
    best = float(weighted[si, j])
    score = float(acc[si, j]) / ys.size
    # competitors: lines that stay further than SEPARATION * bw from the best one over all rows used
    first_last = np.array([dy[0], dy[-1]])
    gap = (axes[None, :, None] + slopes[:, None, None] * first_last) - (axes[j] + slopes[si] * first_last)
    far = (np.sign(gap[..., 0]) == np.sign(gap[..., 1])) & (np.abs(gap).min(-1) > SEPARATION * bw)
    second = float(weighted[far].max()) if far.any() else 0.0
    margin = 1.0 - second / best if best > 0 else 0.0
    if not score >= MIN_SCORE:
        return centre(f"no symmetric bright band between dark lung fields (score {score:.3f} < {MIN_SCORE})",
                      score, margin)
    if not margin >= MIN_MARGIN:
        return centre(f"ambiguous: another place as good (margin {margin:.3f} < {MIN_MARGIN})", score, margin)
    if abs(si - n_s) == n_s:
        return centre(f"tilt at the search limit (|dx/dy| = {MAX_SLOPE})", score, margin)
    s, xm = float(slopes[si]), float(axes[j])
    sx, sy = W / w, H / h
    x_mid = xm + s * (h / 2 - ym)  # at the working copy's mid-height, = the image's H / 2
    return Midline(x_mid * sx, s * sx / sy, "image", H, W, score, margin, "")
