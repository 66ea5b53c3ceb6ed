"""The notebook API: explain a token, a keyword (all occurrences, multi-token), the answer span;
overlays with the right geometry."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.explainer import Explainer
from pipeline.generation import Generation, encode_inputs
from pipeline.model import load_model
from pipeline.relevancy import Target, explain_sequence
from reports.overlay import overlay_map, upsample_grid

PROMPT = "Describe the findings."


@pytest.fixture(scope="module")
def explainer(tiny_model_dir):
    return Explainer(load_model(str(tiny_model_dir), device="cpu"), max_new_tokens=6)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, size=(48, 64), dtype=np.uint8)).convert("RGB")


def _forced_generation(ex, image, answer: str) -> Generation:
    """A Generation whose answer we choose (the random model's own answers are noise)."""
    ids = encode_inputs(ex.loaded, image, PROMPT)["input_ids"][0].tolist()
    ans = ex.loaded.tokenizer.encode(answer, add_special_tokens=False)
    eot = ex.loaded.end_of_turn_id
    return Generation(answer=answer, sequence_ids=ids + ans + [eot], prompt_length=len(ids), n_new_tokens=len(ans) + 1,
                      stopped="eos")


def test_explain_default_token_and_text_alignment(explainer, image):
    res = explainer.explain(image, PROMPT)
    assert res.image_relevancy.shape == (4, 4) and (res.image_relevancy >= 0).all()
    assert len(res.token_labels) == len(res.text_relevancy) == len(res.metadata["sequence_ids"])
    assert res.metadata["argmax_matches"] is True and res.metadata["image_tokens_ok"] is True
    assert res.raw_image_relevancy is not None and set(res.maps) == {"chefer", "raw_attention"}
    p = res.occurrences[0].token_start
    assert p == res.metadata["prompt_length"]


def test_explain_token_position_matches_the_engine(explainer, image):
    gen = explainer.generate(image, PROMPT)
    p = gen.prompt_length + 2
    res = explainer.explain(image, PROMPT, token_position=p, generation=gen)
    from pipeline.generation import model_inputs_for_sequence

    inp = model_inputs_for_sequence(explainer.loaded, image, gen.sequence_ids)
    direct = explain_sequence(explainer.loaded.model, inp["input_ids"], inp["pixel_values"], inp["token_type_ids"],
                              [Target(p, p + 1)], ["chefer"])
    np.testing.assert_allclose(res.image_relevancy, direct.map(0, "chefer").image_map, rtol=1e-6)
    with pytest.raises(ValueError, match="not an answer position"):
        explainer.explain(image, PROMPT, token_position=1, generation=gen)


def test_explain_keyword_all_occurrences_multi_token(explainer, image):
    gen = _forced_generation(explainer, image, "cardiomegaly. no effusion. cardiomegaly again")
    res = explainer.explain_keyword(image, PROMPT, "cardiomegaly", generation=gen)
    assert len(res.occurrences) == 2
    assert all(o.token_end - o.token_start > 1 for o in res.occurrences)  # a multi-token word
    per = [o["chefer"] for o in res.metadata["per_occurrence"]]
    np.testing.assert_allclose(res.image_relevancy, np.mean(per, axis=0), rtol=1e-6)
    assert not np.allclose(per[0], per[1])
    with pytest.raises(LookupError, match="pneumothorax"):
        explainer.explain_keyword(image, PROMPT, "pneumothorax", generation=gen)
    with pytest.raises(LookupError):  # whole words only: "effusion" does not match inside "effusions"
        explainer.explain_keyword(image, PROMPT, "effus", generation=gen)


def test_explain_answer_span(explainer, image):
    gen = _forced_generation(explainer, image, "left effusion")
    res = explainer.explain_answer_span(image, PROMPT, generation=gen)
    (span,) = res.occurrences
    assert span.token_end == len(gen.sequence_ids) - 1  # the closing <end_of_turn> is not explained
    assert span.token_start == gen.prompt_length


def test_overlay_geometry_non_square():
    grid = np.zeros((4, 4), np.float32)
    grid[0, 3] = 1.0  # top-right cell: the patient's left upper zone
    up = upsample_grid(grid, 100, 60, smooth=False)
    assert up.shape == (60, 100)
    assert up[:15, 75:].min() == 1.0 and up[15:, :].max() == 0.0 and up[:, :75].max() == 0.0
    img = Image.new("L", (100, 60), 128)
    ov = np.asarray(overlay_map(img, grid, mark_sides=False))
    red = ov[..., 0].astype(int) - ov[..., 2].astype(int)
    assert red[:15, 75:].mean() > red[30:, :50].mean() + 50


def test_explainer_from_pretrained_loads_the_same_way(tiny_model_dir):
    ex = Explainer.from_pretrained(str(tiny_model_dir), device="cpu", max_new_tokens=3)
    assert ex.loaded.image_token_id == ex.loaded.model.config.image_token_id
