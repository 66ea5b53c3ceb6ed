"""Body masks as rows of the body_masks/ table: computed where the image is decoded anyway (the
load stage), read back by the score stage of the same shard, so each image is decoded once per
run for its mask and no per-image file is written (a 250,000-image run would otherwise leave
250,000 PNGs on a cluster file system).

A mask is stored as ``numpy.packbits`` of the boolean array (row-major, zstd-compressed in the
Parquet file) with its height and width; an image whose mask cannot be computed (e.g. a constant
image: no body to find) gets a row with the reason in ``error``.
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
           "shard": shard}
    try:
        row["mask"] = np.packbits(metrics.body_mask(pixels).astype(bool), axis=None).tobytes()
    except Exception as e:  # recorded; score turns it into errors/ rows of the image's samples
        row["error"] = f"{type(e).__name__}: {e}"
    return row


def decode(row: dict[str, Any]) -> np.ndarray:
    """The boolean mask of a body_masks/ row; raises ValueError with the stored reason if none."""
    if row.get("mask") is None:
        raise ValueError(f"no body mask for image {row.get('image_id')}: {row.get('error')}")
    h, w = int(row["height"]), int(row["width"])
    bits = np.unpackbits(np.frombuffer(row["mask"], dtype=np.uint8), count=h * w)
    return bits.reshape(h, w).astype(bool)


class ShardBodyMasks:
    """This shard's body masks: read from body_masks/ per image, computed (and stored) for images
    that have none (runs loaded before masks were stored, or whose load predates this table)."""

    def __init__(self, view, image_ids: list[str], max_pixels: int):
        self.view = view
        self.max_pixels = max_pixels
        only = ds.field("image_id").isin(sorted(set(image_ids)))
        df = view.read("body_masks", filter=only, foreign_filter=only).drop_duplicates("image_id")
        self.rows = {r["image_id"]: r for r in df.to_dict("records")}
        self.new_rows: list[dict[str, Any]] = []

    def get(self, image_id: str, image_path: str, digest: str) -> np.ndarray:
        """The mask of one image (ValueError when the image has none)."""
        if image_id not in self.rows:
            from pipeline.images import read_image

            pixels = read_image(image_path, max_pixels=self.max_pixels).pixels
            row = mask_row(image_id, digest, pixels, self.view.shard)
            self.rows[image_id] = row
            self.new_rows.append(row)
        return decode(self.rows[image_id])

    def save(self) -> None:
        """Store the masks computed here (one part file)."""
        if self.new_rows:
            self.view.write_rows("body_masks", self.new_rows)
            self.new_rows = []
