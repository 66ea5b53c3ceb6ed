"""Stage `load`: dataset images x prompt variants -> samples/, body masks -> body_masks/.

Each selected image is decoded in full (so corrupt, truncated or odd files fail here, as one
errors/ row each, and later stages only see images that read) and one row is written per prompt
variant. Boxes are rescaled to the decoded image's pixel size. The image's body mask is computed
from the same decoded pixels (pipeline.body_masks) for the score stage.
"""
from __future__ import annotations

import hashlib
import logging
from typing import Any

import pyarrow.dataset as ds

from pipeline.body_masks import mask_row
from pipeline.config import ConfigError
from pipeline.datasets import fingerprint, get_dataset, select
from pipeline.datasets.checks import check_boxes
from pipeline.images import read_image
from pipeline.prompts import Prompt, prompt_variants, sample_id
from pipeline.vocabulary import FINDINGS, label_column

log = logging.getLogger(__name__)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class DatasetRowError(ValueError):
    """The dataset's files reject this image (the loader's message names the file and row)."""

    kind = "dataset"


def sample_rows(rec, width: int, height: int, digest: str, prompts: list[Prompt], shard: int,
                boxes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The samples/ rows of one decoded image: one per prompt (or its own per-image prompt);
    `boxes` are the image's checked boxes in its pixels (pipeline.datasets.checks)."""
    if rec.prompt_text:
        prompts = [Prompt("manifest", rec.prompt_text, "free_text", None, "", False)]
    base = {
        "dataset": rec.dataset,
        "image_id": rec.image_id,
        "study_id": rec.study_id,
        "subject_id": rec.subject_id,
        "image_path": rec.image_path,
        "image_sha256": digest,
        "lung_mask_path": rec.lung_mask_path,
        "view_position": rec.view_position,
        "split": rec.split,
        "width": width,
        "height": height,
        "boxes": boxes,
        "report_text": rec.report_text,
        "shard": shard,
    }
    base.update({label_column(f): rec.labels.get(f) for f in FINDINGS})
    return [
        {
            **base,
            "sample_id": sample_id(rec.dataset, rec.image_id, p.id),
            "prompt_id": p.id,
            "prompt_text": p.text,
            "prompt_kind": p.kind,
            "prompt_finding": p.finding,
            "prompt_style": p.style,
            "format_instruction": p.format_instruction,
        }
        for p in prompts
    ]


def _check_not_empty(cfg, records: list, unsharded: list, prompts: list) -> None:
    """An empty selection stops the run (ConfigError naming what selected nothing): an empty run
    directory would look like a successful one. A shard with no image of its own is fine."""
    d = cfg.dataset
    if not records:
        where = d.path if d.name == "manifest" else d.root
        raise ConfigError(f"dataset={d.name} ({where}) lists no images: nothing to do")
    if not unsharded:
        raise ConfigError(
            f"dataset={d.name}: the filters selected none of its {len(records)} images "
            f"(dataset.views={list(d.views)}, dataset.splits={list(d.splits)}, dataset.findings={list(d.findings)}, "
            f"dataset.one_image_per_study={d.one_image_per_study}, dataset.limit={d.limit})")
    if not any(r.prompt_text for r in unsharded) and not prompts:
        raise ConfigError(f"prompts={cfg.prompts.name}: no prompt variant is left after prompts.only_findings="
                          f"{list(cfg.prompts.only_findings)}: no samples")


def run(ctx) -> dict[str, Any]:
    cfg = ctx.cfg
    dataset = get_dataset(cfg.dataset)
    records = dataset.records()
    unsharded = select(records, cfg.dataset, apply_shard=False)
    selected = select(records, cfg.dataset)
    ctx.manifest.update(dataset_fingerprint=fingerprint(dataset, unsharded))
    prompts = prompt_variants(cfg.prompts)
    _check_not_empty(cfg, records, unsharded, prompts)
    ids = [r.image_id for r in selected]
    done = set(ctx.view.read("samples", ["image_id"], foreign_filter=ds.field("image_id").isin(ids))["image_id"])
    star_ids = [sample_id(r.dataset, r.image_id, "*") for r in selected]
    failed = set() if cfg.retry_errors else ctx.view.error_keys("load", ds.field("sample_id").isin(star_ids))
    todo = [r for r in selected if r.image_id not in done and sample_id(r.dataset, r.image_id, "*") not in failed]
    log.info("load: %d images selected (%d in all), %d already done, %d to read",
             len(selected), len(records), len(selected) - len(todo), len(todo))
    n_rows = n_err = 0
    rejected: set[str] = set()  # one errors/ row per image id, however many records share it
    with ctx.writer("samples") as writer, ctx.writer("body_masks") as mask_writer:
        for rec in ctx.progress(todo, total=len(todo), desc="load"):
            if rec.image_id in rejected:
                continue
            try:
                if rec.error:
                    raise DatasetRowError("; ".join([rec.error, *rec.problems]))
                img = read_image(rec.image_path, max_pixels=cfg.dataset.max_pixels)
                digest = _sha256(rec.image_path)
                boxes, box_notes = check_boxes(rec.boxes, img.width, img.height)
                rows = sample_rows(rec, img.width, img.height, digest, prompts, ctx.shard, boxes)
            except Exception as e:  # one bad image is an error row, never the end of the run
                ctx.record_error("load", sample_id(rec.dataset, rec.image_id, "*"), e, image_id=rec.image_id,
                                 detail=rec.image_path)
                rejected.add(rec.image_id)
                n_err += 1
                continue
            notes = [*rec.problems, *box_notes]
            if notes:  # recorded in one row (one key per image), the image is loaded
                ctx.record_error("dataset", sample_id(rec.dataset, rec.image_id, "*"), DatasetRowError("; ".join(notes)),
                                 image_id=rec.image_id, detail=rec.image_path)
            mask_writer.add(mask_row(rec.image_id, digest, img.pixels, ctx.shard))
            writer.add(rows)
            n_rows += len(rows)
            mask_writer.maybe_flush()
            writer.maybe_flush()
    return {"images_selected": len(selected), "images_read": len(todo) - n_err, "rows": n_rows, "errors": n_err}
