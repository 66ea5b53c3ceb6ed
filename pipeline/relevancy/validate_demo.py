"""Validation of relevancy methods on the trained demo model (docs/methods.md, "Validation").

The numbers of docs/demo_model.md ("Held-out results") for any registered methods, computed with
the same evaluation code (:mod:`pipeline.train_demo`: the same held-out seed, phantoms, answers,
targets, scores and helpers), so they are comparable with the methods listed there:

- localisation: pointing game and box mass ratio per target kind (48 single-lesion phantoms);
- faithfulness: deletion / insertion AUC of log P of the explained tokens (the first 24
  explained sequences, 16 steps, mean-embedding baseline) with the random-order floor;
- model randomisation: Spearman correlation of the trained and the randomised model's maps
  (12 sequences, layers re-initialised cascading from the top);
- contrast: the yes/no answers' "yes" and side word explained with ``score=logit`` and with
  ``score=contrast`` (against "no" / the other side), pointing game and box mass ratio;
- integrated gradients' relative completeness error per number of steps, AttnLRP's relative
  conservation error.

Usage::

    python -m pipeline.relevancy.validate_demo --threads 1 --json validation.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SECTIONS = ("localisation", "faithfulness", "randomisation", "contrast")


def contrast_rows(loaded, records: Sequence[dict], methods: Sequence[str]) -> list[dict]:
    """Pointing and box ratio of the yes/no answers' targets under score=logit and =contrast."""
    from metrics.maps import MapScorer
    from pipeline.generation import model_inputs_for_sequence
    from pipeline.relevancy import SequenceInputs, counterpart_id, explain

    rows = []
    for rec in records:
        if rec["kind"] != "yes_no" or not rec["correct"] or not rec["targets"]:
            continue
        gen, item = rec["gen"], rec["item"]
        seq = SequenceInputs.of(model_inputs_for_sequence(loaded, item.image, gen.sequence_ids),
                                prompt_length=gen.prompt_length)
        targets = [t for _, t in rec["targets"]]
        counter = [counterpart_id(loaded.tokenizer, gen.sequence_ids[t.start]) if t.end - t.start == 1 else None
                   for t in targets]
        scorer = MapScorer(item.phantom.body_mask, item.case.view, [rec["box"]])
        for score in ("logit", "contrast"):
            out = explain(loaded.model, seq, targets, methods, score=score, counterparts=counter)
            for (kind, target), res in zip(rec["targets"], out.results):
                for method in methods:
                    sc = scorer.score(res.maps[method].image_map)
                    rows.append({"key": item.key, "kind": kind, "method": method, "score": score,
                                 "contrasted": res.counterpart is not None, "target_score": res.score,
                                 "pointing": sc["pointing_hit"],
                                 "box_ratio": sc["box_mass_fraction"] / sc["box_area_fraction"]})
    return rows


def validate_methods(model_dir: str | Path, methods: Sequence[str], *, seed: int | None = None,
                     n_localisation: int = 48, n_faithfulness: int = 24, n_randomisation: int = 12,
                     sections: Sequence[str] = SECTIONS, log=print) -> dict[str, Any]:
    """The tables of the module docstring for ``methods`` on ``model_dir``."""
    import pandas as pd

    from pipeline import train_demo as td
    from pipeline.model import load_model

    seed = td.HELD_OUT_SEED if seed is None else seed
    t0 = time.perf_counter()
    loaded = load_model(str(model_dir), dtype="float32", device="cpu")
    free, yes_no = td.prompt_texts()
    items = td.draw_items(td.localisation_cases(seed, n_localisation), seed, "loc")
    records, stats = td.localisation_records(loaded, items, free[0], yes_no, td.synonyms())
    good = [r for r in records if r["correct"]]
    report: dict[str, Any] = {"model_dir": str(model_dir), "seed": seed, "methods": list(methods),
                              "answers": stats}
    rows = td.explain_records(loaded, good, methods, keep_maps=True)
    if "localisation" in sections:
        table = td.summarise(rows)
        report["localisation"] = json.loads(table.reset_index().to_json(orient="records"))
        log(f"\n## Localisation ({len(good)} of {len(records)} answers exactly right and explained)\n")
        log(td._md(table[["n", "pointing", "box_ratio", "box_area", "border", "inside_body"]]))
    if "faithfulness" in sections:
        keys = list(dict.fromkeys((r["key"], r["prompt"]) for r in rows))[:n_faithfulness]
        sub = [r for r in rows if (r["key"], r["prompt"]) in set(keys)]
        ftab = pd.DataFrame(td.faithfulness(loaded, records, sub, methods)).groupby(["kind", "method"]).mean(
            numeric_only=True)
        report["faithfulness"] = json.loads(ftab.reset_index().to_json(orient="records"))
        log(f"\n## Deletion / insertion (16 steps, {len(keys)} sequences)\n")
        log(td._md(ftab))
    if "randomisation" in sections:
        rm = [m for m in methods if m not in ("occlusion", "random")]
        sel = [r for r in records if r["correct"] and r["targets"]][:n_randomisation]
        ra = pd.DataFrame(td.randomisation_check(loaded, sel, rm, seed=seed))
        order = list(dict.fromkeys(ra["stage"]))
        rtab = ra.groupby(["stage", "method"], sort=False)["spearman"].mean().unstack("method").loc[order]
        report["randomisation"] = json.loads(rtab.reset_index().to_json(orient="records"))
        log(f"\n## Cascading randomisation, {len(sel)} sequences\n")
        log(td._md(rtab))
    if "contrast" in sections:
        gm = [m for m in methods if m in ("chefer", "legrad", "gradcam", "integrated_gradients", "attnlrp")]
        ct = pd.DataFrame(contrast_rows(loaded, good, gm))
        ctab = ct.groupby(["kind", "method", "score"]).agg(
            n=("key", "count"), contrasted=("contrasted", "mean"), target_score=("target_score", "mean"),
            pointing=("pointing", "mean"), box_ratio=("box_ratio", "mean"))
        report["contrast"] = json.loads(ctab.reset_index().to_json(orient="records"))
        log("\n## Logit vs contrast targets (yes/no answers)\n")
        log(td._md(ctab))
    if "integrated_gradients" in methods:
        report["ig_completeness"] = _ig_completeness(loaded, good, log)
    if "attnlrp" in methods:
        report["attnlrp_conservation"] = _attnlrp_conservation(loaded, good, log)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    log(f"\n(took {report['seconds']} s)")
    return report


def _ig_completeness(loaded, records: Sequence[dict], log, steps: Sequence[int] = (4, 16, 64), n: int = 12):
    """Relative completeness error |sum a - (S(x) - S(x'))| / |S(x) - S(x')| of integrated
    gradients on the first ``n`` explained records, per number of steps (median, max)."""
    import numpy as np

    from pipeline.generation import model_inputs_for_sequence
    from pipeline.relevancy import SequenceInputs, explain

    out = {}
    for s in steps:
        rel = []
        for rec in [r for r in records if r["targets"]][:n]:
            seq = SequenceInputs.of(model_inputs_for_sequence(loaded, rec["item"].image, rec["gen"].sequence_ids))
            res = explain(loaded.model, seq, [t for _, t in rec["targets"]], ["integrated_gradients"], ig_steps=s)
            for r in res.results:
                ex = r.maps["integrated_gradients"].extras
                rel.append(ex["completeness_error"] / max(abs(ex["score_delta"]), 1e-12))
        out[s] = {"median": float(np.median(rel)), "max": float(np.max(rel)), "n": len(rel)}
        log(f"integrated_gradients, {s} steps: relative completeness error median {out[s]['median']:.2e}, "
            f"max {out[s]['max']:.2e} ({len(rel)} targets)")
    return out


def _attnlrp_conservation(loaded, records: Sequence[dict], log, n: int = 24) -> dict[str, float]:
    """Relative conservation error |sum_i R_i - S| / |S| of AttnLRP (all positions) and the share
    of the relevance on the image tokens, on the first ``n`` explained records."""
    import numpy as np

    from pipeline.generation import model_inputs_for_sequence
    from pipeline.relevancy import SequenceInputs, explain

    rel, image_share = [], []
    for rec in [r for r in records if r["targets"]][:n]:
        seq = SequenceInputs.of(model_inputs_for_sequence(loaded, rec["item"].image, rec["gen"].sequence_ids))
        out = explain(loaded.model, seq, [t for _, t in rec["targets"]], ["attnlrp"])
        for r in out.results:
            ex = r.maps["attnlrp"].extras
            rel.append(ex["conservation_error"] / max(abs(r.score), 1e-12))
            image_share.append(float(r.maps["attnlrp"].image_map.sum()) / max(abs(ex["relevance_sum"]), 1e-12))
    out = {"median": float(np.median(rel)), "max": float(np.max(rel)), "n": len(rel),
           "image_share_median": float(np.median(image_share))}
    log(f"attnlrp: relative conservation error median {out['median']:.3f}, max {out['max']:.3f}; positive "
        f"image-token relevance / total relevance, median {out['image_share_median']:.3f} ({len(rel)} targets)")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.relevancy.validate_demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(REPO / "data" / "demo_model"))
    ap.add_argument("--methods", default="chefer,legrad,gradcam,integrated_gradients,attnlrp,occlusion,random")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    report = validate_methods(args.model, [m.strip() for m in args.methods.split(",") if m.strip()],
                              sections=[s.strip() for s in args.sections.split(",") if s.strip()])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
