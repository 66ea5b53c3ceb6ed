"""Seeded synthetic chest-radiograph phantoms, and a demo dataset in the MIMIC-CXR-JPG 2.x layout.

Conventions (every function here follows them):

- Display: the PATIENT'S RIGHT is on the IMAGE'S LEFT, for PA and AP alike. A lesion on the
  "left" is on the patient's left, so it is drawn on the image's RIGHT half.
- Brightness: bright = dense (bone and soft tissue white, air black), as in a displayed
  MONOCHROME2 radiograph.
- Pixel coordinates: x to the right, y down, origin at the image's top-left corner; pixel
  (row i, column j) covers [j, j+1) x [i, i+1). A box is (x, y, w, h) in pixels, the tight box of
  the lesion's pixels, so x, y, w, h are whole numbers and the box lies inside the image.
- Lung mask values: 0 background, 1 = patient's RIGHT lung (image left), 2 = patient's LEFT lung
  (image right). The mask is the aerated lung as drawn: the heart's silhouette is cut out.
- Zones: "upper", "middle", "lower" are thirds of one lung's vertical extent (the rows where
  the lung mask has that lung), top to bottom. A focal lesion's zone is the third that holds
  its box centre (y + h / 2).
- Lateral views have no laterality: lung_mask is all zeros, lesions have side None, and zones
  are thirds of the (single, internal) lung field.

`make_phantom` draws one image in memory (about 5 ms for 256 x 256 on one CPU core); `write_demo_dataset`
writes a small dataset that the MIMIC-CXR loader reads unchanged, plus the ground truth.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gzip
import hashlib
import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import cv2
import numpy as np
import pandas as pd
from PIL import Image
from pipeline.vocabulary import CHEXPERT_FINDINGS

CHEXPERT_COLUMNS: tuple[str, ...] = CHEXPERT_FINDINGS  # MIMIC-CXR label file columns, in order
# Phantom labels: the 14 CheXpert columns plus Nodule (which CheXpert folds into Lung Lesion).
LABEL_NAMES: tuple[str, ...] = CHEXPERT_COLUMNS + ("Nodule",)

FOCAL_FINDINGS: tuple[str, ...] = ("Consolidation", "Lung Opacity", "Nodule", "Pleural Effusion", "Pneumothorax")
FINDINGS: tuple[str, ...] = FOCAL_FINDINGS + ("Cardiomegaly", "Support Devices")
SIDES: tuple[str, ...] = ("left", "right")
ZONES: tuple[str, ...] = ("upper", "middle", "lower")
VIEWS: tuple[str, ...] = ("PA", "AP", "LATERAL")
MARKER_CORNERS: tuple[str, ...] = ("top_left", "top_right", "bottom_left", "bottom_right")

RIGHT_LUNG = 1  # patient's right lung, drawn on the image's left
LEFT_LUNG = 2  # patient's left lung, drawn on the image's right
_LATERAL_LUNG = 3  # internal label of the lung field of a lateral view (never in lung_mask)

# Zones a finding can occupy (effusions gather at the base, pneumothoraces at the apex).
_FINDING_ZONES: dict[str, tuple[str, ...]] = {
    "Consolidation": ZONES,
    "Lung Opacity": ZONES,
    "Nodule": ZONES,
    "Pleural Effusion": ("lower",),
    "Pneumothorax": ("upper",),
}
# CheXpert labels set to 1.0 by each drawn finding.
_POSITIVE_LABELS: dict[str, tuple[str, ...]] = {
    "Consolidation": ("Consolidation", "Lung Opacity"),
    "Lung Opacity": ("Lung Opacity",),
    "Nodule": ("Nodule", "Lung Lesion"),
    "Pleural Effusion": ("Pleural Effusion",),
    "Pneumothorax": ("Pneumothorax",),
    "Cardiomegaly": ("Cardiomegaly",),
    "Support Devices": ("Support Devices",),
}
# Weights of the random finding draw (findings=None).
_RANDOM_WEIGHTS: dict[str, float] = {
    "Consolidation": 0.22,
    "Lung Opacity": 0.08,
    "Nodule": 0.20,
    "Pleural Effusion": 0.20,
    "Pneumothorax": 0.12,
    "Cardiomegaly": 0.18,
}
# Display intensities on a 0..1 scale (0 black, 1 white).
_AIR = 0.045
_SOFT = 0.52
_HEART = 0.64
_FLUID = 0.60
_DEVICE = 0.95
_MARKER = 0.97

# Probabilities of the label states for a finding absent from the image.
_P_NEGATIVE = 0.60
_P_UNCERTAIN = 0.07  # the rest is "not mentioned" (None)


@dataclass(frozen=True)
class Lesion:
    """A finding drawn at a known place.

    finding: vocabulary name ("Consolidation", "Nodule", "Pleural Effusion", ...).
    side: "left" / "right" = the PATIENT'S side (left is drawn on the image's right); None for
        midline findings (cardiomegaly, support devices) and on lateral views.
    zone: "upper" / "middle" / "lower" third of the lung's vertical extent; None where not
        applicable.
    box: (x, y, w, h) in pixels of the image, top-left origin; the tight box of the lesion's
        pixels (for soft lesions: where the lesion's opacity is at least half its peak).
    """

    finding: str
    side: str | None
    zone: str | None
    box: tuple[float, float, float, float]


@dataclass
class Phantom:
    """One synthetic radiograph and its ground truth.

    image: uint8 H x W, bright = dense. lung_mask: uint8 H x W, 0 / 1 (patient's right lung,
    image left) / 2 (patient's left lung, image right); zeros on lateral views. body_mask: bool
    H x W, the body as drawn (never the side marker). labels: CheXpert-style state per name in
    LABEL_NAMES: 1.0 positive, 0.0 negative, -1.0 uncertain, None not mentioned. marker:
    (letter, corner) of the drawn side marker, marker_box its (x, y, w, h) in pixels. report:
    the FINDINGS text (`findings_sentence`), impression: the IMPRESSION text. device_kinds: the
    drawn support devices ("endotracheal tube", "central venous catheter", "enteric tube").
    """

    image: np.ndarray
    view: str
    lesions: list[Lesion]
    lung_mask: np.ndarray
    body_mask: np.ndarray
    labels: dict[str, float | None]
    marker: tuple[str, str] | None
    report: str
    marker_box: tuple[float, float, float, float] | None = None
    impression: str = ""
    device_kinds: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# small geometry helpers


def _bbox(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """Tight (x, y, w, h) of the True pixels of a 2-D mask; None if empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return (float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1))


def _f(layer: np.ndarray) -> np.ndarray:
    """uint8 drawing layer (0..255) -> float32 coverage 0..1."""
    return layer.astype(np.float32) * np.float32(1.0 / 255.0)


def _main_part(mask: np.ndarray, r: int, seed: tuple[float, float]) -> np.ndarray:
    """The connected part of a boolean mask that holds `seed` (x, y), after an opening of radius
    r pixels (drops slivers, e.g. lung left between the heart's curve and the diaphragm)."""
    m = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, cv2.getStructuringElement(
        cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
    H, W = m.shape
    x, y = min(max(int(seed[0]), 0), W - 1), min(max(int(seed[1]), 0), H - 1)
    if not m[y, x]:
        return m.astype(bool)
    cv2.floodFill(m, np.zeros((H + 2, W + 2), np.uint8), (x, y), 2, flags=4)
    return m == 2


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Float32 0/1 copy of a boolean mask grown by r pixels (square structuring element)."""
    m = mask.astype(np.uint8)
    if r > 0:
        m = cv2.dilate(m, np.ones((2 * r + 1, 2 * r + 1), np.uint8))
    return m.astype(np.float32)


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a float32 array; sigma in pixels (no-op below 0.3 px)."""
    if sigma < 0.3:
        return a
    return cv2.GaussianBlur(a, (0, 0), sigmaX=float(sigma), sigmaY=float(sigma), borderType=cv2.BORDER_REPLICATE)


def _fill_poly(shape: tuple[int, int], pts: np.ndarray, value: int = 1) -> np.ndarray:
    """uint8 mask of a filled polygon given float (x, y) vertices in pixel coordinates."""
    m = np.zeros(shape, np.uint8)
    # Vertex (x, y) in continuous coordinates lies in pixel (floor(y), floor(x)); cv2 addresses
    # pixel centres, so shift by half a pixel. Fixed point with 4 fractional bits.
    p = np.round((np.asarray(pts, np.float64) - 0.5) * 16).astype(np.int32)
    cv2.fillPoly(m, [p], value, lineType=cv2.LINE_8, shift=4)
    return m


def lung_zone_bounds(lung: np.ndarray) -> dict[str, tuple[float, float]]:
    """Zone -> (y0, y1) row interval in pixels, the thirds of a lung's vertical extent.

    `lung` is a boolean mask of one lung (e.g. lung_mask == 2). y is continuous: the lung
    occupies [first row, last row + 1); a point with y0 <= y < y1 is in that zone.
    """
    rows = np.flatnonzero(np.asarray(lung).any(axis=1))
    if rows.size == 0:
        raise ValueError("empty lung mask")
    top, bottom = float(rows[0]), float(rows[-1] + 1)
    ext = bottom - top
    return {z: (top + k * ext / 3.0, top + (k + 1) * ext / 3.0) for k, z in enumerate(ZONES)}


def _box_centre(box: tuple[float, float, float, float]) -> tuple[float, float]:
    x, y, w, h = box
    return x + w / 2.0, y + h / 2.0


# ----------------------------------------------------------------------------------------------
# scene: the anatomy of one phantom


@dataclass
class _Scene:
    """Working state while drawing: float image (0..1) and the anatomical masks."""

    W: int
    H: int
    X: np.ndarray
    Y: np.ndarray
    img: np.ndarray
    body: np.ndarray
    fields: np.ndarray  # uint8: lung labels 1/2 (frontal) or 3 (lateral), heart cut out
    lung_full: np.ndarray  # bool: lungs including the part behind the heart
    heart: np.ndarray  # bool: visible cardiac silhouette
    outer_dir: dict[int, int]  # lung label -> x direction (-1/+1) of its chest wall / posterior side
    frontal: bool
    cx: float
    tw: float
    y_apex: float
    y_clav: float
    x_lat: dict[int, float] = field(default_factory=dict)


def _grid(W: int, H: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (X, Y), float32 H x W."""
    ys = np.arange(H, dtype=np.float32) + 0.5
    xs = np.arange(W, dtype=np.float32) + 0.5
    return np.broadcast_to(xs[None, :], (H, W)), np.broadcast_to(ys[:, None], (H, W))


def _smooth_noise(rng: np.random.Generator, W: int, H: int, cells: int = 10) -> np.ndarray:
    """Low-frequency texture, float32 H x W, roughly unit variance."""
    small = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(small, (W, H), interpolation=cv2.INTER_CUBIC)


def _torso(cx: float, hw: float, W: int, H: int, rng: np.random.Generator) -> np.ndarray:
    """Frontal body outline: neck, rounded shoulders, axillae, chest wall down to the bottom edge."""
    nw = W * rng.uniform(0.075, 0.095)
    y_neck = H * rng.uniform(0.02, 0.05)
    y_sh = y_neck + H * rng.uniform(0.12, 0.16)
    t = np.linspace(0.0, np.pi / 2, 16)
    off = nw + (hw - nw) * np.sin(t)
    ys = y_neck + (y_sh - y_neck) * (1.0 - np.cos(t))
    prof = ([(nw, -1.0), (nw, y_neck)] + list(zip(off, ys))
            + [(hw * 0.985, y_sh + H * 0.06), (hw * 0.94, H * 0.36), (hw * 0.95, H * 0.7), (hw * 0.92, H + 1.0)])
    left = [(cx - o, y) for o, y in prof]
    right = [(cx + o, y) for o, y in reversed(prof)]
    return _fill_poly((H, W), np.array(left + right)).astype(bool)


def _lung_polygon(x_lat: float, x_med: float, y_apex: float, y_cp: float, y_mb: float, dome: float,
                  n: int = 28) -> np.ndarray:
    """Outline of one frontal lung: rounded apex, lateral wall, domed diaphragm, medial border.

    x_lat / x_med: lateral and medial x at the base (either order); y_cp: costophrenic angle
    (the lowest point); y_mb: medial end of the diaphragm; dome: height of the dome above the
    chord, pixels. The lung narrows towards the apex.
    """
    lw = x_med - x_lat  # signed lung width at the base
    ys = np.linspace(y_apex, y_cp, n)
    s = (ys - y_apex) / (y_cp - y_apex)
    u = np.clip(s / 0.38, 0.0, 1.0)
    lat = (x_lat + lw * 0.42 * (1.0 - np.sqrt(1.0 - (1.0 - u) ** 2)) + lw * 0.10 * (1.0 - s)
           + lw * 0.03 * np.clip(s - 0.8, 0.0, None) / 0.2)
    ym = np.linspace(y_apex, y_mb, n)
    sm = (ym - y_apex) / (y_mb - y_apex)
    um = np.clip(sm / 0.22, 0.0, 1.0)
    med = x_med - lw * 0.45 * (1.0 - np.sqrt(1.0 - (1.0 - um) ** 2))
    t = np.linspace(0.0, 1.0, n)
    xd = lat[-1] + (x_med - lat[-1]) * t
    yd = y_cp + (y_mb - y_cp) * t - dome * np.sin(np.pi * t) ** 0.7
    return np.concatenate([
        np.stack([lat, ys], 1),
        np.stack([xd, yd], 1)[1:],
        np.stack([med, ym], 1)[::-1][1:-1],
    ])


def _vessel_trees(layer: np.ndarray, rng: np.random.Generator, x: np.ndarray, y: np.ndarray, ang: np.ndarray,
                  length: np.ndarray, width: float, depth: int = 3) -> None:
    """Draw branching, tapering vessel trees (0..255, fainter and thinner with each generation)
    from the roots (x, y) in directions ang (radians) with segment lengths in pixels."""
    steps = 4
    for level in range(depth):
        n = x.size
        a = ang[:, None] + np.cumsum(rng.normal(0.0, 0.18, (n, steps)), axis=1)
        px = x[:, None] + np.cumsum(np.cos(a) * (length / steps)[:, None], axis=1)
        py = y[:, None] + np.cumsum(np.sin(a) * (length / steps)[:, None], axis=1)
        pts = np.stack([np.concatenate([x[:, None], px], 1), np.concatenate([y[:, None], py], 1)], axis=2)
        cv2.polylines(layer, list(np.round(pts * 4).astype(np.int32)), False, int(255 - 60 * level),
                      max(1, int(round(width * 0.7 ** level))), cv2.LINE_AA, shift=2)
        x, y, end = np.repeat(px[:, -1], 2), np.repeat(py[:, -1], 2), np.repeat(a[:, -1], 2)
        spread = rng.uniform(0.25, 0.6, 2 * n) * np.tile([1.0, -1.0], n)
        ang = end + spread
        length = np.repeat(length, 2) * rng.uniform(0.55, 0.75, 2 * n)


def _frontal_scene(rng: np.random.Generator, W: int, H: int, view: str, edge_to_edge: bool,
                   cardiomegaly: bool) -> _Scene:
    """Draw a PA / AP chest: body, lungs (right one on the image's left), heart, mediastinum."""
    X, Y = _grid(W, H)
    ap = view == "AP"
    cx = W * (0.5 + rng.uniform(-0.012, 0.012))
    if edge_to_edge:
        tw = W * rng.uniform(0.40, 0.44)
        body = np.ones((H, W), bool)
    else:
        tw = W * rng.uniform(0.31, 0.36)
        hw = min(tw / rng.uniform(0.80, 0.85), 0.44 * W)
        body = _torso(cx, hw, W, H, rng)

    y_apex = H * rng.uniform(0.09, 0.13)
    y_cp_r = H * rng.uniform(0.72, 0.79) - (0.05 * H if ap else 0.0)
    y_cp_l = y_cp_r + H * rng.uniform(0.01, 0.025)
    dome_r = H * rng.uniform(0.045, 0.065)
    dome_l = dome_r * rng.uniform(0.8, 0.95)
    x_lat_r = cx - tw
    x_lat_l = cx + tw * rng.uniform(0.95, 0.99)
    x_med_r = cx - W * rng.uniform(0.04, 0.055)
    x_med_l = cx + W * rng.uniform(0.045, 0.06)
    y_mb_r = y_cp_r - H * 0.04
    y_mb_l = y_cp_l - H * 0.05
    lung_r = _fill_poly((H, W), _lung_polygon(x_lat_r, x_med_r, y_apex, y_cp_r, y_mb_r, dome_r)).astype(bool)
    lung_l = _fill_poly((H, W), _lung_polygon(x_lat_l, x_med_l, y_apex + H * 0.006, y_cp_l, y_mb_l, dome_l))
    lung_l = lung_l.astype(bool)

    # Heart: cardiothoracic ratio (heart width / inner thoracic width), about one third right of
    # the midline (image left), two thirds left (image right); its base rests on the diaphragm.
    thorax_w = x_lat_l - x_lat_r
    ctr = rng.uniform(0.58, 0.65) if cardiomegaly else rng.uniform(0.40, 0.46)
    if ap:
        ctr *= 1.05
    hwid = ctr * thorax_w
    hx0 = cx - hwid * rng.uniform(0.28, 0.34)
    h_bottom = y_mb_l + H * 0.01
    h_height = (0.43 * thorax_w / W) * H * rng.uniform(0.85, 0.95) * np.sqrt(ctr / 0.43)
    heart_u8 = np.zeros((H, W), np.uint8)
    # left ventricle: a tilted ellipse whose apex points down to the image's right
    cv2.ellipse(heart_u8, ((hx0 + 0.55 * hwid, h_bottom - 0.45 * h_height), (1.0 * hwid, 0.70 * h_height), 30.0),
                1, -1)
    # right atrium: the gentle right heart border just right of the spine (image left)
    cv2.ellipse(heart_u8, ((hx0 + 0.22 * hwid, h_bottom - 0.42 * h_height), (0.44 * hwid, 0.75 * h_height), 0.0),
                1, -1)
    heart_u8[int(np.ceil(h_bottom + H * 0.02 - 0.5)):] = 0
    heart = heart_u8.astype(bool)
    # the heart's top merges into the mediastinum (a column between the hila), plus the aortic knob
    sil_u8 = heart_u8.copy()
    sil_u8[int(y_apex):int(h_bottom), max(0, int(cx - 0.06 * W)):int(cx + 0.08 * W)] = 1
    cv2.ellipse(sil_u8, ((cx + W * 0.045, y_apex + H * 0.16), (W * 0.06, H * 0.056), 0.0), 1, -1)
    silhouette = sil_u8.astype(bool)

    fields = np.zeros((H, W), np.uint8)
    y_seed = y_apex + 0.3 * (y_cp_r - y_apex)  # a point well inside each lung, above the heart
    for lab, lung, xs in ((RIGHT_LUNG, lung_r, (x_lat_r + x_med_r) / 2), (LEFT_LUNG, lung_l, (x_lat_l + x_med_l) / 2)):
        fields[_main_part(lung & ~silhouette & body, max(1, int(round(0.012 * W))), (xs, y_seed))] = lab
    lung_full = (fields > 0) | ((lung_r | lung_l) & silhouette & body)  # aerated lung + the part behind the heart
    heart &= body

    # --- densities
    soft = np.float32(_SOFT) + np.float32(0.07) * Y / H
    img = np.where(body, soft, np.float32(_AIR) + np.float32(0.02) * Y / H).astype(np.float32)
    if not edge_to_edge:
        bf = _blur(body.astype(np.float32), 1.2)
        img = _AIR + (img - _AIR) * bf
    lung_f = _blur(lung_full.astype(np.float32), 1.2)
    medial = np.clip(1.0 - np.abs(X - cx) / tw, 0.0, 1.0) ** 2
    lung_val = (rng.uniform(0.13, 0.18) + 0.09 * medial
                + 0.05 * np.clip((y_apex + 0.10 * H - Y) / (0.10 * H), 0, 1)
                + 0.04 * np.clip((Y - (y_cp_r - 0.15 * H)) / (0.15 * H), 0, 1)
                + 0.015 * _smooth_noise(rng, W, H, 12))
    # vascular markings: tapering branches from each hilum
    ves = np.zeros((H, W), np.uint8)
    hy = y_apex + (y_cp_r - y_apex) * 0.45
    roots_x, roots_a, roots_l = [], [], []
    for x_med, x_lat in ((x_med_r, x_lat_r), (x_med_l, x_lat_l)):
        d = np.sign(x_lat - x_med)
        angs = np.linspace(-1.1, 1.1, 5) + rng.normal(0, 0.08, 5)
        roots_x.append(np.full(5, x_med + d * abs(x_lat - x_med) * 0.12))
        roots_a.append(angs if d > 0 else np.pi - angs)
        roots_l.append(abs(x_lat - x_med) * rng.uniform(0.30, 0.40, 5))
    _vessel_trees(ves, rng, np.concatenate(roots_x), np.full(10, hy), np.concatenate(roots_a),
                  np.concatenate(roots_l), max(1.0, min(W, H) / 100.0))
    lung_val = lung_val + 0.06 * _blur(_f(ves), 0.7)
    img = img * (1.0 - lung_f) + lung_val * lung_f
    sil = silhouette.astype(np.float32)
    sil_f = np.maximum(_blur(sil, 1.0), sil)  # opaque inside: no lung shows through the heart
    img = img * (1.0 - sil_f) + soft * sil_f
    return _Scene(W=W, H=H, X=X, Y=Y, img=img.astype(np.float32), body=body, fields=fields, lung_full=lung_full,
                  heart=heart, outer_dir={RIGHT_LUNG: -1, LEFT_LUNG: +1}, frontal=True, cx=cx, tw=tw,
                  y_apex=y_apex, y_clav=y_apex + H * (0.015 if ap else 0.05),
                  x_lat={RIGHT_LUNG: x_lat_r, LEFT_LUNG: x_lat_l})


def _frontal_bones(rng: np.random.Generator, sc: _Scene, view: str) -> None:
    """Add the spine, posterior and anterior ribs and the clavicles (additive densities)."""
    W, H, X, Y, cx, tw = sc.W, sc.H, sc.X, sc.Y, sc.cx, sc.tw
    sw = W * 0.036
    spine = np.clip(1.0 - np.abs(X - cx) / sw, 0.0, 1.0) ** 0.6
    period = H * 0.048
    vert = 0.78 + 0.22 * (np.cos(2 * np.pi * (Y - sc.y_apex) / period) > -0.55)
    bodyf = sc.body.astype(np.float32)
    sc.img += 0.15 * spine * vert * bodyf

    post = np.zeros((H, W), np.uint8)
    ant = np.zeros((H, W), np.uint8)
    y_base = max(sc.y_apex + 0.5 * H, float(np.flatnonzero(sc.lung_full.any(axis=1))[-1]))
    n_ribs = 9
    spacing = (y_base - sc.y_apex) / (n_ribs - 0.3)
    t_rib = max(1, int(round(0.014 * H)))
    for k in range(n_ribs):
        yk = sc.y_apex - 0.03 * H + k * spacing
        b = H * rng.uniform(0.15, 0.18)
        a = tw * 1.04
        for a0, a1 in ((180, 270), (270, 360)):
            cv2.ellipse(post, (int(round(cx * 4)), int(round((yk + b) * 4))), (int(round(a * 4)), int(round(b * 4))),
                        0, a0, a1, 255, t_rib, cv2.LINE_AA, shift=2)
        ya = sc.y_apex + 0.06 * H + k * spacing * 0.8
        for a0, a1 in ((100, 160), (20, 80)):
            cv2.ellipse(ant, (int(round(cx * 4)), int(round((ya - 0.12 * H) * 4))),
                        (int(round(a * 0.95 * 4)), int(round(0.12 * H * 4))), 0, a0, a1, 255, t_rib, cv2.LINE_AA, shift=2)
    lungish = 0.35 + 0.65 * _blur((sc.fields > 0).astype(np.float32), 2.0)
    post_f = _blur(_f(post), 0.9) * (np.abs(X - cx) > sw * 1.1)
    ant_f = _blur(_f(ant), 1.4)
    sc.img += (0.09 * post_f + 0.035 * ant_f) * bodyf * lungish

    clav = np.zeros((H, W), np.uint8)
    rise = 0.05 * H if view == "PA" else 0.012 * H
    for sgn in (-1, 1):
        pts = np.array([[cx + sgn * 0.035 * W, sc.y_clav + 0.012 * H],
                        [cx + sgn * 0.15 * W, sc.y_clav + 0.004 * H],
                        [cx + sgn * tw * 0.75, sc.y_clav - rise * 0.6],
                        [cx + sgn * tw * 1.08, sc.y_clav - rise]])
        cv2.polylines(clav, [np.round(pts * 4).astype(np.int32)], False, 255, max(2, int(round(0.016 * H))),
                      cv2.LINE_AA, shift=2)
    sc.img += 0.11 * _blur(_f(clav), 1.0) * bodyf


def _lateral_scene(rng: np.random.Generator, W: int, H: int, edge_to_edge: bool, cardiomegaly: bool) -> _Scene:
    """Draw a lateral chest (anterior on the image's left, spine on the right); no laterality."""
    X, Y = _grid(W, H)
    if edge_to_edge:
        body = np.ones((H, W), bool)
        xa, xp = W * rng.uniform(0.14, 0.18), W * rng.uniform(0.76, 0.80)
    else:
        f0, b0 = W * rng.uniform(0.13, 0.17), W * rng.uniform(0.86, 0.9)
        # neck and raised arms at the top, chest wall in front (left), back (right)
        pts = np.array([[W * 0.30, -1.0], [W * 0.24, H * 0.10], [f0 + W * 0.02, H * 0.22], [f0, H * 0.45],
                        [f0 + W * 0.005, H * 0.7], [f0 + W * 0.04, H + 1.0], [b0 - W * 0.03, H + 1.0],
                        [b0, H * 0.6], [b0 - W * 0.005, H * 0.25], [W * 0.78, H * 0.08], [W * 0.76, -1.0]])
        body = _fill_poly((H, W), pts).astype(bool)
        xa, xp = f0 + W * 0.06, b0 - W * 0.12
    y_top = H * rng.uniform(0.09, 0.13)
    ry = H * 0.16
    y_ant = H * rng.uniform(0.58, 0.63)
    y_post = H * rng.uniform(0.76, 0.82)
    dome = H * rng.uniform(0.07, 0.09)
    th = np.linspace(np.pi, 2 * np.pi, 28)
    xc, rx = (xa + xp) / 2, (xp - xa) / 2
    # the apex is narrower than the base: the arc spans the middle of the chest
    arc = np.stack([xc + 0.02 * W + rx * 0.85 * np.cos(th), y_top + ry + ry * np.sin(th)], 1)
    t = np.linspace(0, 1, 28)
    dia = np.stack([xp + (xa - xp) * t, y_post + (y_ant - y_post) * t - dome * np.sin(np.pi * t) ** 0.7], 1)
    poly = np.concatenate([arc, [[xp, y_top + 1.6 * ry], [xp + 0.01 * W, y_post - 0.02 * H]], dia,
                           [[xa, y_top + 1.4 * ry]]])
    lung = _fill_poly((H, W), poly).astype(bool) & body
    scale = rng.uniform(1.22, 1.32) if cardiomegaly else rng.uniform(0.95, 1.05)
    heart_u8 = np.zeros((H, W), np.uint8)
    hc = (xa + 0.15 * W * scale, y_ant - 0.08 * H * scale)
    cv2.ellipse(heart_u8, (hc, (0.40 * W * scale, 0.30 * H * scale), -30.0), 1, -1)
    heart = heart_u8.astype(bool) & (Y < y_ant + 0.03 * H) & body
    fields = np.where(lung & ~heart, _LATERAL_LUNG, 0).astype(np.uint8)

    soft = np.float32(_SOFT) + np.float32(0.08) * Y / H
    img = np.where(body, soft, np.float32(_AIR)).astype(np.float32)
    if not edge_to_edge:
        img = _AIR + (img - _AIR) * _blur(body.astype(np.float32), 1.2)
    lung_f = _blur(lung.astype(np.float32), 1.5)
    lung_val = (rng.uniform(0.25, 0.30) + 0.02 * _smooth_noise(rng, W, H, 10)
                + 0.06 * np.clip((Y - (y_ant - 0.1 * H)) / (0.2 * H), 0, 1)
                + 0.05 * np.clip((y_top + 0.1 * H - Y) / (0.1 * H), 0, 1))
    img = img * (1 - lung_f) + lung_val * lung_f
    heart_f = _blur(heart.astype(np.float32), 1.5)
    img = img * (1 - heart_f) + (lung_val + 0.6 * (soft - lung_val)) * heart_f  # lungs overlap the heart
    return _Scene(W=W, H=H, X=X, Y=Y, img=img, body=body, fields=fields, lung_full=lung, heart=heart,
                  outer_dir={_LATERAL_LUNG: +1}, frontal=False, cx=xc, tw=rx, y_apex=y_top, y_clav=y_top,
                  x_lat={_LATERAL_LUNG: xp})


def _lateral_bones(rng: np.random.Generator, sc: _Scene) -> None:
    """Vertebral bodies (posterior, image right), sternum (anterior) and faint ribs."""
    W, H = sc.W, sc.H
    bones = np.zeros((H, W), np.uint8)
    x0 = sc.x_lat[_LATERAL_LUNG] - 0.02 * W
    vh, gap = 0.036 * H, 0.012 * H
    y = 0.04 * H
    while y < H:
        tilt = 0.01 * W * (y / H - 0.5)
        pts = np.array([[x0 + tilt, y], [x0 + 0.085 * W + tilt, y], [x0 + 0.085 * W + tilt, y + vh], [x0 + tilt, y + vh]])
        bones |= _fill_poly((H, W), pts)
        y += vh + gap
    ster = np.zeros((H, W), np.uint8)
    xs = sc.cx - sc.tw - 0.035 * W
    cv2.line(ster, (int(xs), int(0.22 * H)), (int(xs + 0.02 * W), int(0.58 * H)), 255, max(2, int(0.02 * W)), cv2.LINE_AA)
    ribs = np.zeros((H, W), np.uint8)
    for k in range(8):
        yk = sc.y_apex + 0.05 * H + k * 0.075 * H
        cv2.ellipse(ribs, (int(sc.cx + 0.05 * W), int(yk)), (int(sc.tw * 1.1), int(0.05 * H)), 15, 180, 360, 255,
                    max(1, int(0.01 * H)), cv2.LINE_AA)
    bodyf = sc.body.astype(np.float32)
    sc.img += (0.17 * _blur(bones.astype(np.float32), 1.0) + 0.12 * _blur(_f(ster), 1.0)
               + 0.05 * _blur(_f(ribs), 1.0)) * bodyf


# ----------------------------------------------------------------------------------------------
# findings


def _lung_of(sc: _Scene, side: str | None) -> int:
    if not sc.frontal:
        return _LATERAL_LUNG
    return LEFT_LUNG if side == "left" else RIGHT_LUNG


def _centre_ok(lung: np.ndarray, box: tuple[float, float, float, float], zone: str | None) -> bool:
    """The box centre lies on the lung and, if zone is given, within that zone's third."""
    cxb, cyb = _box_centre(box)
    H, W = lung.shape
    if not (0 <= cxb < W and 0 <= cyb < H) or not lung[int(cyb), int(cxb)]:
        return False
    if zone is None:
        return True
    y0, y1 = lung_zone_bounds(lung)[zone]
    return y0 <= cyb < y1


def _pick_point(rng: np.random.Generator, lung: np.ndarray, dist: np.ndarray, y0: float, y1: float,
                margin: float) -> tuple[float, float] | None:
    """A random point in rows [y0, y1) of the lung at least `margin` px from its edge."""
    for k in range(20):
        yc = rng.uniform(y0, y1)
        row = int(min(max(yc, 0), lung.shape[0] - 1))
        cols = np.flatnonzero(dist[row] > margin * (1.0 - k / 20.0))  # relax the margin on retries
        if cols.size:
            return float(rng.choice(cols) + rng.uniform(0.0, 1.0)), yc
    return None


def _draw_opacity(rng: np.random.Generator, sc: _Scene, lung_id: int, zone: str, strength: tuple[float, float]
                  ) -> tuple[float, float, float, float]:
    """Consolidation / airspace opacity: an irregular soft blob inside one lung zone."""
    lung = sc.fields == lung_id
    z0, z1 = lung_zone_bounds(lung)[zone]
    zh = z1 - z0
    dist = cv2.distanceTransform(lung.astype(np.uint8), cv2.DIST_L2, 3)
    for _ in range(40):
        p = _pick_point(rng, lung, dist, z0 + 0.3 * zh, z1 - 0.3 * zh, 0.03 * sc.W)
        if p is None:
            continue
        xc, yc = p
        row_w = float(np.count_nonzero(lung[int(yc)]))
        rx = max(4.0, row_w * rng.uniform(0.22, 0.34))
        ry = max(4.0, zh * rng.uniform(0.30, 0.42))
        blob = np.zeros((sc.H, sc.W), np.uint8)
        cv2.ellipse(blob, ((xc, yc), (2 * rx, 2 * ry), rng.uniform(-30, 30)), 1, -1)
        for _k in range(3):
            ox, oy = rng.uniform(-0.6, 0.6) * rx, rng.uniform(-0.6, 0.6) * ry
            cv2.ellipse(blob, ((xc + ox, yc + oy), (rx * rng.uniform(0.6, 1.1), ry * rng.uniform(0.6, 1.1)),
                               rng.uniform(0, 180)), 1, -1)
        alpha = _blur(blob.astype(np.float32), 0.22 * min(rx, ry))
        alpha = np.clip(alpha * 1.25, 0.0, 1.0) * _blur(_dilate(lung, 1), 1.0)
        # mottled texture and a few air bronchograms (dark branching lines) inside the opacity
        tex = 1.0 + 0.12 * _smooth_noise(rng, sc.W, sc.H, 24)
        br = np.zeros((sc.H, sc.W), np.uint8)
        for _k in range(3):
            ang = rng.uniform(0, 2 * np.pi)
            cv2.line(br, (int(xc), int(yc)), (int(xc + np.cos(ang) * rx * 0.7), int(yc + np.sin(ang) * ry * 0.7)), 255, 1,
                     cv2.LINE_AA)
        k = rng.uniform(*strength)
        a = np.clip(alpha * k * tex, 0.0, 1.0) * (1.0 - 0.2 * _blur(_f(br), 0.6))
        vis = alpha >= 0.5
        box = _bbox(vis)
        if box is None or not _centre_ok(lung, box, zone):
            continue
        sc.img = sc.img * (1.0 - a) + _FLUID * a
        return box
    raise RuntimeError(f"could not place an opacity in the {zone} zone")


def _draw_nodule(rng: np.random.Generator, sc: _Scene, lung_id: int, zone: str) -> tuple[float, float, float, float]:
    """A small, well-defined round opacity (radius 1.6-2.8 % of the shorter image side)."""
    lung = sc.fields == lung_id
    z0, z1 = lung_zone_bounds(lung)[zone]
    zh = z1 - z0
    r = max(3.0, min(sc.W, sc.H) * rng.uniform(0.016, 0.028))
    dist = cv2.distanceTransform(lung.astype(np.uint8), cv2.DIST_L2, 3)
    for _ in range(40):
        p = _pick_point(rng, lung, dist, z0 + 0.2 * zh, z1 - 0.2 * zh, r + 2.0)
        if p is None:
            continue
        xc, yc = p
        d = np.hypot(sc.X - xc, sc.Y - yc)
        alpha = np.clip(r - d + 0.5, 0.0, 1.0)
        box = _bbox(alpha >= 0.5)
        if box is None or not _centre_ok(lung, box, zone):
            continue
        sc.img += (0.26 + 0.08 * np.clip(1 - (d / r) ** 2, 0, 1)) * alpha
        return box
    raise RuntimeError(f"could not place a nodule in the {zone} zone")


def _effusion_levels(rng: np.random.Generator, tries: int = 30, steps: int = 24):
    """(fill, rise) pairs to try for an effusion, as fractions of the lung's height: `tries`
    random levels (fill 20-30 %, the meniscus rising a further 6-12 % at the chest wall), then
    `steps` ever lower levels down to the costophrenic angle. The lower levels serve lungs whose
    base is a thin crescent (a large heart on an AP view of a tall image cuts most of the left
    base away): there a high meniscus's box is the crescent's box, whose centre lies on the heart."""
    for _ in range(tries):
        yield rng.uniform(0.20, 0.30), rng.uniform(0.06, 0.12)
    for f in np.linspace(0.20, 0.0, steps, endpoint=False):
        yield float(f), float(f) * 0.4


def _draw_effusion(rng: np.random.Generator, sc: _Scene, lung_id: int) -> tuple[float, float, float, float]:
    """Pleural fluid at the lung base: a meniscus rising towards the chest wall (lateral) or the
    posterior sulcus (lateral view), blunting the costophrenic angle. Its box centre lies on the
    lung in the lower zone (levels: `_effusion_levels`; the lowest is the lung's bottom row)."""
    lung = sc.fields == lung_id
    rows = np.flatnonzero(lung.any(axis=1))
    cols = np.flatnonzero(lung.any(axis=0))
    top, bot = float(rows[0]), float(rows[-1] + 1)
    h = bot - top
    d = sc.outer_dir[lung_id]
    x_out = float(cols[0]) if d < 0 else float(cols[-1] + 1)
    x_in = float(cols[-1] + 1) if d < 0 else float(cols[0])
    lung_f = _blur(_dilate(lung, 2), 1.0)
    r = np.clip((sc.X - x_in) / (x_out - x_in), 0.0, 1.0)
    soft = max(1.5, 0.012 * sc.H)
    for f, rise in _effusion_levels(rng):
        lv_in = bot - max(f * h, 1.0)  # at least the bottom row is under fluid
        lv_out = lv_in - rise * h
        surf = lv_in - (lv_in - lv_out) * r ** 2
        alpha = np.clip(0.5 + (sc.Y - surf) / soft, 0.0, 1.0) * lung_f
        box = _bbox((alpha >= 0.5) & lung)
        if box is None or not _centre_ok(lung, box, "lower"):
            continue
        grad = np.clip((sc.Y - surf) / (0.08 * sc.H), 0.0, 1.0)  # denser deeper in the fluid
        k = alpha * (0.80 + 0.15 * grad)
        sc.img = sc.img * (1.0 - k) + _FLUID * k
        return box
    raise RuntimeError(f"could not place a pleural effusion in a lung of rows {int(top)}-{int(bot) - 1}")


def _draw_pneumothorax(rng: np.random.Generator, sc: _Scene, lung_id: int) -> tuple[float, float, float, float]:
    """Apical pneumothorax: a lucent crescent along the apex / chest wall with no lung markings,
    bounded by a thin bright visceral pleural line."""
    lung = sc.fields == lung_id
    rows = np.flatnonzero(lung.any(axis=1))
    cols = np.flatnonzero(lung.any(axis=0))
    top, bot = float(rows[0]), float(rows[-1] + 1)
    h = bot - top
    width = float(cols[-1] + 1 - cols[0])
    xmid = (cols[0] + cols[-1] + 1) / 2.0
    # distance to the chest wall / apex (the lateral view's lung field includes the heart's shadow)
    outline = lung if sc.frontal else sc.lung_full
    dist = cv2.distanceTransform(outline.astype(np.uint8), cv2.DIST_L2, 3)
    for _ in range(30):
        if sc.frontal:
            depth0 = width * rng.uniform(0.13, 0.22)
            ymax = top + h * rng.uniform(0.40, 0.55)
        else:
            depth0 = h * rng.uniform(0.06, 0.10)
            ymax = top + h * rng.uniform(0.30, 0.40)
        taper = np.clip(1.0 - ((sc.Y - top) / (ymax - top)) ** 2, 0.0, 1.0)
        region = lung & (dist < depth0 * np.sqrt(taper)) & (sc.Y < ymax)
        if sc.frontal:
            region &= (sc.X - xmid) * sc.outer_dir[lung_id] > -0.15 * width
        box = _bbox(region)
        if box is None or not _centre_ok(lung, box, "upper"):
            continue
        rf = _blur(region.astype(np.float32), 0.7)
        val = np.float32(rng.uniform(0.06, 0.09)) + 0.008 * _smooth_noise(rng, sc.W, sc.H, 16)
        sc.img = sc.img * (1.0 - rf) + val * rf
        edge = cv2.dilate(region.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool) & ~region & lung
        sc.img += 0.16 * _blur(edge.astype(np.float32), 0.5)
        return box
    raise RuntimeError("could not place a pneumothorax")


def _draw_devices(rng: np.random.Generator, sc: _Scene) -> tuple[tuple[float, float, float, float], list[str]]:
    """Radiopaque lines: an endotracheal tube and/or a central venous catheter (frontal), or a
    tube crossing the lateral view. Returns the union box and the device kinds."""
    W, H = sc.W, sc.H
    layer = np.zeros((H, W), np.uint8)
    t = max(2, int(round(min(W, H) / 110)))
    kinds: list[str] = []
    u = rng.random()
    if not sc.frontal:
        pts = np.array([[sc.cx - 0.05 * W, 0.0], [sc.cx, 0.25 * H], [sc.cx + 0.08 * W, 0.55 * H], [sc.cx + 0.05 * W, 0.85 * H]])
        cv2.polylines(layer, [np.round(pts * 4).astype(np.int32)], False, 255, t, cv2.LINE_AA, shift=2)
        kinds.append("enteric tube")
    else:
        if u < 0.7:
            x0 = sc.cx + W * rng.uniform(-0.012, 0.012)
            tip = sc.y_apex + H * rng.uniform(0.12, 0.18)
            pts = np.array([[x0, 0.0], [x0 + W * rng.uniform(-0.01, 0.01), tip * 0.5], [sc.cx + W * 0.004, tip]])
            cv2.polylines(layer, [np.round(pts * 4).astype(np.int32)], False, 255, t, cv2.LINE_AA, shift=2)
            kinds.append("endotracheal tube")
        if u >= 0.4:
            sgn = -1 if rng.random() < 0.7 else 1  # right subclavian (image left) is the common route
            p0 = np.array([sc.cx + sgn * sc.tw * 0.95, sc.y_clav + 0.02 * H])
            p1 = np.array([sc.cx + sgn * 0.12 * W, sc.y_clav - 0.005 * H])
            p2 = np.array([sc.cx - 0.03 * W, sc.y_apex + H * rng.uniform(0.18, 0.24)])
            s = np.linspace(0, 1, 24)[:, None]
            curve = (1 - s) ** 2 * p0 + 2 * (1 - s) * s * p1 + s ** 2 * p2
            cv2.polylines(layer, [np.round(curve * 4).astype(np.int32)], False, 255, max(2, t - 1), cv2.LINE_AA, shift=2)
            kinds.append("central venous catheter")
    a = _f(layer)
    sc.img = sc.img * (1.0 - 0.85 * a) + _DEVICE * 0.85 * a
    box = _bbox(layer > 0)
    assert box is not None
    return box, kinds


def _draw_marker(rng: np.random.Generator, img: np.ndarray, body: np.ndarray, letter: str, frontal: bool
                 ) -> tuple[str, tuple[float, float, float, float], np.ndarray]:
    """Draw a bright side-marker letter in a corner outside the body.

    On frontal views "L" goes to a corner on the image's right (the patient's left) and "R" to
    one on the image's left. Returns (corner, box, carve) where carve is the marker's box mask,
    to be removed from body_mask if no corner was free of body (edge-to-edge images).
    """
    H, W = body.shape
    font = cv2.FONT_HERSHEY_SIMPLEX
    scale = 0.055 * H / 22.0
    thick = max(1, int(round(scale * 2.2)))
    (tw_, th_), base = cv2.getTextSize(letter, font, scale, thick)
    mx, my = max(2, int(0.02 * W)), max(2, int(0.02 * H))
    if frontal:  # the letter's own side only, so the marker never contradicts the anatomy
        sides: tuple[str, ...] = ("right",) if letter == "L" else ("left",)
    else:
        sides = ("left", "right") if rng.random() < 0.5 else ("right", "left")
    order = [f"{v}_{s}" for s in sides for v in ("top", "bottom")]
    if rng.random() < 0.25:
        order[0], order[1] = order[1], order[0]

    def origin(corner: str) -> tuple[int, int]:
        x = mx if corner.endswith("left") else W - mx - tw_
        y = my + th_ if corner.startswith("top") else H - my - base
        return x, y

    chosen = None
    for corner in order:
        x, y = origin(corner)
        if not body[max(0, y - th_ - 3):min(H, y + base + 3), max(0, x - 3):min(W, x + tw_ + 3)].any():
            chosen = (corner, x, y)
            break
    if chosen is None:  # no free corner (edge-to-edge body): draw over the body, carve it out below
        chosen = (order[0], *origin(order[0]))
    corner, x, y = chosen
    layer = np.zeros((H, W), np.uint8)
    cv2.putText(layer, letter, (x, y), font, scale, 255, thick, cv2.LINE_AA)
    a = layer.astype(np.float32) / 255.0
    img[:] = img * (1.0 - a) + _MARKER * a
    box = _bbox(layer > 0)
    assert box is not None
    bx, by, bw, bh = (int(v) for v in box)
    carve = np.zeros((H, W), bool)
    carve[max(0, by - 2):by + bh + 2, max(0, bx - 2):bx + bw + 2] = True
    return corner, box, carve


# ----------------------------------------------------------------------------------------------
# labels and report text


def _labels(rng: np.random.Generator, lesions: Sequence[Lesion]) -> dict[str, float | None]:
    """CheXpert-style labels: 1.0 for drawn findings; absent ones mostly 0.0, some None (not
    mentioned), rarely -1.0 (uncertain; only for pathologies, and only when one is present). "No Finding" is 1.0
    when no pathology (anything but support devices) is positive or uncertain, else None (as in
    MIMIC-CXR's label files, where No Finding is 1.0 or blank)."""
    pos: set[str] = set()
    for les in lesions:
        pos.update(_POSITIVE_LABELS[les.finding])
    abnormal = bool(pos - {"Support Devices"})
    labels: dict[str, float | None] = {}
    for name in CHEXPERT_COLUMNS:
        if name == "No Finding":
            continue
        if name in pos:
            labels[name] = 1.0
            continue
        u = rng.random()
        if u < _P_NEGATIVE:
            labels[name] = 0.0
        elif u < _P_NEGATIVE + _P_UNCERTAIN and abnormal and name != "Support Devices":
            labels[name] = -1.0
        else:
            labels[name] = None
    labels["Nodule"] = 1.0 if "Nodule" in pos else labels["Lung Lesion"]
    pathology_flagged = any(labels[n] in (1.0, -1.0) for n in CHEXPERT_COLUMNS
                            if n not in ("No Finding", "Support Devices"))
    labels["No Finding"] = None if pathology_flagged else 1.0
    return {n: labels[n] for n in LABEL_NAMES}


def lesion_phrase(lesion: Lesion, device_kind: str | None = None) -> str:
    """Lower-case phrase naming a lesion, e.g. "left lower zone consolidation"."""
    f = lesion.finding
    side = f"{lesion.side} " if lesion.side else ""
    zone = f"{lesion.zone} zone " if lesion.zone else ""
    if f in ("Consolidation", "Nodule"):
        return f"{side}{zone}{f.lower()}"
    if f == "Lung Opacity":
        return f"{side}{zone}opacity"
    if f == "Pleural Effusion":
        return f"{side}pleural effusion"
    if f == "Pneumothorax":
        return f"{side}apical pneumothorax"
    if f == "Support Devices":
        return f"{device_kind or 'support device'} in place"
    return f.lower()


def findings_sentence(lesions: Sequence[Lesion], negatives: Iterable[str], uncertain: Iterable[str] = (),
                      device_kinds: Sequence[str] = ()) -> str:
    """The phantom report's FINDINGS text.

    Rule: one sentence per lesion, in order ("left lower zone consolidation.", "right pleural
    effusion.", "left apical pneumothorax.", "cardiomegaly.", "endotracheal tube in place."); then
    "cannot exclude X." for each uncertain finding and "no X." for each negative one (names lower
    case, in the order given). Without any pathological lesion or uncertainty the text opens with
    "no acute cardiopulmonary abnormality.". Findings not mentioned (label None) do not appear.
    """
    parts: list[str] = []
    unc = [u for u in uncertain if u != "No Finding"]
    kinds = list(device_kinds)
    for les in lesions:
        kind = kinds.pop(0) if les.finding == "Support Devices" and kinds else None
        parts.append(lesion_phrase(les, kind) + ".")
    if not any(les.finding != "Support Devices" for les in lesions) and not unc:
        parts.append("no acute cardiopulmonary abnormality.")
    parts += [f"cannot exclude {u.lower()}." for u in unc]
    parts += [f"no {n.lower()}." for n in negatives if n != "No Finding"]
    return " ".join(parts)


def _impression(lesions: Sequence[Lesion], uncertain: Sequence[str]) -> str:
    path = [lesion_phrase(les) for les in lesions if les.finding != "Support Devices"]
    if not path:
        text = "No acute cardiopulmonary process."
    else:
        text = "; ".join(path) + "."
        text = text[0].upper() + text[1:]
    if uncertain:
        text += " " + " ".join(f"Cannot exclude {u.lower()}." for u in uncertain)
    return text


def _report_lists(labels: Mapping[str, float | None]) -> tuple[list[str], list[str]]:
    """(negatives, uncertain) names from labels, CheXpert column order (Nodule mirrors Lung Lesion)."""
    neg = [n for n in CHEXPERT_COLUMNS if n != "No Finding" and labels.get(n) == 0.0]
    unc = [n for n in CHEXPERT_COLUMNS if n != "No Finding" and labels.get(n) == -1.0]
    return neg, unc


# ----------------------------------------------------------------------------------------------
# the generator


def _choose_findings(rng: np.random.Generator, forced_focal: bool, zone: str | None) -> list[str]:
    u = rng.random()
    k = 0 if u < 0.30 else (1 if u < 0.80 else 2)
    names = list(_RANDOM_WEIGHTS)
    w = np.array([_RANDOM_WEIGHTS[n] for n in names])
    picks = [names[i] for i in rng.choice(len(names), size=k, replace=False, p=w / w.sum())] if k else []
    focal = [p for p in picks if p in FOCAL_FINDINGS]
    if forced_focal and (not focal or (zone is not None and zone not in _FINDING_ZONES[focal[0]])):
        ok = [f for f in FOCAL_FINDINGS if zone is None or zone in _FINDING_ZONES[f]]
        picks.insert(0, ok[int(rng.integers(len(ok)))])
    return picks


def make_phantom(rng: np.random.Generator, *, width: int = 256, height: int = 256, view: str = "PA",
                 findings: Sequence[str] | None = None, side: str | None = None, zone: str | None = None,
                 side_marker: str | None = None, support_devices: bool | None = None,
                 edge_to_edge: bool = False) -> Phantom:
    """Draw one synthetic chest radiograph (uint8, width x height pixels) with known findings.

    findings: names from FINDINGS (repeats allowed); None draws a random set (about 30 % none).
    side / zone: force the placement of the first focal finding (side = PATIENT side; not
    allowed on LATERAL views; zone must suit the finding: effusions are "lower", pneumothoraces
    "upper"). Other focal findings get random sides and zones. side_marker: None, "L", "R" or
    "auto" (a random letter). support_devices: None = random (20 %) unless listed in findings.
    edge_to_edge: the body fills the whole frame (no air around it).
    """
    view = view.upper()
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    if width < 64 or height < 64:
        raise ValueError("phantoms need at least 64 x 64 pixels")
    if side is not None and side not in SIDES:
        raise ValueError(f"side must be 'left', 'right' or None, got {side!r}")
    if zone is not None and zone not in ZONES:
        raise ValueError(f"zone must be one of {ZONES} or None, got {zone!r}")
    if side is not None and view == "LATERAL":
        raise ValueError("lateral views have no laterality: side must be None")
    if side_marker is not None and side_marker not in ("L", "R", "auto"):
        raise ValueError(f"side_marker must be None, 'L', 'R' or 'auto', got {side_marker!r}")
    forced = side is not None or zone is not None
    if findings is None:
        names = _choose_findings(rng, forced, zone)
        want_devices = bool(rng.random() < 0.2) if support_devices is None else support_devices
    else:
        names = list(findings)
        for n in names:
            if n not in FINDINGS:
                raise ValueError(f"unknown phantom finding {n!r}; known: {FINDINGS}")
        if "Support Devices" in names and support_devices is False:
            raise ValueError("findings lists Support Devices but support_devices=False")
        want_devices = bool(support_devices) or "Support Devices" in names
    names = [n for n in names if n != "Support Devices"]
    focal = [n for n in names if n in FOCAL_FINDINGS]
    if forced and not focal:
        raise ValueError("side/zone given but no focal finding to place")
    if zone is not None and zone not in _FINDING_ZONES[focal[0]]:
        raise ValueError(f"{focal[0]} cannot be placed in the {zone} zone (allowed: {_FINDING_ZONES[focal[0]]})")
    cardiomegaly = "Cardiomegaly" in names

    W, H = int(width), int(height)
    if view == "LATERAL":
        sc = _lateral_scene(rng, W, H, edge_to_edge, cardiomegaly)
    else:
        sc = _frontal_scene(rng, W, H, view, edge_to_edge, cardiomegaly)

    lesions: list[Lesion] = []
    first = True
    for name in names:
        if name == "Cardiomegaly":
            box = _bbox(sc.heart)
            assert box is not None
            lesions.append(Lesion(name, None, None, box))
            continue
        les_side = (side if first and side is not None else str(rng.choice(SIDES))) if sc.frontal else None
        allowed = _FINDING_ZONES[name]
        les_zone = zone if first and zone is not None else allowed[int(rng.integers(len(allowed)))]
        first = False
        lung_id = _lung_of(sc, les_side)
        if name in ("Consolidation", "Lung Opacity"):
            strength = (0.65, 0.85) if name == "Consolidation" else (0.35, 0.5)
            box = _draw_opacity(rng, sc, lung_id, les_zone, strength)
        elif name == "Nodule":
            box = _draw_nodule(rng, sc, lung_id, les_zone)
        elif name == "Pleural Effusion":
            box = _draw_effusion(rng, sc, lung_id)
        else:
            box = _draw_pneumothorax(rng, sc, lung_id)
        lesions.append(Lesion(name, les_side, les_zone, box))

    if sc.frontal:
        _frontal_bones(rng, sc, view)
    else:
        _lateral_bones(rng, sc)
    device_kinds: list[str] = []
    if want_devices:
        box, device_kinds = _draw_devices(rng, sc)
        lesions.append(Lesion("Support Devices", None, None, box))

    body_mask = sc.body.copy()
    marker = marker_box = None
    if side_marker is not None:
        letter = side_marker if side_marker != "auto" else ("L" if rng.random() < 0.5 else "R")
        corner, marker_box, carve = _draw_marker(rng, sc.img, sc.body, letter, sc.frontal)
        marker = (letter, corner)
        body_mask &= ~carve

    img = _blur(sc.img, 0.55 * min(W, H) / 256.0)
    img = img + rng.standard_normal((H, W), dtype=np.float32) * np.float32(0.012)
    image = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)

    labels = _labels(rng, lesions)
    neg, unc = _report_lists(labels)
    report = findings_sentence(lesions, neg, unc, device_kinds)
    lung_mask = sc.fields if sc.frontal else np.zeros((H, W), np.uint8)
    return Phantom(image=image, view=view, lesions=lesions, lung_mask=lung_mask.astype(np.uint8),
                   body_mask=body_mask, labels=labels, marker=marker, report=report, marker_box=marker_box,
                   impression=_impression(lesions, unc), device_kinds=device_kinds)


# ----------------------------------------------------------------------------------------------
# demo dataset in the MIMIC-CXR-JPG layout

DEMO_SHAPES: tuple[tuple[int, int], ...] = ((256, 256), (320, 256), (256, 320))  # (width, height)
# Frontal images cycle through this plan: (findings, side, zone) of the first focal finding.
_DEMO_CYCLE: tuple[tuple[tuple[str, ...], str | None, str | None], ...] = (
    (("Consolidation",), "left", "lower"),
    (("Nodule",), "right", "upper"),
    (("Pleural Effusion",), "right", None),
    (("Pneumothorax",), "left", None),
    (("Cardiomegaly",), None, None),
    ((), None, None),
    (("Consolidation",), "right", "middle"),
    (("Nodule",), "left", "middle"),
    (("Pleural Effusion", "Cardiomegaly"), "left", None),
    (("Pneumothorax",), "right", None),
    (("Consolidation", "Nodule"), "left", "upper"),
    ((), None, None),
)
_PROCEDURE = {"PA": "CHEST (PA AND LAT)", "LATERAL": "CHEST (PA AND LAT)", "AP": "CHEST (PORTABLE AP)"}
_VIEW_MEANING = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral"}
_ORIENTATION = {"PA": "Erect", "LATERAL": "Erect", "AP": "Recumbent"}
METADATA_COLUMNS: tuple[str, ...] = (
    "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows", "Columns",
    "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
)
MS_CXR_COLUMNS: tuple[str, ...] = (
    "dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h", "image_width", "image_height",
)
TRUTH_COLUMNS: tuple[str, ...] = (
    "dicom_id", "finding", "side", "zone", "x", "y", "w", "h", "view", "marker_letter", "marker_corner",
)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _csv_bytes(df: pd.DataFrame) -> bytes:
    return df.to_csv(index=False, lineterminator="\n").encode("utf-8")


def _write_csv(path: Path, df: pd.DataFrame, gz: bool) -> None:
    data = _csv_bytes(df)
    if gz:
        data = gzip.compress(data, compresslevel=9, mtime=0)  # mtime 0: byte-identical reruns
    _atomic_write(path, data)


def _demo_ids(seed: int, i: int) -> tuple[str, str, str, str]:
    """(dicom_id, subject_id, study_id, hash) for image i; all derived from (seed, i)."""
    h = hashlib.sha256(f"cxr-phantom:{seed}:{i}".encode()).hexdigest()
    dicom = "-".join(h[8 * k: 8 * k + 8] for k in range(5))
    subject = 10_000_000 + 1_000_000 * (i % 10) + i // 10
    study = 50_000_000 + int(h[40:48], 16) % 10_000_000
    return dicom, str(subject), str(study), h


SIDE_MARKER_MODES = ("default", "none", "lesion_side", "opposite")


def _marker_for(mode: str, i: int, side: str | None) -> str | None:
    """Side-marker argument of demo image i: "default" puts a random letter on every fifth image;
    "lesion_side" / "opposite" put on every image whose first finding has a side the letter of
    that side / of the other side (a random letter where there is no side)."""
    if mode == "default":
        return "auto" if i % 5 == 1 else None
    if mode == "none":
        return None
    if side is None:
        return "auto"
    letter = "L" if side == "left" else "R"
    return letter if mode == "lesion_side" else {"L": "R", "R": "L"}[letter]


def demo_plan(n: int, seed: int, lateral_fraction: float, side_markers: str = "default") -> list[dict]:
    """Per-image generation arguments of the demo dataset (deterministic in n, seed, side_markers)."""
    if side_markers not in SIDE_MARKER_MODES:
        raise ValueError(f"side_markers must be one of {SIDE_MARKER_MODES}, got {side_markers!r}")
    prng = np.random.default_rng([seed, 0x5EED])
    n_lat = int(round(n * lateral_fraction))
    lat_idx = {int((k + 0.5) * n / n_lat) for k in range(n_lat)} if n_lat else set()
    shape_offset = int(prng.integers(3))
    plan: list[dict] = []
    j = 0
    for i in range(n):
        w, h = DEMO_SHAPES[(i + shape_offset) % len(DEMO_SHAPES)]
        p: dict = {"width": w, "height": h, "edge_to_edge": i % 8 == 5,
                   "side_marker": _marker_for(side_markers, i, None)}
        if i in lat_idx:
            p.update(view="LATERAL", findings=None, side=None, zone=None, support_devices=False)
        else:
            f, s, z = _DEMO_CYCLE[j % len(_DEMO_CYCLE)]
            p.update(view="AP" if j % 3 == 2 else "PA", findings=list(f), side=s, zone=z,
                     support_devices=(j % 5 == 3), side_marker=_marker_for(side_markers, i, s))
            j += 1
        plan.append(p)
    perm = prng.permutation(n)
    n_val = max(1, int(round(0.15 * n))) if n >= 3 else 0
    n_test = max(1, int(round(0.15 * n))) if n >= 3 else 0
    for rank, i in enumerate(perm):
        plan[int(i)]["split"] = "validate" if rank < n_val else ("test" if rank < n_val + n_test else "train")
    return plan


def write_demo_dataset(root: str | Path, *, n: int = 24, seed: int = 0, lateral_fraction: float = 0.1,
                       side_markers: str = "default") -> dict:
    """Write n phantoms in the MIMIC-CXR-JPG 2.x layout under root; returns a summary dict.

    Files: files/pXX/pSUBJECT/sSTUDY/DICOM.jpg (greyscale JPEG, quality 95) and sSTUDY.txt
    (report); mimic-cxr-2.0.0-{metadata,chexpert,negbio,split}.csv.gz (gzip mtime 0);
    MS_CXR_Local_Alignment_v1.1.0.csv (boxes in the JPG's pixels); lung_masks/DICOM.png (0/1/2);
    phantom_truth.csv (one row per lesion, a row with finding "" for images without one).
    Byte-identical for equal (n, seed, lateral_fraction, side_markers). The negbio file equals the chexpert one.
    """
    t0 = time.perf_counter()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    plan = demo_plan(n, seed, lateral_fraction, side_markers)
    meta, labels_rows, split_rows, box_rows, truth_rows = [], [], [], [], []
    used_studies: set[str] = set()
    counts: dict[str, int] = {}
    sides: dict[str, dict[str, int]] = {}
    views: dict[str, int] = {}
    n_normal = n_marker = 0
    base_date = _dt.date(2180, 1, 1)
    for i, p in enumerate(plan):
        dicom, subject, study, h = _demo_ids(seed, i)
        while study in used_studies:
            study = str(int(study) + 1)
        used_studies.add(study)
        args = {k: v for k, v in p.items() if k != "split"}
        ph = make_phantom(np.random.default_rng([seed, i]), **args)
        H, W = ph.image.shape
        rel_dir = Path("files") / f"p{subject[:2]}" / f"p{subject}"
        rel_jpg = rel_dir / f"s{study}" / f"{dicom}.jpg"
        buf = io.BytesIO()
        Image.fromarray(ph.image).save(buf, format="JPEG", quality=95)
        _atomic_write(root / rel_jpg, buf.getvalue())
        _atomic_write(root / rel_dir / f"s{study}.txt",
                      f"FINDINGS: {ph.report}\n\nIMPRESSION: {ph.impression}\n".encode())
        buf = io.BytesIO()
        Image.fromarray(ph.lung_mask).save(buf, format="PNG")
        _atomic_write(root / "lung_masks" / f"{dicom}.png", buf.getvalue())

        date = base_date + _dt.timedelta(days=int(h[48:52], 16) % 3000)
        secs = int(h[52:58], 16) % 86400
        stime = f"{secs // 3600:02d}{secs % 3600 // 60:02d}{secs % 60:02d}.{int(h[58:61], 16) % 1000:03d}"
        meta.append({"dicom_id": dicom, "subject_id": subject, "study_id": study,
                     "PerformedProcedureStepDescription": _PROCEDURE[ph.view], "ViewPosition": ph.view,
                     "Rows": H, "Columns": W, "StudyDate": date.strftime("%Y%m%d"), "StudyTime": stime,
                     "ProcedureCodeSequence_CodeMeaning": _PROCEDURE[ph.view],
                     "ViewCodeSequence_CodeMeaning": _VIEW_MEANING[ph.view],
                     "PatientOrientationCodeSequence_CodeMeaning": _ORIENTATION[ph.view]})
        labels_rows.append({"subject_id": subject, "study_id": study,
                            **{c: (np.nan if ph.labels[c] is None else ph.labels[c]) for c in CHEXPERT_COLUMNS}})
        split_rows.append({"dicom_id": dicom, "study_id": study, "subject_id": subject, "split": p["split"]})
        letter, corner = ph.marker if ph.marker else ("", "")
        views[ph.view] = views.get(ph.view, 0) + 1
        n_marker += ph.marker is not None
        if not ph.lesions:
            n_normal += 1
            truth_rows.append({"dicom_id": dicom, "finding": "", "side": "", "zone": "", "x": "", "y": "", "w": "",
                               "h": "", "view": ph.view, "marker_letter": letter, "marker_corner": corner})
        kinds = list(ph.device_kinds)
        for les in ph.lesions:
            x, y, w, hh = (int(v) for v in les.box)
            kind = kinds.pop(0) if les.finding == "Support Devices" and kinds else None
            box_rows.append({"dicom_id": dicom, "category_name": les.finding, "label_text": lesion_phrase(les, kind),
                             "path": rel_jpg.as_posix(), "x": x, "y": y, "w": w, "h": hh,
                             "image_width": W, "image_height": H})
            truth_rows.append({"dicom_id": dicom, "finding": les.finding, "side": les.side or "",
                               "zone": les.zone or "", "x": x, "y": y, "w": w, "h": hh, "view": ph.view,
                               "marker_letter": letter, "marker_corner": corner})
            counts[les.finding] = counts.get(les.finding, 0) + 1
            if les.side:
                sides.setdefault(les.finding, {}).setdefault(les.side, 0)
                sides[les.finding][les.side] += 1

    label_cols = ["subject_id", "study_id", *CHEXPERT_COLUMNS]
    labels_df = pd.DataFrame(labels_rows, columns=label_cols)
    _write_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", pd.DataFrame(meta, columns=list(METADATA_COLUMNS)), True)
    _write_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", labels_df, True)
    _write_csv(root / "mimic-cxr-2.0.0-negbio.csv.gz", labels_df, True)
    _write_csv(root / "mimic-cxr-2.0.0-split.csv.gz",
               pd.DataFrame(split_rows, columns=["dicom_id", "study_id", "subject_id", "split"]), True)
    _write_csv(root / "MS_CXR_Local_Alignment_v1.1.0.csv", pd.DataFrame(box_rows, columns=list(MS_CXR_COLUMNS)),
               False)
    _write_csv(root / "phantom_truth.csv", pd.DataFrame(truth_rows, columns=list(TRUTH_COLUMNS)), False)
    return {"root": str(root), "n_images": n, "seed": seed, "views": views, "findings": counts, "sides": sides,
            "n_normal": n_normal, "n_marker": n_marker,
            "shapes": sorted({(p["width"], p["height"]) for p in plan}),
            "seconds": round(time.perf_counter() - t0, 3)}


# ----------------------------------------------------------------------------------------------
# visual check


_COLOURS = {"Consolidation": (255, 80, 80), "Lung Opacity": (255, 160, 80), "Nodule": (80, 255, 80),
            "Pleural Effusion": (80, 160, 255), "Pneumothorax": (255, 255, 0), "Cardiomegaly": (255, 0, 255),
            "Support Devices": (0, 255, 255)}


def contact_sheet(phantoms: Sequence[Phantom], *, cols: int = 4, tile: int = 320, boxes: bool = True) -> np.ndarray:
    """RGB uint8 grid of phantoms (each letterboxed into tile x tile) with truth boxes and captions."""
    rows = (len(phantoms) + cols - 1) // cols
    sheet = np.zeros((rows * (tile + 30), cols * tile, 3), np.uint8)
    for k, ph in enumerate(phantoms):
        H, W = ph.image.shape
        s = min(tile / W, tile / H)
        rgb = cv2.cvtColor(cv2.resize(ph.image, (int(W * s), int(H * s)), interpolation=cv2.INTER_AREA),
                           cv2.COLOR_GRAY2RGB)
        if boxes:
            for les in ph.lesions:
                x, y, w, h = les.box
                cv2.rectangle(rgb, (int(x * s), int(y * s)), (int((x + w) * s) - 1, int((y + h) * s) - 1),
                              _COLOURS.get(les.finding, (255, 255, 255)), 1)
        r0, c0 = (k // cols) * (tile + 30), (k % cols) * tile
        sheet[r0:r0 + rgb.shape[0], c0:c0 + rgb.shape[1]] = rgb
        cap = f"{ph.view} " + ", ".join(
            f"{les.finding[:5]}{'-' + les.side[0].upper() if les.side else ''}{'-' + les.zone[0] if les.zone else ''}"
            for les in ph.lesions)
        cv2.putText(sheet, cap[:48], (c0 + 3, r0 + tile + 20), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1,
                    cv2.LINE_AA)
    return sheet


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: write the demo dataset, or a contact sheet PNG of random phantoms."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="output directory (dataset) or .png path (--sheet)")
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sheet", action="store_true", help="write a contact sheet of n phantoms instead")
    a = ap.parse_args(argv)
    if a.sheet:
        rng = np.random.default_rng(a.seed)
        phs = [make_phantom(rng, view=str(rng.choice(["PA", "PA", "AP", "LATERAL"])), side_marker="auto")
               for _ in range(a.n)]
        Image.fromarray(contact_sheet(phs)).save(a.out)
    else:
        print(write_demo_dataset(a.out, n=a.n, seed=a.seed))


if __name__ == "__main__":
    main()
