"""Body masks as rows of the body_masks/ table: computed where the image is decoded anyway (the
load stage), read back by the score stage of the same shard, so each image is decoded once per
run for its mask and no per-image file is written (a 250,000-image run would otherwise leave
250,000 PNGs on a cluster file system).

A mask is stored as ``numpy.packbits`` of the boolean array (row-major, zstd-compressed in the
Parquet file) with its height and width; an image whose mask cannot be computed (e.g. a constant
image: no body to find) gets a row with the reason in ``error``.

The same row holds the patient's midline (`metrics.patient_midline`: x(y) = midline_x0 +
midline_slope * (y - height / 2), pixels), which laterality splits at. ``midline_source`` is
"image" when the line was found on the image, "image_centre" when it was not (the image's centre
column, with ``midline_reason``): recorded, never a silent guess. Rows written before midlines
were stored have none; the score stage computes them again from the image.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow.dataset as ds


def mask_row(image_id: str, digest: str, pixels: np.ndarray, shard: int) -> dict[str, Any]:
    """The body_masks/ row of one decoded image (`pixels` as `pipeline.images.read_image` gives)."""
    import metrics

    h, w = int(pixels.shape[0]), int(pixels.shape[1])
    row = {"image_id": image_id, "image_sha256": digest, "height": h, "width": w, "mask": None, "error": None,
           "midline_x0": None, "midline_slope": None, "midline_source": None, "midline_reason": None,
           "shard": shard}
    try:
        geo = metrics.body_geometry(pixels)
    except Exception as e:  # recorded; score turns it into errors/ rows of the image's samples
        row["error"] = f"{type(e).__name__}: {e}"
        return row
    line = geo.midline
    row.update(mask=np.packbits(geo.mask.astype(bool), axis=None).tobytes(), midline_x0=float(line.x0),
               midline_slope=float(line.slope), midline_source=line.source, midline_reason=line.reason or None)
    return row


def decode(row: dict[str, Any]) -> np.ndarray:
    """The boolean mask of a body_masks/ row; raises ValueError with the stored reason if none."""
    if not isinstance(row.get("mask"), bytes):  # null (None, or NaN from a pandas frame)
        raise ValueError(f"no body mask for image {row.get('image_id')}: {row.get('error')}")
    h, w = int(row["height"]), int(row["width"])
    bits = np.unpackbits(np.frombuffer(row["mask"], dtype=np.uint8), count=h * w)
    return bits.reshape(h, w).astype(bool)


def midline_split(row: dict[str, Any]) -> np.ndarray:
    """The patient's midline of a body_masks/ row as one x position (pixels) per image row, at the
    rows' centres (`metrics.MapScorer`'s `midline_x`)."""
    import metrics

    return metrics.Midline(float(row["midline_x0"]), float(row["midline_slope"]), str(row["midline_source"]),
                           int(row["height"]), int(row["width"])).per_row()


def _complete(row: dict[str, Any] | None) -> bool:
    """A stored row usable as it is: an error, or a mask with its midline."""
    if row is None:
        return False
    return not isinstance(row.get("mask"), bytes) or isinstance(row.get("midline_source"), str)


class ShardBodyMasks:
    """This shard's body masks and midlines: read from body_masks/ per image, computed (and
    stored) for images that have none (runs loaded before masks or midlines were stored)."""

    def __init__(self, view, image_ids: list[str], max_pixels: int):
        self.view = view
        self.max_pixels = max_pixels
        only = ds.field("image_id").isin(sorted(set(image_ids)))
        df = view.read("body_masks", filter=only, foreign_filter=only)
        self.rows: dict[str, dict[str, Any]] = {}
        for r in df.to_dict("records"):  # a complete row (with its midline) wins over an older one
            if not _complete(self.rows.get(r["image_id"])):
                self.rows[r["image_id"]] = r
        self.new_rows: list[dict[str, Any]] = []

    def get(self, image_id: str, image_path: str, digest: str) -> np.ndarray:
        """The mask of one image (ValueError when the image has none)."""
        return decode(self.row(image_id, image_path, digest))

    def row(self, image_id: str, image_path: str, digest: str) -> dict[str, Any]:
        """The body_masks/ row of one image (computed from the image when none is stored)."""
        if not _complete(self.rows.get(image_id)):
            from pipeline.images import read_image

            pixels = read_image(image_path, max_pixels=self.max_pixels).pixels
            row = mask_row(image_id, digest, pixels, self.view.shard)
            self.rows[image_id] = row
            self.new_rows.append(row)
        return self.rows[image_id]

    def save(self) -> None:
        """Store the masks computed here (one part file)."""
        if self.new_rows:
            self.view.write_rows("body_masks", self.new_rows)
            self.new_rows = []
