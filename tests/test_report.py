"""Stage report on a synthetic, schema-exact run directory built on the NIH ChestX-ray14 subset.

The fixture runs stage load on the three NIH images (real samples/ and manifests), then writes
generations, relevancy, metrics, sensitivity, answers, faithfulness and errors rows by hand, as
the later stages would, plus an invocation manifest with the model entry.
"""
from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import NIH_SUBSET, compose, run_pipeline

METHODS = ["chefer", "raw_attention", "rollout", "random"]
GH = GW = 16
IMAGE_TOKEN = 9
NIH = ["dataset=nih_cxr14", f"dataset.root={NIH_SUBSET}"]
TEXTS = {  # image id -> free-text answer and the keyword it names (finding, its characters)
    "00001369_000": ("The heart is enlarged, consistent with cardiomegaly.", "Cardiomegaly", "cardiomegaly"),
    "00008386_000": ("A small nodule in the left upper lung.", "Nodule", "nodule"),
    "00000100_000": ("Small left pleural effusion.", "Pleural Effusion", "pleural effusion"),
}
SIDE = {"Cardiomegaly": "bilateral", "Nodule": "left", "Pleural Effusion": None}


def _pixel_protocol_scores(method: str, has_box: bool, kind: str, side: str | None, left: float,
                           rng: np.random.Generator) -> dict[str, float]:
    """iou_top, cnr, the sink diagnostics and side_agrees of one synthetic metrics row: chefer
    localises best; raw_attention parks its mass on the first image token in about a third of its
    maps; free-text keywords on a known side carry side_agrees."""
    nan = float("nan")
    sink = method == "raw_attention" and rng.random() < 0.35
    return {"iou_top": float(rng.uniform(0.2, 0.4) if method == "chefer" else rng.uniform(0.0, 0.2)) if has_box else nan,
            "cnr": float(rng.uniform(1.0, 2.0) if method == "chefer" else rng.uniform(0.1, 0.8)) if has_box else nan,
            "first_token_fraction": float(rng.uniform(0.55, 0.8) if sink else rng.uniform(0.0, 0.02)),
            "corner_fraction": float(rng.uniform(0.0, 0.05)),
            "side_agrees": (left if side == "left" else 1.0 - left) if kind == "keywords" and side in ("left", "right")
            else nan}


def _blob(cx: float, cy: float, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """A 16 x 16 map: a Gaussian at (cx, cy) in cell units plus a little noise (raw, unnormalised)."""
    y, x = np.mgrid[0:GH, 0:GW]
    g = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2)) * 0.01
    return (g + rng.random((GH, GW)) * 0.001).astype(np.float32)


def _map(method: str, sample: dict, finding: str | None, rng: np.random.Generator) -> np.ndarray:
    boxes = [b for b in sample["boxes"] if b["finding"] == finding]
    if method == "random":
        return rng.random((GH, GW), dtype=np.float32)
    if boxes:
        b = boxes[0]
        cx, cy = (b["x"] + b["w"] / 2) / sample["width"] * GW - 0.5, (b["y"] + b["h"] / 2) / sample["height"] * GH - 0.5
    else:
        cx, cy = 11.0, 10.0  # patient's left lower zone
    return _blob(cx, cy, {"chefer": 1.5, "raw_attention": 4.0, "rollout": 3.0}[method], rng)


def _words(answer: str) -> list[tuple[int, int]]:
    """Character spans of word-like tokens (a leading space belongs to the token, like SentencePiece)."""
    return [(m.start(), m.end()) for m in re.finditer(r" ?[^ ]+", answer)]


def build_run(d: Path) -> Path:
    """The synthetic run directory (see the module docstring)."""
    from pipeline.store import RunStore

    run_pipeline(["stages=[load]", *NIH, f"run_dir={d}"])
    store = RunStore(d)
    samples = store.table("samples").read()
    rng = np.random.default_rng(0)
    extra_rng = np.random.default_rng(1)  # the newer score columns: a stream of their own
    gens, rel, met, ans, faith = [], [], [], [], []
    prompt_ids = [2, 5, 20, 21, 22, 6, 7] + [IMAGE_TOKEN] * (GH * GW) + [8, 23, 24, 25, 26, 6, 5, 27]
    for s in samples.to_dict("records"):
        sid, img = s["sample_id"], s["image_id"]
        if s["prompt_kind"] == "free_text":
            answer, finding, word = TEXTS[img]
        else:
            positive = s[{"Pleural Effusion": "label_pleural_effusion", "Cardiomegaly": "label_cardiomegaly",
                          "Nodule": "label_nodule"}.get(s["prompt_finding"], "label_pneumothorax")] == 1.0
            answer = "Yes." if positive else ("No." if s["prompt_id"] != "yn_consolidation" else "Possibly.")
            finding, word = s["prompt_finding"], None
        spans = _words(answer)
        seq = prompt_ids + [30 + k for k in range(len(spans))] + [6]
        plen = len(prompt_ids)
        if img == "00000100_000" and s["prompt_id"] == "yn_pneumothorax":
            continue  # a sample whose generation failed (see errors below)
        gens.append({"sample_id": sid, "answer": answer, "sequence_ids": seq, "prompt_length": plen,
                     "n_new_tokens": len(spans) + 1, "stopped": "eos", "model_name": "synthetic", "seconds": 0.5,
                     "shard": 0})
        targets = []  # (kind, label, token_start, token_end, char_start, char_end, matched)
        if word:
            a = answer.lower().index(word)
            k = next(i for i, (cs, ce) in enumerate(spans) if cs <= a < ce)
            targets.append(("keywords", finding, plen + k, plen + k + 1, a, a + len(word), answer[a:a + len(word)]))
            targets.append(("answer_span", "answer", plen, plen + len(spans), 0, len(answer), answer))
            if img != "00000100_000":  # token-by-token for two samples: the explorer's input
                targets += [("answer_tokens", answer[cs:ce].strip(), plen + k, plen + k + 1, cs, ce, answer[cs:ce])
                            for k, (cs, ce) in enumerate(spans)]
        elif answer in ("Yes.", "No."):
            targets.append(("answer_token", answer[:-1].lower(), plen, plen + 1, 0, len(answer) - 1, answer[:-1]))
        for method in METHODS:
            for kind, label, ts, te, cs, ce, matched in targets:
                grid = _map(method, s, finding, rng)
                text = None
                if method != "random":
                    text = (rng.random(len(seq)) * 0.01).astype(np.float32)
                    text[ts - 1] = 1.0  # identity term of the read-out row
                    text[plen: ts] += 0.02  # earlier answer tokens matter
                rel.append({"sample_id": sid, "target_kind": kind, "target_label": label, "token_start": ts,
                            "token_end": te, "char_start": cs, "char_end": ce, "matched_text": matched,
                            "method": method, "status": "ok", "grid_h": GH, "grid_w": GW,
                            "image_map": grid.reshape(-1).tolist(), "text_map": None if text is None else text.tolist(),
                            "target_score": float(rng.normal(10, 2)), "argmax_matches": True, "image_tokens_ok": True,
                            "seconds": 0.1, "shard": 0})
                if kind == "answer_tokens" and ts > plen + 1:
                    continue  # metrics for a couple of answer tokens only
                has_box = any(b["finding"] == finding for b in s["boxes"])
                good = method == "chefer"
                side = SIDE.get(finding) if s["prompt_kind"] == "free_text" else "right"
                met.append({
                    "sample_id": sid, "target_kind": kind, "target_label": label, "token_start": ts, "method": method,
                    "image_id": img, "prompt_id": s["prompt_id"], "prompt_kind": s["prompt_kind"],
                    "view_position": s["view_position"], "finding": finding if has_box else None,
                    "finding_side": side if (has_box or side == "right") else None,
                    "n_boxes": int(has_box), "mass": float(grid.sum()),
                    "inside_body_ratio": float(rng.uniform(0.8, 0.98) if good else rng.uniform(0.5, 0.9)),
                    "border_fraction": float(rng.uniform(0.0, 0.05) if good else rng.uniform(0.05, 0.3)),
                    "entropy_bits": float(rng.uniform(5, 7) if good else rng.uniform(7, 8)),
                    "entropy_norm": float(rng.uniform(0.6, 0.85) if good else rng.uniform(0.85, 1.0)),
                    "patient_left_fraction": float(
                        rng.uniform(0.6, 0.9) if side == "left" else rng.uniform(0.1, 0.4) if side == "right"
                        else rng.uniform(0.4, 0.6)),
                    "apical_fraction": 0.3, "middle_fraction": 0.4, "basal_fraction": 0.3,
                    "pointing_hit": (1.0 if good else float(rng.integers(0, 2))) if has_box else float("nan"),
                    "box_mass_fraction": float(rng.uniform(0.4, 0.7) if good else rng.uniform(0.05, 0.3))
                    if has_box else float("nan"),
                    "box_area_fraction": 0.2 if has_box else float("nan"),
                    "box_iou": float(rng.uniform(0.2, 0.5)) if has_box else float("nan"),
                    "body_area_fraction": 0.7, "shard": 0})  # pass flags: derived by the report
                met[-1].update(_pixel_protocol_scores(method, has_box, kind, side, met[-1]["patient_left_fraction"],
                                                      extra_rng))
                if kind == "keywords":
                    fr = np.linspace(0, 1, 9)
                    dele = -0.1 - (3.0 if good else 1.5) * fr
                    ins = -4.0 + (3.5 if good else 2.0) * fr
                    rdel, rins = -0.1 - 1.0 * fr, -4.0 + 1.2 * fr
                    auc = lambda y: float(np.trapezoid(y, fr))  # noqa: E731
                    faith.append({"sample_id": sid, "target_kind": kind, "target_label": label, "token_start": ts,
                                  "method": method, "baseline": "mean_image_token", "fractions": fr.tolist(),
                                  "deletion": dele.tolist(), "insertion": ins.tolist(),
                                  "random_deletion": rdel.tolist(), "random_insertion": rins.tolist(),
                                  "deletion_auc": auc(dele), "insertion_auc": auc(ins), "random_deletion_auc": auc(rdel),
                                  "random_insertion_auc": auc(rins), "shard": 0})
            if s["prompt_kind"] == "free_text" and img == "00000100_000":
                rel.append({"sample_id": sid, "target_kind": "keywords", "target_label": "Atelectasis",
                            "token_start": -1, "token_end": -1, "method": method, "status": "not_mentioned", "shard": 0})
            if answer == "Possibly.":
                rel.append({"sample_id": sid, "target_kind": "answer_token", "target_label": "yes/no",
                            "token_start": -1, "token_end": -1, "method": method, "status": "not_mentioned", "shard": 0})
        if s["prompt_kind"] == "yes_no":
            label = s[{"Pleural Effusion": "label_pleural_effusion", "Cardiomegaly": "label_cardiomegaly",
                       "Nodule": "label_nodule", "Pneumothorax": "label_pneumothorax",
                       "Consolidation": "label_consolidation"}[s["prompt_finding"]]]
            label = None if label is None or np.isnan(label) else float(label)
            parsed = {"Yes.": "yes", "No.": "no"}.get(answer, "uncertain")
            state = {1.0: "positive", 0.0: "negative", -1.0: "uncertain", None: "not_mentioned"}[label]
            correct = None if parsed not in ("yes", "no") or state not in ("positive", "negative") else \
                (parsed == "yes") == (state == "positive")
            ans.append({"sample_id": sid, "image_id": img, "prompt_id": s["prompt_id"], "finding": s["prompt_finding"],
                        "answer": answer, "parsed": parsed, "label": label, "label_state": state, "correct": correct,
                        "shard": 0})
    sens = []
    phr = [("tech_fmt", "technical", True), ("tech", "technical", False), ("lay", "lay", False)]
    for img in TEXTS:
        for finding in ("Pleural Effusion", "Cardiomegaly"):
            for i in range(len(phr)):
                for j in range(i + 1, len(phr)):
                    (pa, sa, fa), (pb, sb, fb) = phr[i], phr[j]
                    a_ans, b_ans = ("yes", "yes") if (i + j) % 2 else ("yes", "no")
                    for method in METHODS:
                        js = float(rng.uniform(0.01, 0.15) if method == "chefer" else rng.uniform(0.1, 0.6))
                        sens.append({"image_id": img, "target_kind": "answer_token", "target_label": finding,
                                     "method": method, "prompt_a": f"{finding[:4].lower()}_{pa}",
                                     "prompt_b": f"{finding[:4].lower()}_{pb}", "style_a": sa, "style_b": sb,
                                     "format_a": fa, "format_b": fb, "js_divergence": js,
                                     "js_distance": float(np.sqrt(js)), "answer_a": a_ans.capitalize() + ".",
                                     "answer_b": b_ans.capitalize() + ".", "parsed_a": a_ans, "parsed_b": b_ans,
                                     "answers_agree": a_ans == b_ans, "shard": 0})
    for name, rows in (("generations", gens), ("relevancy", rel), ("metrics", met), ("answers", ans),
                       ("faithfulness", faith), ("sensitivity", sens)):
        half = len(rows) // 2  # two part files per table, as two shards would write
        store.table(name).write_rows(rows[:half], tag="s00000")
        store.table(name).write_rows(rows[half:], tag="s00001")
    for stage, etype, sid in (("generate", "OutOfMemoryError", "nih_cxr14:00000100_000:yn_pneumothorax"),
                              ("explain", "RuntimeError", "nih_cxr14:00008386_000:yn_nodule")):
        store.record_error(stage, sid, RuntimeError(f"synthetic {etype}"), image_id=sid.split(":")[1])
    errs = store.table("errors").read()
    errs.loc[errs["stage"] == "generate", "error_type"] = "OutOfMemoryError"
    shutil.rmtree(d / "errors")
    store.table("errors").write_rows(errs.to_dict("records"), tag="s00000")
    # the invocation that ran generate / explain / score, with the model entry
    first = sorted((d / "manifests").glob("*.json"))[0]
    m = json.loads(first.read_text())
    m.update(started_utc="20990101T000000Z", finished_utc="20990101T000100Z",
             stages={"generate": {"seconds": 1.0}, "explain": {"seconds": 2.0}, "score": {"seconds": 0.5}},
             model={"name_or_path": str(d / "no_such_model"), "revision": "main", "resolved_revision": "0123abcd",
                    "fingerprint": "sha256:synthetic", "dtype": "bfloat16", "device": "cuda:0",
                    "model_type": "gemma3", "image_token_id": IMAGE_TOKEN, "mm_tokens_per_image": GH * GW,
                    "config_name": "medgemma_4b"})
    m["config"]["stages"] = ["generate", "explain", "score"]
    m["config"]["model"].update(name="medgemma_4b", name_or_path=str(d / "no_such_model"))
    m["config"]["explain"]["methods"] = METHODS
    m["config"]["explain"]["targets"] = ["keywords", "answer_token", "answer_span", "answer_tokens"]
    (d / "manifests" / "20990101T000000Z-s00000-1.json").write_text(json.dumps(m))
    return d


def make_report(run_dir: Path, *overrides: str):
    return run_pipeline(["stages=[report]", *NIH, f"run_dir={run_dir}", "report.bootstrap=200",
                         "report.gallery_size=4", *overrides])


@pytest.fixture(scope="module")
def reported(tmp_path_factory) -> tuple[Path, dict]:
    """The synthetic run with its report (images included); read-only for the tests using it."""
    d = build_run(tmp_path_factory.mktemp("report_template") / "run")
    ctx = make_report(d)
    return d, ctx.manifest.data["stages"]["report"]


@pytest.fixture
def run_dir(reported, tmp_path) -> Path:
    """A private copy of the reported run."""
    d = tmp_path / "run"
    shutil.copytree(reported[0], d)
    return d


def _embedded_pngs(html: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)]


def _stage_summary(ctx) -> dict:
    return ctx.manifest.data["stages"]["report"]


def test_full_report(reported):
    run_dir, summary = reported
    assert summary["failed_sections"] == [] and summary["missing_tables"] == []
    rep = run_dir / "report"
    html = (rep / "report.html").read_text()
    md = (rep / "report.md").read_text()
    # self-contained: every image inline, no external resource (links to local files only)
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)
    assert "<link" not in html and "@import" not in html and "<script src" not in html
    srcs = re.findall(r'<img[^>]*src="([^"]+)"', html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    figures = sorted(p.name for p in (rep / "figures").glob("*.png"))
    assert len(srcs) == len(figures)
    embedded = _embedded_pngs(html)
    assert sorted(embedded) == sorted((rep / "figures" / f).read_bytes() for f in figures)
    for f in ("score_distributions.png", "laterality.png", "js_by_finding.png", "faithfulness_curves.png",
              "localisation.png", "gallery_00.png"):
        assert f in figures, f
    for sec in ("identity", "counts", "scores", "answers", "localisation", "faithfulness", "sensitivity",
                "laterality", "gallery", "explorer"):
        assert f'id="{sec}"' in html and f'<a id="{sec}"></a>' in md
    assert 'href="token_explorer.html"' in html
    # identity: model and revision from the newest manifest with a model entry; config hash; errors
    ident = json.loads((run_dir / "manifest.json").read_text())
    for s in ("no_such_model", "0123abcd", ident["config_hash"], "nih_cxr14", "OutOfMemoryError"):
        assert s in html and s in md, s
    model = pd.read_csv(rep / "tables" / "model.csv").set_index("item")["value"]
    assert model["revision (requested)"] == "main" and model["dtype"] == "bfloat16"
    errors = pd.read_csv(rep / "tables" / "errors_by_stage_type.csv")
    assert set(zip(errors["stage"], errors["error_type"])) == {("generate", "OutOfMemoryError"),
                                                               ("explain", "RuntimeError")}
    status = pd.read_csv(rep / "tables" / "targets_by_status.csv").set_index("target kind")
    rel = pd.read_parquet(run_dir / "relevancy", columns=["sample_id", "target_kind", "target_label", "token_start",
                                                            "status"]).drop_duplicates()
    assert status.loc["total", "ok"] == (rel["status"] == "ok").sum()
    assert status.loc["total", "not_mentioned"] == (rel["status"] == "not_mentioned").sum() == 4
    # every table is a CSV; the gallery shows one figure per chosen target
    assert len(list((rep / "tables").glob("*.csv"))) == summary["tables"]
    assert summary["gallery"] == len([f for f in figures if f.startswith("gallery_")]) >= 3


def test_score_summaries_match_the_data(reported):
    run_dir = reported[0]
    rep = run_dir / "report" / "tables"
    met = pd.read_parquet(run_dir / "metrics")
    s = pd.read_csv(rep / "scores_keywords.csv")
    kw = met[met["target_kind"] == "keywords"]
    for method in METHODS:
        for score in ("inside_body_ratio", "pointing_hit", "box_mass_fraction"):
            x = kw.loc[kw["method"] == method, score].dropna()
            row = s[(s["method"] == method) & (s["score"] == score)].iloc[0]
            assert row["n"] == len(x)  # NaNs dropped, n counts non-NaN
            assert row["mean"] == pytest.approx(x.mean(), abs=1e-6)
            assert row["median"] == pytest.approx(x.median(), abs=1e-6)
            assert row["ci_low"] <= row["mean"] + 1e-9 and row["mean"] <= row["ci_high"] + 1e-9
    full = pd.read_csv(rep / "scores_by_method_finding_view.csv")
    assert {"target_kind", "method", "finding", "view", "score", "n", "mean", "median", "ci_low", "ci_high"} <= \
        set(full.columns)
    assert set(full.loc[full["target_kind"] == "keywords", "finding"]) == {"Cardiomegaly", "Nodule", "Pleural Effusion"}
    p = pd.read_csv(rep / "pass_rates.csv")  # flags derived with the default thresholds
    for method, g in kw.groupby("method"):
        row = p[(p["target_kind"] == "keywords") & (p["method"] == method) & (p["check"] == "pass_border")].iloc[0]
        assert row["n"] == len(g) and row["passed"] == (g["border_fraction"] <= 0.05).sum()
        assert row["ci_low"] <= row["fraction"] + 1e-9 and row["fraction"] <= row["ci_high"] + 1e-9
    row = p[(p["target_kind"] == "keywords") & (p["method"] == "chefer") & (p["check"] == "pass_inside_body")].iloc[0]
    assert row["fraction"] == 1.0 and row["n"] == (kw["method"] == "chefer").sum()
    # answers: definite pairs only, the rest counted apart
    a = pd.read_parquet(run_dir / "answers")
    byf = pd.read_csv(rep / "answers_by_finding.csv").set_index("group")
    definite = a[a["parsed"].isin(["yes", "no"]) & a["label_state"].isin(["positive", "negative"])]
    assert byf.loc["(all)", "n_definite"] == len(definite)
    assert byf.loc["(all)", "accuracy"] == pytest.approx(definite["correct"].mean())
    assert byf.loc["(all)", "answer_uncertain"] == (a["parsed"] == "uncertain").sum() > 0
    assert byf.loc["(all)", "accuracy_lo"] <= byf.loc["(all)", "accuracy"] <= byf.loc["(all)", "accuracy_hi"]
    # localisation beside the floors
    loc = pd.read_csv(rep / "localisation.csv").set_index("method")
    assert loc.loc["chefer", "pointing"] == 1.0 and loc.loc["chefer", "mass"] > loc.loc["random", "mass"]
    assert loc.loc["chefer", "uniform_mass"] == pytest.approx(0.2)
    # faithfulness, sensitivity, laterality
    fa = pd.read_csv(rep / "faithfulness_auc.csv").set_index("method")
    assert fa.loc["chefer", "deletion_auc"] < fa.loc["chefer", "random_deletion_auc"]
    js = pd.read_csv(rep / "js_by_finding.csv")
    assert set(js["finding"]) == {"Pleural Effusion", "Cardiomegaly"} and (js["n"] == 9).all()
    lat = pd.read_csv(rep / "laterality.csv")
    left = lat[(lat["side"] == "left") & (lat["method"] == "chefer")].iloc[0]
    assert left["mean"] > 0.5
    assert set(lat["side"]) == {"left", "right", "bilateral", "(unknown)"}  # effusion: no boxes


def test_bootstrap_is_seeded():
    from reports.stats import summarise

    rng = np.random.default_rng(0)
    df = pd.DataFrame({"method": ["a"] * 50 + ["b"] * 30, "x": rng.random(80), "y": rng.random(80),
                       "patient": [f"p{i % 13}" for i in range(80)]})
    df.loc[::7, "y"] = np.nan
    a = summarise(df, ["x", "y"], ["method"], 300, seed=0, cluster="patient")
    pd.testing.assert_frame_equal(a, summarise(df, ["x", "y"], ["method"], 300, seed=0, cluster="patient"))
    # a group's interval does not depend on the other groups
    only_a = summarise(df[df["method"] == "a"], ["x", "y"], ["method"], 300, seed=0, cluster="patient")
    pd.testing.assert_frame_equal(only_a, a[a["method"] == "a"].reset_index(drop=True))
    assert list(a["n"]) == [50, 50 - 8, 30, 30 - 4]  # NaNs dropped; n counts rows, not patients
    assert not np.allclose(a["ci_low"], summarise(df, ["x", "y"], ["method"], 300, seed=1, cluster="patient")["ci_low"])


def test_token_explorer(reported):
    run_dir = reported[0]
    page = (run_dir / "report" / "token_explorer.html").read_text()
    payload = json.loads(re.search(r'<script type="application/json" id="explorer-data">(.*?)</script>', page,
                                   re.S).group(1).replace("<\\/", "</"))
    assert payload["methods"] == METHODS and payload["include_images"] is True
    assert payload["tokenizer"] is False  # the manifest's model path does not exist: prompt unshaded
    assert len(payload["samples"]) == 2
    gens = pd.read_parquet(run_dir / "generations").set_index("sample_id")
    for s in payload["samples"]:
        answer = gens.loc[s["id"], "answer"]
        assert "".join(seg[0] for seg in s["answer"]) == answer  # the whole answer, words clickable
        assert len(s["tokens"]) == len(answer.split())
        assert s["image"].startswith("data:image/png;base64,")
        tok = s["tokens"][0]
        grid = np.frombuffer(base64.b64decode(tok["m"]["chefer"]["g"]), dtype=np.uint8)
        assert grid.size == GH * GW and grid.max() == 255
        assert "t" in tok["m"]["chefer"] and "t" not in tok["m"]["random"]
    assert "<script src" not in page and not re.search(r"""(src|href)=["']?(https?:)?//""", page)


def test_explorer_prompt_tokens_with_tokenizer(tiny_model_dir):
    """With the model's tokenizer at hand, prompt tokens are decoded and shaded; image tokens collapse."""
    from reports.explorer import build_payload, load_tokenizer

    tok = load_tokenizer({"name_or_path": str(tiny_model_dir)})
    assert tok is not None
    image_id = tok.convert_tokens_to_ids("<image_soft_token>")
    prompt = tok("Is there a pleural effusion?", add_special_tokens=False)["input_ids"]
    answer_ids = tok(" Yes it is", add_special_tokens=False)["input_ids"]
    seq = [tok.bos_token_id] + [image_id] * 4 + prompt + answer_ids
    plen = 1 + 4 + len(prompt)
    answer = tok.decode(answer_ids)
    rows = []
    pos = 0
    for k, tid in enumerate(answer_ids):
        piece = tok.decode(answer_ids[: k + 1])
        text = np.linspace(0, 1, len(seq)).astype(np.float32)
        rows.append({"sample_id": "s", "target_kind": "answer_tokens", "target_label": piece[pos:].strip(),
                     "token_start": plen + k, "token_end": plen + k + 1, "char_start": pos, "char_end": len(piece),
                     "matched_text": piece[pos:], "method": "chefer", "status": "ok", "grid_h": 2, "grid_w": 2,
                     "image_map": [0.0, 1.0, 2.0, 3.0], "text_map": text.tolist()})
        pos = len(piece)
    payload = build_payload(pd.DataFrame(rows), pd.DataFrame([{"sample_id": "s", "answer": answer, "sequence_ids": seq,
                                                               "prompt_length": plen}]),
                            pd.DataFrame(), ["s"], tok, image_id, include_images=False, image_size=64)
    s = payload["samples"][0]
    kinds = [p["k"] for p in s["prompt"]]
    assert kinds.count("image") == 1 and kinds[0] == "special"
    assert "pleural" in "".join(p["t"] for p in s["prompt"]).lower()
    assert s["tpos"][: len(s["prompt"]) - 1] == [p["p"] for p in s["prompt"] if p["k"] != "image"]
    last = s["tokens"][-1]["m"]["chefer"]
    shade = np.frombuffer(base64.b64decode(last["t"]), dtype=np.uint8)
    assert shade.size == len(s["tpos"]) and shade.max() == 255 and s["image"] is None


def test_no_patient_images(run_dir):
    """include_images=false: no gallery, no image in the explorer, no image pixels anywhere; a report
    that had images before is replaced whole (no stale gallery files)."""
    rep = run_dir / "report"
    assert list((rep / "figures").glob("gallery_*.png"))  # the copied report had images
    make_report(run_dir, "report.include_images=false")
    figures = sorted((rep / "figures").glob("*.png"))
    assert figures and not [f for f in figures if f.name.startswith("gallery")]
    html = (rep / "report.html").read_text()
    assert sorted(_embedded_pngs(html)) == sorted(f.read_bytes() for f in figures)  # only the plots
    assert "include_images=false" in html
    page = (rep / "token_explorer.html").read_text()
    assert "data:image" not in page and "base64,iVBOR" not in page
    payload = json.loads(re.search(r'id="explorer-data">(.*?)</script>', page, re.S).group(1).replace("<\\/", "</"))
    assert payload["include_images"] is False
    assert all(s["image"] is None and s["body"] == [] for s in payload["samples"])
    # the image-free plots are still there
    assert {"score_distributions.png", "laterality.png", "localisation.png"} <= {f.name for f in figures}


def test_partial_run_only_samples(tmp_path):
    d = tmp_path / "run"
    run_pipeline(["stages=[load]", *NIH, f"run_dir={d}"])
    ctx = make_report(d)
    summary = _stage_summary(ctx)
    assert summary["failed_sections"] == []
    assert set(summary["missing_tables"]) == {"generations", "relevancy", "metrics", "sensitivity", "answers",
                                              "faithfulness"}
    md = (d / "report" / "report.md").read_text()
    html = (d / "report" / "report.html").read_text()
    for table in ("metrics", "answers", "sensitivity", "faithfulness", "relevancy"):
        assert f"No `{table}` rows in this run" in md
    assert "No invocation loaded the model yet" in md
    n_samples = len(pd.read_parquet(d / "samples"))
    assert n_samples == 3 * len(compose([]).prompts.variants)
    assert f"samples (image x prompt) | {n_samples}" in md
    assert "<img" not in html and not (d / "report" / "token_explorer.html").exists()


def test_partial_run_nothing_explained(run_dir):
    """Tables present but with nothing usable: only not-mentioned targets, no metrics."""
    for name in ("metrics", "sensitivity", "answers", "faithfulness"):
        shutil.rmtree(run_dir / name)
    import pyarrow.parquet as pq

    rel = pq.read_table(run_dir / "relevancy").to_pylist()
    shutil.rmtree(run_dir / "relevancy")
    from pipeline.store import RunStore

    RunStore(run_dir).table("relevancy").write_rows([r for r in rel if r["status"] == "not_mentioned"], tag="s00000")
    ctx = make_report(run_dir)
    assert _stage_summary(ctx)["failed_sections"] == []
    md = (run_dir / "report" / "report.md").read_text()
    assert "no relevancy row with status ok" in md and "No token explorer" in md


def test_statistics_helpers():
    from reports.stats import bootstrap_mean_ci, mean_curve, wilson_interval

    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    assert np.isnan(wilson_interval(0, 0)[0])
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 1.0, 400)
    lo, hi = bootstrap_mean_ci(np.r_[x, [np.nan] * 5], 2000, np.random.default_rng(1))
    se = x.std(ddof=1) / np.sqrt(x.size)
    assert lo == pytest.approx(x.mean() - 1.96 * se, abs=0.03) and hi == pytest.approx(x.mean() + 1.96 * se, abs=0.03)
    b = (rng.random(300) < 0.3).astype(float)  # a proportion of independent rows: close to Wilson
    lo, hi = bootstrap_mean_ci(b, 4000, np.random.default_rng(2))
    wl, wh = wilson_interval(int(b.sum()), b.size)
    assert lo == pytest.approx(wl, abs=0.02) and hi == pytest.approx(wh, abs=0.02)
    g, y, n = mean_curve([[0, 0.5, 1], [0, 1]], [[0, 1, 2], [0, 4]])
    assert n == 2 and y[-1] == pytest.approx(3.0) and g[0] == 0 and g[-1] == 1


def test_report_config_errors(run_dir):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="report.bootstrap"):
        make_report(run_dir, "report.bootstrap=-1")


def test_compare_runs_means_and_labels(run_dir, tmp_path):
    """reports.compare: one row per run x target kind x method x score, means equal to metrics/,
    intervals as the report's (patient-level cluster bootstrap, streamed aggregates)."""
    from reports.compare import SCORES, compare_runs, format_table, main

    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    for p in (other / "manifests").glob("*.json"):
        m = json.loads(p.read_text())
        if m.get("model"):
            m["model"]["config_name"] = "other_model"
        p.write_text(json.dumps(m))
    long = compare_runs([run_dir, other], target_kinds=["keywords"], n_resamples=200)
    assert set(long["run"]) == {"medgemma_4b", "other_model"}
    assert set(long["target_kind"]) == {"keywords"} and set(long["score"]) == set(SCORES)
    metrics = pd.read_parquet(run_dir / "metrics")
    kw = metrics[metrics["target_kind"] == "keywords"]
    for method, g in kw.groupby("method"):
        row = long[(long["run"] == "medgemma_4b") & (long["method"] == method) & (long["score"] == "border_fraction")]
        assert row["mean"].item() == pytest.approx(float(g["border_fraction"].mean()), rel=1e-6)
        assert row["ci_low"].item() <= row["mean"].item() <= row["ci_high"].item()
        ratio = (g["box_mass_fraction"] / g["box_area_fraction"]).dropna()
        row = long[(long["run"] == "other_model") & (long["method"] == method) & (long["score"] == "box_mass_ratio")]
        assert row["n"].item() == len(ratio)
    text = format_table(long)
    assert "other_model" in text and "pointing_hit" in text
    assert main([str(run_dir), "--target-kind", "keywords", "--csv", str(tmp_path / "c.csv")]) == 0
    assert len(pd.read_csv(tmp_path / "c.csv")) == kw["method"].nunique() * len(SCORES)


def test_model_validation_section_shows_the_shipped_card(run_dir):
    """A model directory's evaluation.json (recorded in the manifest's model entry) becomes a section."""
    card = {"about": "Held-out phantoms.", "summary": [["yes/no accuracy (default prompts)", 0.975], ["variant", "clean"]],
            "tables": {"localisation": [{"kind": "keyword", "method": "chefer", "pointing": 0.9, "n": 10}]},
            "notes": ["A caveat."]}
    for p in (run_dir / "manifests").glob("*.json"):
        m = json.loads(p.read_text())
        if m.get("model"):
            m["model"]["validation"] = card
        p.write_text(json.dumps(m))
    make_report(run_dir)
    md = (run_dir / "report" / "report.md").read_text()
    assert "Model validation (shipped with the model)" in md
    assert "0.975" in md and "A caveat." in md
    table = pd.read_csv(run_dir / "report" / "tables" / "model_validation_localisation.csv")
    assert table["pointing"].tolist() == [0.9]
