"""Drawing a relevancy grid on the original image with the right geometry.

The processor resizes the image to a square without keeping the aspect ratio, so a grid cell
(i, j) covers x in [j*W/gw, (j+1)*W/gw) and y in [i*H/gh, (i+1)*H/gh) of the original W x H
image: the grid is stretched independently along each axis, never padded or cropped.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw


def upsample_grid(grid: np.ndarray, width: int, height: int, smooth: bool = True) -> np.ndarray:
    """(gh, gw) grid -> (height, width) float32 image by non-uniform scaling.

    smooth=False repeats each cell over exactly its pixel rectangle (nearest cell by pixel
    centre); smooth=True interpolates bilinearly between cell centres (for display).
    """
    import cv2

    g = np.asarray(grid, dtype=np.float32)
    if g.ndim != 2:
        raise ValueError(f"grid must be 2-D, got shape {g.shape}")
    interp = cv2.INTER_LINEAR if smooth else cv2.INTER_NEAREST
    return cv2.resize(g, (int(width), int(height)), interpolation=interp)


def normalise_for_display(x: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] for display only (scores always use the raw map). A constant map
    becomes all zeros."""
    x = np.asarray(x, dtype=np.float32)
    lo, hi = float(np.nanmin(x)), float(np.nanmax(x))
    return np.zeros_like(x) if hi <= lo else (x - lo) / (hi - lo)


def overlay_map(image: Image.Image | np.ndarray, grid: np.ndarray, *, alpha: float = 0.45, cmap: str = "jet",
                boxes: Sequence[dict] | None = None, body_mask: np.ndarray | None = None,
                mark_sides: bool = True, view_position: str | None = None) -> Image.Image:
    """The original image in grey with the map in colour on top (min-max normalised for display).

    Optional: ground-truth boxes (dicts with x, y, w, h in image pixels) in white, the body-mask
    contour in cyan, and the patient's R (image left) and L (image right) for frontal views.
    """
    import cv2
    from matplotlib import colormaps

    if isinstance(image, Image.Image):
        base = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    else:
        arr = np.asarray(image, dtype=np.float32)
        base = arr.mean(axis=2) if arr.ndim == 3 else arr
        base = normalise_for_display(base)
    h, w = base.shape
    heat = normalise_for_display(upsample_grid(grid, w, h))
    colour = colormaps[cmap](heat)[..., :3]
    rgb = (1 - alpha) * np.repeat(base[..., None], 3, axis=2) + alpha * colour
    out = (np.clip(rgb, 0, 1) * 255).astype(np.uint8)
    if body_mask is not None:
        contours, _ = cv2.findContours(np.asarray(body_mask, dtype=np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, (0, 255, 255), max(1, round(min(h, w) / 256)))
    pil = Image.fromarray(out)
    draw = ImageDraw.Draw(pil)
    for b in boxes or []:
        draw.rectangle([b["x"], b["y"], b["x"] + b["w"], b["y"] + b["h"]], outline=(255, 255, 255),
                       width=max(1, round(min(h, w) / 200)))
    if mark_sides and (view_position or "PA").upper().split()[0] in ("PA", "AP"):
        size = max(10, min(h, w) // 12)
        try:
            from PIL import ImageFont

            font = ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1
            font = None
        pad = size // 3
        draw.text((pad, pad), "R", fill=(255, 255, 0), font=font)  # patient's right: image left
        draw.text((w - pad - size, pad), "L", fill=(255, 255, 0), font=font)
    return pil
