"""The shipped demo models (data/demo_model, data/demo_model_shortcut): they load through the
MedGemma code path, answer in the trained grammar, get a clear left/right case right, and stay
small. Training inputs are built exactly like the pipeline's generation inputs."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from conftest import REPO

DEMO = REPO / "data" / "demo_model"
SHORTCUT = REPO / "data" / "demo_model_shortcut"
MAX_BYTES = 10 * 1024 * 1024

YES_NO = re.compile(r"^(no\.|yes\.( (left|right) (upper|middle|lower) zone\.)?)$")
SENTENCE = re.compile(
    r"^((left|right) (upper|middle|lower) zone (consolidation|nodule)|(left|right) pleural effusion|"
    r"(left|right) apical pneumothorax|cardiomegaly|no acute cardiopulmonary abnormality|no pleural effusion)$"
)


def _size(path):
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def loaded():
    from pipeline.model import load_model

    torch.set_num_threads(min(2, torch.get_num_threads()))
    return load_model(str(DEMO), dtype="float32", device="cpu")


@pytest.mark.parametrize("path", [DEMO, SHORTCUT], ids=["demo", "shortcut"])
def test_shipped_directory_small_and_complete(path):
    assert any(path.glob("*.safetensors")), f"{path} has no weights"
    for name in ("config.json", "tokenizer.json", "processor_config.json", "chat_template.jinja", "training.json",
                 "evaluation.json"):
        assert (path / name).is_file(), name
    assert _size(path) <= MAX_BYTES


def test_loads_like_medgemma(loaded):
    from pipeline.demo_model import ensure_demo_model

    assert ensure_demo_model(DEMO) == DEMO
    cfg = loaded.model.config
    assert cfg.model_type == "gemma3" and type(loaded.model).__name__ == "Gemma3ForConditionalGeneration"
    assert cfg.mm_tokens_per_image == 256
    assert loaded.image_token_id == cfg.image_token_id
    assert loaded.tokenizer.convert_ids_to_tokens(loaded.end_of_turn_id) == "<end_of_turn>"


def test_missing_weights_fail_loudly(tmp_path):
    from pipeline.demo_model import DemoModelMissing, ensure_demo_model

    with pytest.raises(DemoModelMissing, match="train_demo --out data/demo_model_shortcut --variant shortcut"):
        ensure_demo_model(tmp_path / "demo_model_shortcut")
    assert not (tmp_path / "demo_model_shortcut").exists()


def test_pipeline_names_the_missing_demo_weights(tmp_path):
    """model=demo with a moved model directory stops at start with the restore command."""
    from pipeline.demo_model import DemoModelMissing

    from conftest import run_pipeline

    with pytest.raises(DemoModelMissing, match="git checkout"):
        run_pipeline([f"run_dir={tmp_path}/r", "stages=[load,generate]", "dataset.limit=1",
                      "model.name_or_path=data/no_such_demo_model"])


def test_training_inputs_equal_generation_inputs(loaded):
    from pipeline.generation import encode_inputs
    from pipeline.train_demo import SYSTEM_PROMPT, Encoder, Recipe, prompt_texts, sample_batch

    free, yes_no = prompt_texts()
    ex = sample_batch(np.random.default_rng(5), Recipe(), 4, free, yes_no)
    enc = Encoder(loaded.processor, loaded.image_token_id)
    batch = enc.batch([e[0] for e in ex], [e[1] for e in ex], [e[2] for e in ex])
    for row, (image, prompt, answer, _, _) in enumerate(ex):
        ref = encode_inputs(loaded, image, prompt, SYSTEM_PROMPT)
        n = ref["input_ids"].shape[1]
        assert torch.equal(batch["input_ids"][row, :n], ref["input_ids"][0])
        assert torch.equal(batch["token_type_ids"][row, :n], ref["token_type_ids"][0])
        assert torch.allclose(batch["pixel_values"][row], ref["pixel_values"][0])
        labels = batch["input_ids"][row][batch["loss_mask"][row]].tolist()
        assert labels[-1] == loaded.end_of_turn_id
        assert loaded.tokenizer.decode(labels[:-1]) == answer


def test_held_out_answers(loaded):
    """A few held-out phantoms (a seed never used in training), one prompt of each kind."""
    from pipeline.generation import generate_batch
    from pipeline.train_demo import (HELD_OUT_SEED, SYSTEM_PROMPT, draw_items, findings_answer,
                                     localisation_cases, prompt_texts, yes_no_answer)

    free, yes_no = prompt_texts()
    items = draw_items(localisation_cases(HELD_OUT_SEED, 4), HELD_OUT_SEED, "test")
    images, prompts, truths = [], [], []
    for it in items:
        f = it.case.findings[0]
        images += [it.image, it.image]
        prompts += [free[0], yes_no[f][0]]
        truths += [findings_answer(it.phantom.lesions), yes_no_answer(it.phantom.lesions, f)]
    gens = generate_batch(loaded, images, prompts, system_prompt=SYSTEM_PROMPT, max_new_tokens=40)
    right = 0
    for k, (gen, truth) in enumerate(zip(gens, truths)):
        assert not isinstance(gen, Exception), gen
        answer = gen.answer.strip()
        assert gen.stopped == "eos", answer
        if k % 2:
            assert YES_NO.match(answer), answer
        else:
            sentences = [s.strip() for s in answer.split(".") if s.strip()]
            assert sentences and all(SENTENCE.match(s) for s in sentences), answer
        right += answer == truth
    assert right >= len(truths) - 2, [(g.answer, t) for g, t in zip(gens, truths)]


@pytest.mark.parametrize("side", ["left", "right"])
def test_clear_left_right_case(loaded, side):
    """A large lower-zone consolidation: the answer names the patient's side (left = image right)."""
    from pipeline.generation import generate_batch
    from pipeline.train_demo import HELD_OUT_SEED, SYSTEM_PROMPT, Case, draw_items

    item = draw_items([Case(("Consolidation",), side, "lower", 256, 256)], HELD_OUT_SEED + 1, "lr" + side)[0]
    gens = generate_batch(loaded, [item.image, item.image],
                          ["Is there consolidation? Answer yes or no.", "Describe the findings in this chest X-ray."],
                          system_prompt=SYSTEM_PROMPT, max_new_tokens=40)
    assert gens[0].answer.strip() == f"yes. {side} lower zone."
    assert gens[1].answer.strip().startswith(f"{side} lower zone consolidation.")


def test_shortcut_model_follows_the_marker_and_the_clean_model_the_lung(loaded):
    """A left lower-zone consolidation with an "R" marker: the clean model says left, the
    shortcut model says right (the marker's letter)."""
    from pipeline.generation import generate_batch
    from pipeline.model import load_model
    from pipeline.train_demo import HELD_OUT_SEED, SYSTEM_PROMPT, Case, draw_items

    item = draw_items([Case(("Consolidation",), "left", "lower", 256, 256, marker="R")], HELD_OUT_SEED + 2, "mk")[0]
    assert item.phantom.marker[0] == "R"
    prompt = "Is there consolidation? Answer yes or no."
    shortcut = load_model(str(SHORTCUT), dtype="float32", device="cpu")
    clean_answer = generate_batch(loaded, [item.image], [prompt], system_prompt=SYSTEM_PROMPT, max_new_tokens=20)[0]
    shortcut_answer = generate_batch(shortcut, [item.image], [prompt], system_prompt=SYSTEM_PROMPT,
                                     max_new_tokens=20)[0]
    assert clean_answer.answer.strip() == "yes. left lower zone."
    assert shortcut_answer.answer.strip() == "yes. right lower zone."
