"""Helpers shared by the stages that use the model: this shard's samples, images, the model."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.dataset as ds

from pipeline.datasets import shard_of

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]


def shard_samples(ctx, columns: list[str] | None = None) -> pd.DataFrame:
    """samples/ rows of this invocation: `dataset.limit` (first N image ids) and the shard
    (`dataset.shard` of `dataset.num_shards`, by the image id's hash) applied, sorted by sample_id.

    Reads this shard's folder; samples written under another sharding (load run unsharded, say)
    are found by the hash of their image ids. `dataset.limit` needs every image id of the run
    (one column), as it counts images across shards."""
    cols = None if columns is None else sorted(set(columns) | {"sample_id", "image_id"})
    d = ctx.cfg.dataset
    own, foreign = ctx.store.table("samples").shard_parts(d.shard, d.num_shards)
    frames = [ctx.store.table("samples").read(columns=cols, parts=own)]
    if foreign:
        ids = ctx.store.table("samples").read(columns=["image_id"], parts=foreign)["image_id"].unique()
        mine = [i for i in ids if d.num_shards == 1 or shard_of(i, d.num_shards) == d.shard]
        frames.append(ctx.store.table("samples").read(columns=cols, parts=foreign,
                                                      filter=ds.field("image_id").isin(mine)))
    df = pd.concat([f for f in frames if len(f)] or frames[:1], ignore_index=True)
    df = df.drop_duplicates("sample_id")
    if d.limit is not None:
        every = ctx.store.table("samples").read(columns=["image_id"])["image_id"].unique()
        df = df[df["image_id"].isin(sorted(every)[: d.limit])]
    return df.sort_values("sample_id").reset_index(drop=True)


def resolve_model_path(model_cfg: Any) -> str:
    """A relative local path is taken from the current directory, else from the repository; a
    demo model without its weights fails here, saying how to restore them (pipeline.demo_model)."""
    name = str(model_cfg.name_or_path)
    p = Path(name)
    if p.is_absolute() or p.exists():
        return name
    in_repo = REPO / p
    if model_cfg.name in ("demo", "demo_shortcut"):
        from pipeline.demo_model import ensure_demo_model

        return str(ensure_demo_model(in_repo))
    return str(in_repo) if in_repo.exists() else name


def get_model(ctx):
    """The model for this run, loaded once per invocation and described in the manifest."""
    if "model" not in ctx.cache:
        from pipeline.model import describe, load_model

        m = ctx.cfg.model
        loaded = load_model(resolve_model_path(m), revision=m.revision, dtype=m.dtype, device=m.device,
                            device_map=m.device_map, local_files_only=m.local_files_only,
                            attn_implementation=m.attn_implementation)
        ctx.cache["model"] = loaded
        ctx.manifest.update(model=describe(loaded) | {"config_name": m.name})
        log.info("model %s loaded (%s on %s)", m.name_or_path, loaded.dtype, loaded.device)
    return ctx.cache["model"]


def record_sample_failure(ctx, stage: str, sample_id: str, image_id: str, exc: BaseException) -> None:
    """One sample a model stage could not process: its errors/ row (after freeing the CUDA cache
    when it ran out of GPU memory, so the next sample starts clean)."""
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()
    ctx.record_error(stage, sample_id, exc, image_id=image_id)


def read_pil(image_path: str, max_pixels: int):
    """The image as the model sees it: decoded robustly, 8-bit RGB."""
    from pipeline.images import read_image, to_rgb_pil

    return to_rgb_pil(read_image(image_path, max_pixels=max_pixels))
