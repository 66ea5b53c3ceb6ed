"""Stage `explain`: relevancy maps for the targets of every generated answer -> relevancy/.

Per sample: the targets named by `explain.targets` are found in the answer, de-duplicated by
token span, and explained by every method of `explain.methods` with ONE forward pass over the
stored sequence (see pipeline.relevancy). A finding the answer does not mention (the finding a
yes/no prompt asks about, or one the dataset labels positive) gets a row with
status="not_mentioned" and no map: it is recorded as not explained, never replaced by another
target. Every (sample, method) gets at least one row, which is how a resumed run knows it is done.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from pipeline.prompts import finding_synonyms
from pipeline.stages.common import get_model, read_pil, shard_samples
from pipeline.vocabulary import FINDINGS, label_column

log = logging.getLogger(__name__)


def select_targets(tokenizer, gen: dict[str, Any], sample: dict[str, Any], kinds, synonyms) -> tuple[list, list[str]]:
    """(targets, not-mentioned finding labels) of one generated answer."""
    from pipeline.targets import answer_span_target, answer_token_target, answer_tokens_targets, keyword_targets

    seq, plen = list(gen["sequence_ids"]), int(gen["prompt_length"])
    targets, not_mentioned = [], []
    if "keywords" in kinds:
        found, missing = keyword_targets(tokenizer, seq, plen, synonyms)
        targets += found
        wanted = {f for f in FINDINGS if sample.get(label_column(f)) == 1.0}
        if isinstance(sample.get("prompt_finding"), str) and sample["prompt_finding"]:
            wanted.add(sample["prompt_finding"])
        not_mentioned += sorted(f for f in wanted if f in missing or f not in synonyms)
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


def _base_row(sample_id: str, method: str, shard: int) -> dict[str, Any]:
    return {"sample_id": sample_id, "method": method, "shard": shard}


def run(ctx) -> dict[str, Any]:
    import torch

    from pipeline.generation import model_inputs_for_sequence
    from pipeline.relevancy import Target, explain_sequence

    cfg = ctx.cfg
    methods = list(dict.fromkeys(cfg.explain.methods))
    kinds = set(cfg.explain.targets)
    synonyms = finding_synonyms(cfg.prompts)
    samples = shard_samples(ctx)
    gens = ctx.store.table("generations").read()
    gens = gens[gens["sample_id"].isin(set(samples["sample_id"]))]
    done = {}
    for sid, method in ctx.store.table("relevancy").read(columns=["sample_id", "method"]).drop_duplicates().itertuples(index=False):
        done.setdefault(sid, set()).add(method)
    failed = ctx.store.error_keys("explain") if not cfg.retry_errors else set()
    by_id = samples.set_index("sample_id", drop=False)
    todo = [g for g in gens.sort_values("sample_id").to_dict("records")
            if g["sample_id"] not in failed and set(methods) - done.get(g["sample_id"], set())]
    log.info("explain: %d generations in this shard, %d to do, methods=%s targets=%s",
             len(gens), len(todo), methods, sorted(kinds))
    if not todo:
        return {"samples": len(gens), "explained": 0, "rows": 0, "errors": 0}
    loaded = get_model(ctx)
    n_rows = n_err = n_ok = 0
    with ctx.writer("relevancy") as writer:
        for gen in ctx.progress(todo, total=len(todo), desc="explain"):
            sid = gen["sample_id"]
            sample = by_id.loc[sid].to_dict()
            todo_methods = [m for m in methods if m not in done.get(sid, set())]
            t0 = time.perf_counter()
            try:
                targets, not_mentioned = select_targets(loaded.tokenizer, gen, sample, kinds, synonyms)
                spans = list(dict.fromkeys((t.token_start, t.token_end) for t in targets))
                out = None
                if spans:
                    image = read_pil(sample["image_path"], cfg.dataset.max_pixels)
                    inputs = model_inputs_for_sequence(loaded, image, gen["sequence_ids"])
                    out = explain_sequence(
                        loaded.model, inputs["input_ids"], inputs["pixel_values"], inputs["token_type_ids"],
                        [Target(s, e) for s, e in spans], todo_methods, attention_mask=inputs["attention_mask"],
                        prompt_length=int(gen["prompt_length"]), chunk_size=cfg.explain.chunk_size,
                        seed=cfg.explain.seed,
                    )
            except Exception as e:  # one sample failing (OOM, bad image) is an error row
                if isinstance(e, torch.cuda.OutOfMemoryError):
                    torch.cuda.empty_cache()
                ctx.store.record_error("explain", sid, e, image_id=sample["image_id"], shard=ctx.shard)
                n_err += 1
                continue
            seconds = (time.perf_counter() - t0) / max(len(spans), 1)
            rows = []
            for method in todo_methods:
                for t in targets:
                    res = out.results[spans.index((t.token_start, t.token_end))]
                    mm = res.maps[method]
                    rows.append({
                        **_base_row(sid, method, ctx.shard),
                        "target_kind": t.kind, "target_label": t.label,
                        "token_start": t.token_start, "token_end": t.token_end,
                        "char_start": t.char_start, "char_end": t.char_end, "matched_text": t.matched_text,
                        "status": "ok", "grid_h": out.grid_h, "grid_w": out.grid_w,
                        "image_map": mm.image_map.reshape(-1).tolist(),
                        "text_map": None if mm.text_map is None else mm.text_map.tolist(),
                        "target_score": res.score, "argmax_matches": out.argmax_matches,
                        "image_tokens_ok": out.image_tokens_ok, "seconds": seconds,
                    })
                for label in not_mentioned:
                    rows.append({**_base_row(sid, method, ctx.shard), "target_kind": "keywords" if label != "yes/no"
                                 else "answer_token", "target_label": label, "token_start": -1, "token_end": -1,
                                 "status": "not_mentioned"})
                if not targets and not not_mentioned:
                    rows.append({**_base_row(sid, method, ctx.shard), "target_kind": "", "target_label": "",
                                 "token_start": -1, "token_end": -1, "status": "no_targets"})
            writer.add(rows)
            writer.maybe_flush()
            n_rows += len(rows)
            n_ok += 1
    return {"samples": len(gens), "explained": n_ok, "rows": n_rows, "errors": n_err}
