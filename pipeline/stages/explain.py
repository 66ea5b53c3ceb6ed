"""Stage `explain`: relevancy maps for the targets of every generated answer -> relevancy/.

Per sample: the targets named by `explain.targets` are found in the answer, de-duplicated by
token span, and explained by every method of `explain.methods` with ONE captured forward pass
over the stored sequence (see pipeline.relevancy; `occlusion` and `integrated_gradients` add
their own batched passes). A finding the answer does not mention (the finding a yes/no prompt
asks about, or one the dataset labels positive) gets a row with status="not_mentioned" and no
map: it is recorded as not explained, never replaced by another target.

Resume is exact per unit of work, a (sample, target kind, method): every unit gets at least one
row (a kind with no target in the answer: one row with status "no_targets" and that kind), so a
resumed run computes exactly the units it lacks. Adding a method or a target kind to a finished
run explains just those; removing one deletes nothing. Only this shard's rows are read.

Score (`explain.score`, pipeline.relevancy.scores): what gradient methods explain and what
`target_score` holds. Every "ok" row records it in `score_kind`; under `contrast`,
`contrast_token` names the counterpart a single-token target was explained against (null: the
target has none and its plain logit was explained). A shard whose stored rows were explained
with another score is refused (ConfigError naming explain.score), so a run never mixes scores:
use a new run_dir to compare scores. Rows written before the column existed count as "logit".

Deletion / insertion curves of these maps are the `faithfulness` stage's (pipeline.stages.faithfulness).
"""
from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

from pipeline.config import ConfigError
from pipeline.prompts import finding_synonyms
from pipeline.stages.common import get_model, read_pil, record_sample_failure, shard_samples
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
    """Seed of a sample's `random` maps and random faithfulness floor: stable across runs, shards
    and resumes."""
    return int.from_bytes(hashlib.sha256(f"{int(seed)}:{sample_id}".encode()).digest()[:8], "little")


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
                 seconds: float, shard: int, contrast_tokens: dict[tuple[int, int], str | None]) -> list[dict[str, Any]]:
    """relevancy/ rows of the `missing` (kind, method) units of one sample, in `methods` order."""
    rows = []
    spans = list(dict.fromkeys((t.token_start, t.token_end) for t in targets))
    for method in methods:
        covered = set()
        for t in targets:
            if (t.kind, method) not in missing:
                continue
            span = (t.token_start, t.token_end)
            res = out.results[spans.index(span)]
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
                "score_kind": out.score_kind, "contrast_token": contrast_tokens.get(span),
                "completeness_error": mm.extras.get("completeness_error"),
                "conservation_error": mm.extras.get("conservation_error"),
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


def counterparts(tokenizer, seq: list[int], spans: list[tuple[int, int]], cfg) -> list[int | None]:
    """Per span the contrast token id (`explain.score=contrast`, single-token spans whose word is
    in `explain.contrast_pairs`), else None."""
    from pipeline.relevancy import counterpart_id

    if cfg.explain.score != "contrast":
        return [None] * len(spans)
    pairs = [tuple(p) for p in cfg.explain.contrast_pairs]
    return [counterpart_id(tokenizer, seq[s], pairs) if e - s == 1 else None for s, e in spans]


def check_score_kind(ctx, only, score: str) -> None:
    """Refuse to add rows of `score` to a shard whose stored "ok" rows have another score kind."""
    import pyarrow.dataset as ds

    stored = ctx.view.read("relevancy", ["score_kind"], filter=ds.field("status") == "ok", foreign_filter=only)
    kinds = set(stored["score_kind"].fillna("logit"))
    if kinds - {score}:
        raise ConfigError(f"explain.score={score}, but this shard's relevancy rows were explained with "
                          f"{', '.join(sorted(kinds - {score}))}: one run holds one score. Use a new run_dir to "
                          "compare scores (or the run's explain.score).")


def _explain_sample(ctx, loaded, gen, sample, missing, methods, synonyms, inputs):
    """relevancy/ rows of one sample's `missing` units (raises what explaining raised)."""
    from pipeline.relevancy import SequenceInputs, Target, explain

    cfg = ctx.cfg
    t0 = time.perf_counter()
    todo_methods = [m for m in methods if any(mm == m for _, mm in missing)]
    targets, not_mentioned = select_targets(loaded.tokenizer, gen, sample, {k for k, _ in missing}, synonyms)
    spans = list(dict.fromkeys((t.token_start, t.token_end) for t in targets))
    out, tokens = None, {}
    if spans:
        seq = list(gen["sequence_ids"])
        counter = counterparts(loaded.tokenizer, seq, spans, cfg)
        tokens = {sp: None if c is None else loaded.tokenizer.convert_ids_to_tokens(int(c))
                  for sp, c in zip(spans, counter)}
        e = cfg.explain
        out = explain(
            loaded.model, SequenceInputs.of(inputs(), prompt_length=int(gen["prompt_length"])),
            [Target(s, t) for s, t in spans], todo_methods,
            chunk_size=_chunk(cfg, loaded.model, max(t for _, t in spans)),
            seed=sample_seed(e.seed, gen["sample_id"]), score=e.score, counterparts=counter,
            occlusion_block=e.occlusion_block, occlusion_baseline=e.occlusion_baseline,
            perturbation_batch_size=e.perturbation_batch_size, ig_steps=e.ig_steps, ig_baseline=e.ig_baseline,
        )
    seconds = (time.perf_counter() - t0) / max(len(spans), 1)
    return _target_rows(gen["sample_id"], out, targets, not_mentioned, missing, todo_methods, seconds, ctx.shard,
                        tokens)


def run(ctx) -> dict[str, Any]:
    import pyarrow.dataset as ds

    cfg = ctx.cfg
    methods = list(dict.fromkeys(cfg.explain.methods))
    kinds = set(cfg.explain.targets)
    synonyms = finding_synonyms(cfg.prompts)
    samples = shard_samples(ctx)
    ids = sorted(samples["sample_id"])
    only = ds.field("sample_id").isin(ids)
    gens = ctx.view.read("generations", foreign_filter=only)
    gens = gens[gens["sample_id"].isin(set(ids))].drop_duplicates("sample_id")
    done = _done_units(ctx, ids)
    failed = ctx.view.error_keys("explain", only) if not cfg.retry_errors else set()
    explorer = explorer_samples(gens, cfg.explain.explorer_samples)

    def missing_units(sid: str) -> set[tuple[str, str]]:
        if sid in failed:
            return set()
        sample_kinds = kinds | {"answer_tokens"} if sid in explorer else kinds
        return {(k, m) for k in sample_kinds for m in methods} - done.get(sid, set())

    by_id = samples.set_index("sample_id", drop=False)
    todo = [g for g in gens.sort_values("sample_id").to_dict("records") if missing_units(g["sample_id"])]
    log.info("explain: %d generations in this shard, %d to do, methods=%s targets=%s score=%s",
             len(gens), len(todo), methods, sorted(kinds), cfg.explain.score)
    summary = {"samples": len(gens), "explained": 0, "rows": 0, "errors": 0}
    if not todo:
        return summary
    from pipeline.generation import model_inputs_for_sequence  # torch: imported only with work to do

    check_score_kind(ctx, only, cfg.explain.score)
    loaded = get_model(ctx)
    with ctx.writer("relevancy") as writer:
        for gen in ctx.progress(todo, total=len(todo), desc="explain"):
            sid = gen["sample_id"]
            sample = by_id.loc[sid].to_dict()

            def inputs(sample=sample, gen=gen) -> dict[str, Any]:
                image = read_pil(sample["image_path"], cfg.dataset.max_pixels)
                return model_inputs_for_sequence(loaded, image, gen["sequence_ids"])

            try:
                rows = _explain_sample(ctx, loaded, gen, sample, missing_units(sid), methods, synonyms, inputs)
            except Exception as e:  # one sample failing (OOM, bad image) is an error row
                record_sample_failure(ctx, "explain", sid, sample["image_id"], e)
                summary["errors"] += 1
            else:
                writer.add(rows)
                summary["rows"] += len(rows)
                summary["explained"] += 1
            writer.maybe_flush()
    return summary
