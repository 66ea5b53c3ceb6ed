"""Perturbation of image soft tokens: batched variants, faithfulness curves, occlusion, and the
faithfulness stage's faithfulness/ table (tiny random Gemma 3 models, CPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import run_pipeline  # noqa: E402
from tiny_gemma_config import IMAGE_ID, make_tiny_gemma3  # noqa: E402

from pipeline.relevancy import (  # noqa: E402
    ALL_METHODS,
    METHODS,
    ImagePerturber,
    Target,
    explain_sequence,
    faithfulness_curves,
    faithfulness_curves_batch,
    occlusion_maps,
)
from pipeline.relevancy import perturbation  # noqa: E402
from pipeline.relevancy.perturbation import occlusion_blocks, relevance_order, trapezoid_auc  # noqa: E402

M = 16  # image tokens of the tiny model (4 x 4)
TOL = 1e-5


@pytest.fixture(scope="module")
def inputs(x):
    return x


def _targets(n: int) -> list[Target]:
    return [Target(n - 6, n - 5), Target(n - 4, n - 1), Target(n - 6, n)]


def _logprob(logits: torch.Tensor, ids: torch.Tensor, target: Target) -> float:
    """Target log-probability from full (N, V) logits, float64."""
    lp = logits.double().log_softmax(-1)
    return float(sum(lp[p - 1, int(ids[0, p])] for p in target.positions))


def _plain(model, x, target: Target, with_types: bool = True) -> float:
    with torch.no_grad():
        logits = model(
            input_ids=x.input_ids, pixel_values=x.pixel_values, token_type_ids=x.token_type_ids if with_types else None
        ).logits[0]
    return _logprob(logits, x.input_ids, target)


def _manual(model, x, target: Target, replaced, baseline: str = "mean") -> float:
    """Independent path: build inputs_embeds by hand (text embeddings, image features merged, the
    replaced tokens set to the baseline) and run the model on them with token types."""
    replaced = list(np.asarray(replaced, dtype=np.int64).reshape(-1))
    with torch.no_grad():
        feats = model.model.get_image_features(x.pixel_values).pooler_output[0]  # (M, D)
        emb = model.get_input_embeddings()(x.input_ids).clone()
        img = torch.nonzero(x.input_ids[0] == IMAGE_ID).flatten()
        emb[0, img] = feats.to(emb.dtype)
        base = feats.float().mean(0) if baseline == "mean" else torch.zeros(feats.shape[-1])
        if replaced:
            emb[0, img[replaced]] = base.to(emb.dtype)
        logits = model(inputs_embeds=emb, token_type_ids=x.token_type_ids).logits[0]
    return _logprob(logits, x.input_ids, target)


# --------------------------------------------------------------------------------------------
# machinery


def test_unperturbed_variant_equals_plain_forward(model, inputs):
    n = inputs.input_ids.shape[1]
    targets = _targets(n)
    masks = np.zeros((4, M), dtype=bool)
    masks[1, [0, 5, 7]] = True
    masks[2] = True  # the unperturbed variant shares its chunk with perturbed ones
    got = ImagePerturber(model, inputs, batch_size=4).logprobs(masks, targets)
    assert got.dtype == np.float32 and got.shape == (4, 3)
    for ti, t in enumerate(targets):
        plain = _plain(model, inputs, t)
        assert abs(got[0, ti] - plain) <= TOL and abs(got[3, ti] - plain) <= TOL
    # the check is sensitive to the bidirectional image mask: without token types it differs
    assert max(abs(_plain(model, inputs, t, with_types=False) - _plain(model, inputs, t)) for t in targets) > 1e-3


def test_eager_model_runs_perturbations_on_sdpa_and_is_restored(inputs):
    """A model loaded with eager attention (as load_model does) gets the same scores from the
    perturbed passes, which run on sdpa, and keeps eager afterwards."""
    eager = make_tiny_gemma3(seed=0, num_layers=4, sliding_window=8)
    eager.set_attn_implementation("eager")
    lm_cfg = eager.config.get_text_config()
    n = inputs.input_ids.shape[1]
    targets = _targets(n)
    masks = np.zeros((3, M), dtype=bool)
    masks[1, [0, 5, 7]] = True
    got = ImagePerturber(eager, inputs, batch_size=4).logprobs(masks, targets)
    assert lm_cfg._attn_implementation == "eager"
    for ti, t in enumerate(targets):
        assert abs(got[0, ti] - _plain(eager, inputs, t)) <= TOL
        assert abs(got[1, ti] - _manual(eager, inputs, t, [0, 5, 7])) <= TOL


@pytest.mark.parametrize("baseline", ["mean", "zero"])
def test_variants_equal_manually_perturbed_forwards(model, inputs, baseline):
    n = inputs.input_ids.shape[1]
    targets = _targets(n)
    rng = np.random.default_rng(0)
    masks = rng.random((5, M)) < 0.4
    got = ImagePerturber(model, inputs, baseline=baseline, batch_size=2).logprobs(masks, targets)
    for v in range(5):
        for ti, t in enumerate(targets):
            assert abs(got[v, ti] - _manual(model, inputs, t, np.flatnonzero(masks[v]), baseline)) <= TOL


def test_which_scores_only_requested_targets(model, inputs):
    n = inputs.input_ids.shape[1]
    targets = _targets(n)
    masks = np.zeros((3, M), dtype=bool)
    masks[1, 3] = True
    p = ImagePerturber(model, inputs)
    full = p.logprobs(masks, targets)
    part = p.logprobs(masks, targets, which=[[2], [0, 1], []])
    assert np.isnan(part[2]).all() and np.isnan(part[0, :2]).all() and np.isnan(part[1, 2])
    np.testing.assert_allclose(part[0, 2], full[0, 2], atol=TOL)
    np.testing.assert_allclose(part[1, :2], full[1, :2], atol=TOL)


# --------------------------------------------------------------------------------------------
# faithfulness curves


def test_curve_end_points(model, inputs):
    n = inputs.input_ids.shape[1]
    t = Target(n - 4, n - 1)
    r = faithfulness_curves(model, inputs, t, np.random.default_rng(3).random((4, 4)), steps=4)
    np.testing.assert_allclose(r.fractions, [0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_array_equal(r.counts, [0, 4, 8, 12, 16])
    plain, blank = _plain(model, inputs, t), _manual(model, inputs, t, np.arange(M))
    for curve in (r.deletion, r.random_deletion):
        assert abs(curve[0] - plain) <= TOL and abs(curve[-1] - blank) <= TOL
    for curve in (r.insertion, r.random_insertion):
        assert abs(curve[0] - blank) <= TOL and abs(curve[-1] - plain) <= TOL
    assert r.deletion[-1] == r.insertion[0] and r.deletion[0] == r.insertion[-1]
    assert r.original == r.deletion[0] and r.all_baseline == r.deletion[-1]
    assert all(c.dtype == np.float32 and c.shape == (5,) for c in (r.deletion, r.insertion))


def test_hand_made_map_orders_deletion_and_insertion(model, inputs):
    n = inputs.input_ids.shape[1]
    t = Target(n - 6, n)
    image_map = np.zeros(M, dtype=np.float32)
    image_map[[5, 9, 2, 14]] = [4.0, 3.0, 2.0, 1.0]  # the rest tie at 0: lower index first
    order = relevance_order(image_map.reshape(4, 4))
    np.testing.assert_array_equal(order[:8], [5, 9, 2, 14, 0, 1, 3, 4])
    r = faithfulness_curves(model, inputs, t, image_map.reshape(4, 4), steps=4)
    assert abs(r.deletion[1] - _manual(model, inputs, t, [5, 9, 2, 14])) <= TOL
    assert abs(r.deletion[2] - _manual(model, inputs, t, [5, 9, 2, 14, 0, 1, 3, 4])) <= TOL
    revealed = {5, 9, 2, 14}
    assert abs(r.insertion[1] - _manual(model, inputs, t, [i for i in range(M) if i not in revealed])) <= TOL
    np.testing.assert_array_equal(r.order, order)


def test_batching_does_not_change_results(model, inputs):
    n = inputs.input_ids.shape[1]
    rng = np.random.default_rng(7)
    pairs = [(t, rng.random((4, 4))) for t in _targets(n)] + [(_targets(n)[0], rng.random((4, 4)))]
    runs = [faithfulness_curves_batch(model, inputs, pairs, steps=4, seed=2, batch_size=bs) for bs in (1, 5, 1000)]
    single = [faithfulness_curves(model, inputs, t, m, steps=4, seed=2, batch_size=3) for t, m in pairs]
    for other in [*runs[1:], single]:
        for a, b in zip(runs[0], other):
            for name in ("deletion", "insertion", "random_deletion", "random_insertion"):
                np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=0, atol=TOL)


def test_random_curves_reproducible_and_shared(model, inputs):
    n = inputs.input_ids.shape[1]
    t = Target(n - 4, n - 1)
    rng = np.random.default_rng(1)
    maps = [rng.random((4, 4)), rng.random((4, 4))]
    a = faithfulness_curves_batch(model, inputs, [(t, m) for m in maps], steps=4, seed=11)
    b = faithfulness_curves_batch(model, inputs, [(t, m) for m in maps], steps=4, seed=11)
    c = faithfulness_curves(model, inputs, t, maps[0], steps=4, seed=12)
    np.testing.assert_array_equal(a[0].random_deletion, b[0].random_deletion)
    np.testing.assert_array_equal(a[0].random_insertion, b[0].random_insertion)
    # one random order per call: every map of a target shares the floor
    np.testing.assert_array_equal(a[0].random_deletion, a[1].random_deletion)
    assert not np.allclose(a[0].random_deletion[1:-1], c.random_deletion[1:-1], atol=1e-6)
    np.testing.assert_allclose(a[0].deletion, c.deletion, atol=TOL)  # the map's own curves ignore the seed


def test_aucs_and_row_columns(model, inputs):
    n = inputs.input_ids.shape[1]
    r = faithfulness_curves(model, inputs, Target(n - 2, n), np.arange(M, dtype=np.float32), steps=8)
    x, y = r.fractions.astype(np.float64), r.deletion.astype(np.float64)
    assert r.deletion_auc == pytest.approx(float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2)), rel=1e-12)
    assert trapezoid_auc([0, 0.5, 1], [1, 1, 3]) == pytest.approx(1.5)
    row = r.columns()
    assert set(row) == {"baseline", "fractions", "deletion", "insertion", "random_deletion", "random_insertion",
                        "deletion_auc", "insertion_auc", "random_deletion_auc", "random_insertion_auc"}
    assert row["baseline"] == "mean" and len(row["fractions"]) == 9
    assert row["random_insertion_auc"] == pytest.approx(trapezoid_auc(r.fractions, r.random_insertion))


def test_bfloat16_model_gives_float32_scores(inputs):
    m32, m16 = make_tiny_gemma3(seed=0), make_tiny_gemma3(seed=0, dtype=torch.bfloat16)
    n = inputs.input_ids.shape[1]
    masks = np.random.default_rng(0).random((3, M)) < 0.5
    a = ImagePerturber(m32, inputs).logprobs(masks, [Target(n - 3, n)])
    b = ImagePerturber(m16, inputs).logprobs(masks, [Target(n - 3, n)])
    assert b.dtype == np.float32 and np.isfinite(b).all()
    np.testing.assert_allclose(a, b, rtol=0.05)


# --------------------------------------------------------------------------------------------
# occlusion


def test_occlusion_single_tokens_equal_manual_forwards(model, inputs):
    n = inputs.input_ids.shape[1]
    targets = [Target(n - 3, n - 2), Target(n - 6, n)]
    maps = occlusion_maps(model, inputs, targets, batch_size=5)
    assert maps.shape == (2, 4, 4) and maps.dtype == np.float32 and (maps >= 0).all()
    for ti, t in enumerate(targets):
        plain = _plain(model, inputs, t)
        expected = [max(0.0, plain - _manual(model, inputs, t, [i])) for i in range(M)]
        np.testing.assert_allclose(maps[ti].reshape(-1), expected, rtol=0, atol=TOL)
        assert maps[ti].max() > 0


def test_block_occlusion(model, inputs):
    n = inputs.input_ids.shape[1]
    t = Target(n - 6, n)
    assert [b.tolist() for b in occlusion_blocks(4, 4, 3)] == [[0, 1, 2, 4, 5, 6, 8, 9, 10], [3, 7, 11],
                                                               [12, 13, 14], [15]]
    plain = _plain(model, inputs, t)
    two = occlusion_maps(model, inputs, [t], block=2)[0]
    for tokens in occlusion_blocks(4, 4, 2):
        values = two.reshape(-1)[tokens]
        assert (values == values[0]).all()  # the block's drop goes to each of its tokens
        assert abs(values[0] - max(0.0, plain - _manual(model, inputs, t, tokens))) <= TOL
    three = occlusion_maps(model, inputs, [t], block=3)[0].reshape(-1)
    assert abs(three[12] - max(0.0, plain - _manual(model, inputs, t, [12, 13, 14]))) <= TOL
    assert three[12] == three[13] == three[14]


def test_occlusion_is_an_explain_sequence_method(model, inputs):
    assert "occlusion" in ALL_METHODS and "occlusion" not in METHODS
    n = inputs.input_ids.shape[1]
    targets = [Target(n - 3, n - 2), Target(n - 6, n)]
    out = explain_sequence(model, inputs.input_ids, inputs.pixel_values, inputs.token_type_ids, targets,
                           ["chefer", "occlusion"], occlusion_block=2, perturbation_batch_size=3)
    direct = occlusion_maps(model, inputs, targets, block=2)
    for i in range(2):
        mm = out.map(i, "occlusion")
        assert mm.text_map is None and mm.image_map.dtype == np.float32 and mm.image_map.shape == (4, 4)
        np.testing.assert_allclose(mm.image_map, direct[i], atol=TOL)
    assert "occlusion" in out.timings


def test_failures_raise_instead_of_returning_a_map(model, inputs, monkeypatch):
    n = inputs.input_ids.shape[1]
    with pytest.raises(ValueError, match="baseline"):
        ImagePerturber(model, inputs, baseline="blur")
    with pytest.raises(ValueError, match="image block"):
        occlusion_maps(model, inputs, [Target(2, 3)])
    with pytest.raises(ValueError, match="image map"):
        faithfulness_curves(model, inputs, Target(n - 1, n), np.ones(15))
    with pytest.raises(ValueError, match="steps"):
        faithfulness_curves(model, inputs, Target(n - 1, n), np.ones(M), steps=0)
    with pytest.raises(ValueError, match="non-finite"):
        faithfulness_curves(model, inputs, Target(n - 1, n), np.full(M, np.nan))

    # the substitution hook never reaches a language model: an error, not a zero map
    monkeypatch.setattr(perturbation, "find_language_model", lambda m: torch.nn.Identity())
    with pytest.raises(RuntimeError, match="could not be recorded"):
        occlusion_maps(model, inputs, [Target(n - 1, n)])
    monkeypatch.undo()

    def broken(self, mask, wanted, targets):
        return np.full((mask.shape[0], len(targets)), np.nan, dtype=np.float32)

    monkeypatch.setattr(ImagePerturber, "_run_chunk", broken)
    with pytest.raises(RuntimeError, match="not finite"):
        occlusion_maps(model, inputs, [Target(n - 1, n)])
    with pytest.raises(RuntimeError, match="not finite"):
        explain_sequence(model, inputs.input_ids, inputs.pixel_values, inputs.token_type_ids, [Target(n - 1, n)],
                         ["occlusion"])


# --------------------------------------------------------------------------------------------
# faithfulness stage: faithfulness/ rows, resume, turning it on later, failures

KEY = ["sample_id", "target_kind", "target_label", "token_start", "method"]


def _overrides(model_dir, run_dir, *extra: str) -> list[str]:
    return [f"model.name_or_path={model_dir}", "model.device=cpu", "dataset.n=4", "dataset.limit=2",
            "prompts=findings", "generate.max_new_tokens=8", "explain.targets=[answer_span]",
            "faithfulness.kinds=[answer_span]", "explain.methods=[chefer,random,occlusion]",
            "explain.explorer_samples=0", "stages=[load,generate,explain,faithfulness]",
            f"run_dir={run_dir}",
            *extra]


def _faith(run_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "faithfulness").sort_values(KEY).reset_index(drop=True)


def test_faithfulness_stage_writes_curves_and_resumes(tmp_path, tiny_model_dir, monkeypatch):
    run_a = tmp_path / "a"
    run_pipeline(_overrides(tiny_model_dir, run_a, "faithfulness.enabled=true"))
    rel = pd.read_parquet(run_a / "relevancy")
    faith = _faith(run_a)
    ok = rel[rel["status"] == "ok"]
    assert len(ok) == 6 and set(ok["method"]) == {"chefer", "random", "occlusion"}
    assert set(map(tuple, faith[KEY].itertuples(index=False))) == set(map(tuple, ok[KEY].itertuples(index=False)))
    for row in faith.itertuples():
        assert row.baseline == "mean" and len(row.fractions) == 9 and len(row.deletion) == 9
        assert row.deletion[0] == row.insertion[-1] == row.random_deletion[0]
        assert row.deletion[-1] == row.insertion[0] == row.random_insertion[0]
        assert row.deletion_auc == pytest.approx(trapezoid_auc(row.fractions, row.deletion), rel=1e-5)
    occ = ok[ok["method"] == "occlusion"]
    assert all((np.asarray(m) >= 0).all() for m in occ["image_map"])

    # target kinds left out of faithfulness.kinds get no curves
    run_c = tmp_path / "c"
    run_pipeline(_overrides(tiny_model_dir, run_c, "faithfulness.enabled=true",
                            "faithfulness.kinds=[keywords,answer_token]"))
    assert len(pd.read_parquet(run_c / "relevancy").query("status == 'ok'")) == 6
    assert not (run_c / "faithfulness").exists() or pd.read_parquet(run_c / "faithfulness").empty

    # a resumed run adds nothing
    run_pipeline(_overrides(tiny_model_dir, run_a, "faithfulness.enabled=true"))
    again = pd.read_parquet(run_a / "faithfulness")
    assert len(again) == len(faith) and not again.duplicated(KEY).any()
    assert len(pd.read_parquet(run_a / "relevancy")) == len(rel)

    # faithfulness turned on later: computed from the stored maps; a failure is an errors/ row
    run_b = tmp_path / "b"
    run_pipeline(_overrides(tiny_model_dir, run_b, "faithfulness.enabled=false"))
    assert not (run_b / "faithfulness").exists()

    def fail(*args, **kwargs):
        raise RuntimeError("simulated faithfulness failure")

    import pipeline.relevancy as relevancy

    monkeypatch.setattr(relevancy, "faithfulness_curves_batch", fail)
    run_pipeline(_overrides(tiny_model_dir, run_b, "faithfulness.enabled=true"))
    errors = pd.read_parquet(run_b / "errors")
    assert list(errors["stage"]) == ["faithfulness"] * 2 and "simulated" in errors["message"].iloc[0]
    assert not (run_b / "faithfulness").exists()
    monkeypatch.undo()
    run_pipeline(_overrides(tiny_model_dir, run_b, "faithfulness.enabled=true"))  # failed samples are skipped
    assert not (run_b / "faithfulness").exists()
    run_pipeline(_overrides(tiny_model_dir, run_b, "faithfulness.enabled=true", "retry_errors=true"))
    later = _faith(run_b)
    pd.testing.assert_frame_equal(later.drop(columns=["shard"]), faith.drop(columns=["shard"]), check_exact=False,
                                  rtol=1e-5, atol=1e-5)


def test_explain_only_explains_and_the_old_keys_fail(tmp_path, tiny_model_dir):
    """The explain stage writes no curves even where faithfulness is on; metrics.faithfulness*
    fail at start, naming the key they moved to."""
    from conftest import compose

    from pipeline.config import ConfigError, validate

    run = tmp_path / "e"
    run_pipeline(_overrides(tiny_model_dir, run, "faithfulness.enabled=true", "stages=[load,generate,explain]",
                            "explain.methods=[random]"))
    assert (run / "relevancy").exists() and not (run / "faithfulness").exists()
    for old, new in [("metrics.faithfulness=true", "faithfulness.enabled"),
                     ("metrics.faithfulness_steps=4", "faithfulness.steps"),
                     ("metrics.faithfulness_kinds=[keywords]", "faithfulness.kinds"),
                     ("metrics.faithfulness_baseline=zero", "faithfulness.baseline")]:
        with pytest.raises(ConfigError, match=f"{old.split('=')[0]} moved to {new}"):
            validate(compose([old]))
