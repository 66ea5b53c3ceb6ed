"""Checks of ground-truth boxes against the decoded image, shared by every dataset source.

A box (x, y, w, h; pixels of its reference size, see :class:`Box`) is

- dropped when a value is not finite, its width or height is not positive, or its reference
  size is not positive: nothing can be localised against it;
- dropped when it lies wholly outside the image (no pixel in common);
- clipped to the image when it lies partly outside.

Each drop or clip is one message naming the box's origin (file and row), so the load stage can
record it as an errors/ row; a kept box is returned in the decoded image's pixels.
"""
from __future__ import annotations

import math
from typing import Any

from pipeline.datasets.base import Box


def _where(box: Box) -> str:
    return f"{box.origin}: " if box.origin else ""


def check_box(box: Box, width: int, height: int) -> tuple[dict[str, Any] | None, str | None]:
    """(the box in image pixels or None when dropped, a message when dropped or clipped)."""
    values = (box.x, box.y, box.w, box.h)
    label = f"{box.finding} box (x={box.x}, y={box.y}, w={box.w}, h={box.h})"
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        return None, f"{_where(box)}{label} dropped: coordinates must be finite numbers"
    if box.w <= 0 or box.h <= 0:
        return None, f"{_where(box)}{label} dropped: width and height must be > 0"
    for ref in (box.ref_width, box.ref_height):
        if ref is not None and not (isinstance(ref, (int, float)) and math.isfinite(ref) and ref > 0):
            return None, f"{_where(box)}{label} dropped: reference image size {box.ref_width} x {box.ref_height} must be > 0"
    b = box.scaled_to(width, height)
    x0, y0 = max(b["x"], 0.0), max(b["y"], 0.0)
    x1, y1 = min(b["x"] + b["w"], float(width)), min(b["y"] + b["h"], float(height))
    if x1 <= x0 or y1 <= y0:
        return None, f"{_where(box)}{label} dropped: wholly outside the {width} x {height} image"
    clipped = {"finding": b["finding"], "x": x0, "y": y0, "w": x1 - x0, "h": y1 - y0}
    if (x0, y0, x1, y1) != (b["x"], b["y"], b["x"] + b["w"], b["y"] + b["h"]):
        return clipped, (f"{_where(box)}{label} clipped to the {width} x {height} image: "
                         f"x={x0:.1f}, y={y0:.1f}, w={x1 - x0:.1f}, h={y1 - y0:.1f} (image pixels)")
    return clipped, None


def check_boxes(boxes: list[Box], width: int, height: int) -> tuple[list[dict[str, Any]], list[str]]:
    """(kept boxes in image pixels, messages about the dropped and clipped ones)."""
    kept, messages = [], []
    for box in boxes:
        b, msg = check_box(box, width, height)
        if b is not None:
            kept.append(b)
        if msg:
            messages.append(msg)
    return kept, messages
