"""Body masks of chest radiographs: where the patient is, as opposed to air, padding and labels.

Algorithm (`body_mask`). Work on a copy downsampled (area averaging) to `work_size` pixels on its
long side; n below is that copy's long side, and lengths are in its pixels.

0. Padding (`content_box`): rows and columns at the image border that are flat (at least 95 % of
   their pixels within 2 % of the grey range of the median of the outermost line of their run;
   the range is the 0.5th-99.5th percentile span) are cut off, side by side, from the outside
   in: letterbox and pillarbox bars of any colour, the constant background of a film pasted
   into a larger frame, saturated air rows. Steps 1-5 work on the rest; the cut-off lines are
   never body. Padding at the air end of the grey scale (once the polarity is known) is put
   back as a margin of air, up to two opening widths (step 5) wide, so the body is rounded off
   against it as against air; padding at the tissue end is not.
1. Grey values: colour = mean of R, G, B (alpha ignored); any integer or float type; downsampled,
   then stretched to [0, 1] between the 0.5th and 99.5th percentiles (as `to_grey01`). Display
   convention: bright = dense.
2. Polarity: which end of the grey scale is tissue (`tissue_is_dark`). The copy is flipped when
   `inverted=True`, or when `inverted=None` (the default) and at least two votes say the image
   is inverted (MONOCHROME1-like: body dark, air bright). The body is found under both
   polarities (steps 3-5) and five independent pieces of evidence vote: three grey-level
   contrasts at the places of the mediastinum, lung fields and abdomen within the patient's box
   (mediastinum darker than the lung fields by > 0.1; the strongest central band of the column
   profile darker than its flanks by > 0.05 net; abdomen darker than the lung fields by > 0.05),
   the plausibility of the two bodies (the one read as it is leaves >= 0.1 more of the convex
   hull of its non-air pieces uncovered, split or notched, while the flipped one leaves <= 0.1)
   and where the air lies (a body in a bright background: up to +2; in a dark one: down to -2).
   Thresholds and reasons: `tissue_is_dark`; the cue values of an image: `polarity_cues`. The
   body is never taken to be "the dark side of Otsu" (that is air plus lungs).
3. Gaussian blur (sigma 2 n / 256); Otsu threshold t_o; air threshold
   t = p1 + `air_fraction` * (t_o - p1), p1 the 1st percentile (the air level). Otsu alone would
   cut through the body on films it fills edge to edge (between lungs and dense tissue); t lies
   between air and lung values.
4. Air = pixels <= t reachable from the image border through channels at least 2r + 1 wide
   (r = n / 80): the air candidate is eroded by r; its components reaching within 4r of the
   border are kept (so a thin bright film edge along the border does not shut the air in),
   dilated by r and intersected with the candidate again. A dark lung joined to the outside air
   through a thin gap in the chest wall stays inside the body.
5. Body = not air, opened (ellipse of diameter n / 25) to cut thin attachments (lines, leads,
   bright collimator bands along the border); the largest connected component (burned-in text
   and "L"/"R" markers lying in the air are separate blobs), its holes filled (the lungs are
   inside); upsampled to the original size (Gaussian sigma 0.7 px to round the pixel staircase,
   bilinear, threshold 0.5).

Errors: a constant image has no contrast to find a body in (ValueError); so has an image where
everything is air (ValueError). Known limits: markers touching the skin line join the body; a
hyperlucent lung whose chest wall is as dark as the air is lost with the air; flat lines of
body at the border (a clipped white abdomen filling whole rows) are cut off as padding; an
inverted film can still be missed when most of its cues are weak (pass `inverted=True` when the
photometric interpretation is known).
"""
from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage as ndi

__all__ = ["body_mask", "body_mask_and_polarity", "content_box", "looks_inverted", "polarity_cues", "tissue_is_dark", "to_grey01"]


def _grey(image: np.ndarray) -> np.ndarray:
    """H x W float32 grey values, not stretched: colour averaged over R, G, B (alpha dropped),
    non-finite values replaced by the smallest finite one (all non-finite: zeros)."""
    a = np.asarray(image)
    if a.ndim == 3:
        if a.shape[2] not in (1, 3, 4):
            raise ValueError(f"expected H x W, H x W x 3 or H x W x 4, got shape {a.shape}")
        a = a[..., :3].astype(np.float32).mean(axis=2) if a.shape[2] >= 3 else a[..., 0]
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D (or colour) image, got shape {a.shape}")
    a = a.astype(np.float32, copy=False)
    if not np.isfinite(a).all():
        finite = np.isfinite(a)
        a = np.where(finite, a, float(a[finite].min()) if finite.any() else 0.0).astype(np.float32)
    return a


def _stretch_range(a: np.ndarray) -> tuple[np.float64, np.float64]:
    """The 0.5th and 99.5th percentiles of `a` (min and max when those coincide)."""
    lo, hi = np.percentile(a, [0.5, 99.5])
    if hi <= lo:
        lo, hi = a.min(), a.max()
    return np.float64(lo), np.float64(hi)  # float64 scalars: the stretch is computed in float64


def _stretch(a: np.ndarray) -> np.ndarray:
    """Linear stretch of float32 values to [0, 1] between the 0.5th and 99.5th percentiles (min and
    max when those coincide), clipped; all zeros when the values are constant."""
    lo, hi = _stretch_range(a)
    if hi <= lo:
        return np.zeros(a.shape, np.float32)
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def to_grey01(image: np.ndarray) -> np.ndarray:
    """Any greyscale / RGB / RGBA array -> float32 H x W grey values in [0, 1].

    `image`: H x W, H x W x 1, H x W x 3 or H x W x 4, of any integer or float type (uint8,
    uint16 with 12-bit values, float, bool). Colour is averaged over R, G, B (alpha dropped).
    Values are stretched linearly between the 0.5th and 99.5th percentiles (min and max when those
    coincide) and clipped, so bit depth and offsets do not matter. Non-finite values are replaced
    by the smallest finite value. A constant (or all non-finite) image gives all zeros.
    """
    return _stretch(_grey(image))


# Padding: a border line is flat when this share of its pixels lies within _PAD_TOL x the grey
# range of the median of the outermost line of its run.
_PAD_TOL = 0.02
_PAD_SHARE = 0.95


def _flat_run(lines: np.ndarray, tol: float, block: int = 32) -> int:
    """How many leading rows of `lines` are padding: runs of rows with >= _PAD_SHARE of their
    values within `tol` of the median of the run's first row (nested bars of different colours
    are successive runs)."""
    i, n = 0, lines.shape[0]
    while i < n:
        v = float(np.median(lines[i]))
        start = i
        while i < n:
            chunk = lines[i:i + block]
            off = (np.abs(chunk - v) > tol).mean(axis=1) > 1.0 - _PAD_SHARE
            if off.any():
                i += int(np.argmax(off))
                break
            i += chunk.shape[0]
        if i == start:  # the line is not flat about its own median: content
            return i
    return n


def content_box(image: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right), the image without its padding: rows top..bottom-1 and columns
    left..right-1 are kept.

    A line (row or column) at the border is padding when at least 95 % of its pixels lie within
    2 % of the grey range (0.5th-99.5th percentile span, min-max when that is empty) of the median
    of the outermost line of its run; lines are cut from the outside in while they are flat
    (nested bars of different colours are successive runs): top and bottom rows first, then left
    and right columns of the rows kept. Letterbox and pillarbox bars of any colour (also with a
    burned-in label covering < 5 % of a line), the constant or lightly noisy background of a
    film pasted off-centre into a larger frame, and saturated air rows all go. When less than
    8 x 8 pixels would be left, nothing is cut.
    """
    return _content_box(_grey(image))


def _content_box(g: np.ndarray) -> tuple[int, int, int, int]:
    """`content_box` of float32 grey values."""
    h, w = g.shape
    step = max(1, max(h, w) // 128)  # the range from a subsample: cheap, and enough for 2 %
    lo, hi = np.percentile(g[::step, ::step], [0.5, 99.5])
    if hi <= lo:
        lo, hi = float(g.min()), float(g.max())
    if hi <= lo:
        return 0, h, 0, w
    tol = _PAD_TOL * float(hi - lo)
    top = _flat_run(g, tol)
    if top >= h:
        return 0, h, 0, w
    bottom = h - _flat_run(g[::-1], tol)
    rows = g[top:bottom]
    left = _flat_run(rows.T, tol)
    right = w - _flat_run(rows.T[::-1], tol)
    if bottom - top < 8 or right - left < 8:
        return 0, h, 0, w
    return top, bottom, left, right


def _mediastinum_contrast(grey: np.ndarray) -> float:
    """Mean grey of the central strip (x in 45-55 % of the width) minus that of the two lung
    fields beside it (x in 18-33 % and 67-82 %), rows 25-65 % of the height. Positive in the
    display convention (mediastinum and spine brighter than the lungs)."""
    h, w = grey.shape
    rows = slice(int(0.25 * h), int(0.65 * h))
    centre = float(grey[rows, int(0.45 * w): int(0.55 * w)].mean())
    lungs = 0.5 * (float(grey[rows, int(0.18 * w): int(0.33 * w)].mean())
                   + float(grey[rows, int(0.67 * w): int(0.82 * w)].mean()))
    return centre - lungs


def _abdomen_contrast(grey: np.ndarray) -> float:
    """Mean grey of the bottom band (rows 85-97 % of the height, x in 15-85 % of the width: the
    abdomen and diaphragm domes) minus that of the lung fields (rows 30-55 %, x in 18-33 % and
    67-82 %). Positive in the display convention (abdomen brighter than the lungs)."""
    h, w = grey.shape
    bottom = float(grey[int(0.85 * h): max(int(0.85 * h) + 1, int(0.97 * h)), int(0.15 * w): int(0.85 * w)].mean())
    rows = slice(int(0.30 * h), int(0.55 * h))
    lungs = 0.5 * (float(grey[rows, int(0.18 * w): int(0.33 * w)].mean())
                   + float(grey[rows, int(0.67 * w): int(0.82 * w)].mean()))
    return bottom - lungs


def _central_band_sign(grey: np.ndarray) -> float:
    """Position-free version of the mediastinum cue: over rows 25-65 %, the column profile
    (smoothed over 10 % of the width) at each candidate centre c in 35-65 % of the width minus
    the mean of its flanks at distances 12-30 % of the width. Returns max + min over c: positive
    when the strongest central band is bright (display convention), negative when it is dark."""
    h, w = grey.shape
    prof = grey[int(0.25 * h): int(0.65 * h)].mean(axis=0).astype(np.float64)
    prof = ndi.uniform_filter1d(prof, max(3, int(0.1 * w)), mode="nearest")
    near, far = max(1, int(0.12 * w)), max(2, int(0.30 * w))
    c = np.arange(int(0.35 * w), int(0.65 * w) + 1)
    cum = np.concatenate([[0.0], np.cumsum(prof)])
    l0, l1 = np.maximum(0, c - far), np.maximum(1, c - near)  # left flank [l0, l1)
    r0, r1 = np.minimum(w, c + near), np.minimum(w, c + far)  # right flank [r0, r1)
    ok = (l1 > l0) & (r1 > r0)
    if not ok.any():
        return 0.0
    c, l0, l1, r0, r1 = c[ok], l0[ok], l1[ok], r0[ok], r1[ok]
    flanks = 0.5 * ((cum[l1] - cum[l0]) / (l1 - l0) + (cum[r1] - cum[r0]) / (r1 - r0))
    vals = prof[c] - flanks
    return float(vals.max() + vals.min())


def looks_inverted(grey: np.ndarray) -> bool:
    """True when the central strip (mediastinum, spine) is darker than the lung fields beside it,
    as in a radiograph shown with inverted grey values. A weak cue on its own (it fails on
    films with dense lungs or an off-centre patient); `tissue_is_dark` combines it with others."""
    return _mediastinum_contrast(np.asarray(grey, dtype=np.float32)) < 0


def _air(blur: np.ndarray, air_fraction: float, r: int) -> np.ndarray:
    """Air: pixels at or below the air threshold reachable from the border through channels at
    least 2r + 1 pixels wide (see the module docstring, step 4)."""
    p1 = float(np.percentile(blur, 1))
    t = p1 + air_fraction * (_otsu(blur) - p1)
    dark = (blur <= t).astype(np.uint8)
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    core = cv2.erode(dark, disc, borderType=cv2.BORDER_REPLICATE)
    n, labels = cv2.connectedComponents(core, connectivity=4)
    if n <= 1:
        return np.zeros(blur.shape, bool)
    b = 4 * r  # seeds: within b of the border, so a thin bright film edge does not shut air in
    edge = np.concatenate([labels[:b].ravel(), labels[-b:].ravel(), labels[:, :b].ravel(), labels[:, -b:].ravel()])
    keep = np.zeros(n, np.uint8)
    keep[edge] = 1
    keep[0] = 0
    reached = keep[labels]
    return cv2.dilate(reached, disc).astype(bool) & dark.astype(bool)


def _ring_fraction(mask: np.ndarray) -> float:
    """Fraction of the outermost pixel ring of `mask` that is True."""
    return float(np.concatenate([mask[0], mask[-1], mask[1:-1, 0], mask[1:-1, -1]]).mean())


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """`mask` with its holes filled: background not 4-connected to the border becomes True (as
    scipy.ndimage.binary_fill_holes, faster)."""
    h, w = mask.shape
    bg = np.ones((h + 2, w + 2), np.uint8)
    bg[1:-1, 1:-1] = ~mask
    cv2.floodFill(bg, None, (0, 0), 2, flags=4)
    return bg[1:-1, 1:-1] != 2


class _Reading:
    """The body found under one polarity (steps 3-5 on the working copy): `air`, `body` (largest
    non-air piece, holes filled) and `unexplained`, the share of the convex hull of all sizeable
    non-air pieces (>= 1 % of the frame each) that the body does not cover."""

    def __init__(self, small: np.ndarray, air_fraction: float, r: int, n: int | None = None):
        n = n or max(small.shape)  # the working copy's long side (without any air margin added)
        blur = cv2.GaussianBlur(small, (0, 0), sigmaX=2.0 * n / 256)
        self.air = _air(blur, air_fraction, r)
        k = max(3, round(n / 25)) | 1
        pieces = cv2.morphologyEx((~self.air).astype(np.uint8), cv2.MORPH_OPEN,
                                  cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
        count, labels, stats, _ = cv2.connectedComponentsWithStats(pieces, connectivity=8)
        if count <= 1:
            self.body = np.zeros(small.shape, bool)
            self.unexplained = 1.0
            return
        areas = stats[1:, cv2.CC_STAT_AREA]
        self.body = _fill_holes(labels == 1 + int(np.argmax(areas)))
        sizeable = np.zeros(count, np.uint8)
        sizeable[1:] = areas >= 0.01 * pieces.size
        sizeable[1 + int(np.argmax(areas))] = 1
        contours, _ = cv2.findContours(sizeable[labels], cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        hull = np.zeros(pieces.shape, np.uint8)
        cv2.fillPoly(hull, [cv2.convexHull(np.vstack(contours))], 1)
        self.unexplained = 1.0 - float(self.body.sum()) / max(1.0, float(hull.sum()))


def _air_margins(air: np.ndarray, other: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) without the air margins: border rows and columns at least 95 %
    air under either polarity are cut from the outside in (a frame of air around a patient that
    is not flat enough to be padding). Nothing is cut when less than a third of the height or
    width would be left."""
    h, w = air.shape

    def run(share: np.ndarray) -> int:
        off = share < 0.95
        return int(np.argmax(off)) if off.any() else share.size

    rows = np.maximum(air.mean(axis=1), other.mean(axis=1))
    top = run(rows)
    bottom = h - run(rows[::-1])
    cols = np.maximum(air[top:bottom].mean(axis=0), other[top:bottom].mean(axis=0)) if bottom > top else np.ones(w)
    left = run(cols)
    right = w - run(cols[::-1])
    if bottom - top < h / 3 or right - left < w / 3:
        return 0, h, 0, w
    return top, bottom, left, right


def _air_votes(air: np.ndarray, other: np.ndarray) -> int:
    """Votes that `air` is the real background: it leaves the image centre (rows 35-65 %, columns
    40-60 %) at least 90 % free and covers >= 85 % of the outer pixel ring while `other` (the air
    under the opposite polarity) covers <= 5 % (2 votes: a body in a background, nothing of the
    other extreme at the border); >= 60 % and <= 25 % (1 vote); else none."""
    h, w = air.shape
    if float(air[int(0.35 * h): int(0.65 * h) + 1, int(0.4 * w): int(0.6 * w) + 1].mean()) > 0.1:
        return 0
    ring, other_ring = _ring_fraction(air), _ring_fraction(other)
    if ring >= 0.85 and other_ring <= 0.05:
        return 2
    return int(ring >= 0.6 and other_ring <= 0.25)


def _polarity_evidence(g: np.ndarray, air_fraction: float, r: int) -> tuple[dict, _Reading, _Reading]:
    """The cue values and votes of `tissue_is_dark` on the working copy `g` (padding cut off),
    with the readings as it is and flipped."""
    as_is, flipped = _Reading(g, air_fraction, r), _Reading(1.0 - g, air_fraction, r)
    top, bottom, left, right = _air_margins(as_is.air, flipped.air)
    p = g[top:bottom, left:right]  # the patient's box: the place cues refer to it
    cues = {"mediastinum": _mediastinum_contrast(p), "band": _central_band_sign(p),
            "abdomen": _abdomen_contrast(p), "unexplained_as_is": as_is.unexplained,
            "unexplained_flipped": flipped.unexplained}
    votes = {"mediastinum": int(cues["mediastinum"] < -0.1), "band": int(cues["band"] < -0.05),
             "abdomen": int(cues["abdomen"] < -0.05),
             "shape": int(as_is.unexplained - flipped.unexplained >= 0.1 and flipped.unexplained <= 0.1)}
    cues["ring_as_is"], cues["ring_flipped"] = _ring_fraction(as_is.air), _ring_fraction(flipped.air)
    votes["air"] = _air_votes(flipped.air, as_is.air) - _air_votes(as_is.air, flipped.air)
    cues["votes"] = sum(votes.values())
    cues["vote_by"] = votes
    return cues, as_is, flipped


def tissue_is_dark(grey_small: np.ndarray, *, air_fraction: float = 0.4, r: int = 3) -> bool:
    """Decide whether a radiograph is inverted (tissue dark, air bright; MONOCHROME1 shown raw).

    `grey_small`: H x W float grey values in [0, 1] (a downsampled copy, ~256 px on its long
    side); `air_fraction` and `r` as in `body_mask`'s steps 3-4. Padding is cut off first
    (`content_box`). The body is then found under both polarities (steps 3-5, as it is and with
    the grey scale flipped), and five independent pieces of evidence vote; the image counts as
    inverted with two votes or more. The three contrasts are measured in the patient's box: the
    copy without the border rows and columns that are >= 95 % air under either polarity.

    - mediastinum (1 vote): the central strip is darker than the lung fields beside it by more
      than 0.1 (`_mediastinum_contrast` < -0.1);
    - band (1 vote): the strongest central band of the column profile is dark
      (`_central_band_sign` < -0.05);
    - abdomen (1 vote): the bottom band (abdomen, diaphragm) is darker than the lung fields by
      more than 0.05 (`_abdomen_contrast` < -0.05);
    - shape (1 vote): U, the share of the convex hull of the sizeable non-air pieces (>= 1 % of
      the frame each) that the body leaves uncovered, is at least 0.1 larger as it is than
      flipped, and at most 0.1 flipped. Read with the wrong polarity, the bright mediastinum and
      abdomen of a display film become "air" cut into the middle of the frame: the body splits
      (a lung is lost) or is deeply notched; read right, it is one compact piece with the lungs
      inside;
    - air (-2 to +2 votes): where the background is. +2 when the air found flipped leaves the
      image centre (rows 35-65 %, columns 40-60 %) at least 90 % free and covers >= 85 % of the
      outer pixel ring while the air found as it is covers <= 5 % (a body in a bright
      background, nothing dark at the border); +1 for >= 60 % and <= 25 %; the same with the
      polarities swapped counts -2 / -1 (a body in a dark background).

    Each cue alone fails on some display-convention films (dense lungs, an off-centre patient,
    a bright collimator band, a body that fills the frame, a frame of air); on the 98 public
    radiographs (40 Hannover, 58 NIH ChestX-ray14), their inverted, 16-bit, padded and off-centre
    variants and the phantoms this was checked on, no two failed together (no display film was
    flipped; at most one vote), and all inverted copies but two films' were found (Hannover
    b39f5cf9, NIH 00001511_000: one vote each); see benchmarks/bench_polarity.py. Pass
    `inverted=True` to `body_mask` when the photometric interpretation is known (the pipeline's
    image reader already turns MONOCHROME1 into the display convention).
    """
    g = np.asarray(grey_small, dtype=np.float32)
    top, bottom, left, right = _content_box(g)
    if (bottom - top, right - left) != g.shape:
        g = _stretch(g[top:bottom, left:right])  # stretched again without the padding
    return _polarity_evidence(g, air_fraction, r)[0]["votes"] >= 2


def _otsu(x: np.ndarray) -> float:
    """Otsu's threshold of values in [0, 1] over a 256-bin histogram, in [0, 1]."""
    u8 = np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)
    t, _ = cv2.threshold(u8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return float(t) / 255.0


def _working_copy(image: np.ndarray, work_size: int):
    """(grey, content box, content downsampled, the same stretched to [0, 1], scale): the padding
    cut off (`content_box`), area-averaged to `work_size` px on its long side (step 1)."""
    g = _grey(image)
    h, w = g.shape
    if h < 2 or w < 2 or not float(g.max()) > float(g.min()):
        raise ValueError(f"constant image (shape {g.shape}): no contrast to separate the body from the background")
    box = _content_box(g)
    c = g[box[0]:box[1], box[2]:box[3]]
    ch, cw = c.shape
    scale = min(1.0, work_size / max(ch, cw))
    sw, sh = max(8, round(cw * scale)), max(8, round(ch * scale))
    c_small = cv2.resize(c, (sw, sh), interpolation=cv2.INTER_AREA) if (sw, sh) != (cw, ch) else c
    small = _stretch(c_small)  # the percentile stretch of `to_grey01`, on the working copy
    if not float(small.max()) > float(small.min()):
        c_small = cv2.resize(c, (sw, sh), interpolation=cv2.INTER_NEAREST)  # a tiny detail averaged away
        small = _stretch(c_small)
    return g, box, c_small, small, scale


def polarity_cues(image: np.ndarray, *, work_size: int = 256, air_fraction: float = 0.4) -> dict:
    """Why `body_mask(image)` reads `image` as inverted or not: the cue values and votes of
    `tissue_is_dark` on `body_mask`'s working copy. Keys: "mediastinum", "band", "abdomen"
    (contrasts, positive in the display convention), "unexplained_as_is", "unexplained_flipped"
    (the shape cue), "ring_as_is", "ring_flipped" (share of the outer pixel ring that is air),
    "vote_by" (votes per cue, positive = inverted), "votes" (their sum) and "inverted" (votes >= 2)."""
    _, _, _, small, _ = _working_copy(image, work_size)
    cues = _polarity_evidence(small, air_fraction, max(1, round(max(small.shape) / 80)))[0]
    cues["inverted"] = cues["votes"] >= 2
    return cues


def body_mask(image: np.ndarray, *, inverted: bool | None = None, work_size: int = 256,
              air_fraction: float = 0.4) -> np.ndarray:
    """Boolean H x W mask (True = the patient's body); `body_mask_and_polarity` without the
    polarity (arguments, algorithm and errors there)."""
    return body_mask_and_polarity(image, inverted=inverted, work_size=work_size, air_fraction=air_fraction)[0]


def body_mask_and_polarity(image: np.ndarray, *, inverted: bool | None = None, work_size: int = 256,
                           air_fraction: float = 0.4) -> tuple[np.ndarray, bool]:
    """(mask, inverted): the body mask and whether the image was read as inverted (tissue dark),
    so a caller can bring the grey values to the display convention (`1 - to_grey01(image)`).

    The mask: boolean H x W (True = the patient's body) of a chest radiograph, at the size of
    `image` (see the module docstring for the algorithm).

    `image`: greyscale (H x W) or colour (H x W x 3 / 4, alpha ignored) array of any numeric type
    (uint8, uint16, float). Display convention (bright = dense) is assumed, but `inverted=None`
    (default) detects an inverted image (`tissue_is_dark`: the body is found under both
    polarities and five cues vote; `polarity_cues` tells why); `inverted=True` / `False` forces
    the polarity. Padding bars and a flat background around a pasted film (`content_box`) are
    never body. The lungs are inside the mask; air, padding and markers or text lying in the air
    are not. On a film the body fills edge to edge, most of the frame is body.
    Raises ValueError for a constant image (no contrast between body and background) or when no
    body is found.
    """
    g, (top, bottom, left, right), c_small, small, scale = _working_copy(image, work_size)
    h, w = g.shape
    ch, cw = bottom - top, right - left
    sh, sw = small.shape
    n = max(sw, sh)
    r = max(1, round(n / 80))
    pads = (top, h - bottom, left, w - right)
    reading = None
    if inverted is None:
        cues, as_is, flipped = _polarity_evidence(small, air_fraction, r)
        inverted = cues["votes"] >= 2
        reading = flipped if inverted else as_is
    x = 1.0 - small if inverted else small
    if any(pads):
        # padding at the air end of the grey scale is air around the film (a margin up to two
        # opening widths, as dark as it gets); padding at the tissue end is just cut off
        k = max(3, round(n / 25)) | 1
        lo, hi = _stretch_range(c_small)
        edges = (g[top - 1, left:right] if top else None, g[bottom, left:right] if bottom < h else None,
                 g[top:bottom, left - 1] if left else None, g[top:bottom, right] if right < w else None)
        margins = []
        for p, e in zip(pads, edges):
            v = 1.0 if e is None or hi <= lo else (float(np.median(e)) - lo) / (hi - lo)
            airlike = (1.0 - v if inverted else v) <= 0.5
            margins.append(min(2 * k, round(p * scale)) if airlike else 0)
        mt, mb, ml, mr = margins
        x = cv2.copyMakeBorder(x, mt, mb, ml, mr, cv2.BORDER_CONSTANT, value=0.0)
        body = _Reading(x, air_fraction, r, n).body[mt:mt + sh, ml:ml + sw]
    else:
        body = (reading or _Reading(x, air_fraction, r, n)).body
    if not body.any():
        raise ValueError("no body found: nothing brighter than the air level away from the image border")
    if body.shape != (ch, cw):
        soft = cv2.GaussianBlur(body.astype(np.float32), (0, 0), sigmaX=0.7)  # rounds the pixel staircase
        body = cv2.resize(soft, (cw, ch), interpolation=cv2.INTER_LINEAR) >= 0.5
    if (ch, cw) == (h, w):
        return body, bool(inverted)
    out = np.zeros((h, w), bool)
    out[top:bottom, left:right] = body
    return out, bool(inverted)
