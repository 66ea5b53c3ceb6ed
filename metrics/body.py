"""Body masks of chest radiographs: where the patient is, as opposed to air, padding and labels.

Algorithm (`body_mask`), on a copy downsampled to `work_size` pixels on its long side:

1. Grey values in [0, 1] (colour: mean of R, G, B; alpha ignored; any integer or float type;
   robust 0.5-99.5 percentile stretch). Display convention: bright = dense. An inverted image
   (a MONOCHROME1 file shown raw) is flipped first when `inverted=True`, or when `inverted=None`
   and the mediastinum strip is darker than the lung fields beside it.
2. Gaussian blur; Otsu threshold t_o; air threshold t = p1 + `air_fraction` * (t_o - p1), p1 the
   1st percentile (the air level). Otsu alone would cut through the body on films the body fills
   edge to edge (between lungs and dense tissue); t sits between air and lung values.
3. Air = pixels <= t connected to the image border (a flood from the edges). The body side is
   everything else: the lungs, dark but enclosed by the chest wall, are not reached by the flood.
4. An opening removes thin structures touching nothing (burned-in text, side markers, lines); the
   largest connected component is the body; its holes are filled; it is upsampled to the
   original size.

A constant image has no contrast to find a body in: ValueError.
"""
from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage as ndi

__all__ = ["body_mask", "to_grey01"]


def to_grey01(image: np.ndarray) -> np.ndarray:
    """Any greyscale / RGB / RGBA array (uint8, uint16, float, ...) -> float32 H x W in [0, 1].

    Colour is averaged over R, G, B (alpha dropped); values are stretched between the 0.5th and
    99.5th percentiles so 12/16-bit ranges and odd offsets do not matter.
    """
    a = np.asarray(image)
    if a.ndim == 3:
        if a.shape[2] not in (1, 3, 4):
            raise ValueError(f"expected H x W, H x W x 3 or H x W x 4, got shape {a.shape}")
        a = a[..., :3].astype(np.float32).mean(axis=2) if a.shape[2] >= 3 else a[..., 0]
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D (or colour) image, got shape {a.shape}")
    a = a.astype(np.float32)
    finite = np.isfinite(a)
    if not finite.any():
        return np.zeros(a.shape, np.float32)
    if not finite.all():
        a = np.where(finite, a, float(a[finite].min()))
    lo, hi = np.percentile(a, [0.5, 99.5])
    if hi <= lo:
        lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, np.float32)
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def looks_inverted(grey: np.ndarray) -> bool:
    """Heuristic: True when the central strip (mediastinum, spine) is darker than the lung
    fields beside it, as in a radiograph shown with inverted grey values."""
    h, w = grey.shape
    rows = slice(int(0.25 * h), int(0.65 * h))
    centre = grey[rows, int(0.45 * w): int(0.55 * w)].mean()
    lungs = np.concatenate([grey[rows, int(0.18 * w): int(0.33 * w)].ravel(),
                            grey[rows, int(0.67 * w): int(0.82 * w)].ravel()])
    return bool(centre < lungs.mean())


def _otsu(x: np.ndarray) -> float:
    u8 = np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)
    t, _ = cv2.threshold(u8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return float(t) / 255.0


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndi.label(mask)
    if n == 0:
        return np.zeros_like(mask)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


def body_mask(image: np.ndarray, *, inverted: bool | None = False, work_size: int = 256,
              air_fraction: float = 0.4) -> np.ndarray:
    """Boolean H x W mask of the patient's body in a chest radiograph (see module docstring).

    `image`: greyscale, RGB or RGBA array of any numeric type, in the display convention
    (bright = dense) unless `inverted` is True; `inverted=None` detects inversion.
    Raises ValueError for a constant image or when no body is found.
    """
    g = to_grey01(image)
    h, w = g.shape
    if float(g.max()) <= float(g.min()):
        raise ValueError("constant image: no contrast to separate the body from the background")
    scale = work_size / max(h, w)
    small = cv2.resize(g, (max(8, round(w * scale)), max(8, round(h * scale))), interpolation=cv2.INTER_AREA)
    if inverted or (inverted is None and looks_inverted(small)):
        small = 1.0 - small
    blur = cv2.GaussianBlur(small, (0, 0), sigmaX=2.0)
    p1 = float(np.percentile(blur, 1))
    t = p1 + air_fraction * (_otsu(blur) - p1)
    labels, _ = ndi.label(blur <= t)
    edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    air = np.isin(labels, edge[edge > 0])
    k = max(3, round(work_size / 64)) | 1
    body = cv2.morphologyEx((~air).astype(np.uint8), cv2.MORPH_OPEN,
                            cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))).astype(bool)
    body = ndi.binary_fill_holes(_largest_component(body))
    if not body.any():
        raise ValueError("no body found: nothing brighter than the air level away from the image border")
    return cv2.resize(body.astype(np.uint8), (w, h), interpolation=cv2.INTER_LINEAR).astype(bool)
