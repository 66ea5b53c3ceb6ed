"""Stage `generate`: greedy answers for every sample -> generations/.

Samples are decoded in batches of `generate.batch_size` (left padding; results do not depend on
the batching). A sample that fails (unreadable image, prompt too long, out of memory) is one
errors/ row; the batch's other samples are kept.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from pipeline.stages.common import get_model, read_pil, shard_samples

log = logging.getLogger(__name__)


def run(ctx) -> dict[str, Any]:
    from pipeline.generation import generate_batch

    cfg = ctx.cfg
    samples = shard_samples(ctx, ["image_path", "prompt_text"])
    skip = ctx.skip_keys("generations", "generate", samples["sample_id"])
    todo = samples[~samples["sample_id"].isin(skip)]
    log.info("generate: %d samples in this shard, %d to do", len(samples), len(todo))
    if todo.empty:
        return {"samples": len(samples), "generated": 0, "errors": 0}
    loaded = get_model(ctx)
    bs = cfg.generate.batch_size
    rows = todo.to_dict("records")
    n_ok = n_err = 0
    with ctx.writer("generations") as writer, ctx.progress(None, total=len(rows), desc="generate") as bar:
        for i in range(0, len(rows), bs):
            batch = rows[i : i + bs]
            images, prompts, keep = [], [], []
            for r in batch:
                try:
                    images.append(read_pil(r["image_path"], cfg.dataset.max_pixels))
                    prompts.append(r["prompt_text"])
                    keep.append(r)
                except Exception as e:
                    ctx.record_error("generate", r["sample_id"], e, image_id=r["image_id"])
                    n_err += 1
            t0 = time.perf_counter()
            results = generate_batch(loaded, images, prompts, system_prompt=cfg.prompts.system_prompt,
                                     max_new_tokens=cfg.generate.max_new_tokens) if keep else []
            per_sample = (time.perf_counter() - t0) / max(len(keep), 1)
            for r, res in zip(keep, results):
                if isinstance(res, Exception):
                    ctx.record_error("generate", r["sample_id"], res, image_id=r["image_id"])
                    n_err += 1
                    continue
                writer.add({
                    "sample_id": r["sample_id"],
                    "answer": res.answer,
                    "sequence_ids": res.sequence_ids,
                    "prompt_length": res.prompt_length,
                    "n_new_tokens": res.n_new_tokens,
                    "stopped": res.stopped,
                    "model_name": cfg.model.name,
                    "seconds": per_sample,
                    "shard": ctx.shard,
                })
                n_ok += 1
            writer.maybe_flush()
            bar.update(len(batch))
    return {"samples": len(samples), "generated": n_ok, "errors": n_err}
