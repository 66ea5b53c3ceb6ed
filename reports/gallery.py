"""The overlay gallery: chosen targets drawn on their original images, one panel per method.

Each panel is :func:`reports.overlay.overlay_map` on the original image (read with
:func:`pipeline.images.read_image`, downscaled for display only): the map min-max normalised per
panel (display only), the body-mask contour (cyan; when ``metrics.body_mask`` is available), the
ground-truth boxes of the target's finding (white) and the patient's R (image left) and L (image
right) on frontal views. The grid covers the image by non-uniform scaling (cell = W/gw x H/gh px).

Only called when ``report.include_images`` is true: these figures contain patient images.
"""
from __future__ import annotations

import io
import logging
import textwrap
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import pandas as pd

from reports.figures import method_order

if TYPE_CHECKING:
    from PIL import Image

    from reports.data import RunData

log = logging.getLogger(__name__)

TARGET_KEY = ["sample_id", "target_kind", "target_label", "token_start"]
DISPLAY_MAX_SIDE = 300  # pixels: longest side of the image drawn in a gallery panel
PANELS_PER_ROW = 5


@dataclass
class GalleryItem:
    """One gallery figure: a target and the finding whose boxes are drawn."""

    sample_id: str
    target_kind: str
    target_label: str
    token_start: int
    finding: str | None


def boxes_for(sample: dict[str, Any] | None, finding: str | None) -> list[dict[str, float]]:
    """The sample's ground-truth boxes of `finding` (image pixels, top-left origin)."""
    if sample is None or not finding:
        return []
    boxes = sample.get("boxes")
    if boxes is None or (isinstance(boxes, float) and np.isnan(boxes)):
        return []
    return [dict(b) for b in boxes if b and b.get("finding") == finding]


def select_targets(data: "RunData", n: int, seed: int) -> list[GalleryItem]:
    """Up to `n` explained targets for the gallery.

    Preference: keyword targets whose finding has boxes in the image, then other keyword
    targets, then yes/no answer tokens and answer spans (boxed first), then single answer
    tokens (left out when there are at least `n` other targets). Within a tier the order is a
    seeded pseudo-random one; distinct images are taken first. The engine ranks every target
    (:func:`reports.data.gallery_candidates`); only the few candidates reach Python.
    """
    from reports.data import gallery_candidates

    if n <= 0:
        return []
    cand = gallery_candidates(data, n, seed)
    if cand.empty:
        return []
    order = ["tier", "u", *TARGET_KEY]
    firsts = cand[cand["first"] == 1].sort_values(order).head(n)
    chosen = [_item(r) for r in firsts.to_dict("records")]
    taken = {(i.sample_id, i.target_kind, i.target_label, i.token_start) for i in chosen}
    for r in cand[cand["first"] == 0].sort_values(order).to_dict("records"):
        if len(chosen) >= n:
            break
        if (r["sample_id"], r["target_kind"], r["target_label"], int(r["token_start"])) not in taken:
            chosen.append(_item(r))
    return chosen


def _item(r: dict[str, Any]) -> GalleryItem:
    finding = r.get("finding")
    return GalleryItem(r["sample_id"], r["target_kind"], r["target_label"], int(r["token_start"]),
                       finding if isinstance(finding, str) and finding else None)


def _body_mask_fn() -> Callable[[np.ndarray], np.ndarray] | None:
    """`metrics.body_mask` if that package provides it (imported lazily), else None."""
    try:
        from metrics import body_mask  # type: ignore[attr-defined]
    except Exception:  # not written yet, or failing to import: draw no contour
        return None
    return body_mask if callable(body_mask) else None


def display_image(image_path: str, max_side: int = DISPLAY_MAX_SIDE, max_pixels: int = 60_000_000,
                  with_body_mask: bool = True) -> tuple[np.ndarray, float, np.ndarray | None]:
    """(pixels downscaled to `max_side`, the scale factor applied, body mask at that size or None).

    The body mask is computed on the original image (as the scores are) and then resized.
    """
    import cv2

    from pipeline.images import read_image

    img = read_image(image_path, max_pixels=max_pixels)
    pixels = np.asarray(img.pixels, dtype=np.float32)
    h, w = pixels.shape[:2]
    mask = None
    fn = _body_mask_fn() if with_body_mask else None
    if fn is not None:
        try:
            mask = np.asarray(fn(pixels), dtype=bool)
            if mask.shape != (h, w):
                mask = None
        except Exception as e:  # a contour is a nicety: never fail the report for it
            log.warning("report: body_mask failed on %s: %s", image_path, e)
            mask = None
    scale = min(1.0, max_side / max(h, w))
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        pixels = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
        if mask is not None:
            mask = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)
    return pixels, scale, mask


def _scaled_boxes(boxes: Sequence[dict], scale: float) -> list[dict]:
    return [{"x": b["x"] * scale, "y": b["y"] * scale, "w": b["w"] * scale, "h": b["h"] * scale} for b in boxes]


def render_item(item: GalleryItem, maps: pd.DataFrame, sample: dict[str, Any], answer: str | None,
                methods: Sequence[str], max_pixels: int = 60_000_000) -> bytes | None:
    """One gallery figure (PNG): a panel per method with a map for this target."""
    from reports.overlay import overlay_map

    rows = maps[(maps["sample_id"] == item.sample_id) & (maps["target_kind"] == item.target_kind)
                & (maps["target_label"] == item.target_label) & (maps["token_start"] == item.token_start)
                & (maps["status"] == "ok")]
    rows = rows[rows["image_map"].map(lambda v: v is not None and len(v) > 0)]
    have = {r["method"]: r for r in rows.to_dict("records")}
    order = [m for m in method_order(list(have)) if m in set(methods) or not methods]
    if not order:
        return None
    pixels, scale, mask = display_image(sample["image_path"], max_pixels=max_pixels)
    boxes = _scaled_boxes(boxes_for(sample, item.finding), scale)
    view = str(sample.get("view_position") or "")
    panels, heads = [], []
    for m in order:
        r = have[m]
        grid = np.asarray(r["image_map"], dtype=np.float32).reshape(int(r["grid_h"]), int(r["grid_w"]))
        panels.append(overlay_map(pixels, grid, boxes=boxes, body_mask=mask, view_position=view or None,
                                  mark_sides=view.upper().split()[0] in ("PA", "AP") if view else True))
        heads.append((m, f"raw {np.nanmin(grid):.3g} .. {np.nanmax(grid):.3g}"))
    kind = {"keywords": "keyword", "answer_token": "yes/no token", "answer_span": "answer span",
            "answer_tokens": "answer token"}.get(item.target_kind, item.target_kind)
    answer_s = (answer or "").strip().replace("\n", " ")
    if len(answer_s) > 240:
        answer_s = answer_s[:237] + "..."
    title = (f"{sample.get('image_id')} ({view or 'view ?'}) · prompt {sample.get('prompt_id')} · target: "
             f"'{item.target_label}' ({kind})" + (f" · boxes: {item.finding} ({len(boxes)})" if boxes else ""))
    return compose_panels(panels, heads, title, f"answer: “{answer_s}”")


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: bitmap font, one size
        return ImageFont.load_default()


def compose_panels(panels: Sequence["Image.Image"], heads: Sequence[tuple[str, str]], title: str,
                   subtitle: str) -> bytes:
    """Panels side by side (wrapped after PANELS_PER_ROW) under a title: one palette PNG."""
    from PIL import Image, ImageDraw

    pw, ph = panels[0].size
    ncols = min(len(panels), PANELS_PER_ROW)
    nrows = -(-len(panels) // ncols)
    gap, head_h = 8, 34
    width = ncols * pw + (ncols + 1) * gap
    f_title, f_head = _font(15), _font(13)
    chars = max(40, int(width / 7.2))
    lines = [title] + textwrap.wrap(subtitle, chars)[:3]
    top = 10 + 20 * len(lines) + 6
    height = top + nrows * (ph + head_h + gap)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((width / 2, 10 + 20 * i), line, fill=(20, 20, 20), font=f_title, anchor="ma")
    for k, (panel, (name, rng_text)) in enumerate(zip(panels, heads)):
        r, c = divmod(k, ncols)
        x = gap + c * (pw + gap)
        y = top + r * (ph + head_h + gap)
        draw.text((x + pw / 2, y), name, fill=(20, 20, 20), font=f_head, anchor="ma")
        draw.text((x + pw / 2, y + 16), rng_text, fill=(90, 90, 90), font=_font(11), anchor="ma")
        canvas.paste(panel.convert("RGB"), (x, y + head_h))
    buf = io.BytesIO()
    canvas.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(buf, format="PNG")
    return buf.getvalue()
