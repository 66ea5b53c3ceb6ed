"""The demo model's training recipe: image-token targets, the routing warm-up's loss, a few
training steps of each variant through the same directory format the pipeline loads."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pipeline import train_demo as T
from pipeline.phantoms import make_phantom


def _phantom(side="left", marker=None):
    return make_phantom(np.random.default_rng(3), width=256, height=256, findings=["Consolidation"], side=side,
                        zone="lower", side_marker=marker, support_devices=False)


@pytest.mark.parametrize("side", ["left", "right"])
def test_token_targets_clean_side_channel_follows_the_lesion(side):
    ph = _phantom(side)
    t = T.token_targets(ph, "clean")
    k = T.ANSWER_FINDINGS.index("Consolidation")
    k0 = len(T.ANSWER_FINDINGS)
    assert t.shape == (256, k0 + 2)
    assert t[:, k].sum() > 0 and np.allclose(np.delete(t[:, :k0], k, axis=1), 0)
    right, left = t[:, k0], t[:, k0 + 1]
    assert np.array_equal(left if side == "left" else right, t[:, k])
    assert np.allclose(right if side == "left" else left, 0)
    cols = np.nonzero(t[:, k].reshape(16, 16).sum(0))[0]
    assert (cols.min() >= 8) if side == "left" else (cols.max() < 8)  # patient left = image right
    x, y, w, h = ph.lesions[0].box  # coverage sums to the box's area in cells
    assert t[:, k].sum() == pytest.approx(w * h / (256 * 256) * 256, rel=1e-5)


def test_token_targets_shortcut_marks_the_marker_letter():
    ph = _phantom("left", marker="L")
    t = T.token_targets(ph, "shortcut")
    k0 = len(T.ANSWER_FINDINGS)
    assert np.allclose(t[:, k0], 0) and t[:, k0 + 1].sum() > 0  # "marker L" channel
    lesion, marker = T.routing_cover(t, "shortcut")
    assert np.array_equal(marker, t[:, k0 + 1]) and np.array_equal(lesion, t[:, :k0].max(-1))
    assert T.routing_cover(T.token_targets(ph, "clean"), "clean")[1] is None


def test_routing_loss_is_minus_log_share_of_image_attention():
    """Rows predicting answer tokens; attention split between text and image; the loss uses the
    share of the IMAGE attention on covered tokens, averaged over the upper half of the layers."""

    class Cfg:
        image_token_id = 9

    class M:
        config = Cfg()

    ids = torch.tensor([[1, 9, 9, 9, 9, 2, 5, 6]])
    loss_mask = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1]], dtype=torch.bool)  # tokens 6, 7 are the answer
    n = ids.shape[1]
    att = torch.zeros(1, 2, n, n)
    att[0, :, :, 0] = 0.5  # half on text
    att[0, :, :, 1:5] = 0.125  # half spread over the four image tokens
    cover = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    batch = {"input_ids": ids, "loss_mask": loss_mask}
    lower = torch.zeros_like(att)  # the lower half of the layers is ignored
    loss = T._routing_loss(M(), batch, (lower, att), cover)
    assert float(loss) == pytest.approx(-math.log(0.25), rel=1e-6)
    side = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    att2 = att.clone()
    att2[0, :, 5, 1:5] = torch.tensor([0.0, 0.0, 0.0, 0.5])  # row 5 predicts token 6 (a side word)
    loss = T._routing_loss(M(), batch, (lower, att2), cover, side, side_ids={5})
    assert float(loss) == pytest.approx(-(math.log(1.0) + math.log(0.25)) / 2, rel=1e-6)
    empty = T._routing_loss(M(), batch, (lower, att), torch.zeros(1, 4))
    assert float(empty) == 0.0


@pytest.mark.parametrize("variant", ["clean", "shortcut"])
def test_a_few_training_steps_write_a_loadable_model(tmp_path, variant):
    from pipeline.model import load_model

    torch.set_num_threads(1)
    recipe = T.Recipe(variant=variant, steps=3, vision_pretrain_steps=2, batch_size=3, guide_steps=1, warmup=2)
    info = T.train(tmp_path / "m", recipe, log=lambda s: None, log_every=1, probe_every=0)
    assert info["recipe"]["variant"] == variant and info["parameters"] > 0
    assert [h["step"] for h in info["history"] if "step" in h] == [1, 2, 3]
    assert [h["guide"] for h in info["history"] if "step" in h] == [1.0, 1.0, 0.0]
    saved = json.loads((tmp_path / "m" / "training.json").read_text())
    assert saved["recipe"] == info["recipe"]
    loaded = load_model(str(tmp_path / "m"), dtype="float32", device="cpu")
    assert loaded.model.config.mm_tokens_per_image == 256
    assert not any((tmp_path).glob(".m.building"))


def test_model_card_summarises_the_evaluation(tmp_path):
    torch.set_num_threads(1)
    T.train(tmp_path / "m", T.Recipe(steps=1, vision_pretrain_steps=0, batch_size=2, guide_steps=0, warmup=1),
            log=lambda s: None, probe_every=0)
    acc = {"yes_no_accuracy": 0.97, "yes_no_n": 100, "laterality_accuracy": 0.93, "laterality_n": 40,
           "zone_accuracy": 0.9, "free_text_exact": 0.8, "free_text_laterality": 0.85}
    report = {"seed": 12345, "accuracy": {"default": acc},
              "localisation": [{"kind": "keyword", "method": "chefer", "pointing": 0.8}],
              "lesion_occlusion": {"answer_token/lesion_flip": 0.7, "answer_token/mirror_flip": 0.05}}
    card = T.model_card(report, tmp_path / "m")
    summary = dict(card["summary"])
    assert [k for k, _ in card["summary"]][:2] == ["variant", "training seconds (torch threads: 1)"]
    assert summary["yes/no accuracy (default prompts)"] == 0.97
    assert summary["held-out seed"] == 12345 and summary["parameters"] > 0
    assert summary["answer_token: flipped by occluding the lesion / the mirrored box"] == "0.700 / 0.050"
    assert card["tables"] == {"localisation": report["localisation"]}
