"""Stage `explain`: relevancy maps for the targets of every generated answer -> relevancy/,
and (`metrics.faithfulness`; default: on for the demo only) deletion / insertion curves of those maps -> faithfulness/.

Per sample: the targets named by `explain.targets` are found in the answer, de-duplicated by
token span, and explained by every method of `explain.methods` with ONE forward pass over the
stored sequence (see pipeline.relevancy; `occlusion` adds batched perturbed passes). A finding
the answer does not mention (the finding a yes/no prompt asks about, or one the dataset labels
positive) gets a row with status="not_mentioned" and no map: it is recorded as not explained,
never replaced by another target.

Resume is exact per unit of work, a (sample, target kind, method): every unit gets at least one
row (a kind with no target in the answer: one row with status "no_targets" and that kind), so a
resumed run computes exactly the units it lacks. Adding a method or a target kind to a finished
run explains just those; removing one deletes nothing. Only this shard's rows are read.

Faithfulness (pipeline.relevancy.perturbation): every relevancy row with status "ok" whose
method is in `explain.methods` and whose target kind is in `metrics.faithfulness_kinds` (and in
`explain.targets`) gets one faithfulness/ row with the same key (sample_id,
target_kind, target_label, token_start, method), computed with `metrics.faithfulness_steps`
steps; the random floor's order is seeded per sample from `explain.seed` and the sample id. A
row is done when its key is in faithfulness/, so a resumed run (or a run that turns
faithfulness on later) computes exactly the missing keys, reading maps written by an earlier
invocation back from relevancy/. A sample whose faithfulness fails is one errors/ row with
stage "faithfulness" (skipped on resume unless `retry_errors=true`); its relevancy rows stay.
"""
from __future__ import annotations

import hashlib
import logging
import time
from typing import Any


from pipeline.config import faithfulness_enabled
from pipeline.prompts import finding_synonyms
from pipeline.stages.common import get_model, read_pil, shard_samples
from pipeline.vocabulary import FINDINGS, label_column

log = logging.getLogger(__name__)

KEY = ("sample_id", "target_kind", "target_label", "token_start", "method")


def select_targets(tokenizer, gen: dict[str, Any], sample: dict[str, Any], kinds, synonyms) -> tuple[list, list[str]]:
    """(targets, not-mentioned finding labels) of one generated answer."""
    from pipeline.targets import (
        answer_span_target,
        answer_token_target,
        answer_tokens_targets,
        keyword_targets,
        laterality_targets,
    )

    seq, plen = list(gen["sequence_ids"]), int(gen["prompt_length"])
    targets, not_mentioned = [], []
    if "keywords" in kinds:
        found, missing = keyword_targets(tokenizer, seq, plen, synonyms)
        targets += found
        wanted = {f for f in FINDINGS if sample.get(label_column(f)) == 1.0}
        if isinstance(sample.get("prompt_finding"), str) and sample["prompt_finding"]:
            wanted.add(sample["prompt_finding"])
        not_mentioned += sorted(f for f in wanted if f in missing or f not in synonyms)
    if "laterality" in kinds:
        asked = sample.get("prompt_finding") if sample.get("prompt_kind") == "yes_no" else None
        targets += laterality_targets(tokenizer, seq, plen, synonyms, asked if isinstance(asked, str) else None)
    if "answer_token" in kinds and sample.get("prompt_kind") == "yes_no":
        t = answer_token_target(tokenizer, seq, plen)
        if t is None:
            not_mentioned.append("yes/no")
        else:
            targets.append(t)
    if "answer_span" in kinds and len(seq) > plen:
        targets.append(answer_span_target(tokenizer, seq, plen))
    if "answer_tokens" in kinds:
        targets += answer_tokens_targets(tokenizer, seq, plen)
    return targets, not_mentioned


def explorer_samples(gens, n: int) -> set[str]:
    """Samples whose every answer token is explained too (target kind answer_tokens), for the
    report's token explorer: the first sample (by id) of each of the first `n` images."""
    if n <= 0 or gens.empty:
        return set()
    ids = sorted(gens["sample_id"])
    first: dict[str, str] = {}
    for sid in ids:
        first.setdefault(sid.rsplit(":", 1)[0], sid)
    return set(list(first.values())[:n])


def _faithful_kind(kind: str, kinds: set[str]) -> bool:
    """Faithfulness curves are computed for `kinds` (explain.targets that are also in
    metrics.faithfulness_kinds), never for the per-token targets added only for the explorer."""
    return kind in kinds


def _base_row(sample_id: str, method: str, shard: int) -> dict[str, Any]:
    return {"sample_id": sample_id, "method": method, "shard": shard}


def _chunk(cfg, model, seq_len: int) -> int:
    """Targets per gradient chunk: explain.chunk_size, lowered to fit explain.memory_budget_gb."""
    from pipeline.relevancy.engine import chunk_for_budget

    budget = cfg.explain.memory_budget_gb
    if budget is None:
        return cfg.explain.chunk_size
    return chunk_for_budget(model, seq_len, budget * 2**30, cfg.explain.chunk_size)


def sample_seed(seed: int, sample_id: str) -> int:
    """Seed of a sample's random faithfulness floor: stable across runs, shards and resumes."""
    return int.from_bytes(hashlib.sha256(f"{int(seed)}:{sample_id}".encode()).digest()[:8], "little")


def _stored_pending(ctx, sample_ids: set[str], methods: list[str], done: set[tuple], skip: set[str]) -> dict[str, list]:
    """This shard's stored "ok" relevancy rows of `sample_ids` and `methods` whose key has no
    faithfulness row. Returns sample_id -> [(key, token_end, image_map)]; maps are read only for
    those samples."""
    import numpy as np
    import pyarrow.dataset as ds

    ok = ds.field("status") == "ok"
    keys = ctx.view.read("relevancy", [*KEY, "status"], filter=ok,
                         foreign_filter=ds.field("sample_id").isin(sorted(sample_ids)))
    keys = keys[keys["sample_id"].isin(sample_ids) & keys["method"].isin(methods) & ~keys["sample_id"].isin(skip)]
    rows = keys[list(KEY)].itertuples(index=False, name=None)
    missing = np.fromiter((k not in done for k in rows), dtype=bool, count=len(keys))
    keys = keys.loc[missing]
    if keys.empty:
        return {}
    wanted = ds.field("sample_id").isin(sorted(set(keys["sample_id"])))
    df = ctx.view.read("relevancy", [*KEY, "status", "token_end", "image_map"], filter=wanted & ok,
                       foreign_filter=wanted)
    df = df[df["method"].isin(methods)].drop_duplicates(list(KEY))
    out: dict[str, list] = {}
    for row in df.itertuples(index=False):
        key = (row.sample_id, row.target_kind, row.target_label, int(row.token_start), row.method)
        if key not in done:
            out.setdefault(row.sample_id, []).append((key, int(row.token_end), row.image_map))
    return out


def _faithfulness_rows(loaded, inputs, pairs: list, cfg, sample_id: str, shard: int) -> list[dict[str, Any]]:
    """faithfulness/ rows for `pairs` [(key, token_end, image_map)] of one sample."""
    from pipeline.relevancy import Target, faithfulness_curves_batch

    results = faithfulness_curves_batch(
        loaded.model, inputs, [(Target(int(key[3]), int(end)), image_map) for key, end, image_map in pairs],
        steps=int(cfg.metrics.faithfulness_steps),
        baseline=cfg.metrics.faithfulness_baseline,
        seed=sample_seed(cfg.explain.seed, sample_id),
        batch_size=cfg.explain.perturbation_batch_size,
    )
    return [{**dict(zip(KEY, key)), **res.columns(), "shard": shard} for (key, _, _), res in zip(pairs, results)]


def _done_units(ctx, sample_ids: list[str]) -> dict[str, set[tuple[str, str]]]:
    """sample_id -> {(target kind, method)} with a relevancy row in this shard."""
    import pyarrow.dataset as ds

    df = ctx.view.read("relevancy", ["sample_id", "target_kind", "method"],
                       foreign_filter=ds.field("sample_id").isin(sample_ids)).drop_duplicates()
    done: dict[str, set[tuple[str, str]]] = {}
    for sid, kind, method in df.itertuples(index=False, name=None):
        done.setdefault(sid, set()).add((kind, method))
    return done


def _target_rows(sid: str, out, targets, not_mentioned, missing: set[tuple[str, str]], methods: list[str],
                 seconds: float, shard: int) -> list[dict[str, Any]]:
    """relevancy/ rows of the `missing` (kind, method) units of one sample, in `methods` order."""
    rows = []
    spans = list(dict.fromkeys((t.token_start, t.token_end) for t in targets))
    for method in methods:
        covered = set()
        for t in targets:
            if (t.kind, method) not in missing:
                continue
            res = out.results[spans.index((t.token_start, t.token_end))]
            mm = res.maps[method]
            rows.append({
                **_base_row(sid, method, shard),
                "target_kind": t.kind, "target_label": t.label,
                "token_start": t.token_start, "token_end": t.token_end,
                "char_start": t.char_start, "char_end": t.char_end, "matched_text": t.matched_text,
                "status": "ok", "grid_h": out.grid_h, "grid_w": out.grid_w,
                "image_map": mm.image_map.reshape(-1).tolist(),
                "text_map": None if mm.text_map is None else mm.text_map.tolist(),
                "target_score": res.score, "argmax_matches": out.argmax_matches,
                "image_tokens_ok": out.image_tokens_ok, "seconds": seconds,
            })
            covered.add(t.kind)
        for label in not_mentioned:
            kind = "keywords" if label != "yes/no" else "answer_token"
            if (kind, method) in missing:
                rows.append({**_base_row(sid, method, shard), "target_kind": kind, "target_label": label,
                             "token_start": -1, "token_end": -1, "status": "not_mentioned"})
                covered.add(kind)
        for kind in sorted({k for k, m in missing if m == method} - covered):
            rows.append({**_base_row(sid, method, shard), "target_kind": kind, "target_label": "",
                         "token_start": -1, "token_end": -1, "status": "no_targets"})
    return rows


def run(ctx) -> dict[str, Any]:
    import pyarrow.dataset as ds
    import torch

    from pipeline.generation import model_inputs_for_sequence
    from pipeline.relevancy import Target, explain_sequence

    cfg = ctx.cfg
    methods = list(dict.fromkeys(cfg.explain.methods))
    kinds = set(cfg.explain.targets)
    faith_kinds = kinds & set(cfg.metrics.faithfulness_kinds)
    synonyms = finding_synonyms(cfg.prompts)
    faithfulness = faithfulness_enabled(cfg)
    samples = shard_samples(ctx)
    ids = sorted(samples["sample_id"])
    only = ds.field("sample_id").isin(ids)
    gens = ctx.view.read("generations", foreign_filter=only)
    gens = gens[gens["sample_id"].isin(set(ids))].drop_duplicates("sample_id")
    done = _done_units(ctx, ids)
    failed = ctx.view.error_keys("explain", only) if not cfg.retry_errors else set()
    faith_done: set[tuple] = set()
    faith_failed: set[str] = set()
    pending: dict[str, list] = {}
    if faithfulness:
        faith_done = ctx.view.keys("faithfulness", foreign_filter=only)
        faith_failed = ctx.view.error_keys("faithfulness", only) if not cfg.retry_errors else set()
        pending = _stored_pending(ctx, set(gens["sample_id"]), methods, faith_done, faith_failed)
        pending = {sid: [p for p in pairs if _faithful_kind(p[0][1], faith_kinds)] for sid, pairs in pending.items()}
        pending = {sid: pairs for sid, pairs in pending.items() if pairs}
    explorer = explorer_samples(gens, cfg.explain.explorer_samples)

    def missing_units(sid: str) -> set[tuple[str, str]]:
        if sid in failed:
            return set()
        sample_kinds = kinds | {"answer_tokens"} if sid in explorer else kinds
        return {(k, m) for k in sample_kinds for m in methods} - done.get(sid, set())

    by_id = samples.set_index("sample_id", drop=False)
    todo = [g for g in gens.sort_values("sample_id").to_dict("records")
            if missing_units(g["sample_id"]) or g["sample_id"] in pending]
    log.info("explain: %d generations in this shard, %d to do, methods=%s targets=%s faithfulness=%s",
             len(gens), len(todo), methods, sorted(kinds), faithfulness)
    summary = {"samples": len(gens), "explained": 0, "rows": 0, "errors": 0}
    if faithfulness:
        summary |= {"faithfulness_rows": 0, "faithfulness_errors": 0, "faithfulness_seconds": 0.0}
    if not todo:
        return summary
    loaded = get_model(ctx)
    occlusion = {
        "occlusion_block": cfg.explain.occlusion_block,
        "occlusion_baseline": cfg.explain.occlusion_baseline,
        "perturbation_batch_size": cfg.explain.perturbation_batch_size,
    }
    with ctx.writer("relevancy") as writer, ctx.writer("faithfulness") as faith_writer:
        for gen in ctx.progress(todo, total=len(todo), desc="explain"):
            sid = gen["sample_id"]
            sample = by_id.loc[sid].to_dict()
            missing = missing_units(sid)
            todo_methods = [m for m in methods if any(mm == m for _, mm in missing)]
            cache: dict[str, Any] = {}

            def inputs() -> dict[str, Any]:
                if "inputs" not in cache:
                    image = read_pil(sample["image_path"], cfg.dataset.max_pixels)
                    cache["inputs"] = model_inputs_for_sequence(loaded, image, gen["sequence_ids"])
                return cache["inputs"]

            new_pairs: list = []
            if missing:
                t0 = time.perf_counter()
                try:
                    todo_kinds = {k for k, _ in missing}
                    targets, not_mentioned = select_targets(loaded.tokenizer, gen, sample, todo_kinds, synonyms)
                    spans = list(dict.fromkeys((t.token_start, t.token_end) for t in targets))
                    out = None
                    if spans:
                        x = inputs()
                        out = explain_sequence(
                            loaded.model, x["input_ids"], x["pixel_values"], x["token_type_ids"],
                            [Target(s, e) for s, e in spans], todo_methods, attention_mask=x["attention_mask"],
                            prompt_length=int(gen["prompt_length"]), chunk_size=_chunk(cfg, loaded.model, max(e for _, e in spans)),
                            seed=sample_seed(cfg.explain.seed, sid), **occlusion,
                        )
                except Exception as e:  # one sample failing (OOM, bad image) is an error row
                    if isinstance(e, torch.cuda.OutOfMemoryError):
                        torch.cuda.empty_cache()
                    ctx.record_error("explain", sid, e, image_id=sample["image_id"])
                    summary["errors"] += 1
                else:
                    seconds = (time.perf_counter() - t0) / max(len(spans), 1)
                    rows = _target_rows(sid, out, targets, not_mentioned, missing, todo_methods, seconds, ctx.shard)
                    for r in rows:
                        key = tuple(r[k] for k in KEY)
                        if r["status"] == "ok" and key not in faith_done and _faithful_kind(r["target_kind"], faith_kinds):
                            new_pairs.append((key, r["token_end"], r["image_map"]))
                    writer.add(rows)
                    summary["rows"] += len(rows)
                    summary["explained"] += 1

            pairs = pending.get(sid, []) + new_pairs
            if faithfulness and pairs and sid not in faith_failed:
                t0 = time.perf_counter()
                try:
                    faith_rows = _faithfulness_rows(loaded, inputs(), pairs, cfg, sid, ctx.shard)
                except Exception as e:  # never a crash: an errors/ row for this sample
                    if isinstance(e, torch.cuda.OutOfMemoryError):
                        torch.cuda.empty_cache()
                    ctx.record_error("faithfulness", sid, e, image_id=sample["image_id"])
                    summary["faithfulness_errors"] += 1
                else:
                    faith_writer.add(faith_rows)
                    summary["faithfulness_rows"] += len(faith_rows)
                    summary["faithfulness_seconds"] += time.perf_counter() - t0
            writer.maybe_flush()
            faith_writer.maybe_flush()
    return summary
