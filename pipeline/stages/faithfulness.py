"""Stage `faithfulness`: deletion / insertion curves of the stored maps -> faithfulness/.

On when `faithfulness.enabled` (null: on for dataset=demo, off otherwise; the curves cost about
2 x `faithfulness.steps` perturbed forward passes per map). Every relevancy row of this shard
with status "ok" whose method is in `explain.methods` and whose target kind is in
`faithfulness.kinds` (and in `explain.targets`) gets one faithfulness/ row with the same key
(sample_id, target_kind, target_label, token_start, method), computed with
pipeline.relevancy.perturbation (`faithfulness.steps` steps, `faithfulness.baseline`,
`faithfulness.batch_size` variants per pass); the random floor's order is seeded per sample from
`explain.seed` and the sample id (pipeline.stages.explain.sample_seed). The maps are read back
from relevancy/, so the stage runs on a run explained earlier just as well.

Resume: a key is done when it is in faithfulness/, so a resumed run (or one that turns the stage
on later) computes exactly the missing keys. A sample whose curves fail is one errors/ row with
stage "faithfulness" (skipped on resume unless `retry_errors=true`). Only this shard's rows are
read.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from pipeline.config import faithfulness_enabled
from pipeline.stages.common import get_model, read_pil, record_sample_failure, shard_samples
from pipeline.stages.explain import KEY, sample_seed

log = logging.getLogger(__name__)


def stored_pending(ctx, sample_ids: set[str], methods: list[str], kinds: set[str], done: set[tuple],
                   skip: set[str]) -> dict[str, list]:
    """This shard's stored "ok" relevancy rows of `sample_ids`, `methods` and target `kinds` whose
    key has no faithfulness row, for samples not in `skip`. Returns sample_id -> [(key,
    token_end, image_map)]; maps are read only for those samples."""
    import numpy as np
    import pyarrow.dataset as ds

    ok = ds.field("status") == "ok"
    keys = ctx.view.read("relevancy", [*KEY, "status"], filter=ok,
                         foreign_filter=ds.field("sample_id").isin(sorted(sample_ids)))
    keys = keys[keys["sample_id"].isin(sample_ids) & keys["method"].isin(methods) & keys["target_kind"].isin(kinds)
                & ~keys["sample_id"].isin(skip)]
    rows = keys[list(KEY)].itertuples(index=False, name=None)
    keys = keys.loc[np.fromiter((k not in done for k in rows), dtype=bool, count=len(keys))]
    if keys.empty:
        return {}
    wanted = ds.field("sample_id").isin(sorted(set(keys["sample_id"])))
    df = ctx.view.read("relevancy", [*KEY, "status", "token_end", "image_map"], filter=wanted & ok,
                       foreign_filter=wanted)
    df = df[df["method"].isin(methods) & df["target_kind"].isin(kinds)].drop_duplicates(list(KEY))
    out: dict[str, list] = {}
    for row in df.itertuples(index=False):
        key = (row.sample_id, row.target_kind, row.target_label, int(row.token_start), row.method)
        if key not in done:
            out.setdefault(row.sample_id, []).append((key, int(row.token_end), row.image_map))
    return out


def curve_rows(loaded, inputs, pairs: list, cfg, sample_id: str, shard: int) -> list[dict[str, Any]]:
    """faithfulness/ rows for `pairs` [(key, token_end, image_map)] of one sample."""
    from pipeline import relevancy

    results = relevancy.faithfulness_curves_batch(
        loaded.model, inputs, [(relevancy.Target(int(key[3]), int(end)), image_map) for key, end, image_map in pairs],
        steps=int(cfg.faithfulness.steps), baseline=cfg.faithfulness.baseline,
        seed=sample_seed(cfg.explain.seed, sample_id), batch_size=int(cfg.faithfulness.batch_size),
    )
    return [{**dict(zip(KEY, key)), **res.columns(), "shard": shard} for (key, _, _), res in zip(pairs, results)]


def run(ctx) -> dict[str, Any]:
    import pyarrow.dataset as ds

    cfg = ctx.cfg
    if not faithfulness_enabled(cfg):
        log.info("faithfulness: off (faithfulness.enabled=%s, dataset=%s)", cfg.faithfulness.enabled, cfg.dataset.name)
        return {"enabled": False}
    samples = shard_samples(ctx)
    ids = sorted(samples["sample_id"])
    only = ds.field("sample_id").isin(ids)
    done = ctx.view.keys("faithfulness", foreign_filter=only)
    failed = ctx.view.error_keys("faithfulness", only) if not cfg.retry_errors else set()
    kinds = set(cfg.explain.targets) & set(cfg.faithfulness.kinds)
    pending = stored_pending(ctx, set(ids), list(dict.fromkeys(cfg.explain.methods)), kinds, done, failed)
    summary = {"enabled": True, "samples": len(pending), "rows": 0, "errors": 0, "curve_seconds": 0.0}
    log.info("faithfulness: %d samples with maps lacking curves, kinds=%s", len(pending), sorted(kinds))
    if not pending:
        return summary
    from pipeline.generation import model_inputs_for_sequence  # torch: imported only with work to do

    gens = ctx.view.read("generations", foreign_filter=only).drop_duplicates("sample_id").set_index("sample_id")
    by_id = samples.set_index("sample_id", drop=False)
    loaded = get_model(ctx)
    t0 = time.perf_counter()
    with ctx.writer("faithfulness") as writer:
        for sid in ctx.progress(sorted(pending), total=len(pending), desc="faithfulness"):
            sample = by_id.loc[sid]
            try:
                image = read_pil(sample["image_path"], cfg.dataset.max_pixels)
                inputs = model_inputs_for_sequence(loaded, image, gens.loc[sid, "sequence_ids"])
                rows = curve_rows(loaded, inputs, pending[sid], cfg, sid, ctx.shard)
            except Exception as e:  # never a crash: an errors/ row for this sample
                record_sample_failure(ctx, "faithfulness", sid, sample["image_id"], e)
                summary["errors"] += 1
            else:
                writer.add(rows)
                summary["rows"] += len(rows)
            writer.maybe_flush()
    summary["curve_seconds"] = round(time.perf_counter() - t0, 3)
    return summary
