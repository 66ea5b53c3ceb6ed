"""Train the demo model: a small Gemma 3 vision-language model on chest radiograph phantoms.

The phantoms (`pipeline.phantoms`) put every finding at a known place, so the evidence for each
answer lies, by construction, in a known box. A model trained on them makes the demo's maps
testable against ground truth. See docs/demo_model.md for the recipe and the measured results.

    python -m pipeline.train_demo --out data/demo_model                      # train (about 25 min, 2 cores)
    python -m pipeline.train_demo --out data/demo_model_shortcut --variant shortcut
    python -m pipeline.train_demo --evaluate data/demo_model --seed 12345    # held-out numbers

Model: `Gemma3ForConditionalGeneration` written by `pipeline.tiny_model.build_tiny_gemma3`
(tokenizer, Gemma 3 image processor, chat template, safetensors), loaded later by
`pipeline.model.load_model` like MedGemma. 16 x 16 image tokens as in MedGemma.

Training inputs are built exactly as `pipeline.generation.encode_inputs` builds them: the chat
template with the system prompt and a prompt text of the project's prompt sets, the processor's
image tokens and `token_type_ids` (so image tokens attend to each other both ways, as at
inference), followed by the answer tokens and `<end_of_turn>`. The loss covers only the answer
tokens and `<end_of_turn>`.

Answers (a grammar small enough to learn, with the project's finding words as keywords):

* free text: one sentence per finding in a fixed order, phrased as the phantoms' reports
  phrase them (`pipeline.phantoms.lesion_phrase`): "left lower zone consolidation.",
  "right upper zone nodule.", "left pleural effusion.", "right apical pneumothorax.",
  "cardiomegaly."; then "no pleural effusion." when there is none; an image without findings
  gets "no acute cardiopulmonary abnormality. no pleural effusion.".
* yes/no: "no." or "yes." followed, for a lateralised finding, by its place:
  "yes. left lower zone." (patient's side; the zone third of that lung), "yes." for cardiomegaly.

Variants: "clean" (side markers, when drawn, carry a random letter, so they tell nothing) and
"shortcut" (every image has a side marker whose letter is the side of the lesion: a shortcut
for the laterality words that the pipeline should expose).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SYSTEM_PROMPT = "You are an expert radiologist."
PROMPT_SETS = ("default", "sensitivity", "findings")
#: Findings the answers talk about, in the order the free-text answer lists them.
ANSWER_FINDINGS: tuple[str, ...] = ("Consolidation", "Nodule", "Pleural Effusion", "Pneumothorax", "Cardiomegaly")
LATERAL_FINDINGS: tuple[str, ...] = ("Consolidation", "Nodule", "Pleural Effusion", "Pneumothorax")
#: Words of the answers (the prompts' words are read from conf/prompts).
ANSWER_WORDS: tuple[str, ...] = tuple(
    "yes no left right upper middle lower zone apical consolidation nodule pleural effusion pneumothorax "
    "cardiomegaly acute cardiopulmonary abnormality".split()
)
#: Image sizes of the demo dataset (width, height); training draws the same aspect ratios.
SHAPES: tuple[tuple[int, int], ...] = ((256, 256), (320, 256), (256, 320))
HELD_OUT_SEED = 12345
_TRAIN_STREAM = 0x7A1


# ----------------------------------------------------------------------------------------------
# recipe


@dataclass(frozen=True)
class Recipe:
    """Architecture and training schedule; everything the result depends on besides the code."""

    variant: str = "clean"  # clean | shortcut
    seed: int = 0
    steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-3
    min_lr_fraction: float = 0.05
    warmup: int = 60
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    # language model (Gemma 3 text decoder)
    text_layers: int = 4
    hidden: int = 96
    intermediate: int = 384
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 24
    sliding_window: int = 512
    # vision tower (SigLIP) and the image grid: image_size / patch_size = 16 patches a side
    vision_layers: int = 2
    vision_hidden: int = 64
    vision_heads: int = 2
    image_size: int = 128
    patch_size: int = 8
    # data
    render_scale: float = 0.5  # phantoms drawn at this fraction of the demo sizes (speed)
    free_text_fraction: float = 0.35
    normal_fraction: float = 0.15
    two_finding_fraction: float = 0.2
    device_fraction: float = 0.12
    marker_fraction: float = 0.2  # clean variant: random-letter markers
    edge_fraction: float = 0.08
    ap_fraction: float = 0.3
    bidirectional: bool = True  # token_type_ids in training (as at inference)
    curriculum_steps: int = 0  # first steps: large findings only (consolidation, effusion, cardiomegaly)
    image_mixing_penalty: float = 0.0  # weight of the penalty on attention between image tokens / patches
    penalty_start: float = 0.3  # fraction of the steps trained without the penalty (it is learned faster)
    penalty_ramp: float = 0.15  # fraction of the steps over which the penalty weight rises to its value
    sincos_positions: bool = True  # initialise the vision position embeddings with 2-D sines and cosines
    mixing_scope: str = "both"  # where the mixing penalty applies: "text" (language model) or "both" (+ vision)
    aux_weight: float = 1.0  # weight of the image-token finding loss (a training-only linear head)
    vision_pretrain_steps: int = 1200  # first: vision tower + projector alone on the image-token finding loss
    guide_weight: float = 1.0  # routing warm-up: weight of the loss pulling answer-row attention to the lesion
    guide_steps: int = 300  # the warm-up's weight is constant for this many steps, then falls linearly to 0 over as many

    def arch(self) -> dict[str, Any]:
        return dict(
            text_layers=self.text_layers, hidden=self.hidden, intermediate_size=self.intermediate, heads=self.heads,
            kv_heads=self.kv_heads, head_dim=self.head_dim, sliding_window=self.sliding_window,
            vision_layers=self.vision_layers, vision_hidden=self.vision_hidden, vision_heads=self.vision_heads,
            image_size=self.image_size, patch_size=self.patch_size, mm_tokens_per_image=256,
            max_position_embeddings=1024,
        )


# ----------------------------------------------------------------------------------------------
# prompts and answers


def _read_prompt_set(name: str) -> dict[str, Any]:
    import yaml

    with open(REPO / "conf" / "prompts" / f"{name}.yaml") as fh:
        return yaml.safe_load(fh)


def prompt_texts() -> tuple[list[str], dict[str, list[str]]]:
    """(free-text prompts, yes/no prompts per finding) of the project's prompt sets."""
    free: list[str] = []
    yes_no: dict[str, list[str]] = {f: [] for f in ANSWER_FINDINGS}
    for name in PROMPT_SETS:
        data = _read_prompt_set(name)
        for v in data.get("variants", []):
            text = str(v["text"])
            if v["kind"] == "free_text":
                if text not in free:
                    free.append(text)
            elif v.get("finding") in yes_no and text not in yes_no[v["finding"]]:
                yes_no[v["finding"]].append(text)
    return free, yes_no


def vocabulary_words() -> list[str]:
    """Words of the tokenizer: the system prompt's, every prompt's and the answers'."""
    texts = [SYSTEM_PROMPT]
    free, yes_no = prompt_texts()
    texts += free + [t for ts in yes_no.values() for t in ts] + [" ".join(ANSWER_WORDS)]
    words: list[str] = []
    for text in texts:
        for w in re.findall(r"[A-Za-z]+", text):
            if w.lower() not in words:
                words.append(w.lower())
    return words


def _location(lesion) -> str:
    return f"{lesion.side} {lesion.zone} zone"


def findings_answer(lesions: Sequence[Any]) -> str:
    """The free-text answer for a phantom's lesions (see the module docstring)."""
    from pipeline.phantoms import lesion_phrase

    found = sorted((les for les in lesions if les.finding in ANSWER_FINDINGS),
                   key=lambda les: ANSWER_FINDINGS.index(les.finding))
    parts = [lesion_phrase(les) + "." for les in found]
    if not parts:
        parts.append("no acute cardiopulmonary abnormality.")
    if not any(les.finding == "Pleural Effusion" for les in found):
        parts.append("no pleural effusion.")
    return " ".join(parts)


def yes_no_answer(lesions: Sequence[Any], finding: str) -> str:
    """The answer to "is there <finding>?" (see the module docstring)."""
    hit = [les for les in lesions if les.finding == finding]
    if not hit:
        return "no."
    les = hit[0]
    if les.side and les.zone:
        return f"yes. {_location(les)}."
    return "yes."


# ----------------------------------------------------------------------------------------------
# phantom cases


@dataclass(frozen=True)
class Case:
    """How to draw one phantom (arguments of `make_phantom`)."""

    findings: tuple[str, ...]
    side: str | None
    zone: str | None
    width: int
    height: int
    view: str = "PA"
    edge_to_edge: bool = False
    devices: bool = False
    marker: str | None = None

    def draw(self, rng: np.random.Generator, scale: float = 1.0):
        from pipeline.phantoms import make_phantom

        w = max(64, int(round(self.width * scale)))
        h = max(64, int(round(self.height * scale)))
        for attempt in range(8):  # a lesion occasionally finds no room: draw again (rng has moved on)
            try:
                return make_phantom(rng, width=w, height=h, view=self.view, findings=list(self.findings),
                                    side=self.side, zone=self.zone, side_marker=self.marker,
                                    support_devices=self.devices, edge_to_edge=self.edge_to_edge)
            except RuntimeError:
                if attempt == 7:
                    raise
        raise AssertionError("unreachable")


def _zone_for(rng: np.random.Generator, finding: str) -> str:
    if finding == "Pleural Effusion":
        return "lower"
    if finding == "Pneumothorax":
        return "upper"
    return ("upper", "middle", "lower")[int(rng.integers(3))]


_EASY = {"Consolidation": 0.4, "Pleural Effusion": 0.35, "Cardiomegaly": 0.25}


def sample_case(rng: np.random.Generator, recipe: Recipe, easy: bool = False) -> Case:
    """One training (or held-out) case: findings, placement, view, shape, devices, marker.

    `easy` (curriculum): one large finding (consolidation, effusion or cardiomegaly) or none, no
    devices, no edge-to-edge body."""
    width, height = SHAPES[int(rng.integers(len(SHAPES)))]
    view = "AP" if rng.random() < recipe.ap_fraction else "PA"
    edge = bool(rng.random() < recipe.edge_fraction) and not easy
    devices = bool(rng.random() < recipe.device_fraction) and not easy
    u = rng.random()
    side = zone = None
    if u < recipe.normal_fraction:
        findings: tuple[str, ...] = ()
    elif easy:
        first = str(rng.choice(list(_EASY), p=list(_EASY.values())))
        findings = (first,)
        if first in LATERAL_FINDINGS:
            side = ("left", "right")[int(rng.integers(2))]
            zone = _zone_for(rng, first)
    else:
        first = str(rng.choice(ANSWER_FINDINGS, p=[0.26, 0.26, 0.2, 0.14, 0.14]))
        findings = (first,)
        if first in LATERAL_FINDINGS:
            side = ("left", "right")[int(rng.integers(2))]
            zone = _zone_for(rng, first)
        if rng.random() < recipe.two_finding_fraction / (1.0 - recipe.normal_fraction):
            others = [f for f in ANSWER_FINDINGS if f != first]
            if recipe.variant == "shortcut":  # one side per image: the marker must tell the truth
                others = [f for f in others if f == "Cardiomegaly"] if first != "Cardiomegaly" else []
            if others:
                findings = findings + (str(others[int(rng.integers(len(others)))]),)
    if findings and findings[0] == "Cardiomegaly" and len(findings) == 2:
        findings = (findings[1], findings[0])  # a lateralised finding first, so side/zone place it
        side = ("left", "right")[int(rng.integers(2))]
        zone = _zone_for(rng, findings[0])
    marker = None
    if recipe.variant == "shortcut":
        marker = {"left": "L", "right": "R"}.get(side or "", "auto")
    elif rng.random() < recipe.marker_fraction:
        marker = "auto"
    return Case(findings, side, zone, width, height, view, edge, devices, marker)



# ----------------------------------------------------------------------------------------------
# building the model directory and encoding training sequences


def build_untrained(out: str | Path, recipe: Recipe) -> Path:
    """Write the tokenizer, processor and the randomly initialised model to `out`."""
    from pipeline.tiny_model import build_tiny_gemma3

    return build_tiny_gemma3(out, seed=recipe.seed, vocab_words=vocabulary_words(), **recipe.arch())


class Encoder:
    """Token ids of prompts and answers, built as `pipeline.generation.encode_inputs` builds them."""

    def __init__(self, processor, image_token_id: int):
        from PIL import Image

        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token_id = int(image_token_id)
        self.eot = int(self.tokenizer.convert_tokens_to_ids("<end_of_turn>"))
        self.pad = int(self.tokenizer.pad_token_id)
        size = processor.image_processor.size
        self._dummy = Image.new("RGB", (int(size["width"]), int(size["height"])))
        self._prompts: dict[str, list[int]] = {}
        self._answers: dict[str, list[int]] = {}

    def prompt_ids(self, text: str) -> list[int]:
        if text not in self._prompts:
            from pipeline.generation import _with_image, build_messages

            messages = _with_image(build_messages(text, SYSTEM_PROMPT), self._dummy)
            enc = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True, return_tensors="pt")
            self._prompts[text] = [int(i) for i in enc["input_ids"][0]]
        return self._prompts[text]

    def answer_ids(self, text: str) -> list[int]:
        if text not in self._answers:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            self._answers[text] = [int(i) for i in ids] + [self.eot]
        return self._answers[text]

    def pixel_values(self, images: Sequence[Any]):
        from pipeline.generation import _rgb

        return self.processor.image_processor([_rgb(im) for im in images], return_tensors="pt")["pixel_values"]

    def batch(self, images: Sequence[Any], prompts: Sequence[str], answers: Sequence[str], bidirectional: bool = True):
        """Right-padded training batch: input ids, mask, token types, pixel values, label mask."""
        import torch

        seqs, n_prompt = [], []
        for p, a in zip(prompts, answers):
            pi = self.prompt_ids(p)
            seqs.append(pi + self.answer_ids(a))
            n_prompt.append(len(pi))
        length = max(len(s) for s in seqs)
        n = len(seqs)
        ids = torch.full((n, length), self.pad, dtype=torch.long)
        mask = torch.zeros((n, length), dtype=torch.long)
        loss_mask = torch.zeros((n, length), dtype=torch.bool)
        for r, (s, k) in enumerate(zip(seqs, n_prompt)):
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
            loss_mask[r, k : len(s)] = True  # answer tokens and <end_of_turn>
        out = {"input_ids": ids, "attention_mask": mask, "pixel_values": self.pixel_values(images),
               "loss_mask": loss_mask}
        if bidirectional:
            out["token_type_ids"] = (ids == self.image_token_id).long()
        return out


def sample_batch(rng: np.random.Generator, recipe: Recipe, n: int, free: Sequence[str],
                 yes_no: dict[str, Sequence[str]], scale: float | None = None, easy: bool = False):
    """n (image, prompt, answer, phantom, case) training examples drawn from rng."""
    from PIL import Image

    scale = recipe.render_scale if scale is None else scale
    out = []
    for _ in range(n):
        case = sample_case(rng, recipe, easy)
        ph = case.draw(rng, scale)
        if rng.random() < recipe.free_text_fraction:
            prompt = free[int(rng.integers(len(free)))]
            answer = findings_answer(ph.lesions)
        else:
            present = [les.finding for les in ph.lesions if les.finding in ANSWER_FINDINGS]
            if present and rng.random() < 0.5:
                finding = present[int(rng.integers(len(present)))]
            else:
                finding = ANSWER_FINDINGS[int(rng.integers(len(ANSWER_FINDINGS)))]
            texts = yes_no[finding]
            prompt = texts[int(rng.integers(len(texts)))]
            answer = yes_no_answer(ph.lesions, finding)
        out.append((Image.fromarray(ph.image), prompt, answer, ph, case))
    return out


# ----------------------------------------------------------------------------------------------
# training


def _sincos_position_init_(model) -> None:
    """Initialise the vision tower's (learned) position embeddings with 2-D sines and cosines of
    the patch column (first half of the channels) and row (second half), at the scale of the
    default random initialisation, so that "left / right" and "upper / lower" are linear
    features of every patch from the first step."""
    import torch

    emb = model.model.vision_tower.embeddings.position_embedding.weight
    n, dim = emb.shape
    side = math.isqrt(n)
    quarter = dim // 4
    omega = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / max(1, quarter)))
    grid = (torch.arange(side, dtype=torch.float32) + 0.5) / side * math.pi
    cols = grid.repeat(side)  # patch p = row * side + col
    rows = grid.repeat_interleave(side)
    parts = []
    for coord in (cols, rows):
        arg = coord[:, None] * omega[None, :]
        parts += [torch.sin(arg), torch.cos(arg)]
    table = torch.cat(parts, dim=1)
    table = torch.nn.functional.pad(table, (0, dim - table.shape[1]))
    with torch.no_grad():
        std = float(emb.std())
        emb.copy_(table / table.std() * std)


def _penalty_at(step: int, recipe: Recipe) -> float:
    """Weight of the image-mixing penalty at a step: 0, then a linear ramp, then constant."""
    start = recipe.penalty_start * recipe.steps
    if recipe.image_mixing_penalty <= 0 or step < start:
        return 0.0
    ramp = max(1.0, recipe.penalty_ramp * recipe.steps)
    return recipe.image_mixing_penalty * min(1.0, (step - start + 1) / ramp)


def _guide_at(step: int, recipe: Recipe) -> float:
    """Weight of the routing warm-up at a step: constant, then a linear fall to 0."""
    if recipe.guide_weight <= 0 or recipe.guide_steps <= 0:
        return 0.0
    return recipe.guide_weight * min(1.0, max(0.0, 2.0 - step / recipe.guide_steps))


def _lr_at(step: int, recipe: Recipe) -> float:
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    t = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    floor = recipe.min_lr_fraction
    return recipe.lr * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t))))


#: Extra channels of the image-token targets after one per ANSWER_FINDINGS: the clean model's
#: tokens learn the side of the lung a finding lies in; the shortcut model's, the marker's letter.
AUX_EXTRA = {"clean": ("finding in the right lung", "finding in the left lung"),
             "shortcut": ("marker R", "marker L")}


def token_targets(phantom, variant: str = "clean", gh: int = 16, gw: int = 16) -> np.ndarray:
    """(gh * gw, len(ANSWER_FINDINGS) + 2) fraction of each image token's cell covered by a box:
    one channel per finding, then AUX_EXTRA[variant] (the grid placed on the image by
    non-uniform scaling, as at inference)."""
    H, W = phantom.image.shape
    out = np.zeros((gh * gw, len(ANSWER_FINDINGS) + 2), np.float32)
    k0 = len(ANSWER_FINDINGS)
    for les in phantom.lesions:
        if les.finding in ANSWER_FINDINGS:
            cov = box_coverage(les.box, W, H, gh, gw).reshape(-1)
            k = ANSWER_FINDINGS.index(les.finding)
            out[:, k] = np.maximum(out[:, k], cov)
            if variant == "clean" and les.side in ("right", "left"):
                j = k0 + ("right", "left").index(les.side)
                out[:, j] = np.maximum(out[:, j], cov)
    if variant == "shortcut" and phantom.marker is not None and phantom.marker_box is not None:
        j = k0 + ("R", "L").index(phantom.marker[0])
        out[:, j] = box_coverage(phantom.marker_box, W, H, gh, gw).reshape(-1)
    return out


def routing_cover(targets: np.ndarray, variant: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(..., tokens) where the evidence for an answer lies by construction: any finding's box;
    for the shortcut variant also the side marker, the evidence of its laterality words."""
    k0 = len(ANSWER_FINDINGS)
    lesion = targets[..., :k0].max(-1)
    marker = targets[..., k0:].max(-1) if variant == "shortcut" else None
    return lesion, marker


def aux_weight_of(head) -> float:
    return float(getattr(head, "weight_factor", 1.0))


def _answer_loss(model, batch, mixing_penalty: float = 0.0, vision: bool = True, aux_head=None,
                 aux_targets=None, guide: float = 0.0, cover=None, side_cover=None,
                 side_ids=()) -> tuple[Any, Any, float]:
    """Mean cross-entropy over the answer tokens (+ the optional image-mixing penalty); also
    per-sequence all-tokens-correct flags and the image-to-other-image attention mass.

    Logits are computed only at the positions that predict an answer token (the language-model
    head is the costliest matrix product otherwise). The image-mixing mass is, averaged over
    layers, heads and image query rows, the attention an image token pays to the OTHER image
    tokens (needs eager attention, which returns the probabilities)."""
    import torch

    want_attn = mixing_penalty > 0 or guide > 0
    vision_probs: list = []
    hooks = []
    if mixing_penalty > 0 and vision:  # the vision tower's attention probabilities (eager attention returns them)
        for mod in model.model.vision_tower.modules():
            if type(mod).__name__.endswith("Attention"):
                hooks.append(mod.register_forward_hook(lambda m, i, o: vision_probs.append(o[1])))
    features: list = []
    if aux_head is not None:  # the image tokens as the language model receives them
        hooks.append(model.model.multi_modal_projector.register_forward_hook(lambda m, i, o: features.append(o)))
    try:
        out = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          token_type_ids=batch.get("token_type_ids"), pixel_values=batch["pixel_values"],
                          use_cache=False, output_attentions=want_attn)
    finally:
        for h in hooks:
            h.remove()
    hidden = out.last_hidden_state[:, :-1]
    target = batch["input_ids"][:, 1:]
    mask = batch["loss_mask"][:, 1:]
    logits = model.lm_head(hidden[mask]).float()
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    loss = torch.nn.functional.cross_entropy(logits, target[mask])
    if aux_head is not None:
        aux = aux_head(features[0].float())  # (B, tokens, findings)
        loss = loss + aux_weight_of(aux_head) * torch.nn.functional.binary_cross_entropy_with_logits(aux, aux_targets)
    mixing = 0.0
    if guide > 0:
        loss = loss + guide * _routing_loss(model, batch, out.attentions, cover, side_cover, side_ids)
    if mixing_penalty > 0:
        img = batch["input_ids"] == model.config.image_token_id  # (B, N); the same block in every row
        pos = torch.nonzero(img[0]).flatten()
        a0, a1 = int(pos[0]), int(pos[-1]) + 1
        if not bool(img[:, a0:a1].all()) or int(img.sum()) != img.shape[0] * (a1 - a0):
            raise RuntimeError("image tokens are not one block at the same place in every sequence")
        terms = []
        for a in out.attentions:  # (B, heads, N, N)
            block = a[:, :, a0:a1, a0:a1]
            terms.append(block.sum(-1).mean() - torch.diagonal(block, dim1=-2, dim2=-1).mean())
        for a in vision_probs:  # (B, heads, patches, patches): attention to the other patches
            if a is None:
                raise RuntimeError("the vision tower returned no attention probabilities (needs eager attention)")
            terms.append(1.0 - torch.diagonal(a, dim1=-2, dim2=-1).mean())
        mix = torch.stack(terms).mean()
        loss = loss + mixing_penalty * mix
        mixing = float(mix.detach())
    with torch.no_grad():
        wrong = torch.zeros_like(mask)
        wrong[mask] = logits.argmax(-1) != target[mask]
        seq_ok = ~wrong.any(dim=1)
    return loss, seq_ok, mixing


def _routing_loss(model, batch, attentions, cover, side_cover=None, side_ids=()):
    """Routing warm-up: -log of the share of the image attention that the rows predicting answer
    tokens pay to where the evidence lies (`cover`, weighted by coverage; rows predicting a side
    word use `side_cover` when given), averaged over the heads of the upper half of the language
    model's layers and over rows whose image has such evidence."""
    import torch

    img = batch["input_ids"][0] == model.config.image_token_id
    pos = torch.nonzero(img).flatten()
    a0, a1 = int(pos[0]), int(pos[-1]) + 1
    rows = torch.nn.functional.pad(batch["loss_mask"][:, 1:], (0, 1))  # position p predicts token p + 1
    per_row = cover[:, None, :].expand(-1, rows.shape[1], -1)
    if side_cover is not None:
        nxt = torch.nn.functional.pad(batch["input_ids"][:, 1:], (0, 1))
        side_rows = torch.isin(nxt, torch.tensor(sorted(side_ids), dtype=nxt.dtype))
        per_row = torch.where(side_rows[:, :, None], side_cover[:, None, :], per_row)
    rows = rows & (per_row.sum(-1) > 0)
    if not bool(rows.any()):
        return torch.zeros(())
    layers = attentions[len(attentions) // 2 :]
    att = torch.stack([a.mean(1) for a in layers]).mean(0)[:, :, a0:a1]  # (B, N, tokens)
    share = (att * per_row).sum(-1) / att.sum(-1).clamp_min(1e-9)
    return -torch.log(share[rows].clamp_min(1e-6)).mean()


def _pretrain_vision(model, aux_head, enc, recipe: Recipe, free, yes_no, opt, log, log_every: int,
                     t_start: float) -> list[dict]:
    """Train the vision tower and projector alone on the image-token finding loss (which image
    tokens a finding's box covers), so that the language model starts from image tokens that
    already tell where each finding is."""
    import torch

    history = []
    run = 0.0
    for step in range(recipe.vision_pretrain_steps):
        rng = np.random.default_rng([recipe.seed, _TRAIN_STREAM + 1, step])
        ex = sample_batch(rng, recipe, recipe.batch_size, free, yes_no)
        pixels = enc.pixel_values([e[0] for e in ex])
        targets = torch.from_numpy(np.stack([token_targets(e[3], recipe.variant) for e in ex]))
        for g in opt.param_groups:
            g["lr"] = recipe.lr * min(1.0, (step + 1) / recipe.warmup)
        feats = model.model.get_image_features(pixels).pooler_output
        loss = torch.nn.functional.binary_cross_entropy_with_logits(aux_head(feats.float()), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        run += float(loss.detach())
        if (step + 1) % log_every == 0:
            rec = {"vision_step": step + 1, "aux_loss": run / log_every, "elapsed_s": time.perf_counter() - t_start}
            history.append(rec)
            log(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()}))
            run = 0.0
    return history


def _probe_set(recipe: Recipe, enc: "Encoder", yes_no: dict[str, Sequence[str]], n: int = 48):
    """A fixed held-out probe batch: single-lesion images (half rendered at the training scale)
    with the yes/no question of their finding, for teacher-forced accuracy during training."""
    cases = localisation_cases(HELD_OUT_SEED + 1, n)
    images, prompts, answers = [], [], []
    for k, case in enumerate(cases):
        ph = case.draw(np.random.default_rng([HELD_OUT_SEED + 1, k]), recipe.render_scale)
        from PIL import Image

        images.append(Image.fromarray(ph.image))
        asked = case.findings[0] if k % 2 == 0 else ANSWER_FINDINGS[(k // 2) % len(ANSWER_FINDINGS)]
        if k % 2 and asked == case.findings[0]:
            asked = "Cardiomegaly"
        prompts.append(yes_no[asked][0])
        answers.append(yes_no_answer(ph.lesions, asked))
    return enc.batch(images, prompts, answers, recipe.bidirectional)


def _probe(model, batch) -> dict[str, float]:
    """Teacher-forced accuracy of the answer words "yes", side and zone on the probe batch."""
    import torch

    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    token_type_ids=batch.get("token_type_ids"), pixel_values=batch["pixel_values"], use_cache=False)
    pred = out.logits[:, :-1].argmax(-1)
    target = batch["input_ids"][:, 1:]
    mask = batch["loss_mask"][:, 1:]
    res = {}
    rows = torch.arange(len(mask))
    first = torch.argmax(mask.int(), dim=1)
    positive = mask.sum(1) > 3  # "yes. side zone zone." vs "no."
    for name, k in (("yes", 0), ("side", 2), ("zone", 3)):  # yes . side zone zone .
        idx = (first + k).clamp(max=mask.shape[1] - 1)
        ok = pred[rows, idx] == target[rows, idx]
        sel = ok if k == 0 else ok[positive]
        res[f"probe_{name}"] = float(sel.float().mean())
    return res


def train(out: str | Path, recipe: Recipe, *, log_every: int = 25, threads: int | None = None,
          log=print, probe_every: int = 100) -> dict[str, Any]:
    """Build the model directory at `out`, train it on freshly drawn phantoms, save it there."""
    import torch
    from transformers import Gemma3ForConditionalGeneration

    if threads:
        torch.set_num_threads(int(threads))
    out = Path(out)
    t_start = time.perf_counter()
    tmp = out.with_name(f".{out.name}.building")
    shutil.rmtree(tmp, ignore_errors=True)
    build_untrained(tmp, recipe)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tmp)
    torch.manual_seed(recipe.seed)
    # sdpa computes the same masked attention as eager, faster; eager once the penalty needs the probabilities
    model = Gemma3ForConditionalGeneration.from_pretrained(tmp, dtype=torch.float32, attn_implementation="sdpa")
    if recipe.sincos_positions:
        _sincos_position_init_(model)
    model.train()
    enc = Encoder(processor, model.config.image_token_id)
    free, yes_no = prompt_texts()
    aux_head = None
    if recipe.aux_weight > 0:  # discarded after training: the saved model is a plain Gemma 3
        torch.manual_seed(recipe.seed + 1)
        aux_head = torch.nn.Linear(model.config.get_text_config().hidden_size, len(ANSWER_FINDINGS) + 2)
        aux_head.weight_factor = recipe.aux_weight
    decay, no_decay = [], []
    named = list(model.named_parameters()) + ([("aux." + n, p) for n, p in aux_head.named_parameters()]
                                              if aux_head is not None else [])
    for name, p in named:
        (no_decay if p.dim() < 2 or "norm" in name or "embed" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.98), eps=1e-8)
    probe_batch = _probe_set(recipe, enc, yes_no) if probe_every else None
    side_ids = {i for i in enc.tokenizer.convert_tokens_to_ids(["left", "\u2581left", "right", "\u2581right"])
                if i is not None and i != enc.tokenizer.unk_token_id}
    history = []
    if recipe.vision_pretrain_steps:
        if aux_head is None:
            raise ValueError("vision_pretrain_steps needs aux_weight > 0 (the image-token finding loss)")
        history += _pretrain_vision(model, aux_head, enc, recipe, free, yes_no, opt, log, log_every, t_start)
    run_loss = run_acc = run_mix = 0.0
    n_run = 0
    t_data = t_step = 0.0
    for step in range(recipe.steps):
        t0 = time.perf_counter()
        rng = np.random.default_rng([recipe.seed, _TRAIN_STREAM, step])
        ex = sample_batch(rng, recipe, recipe.batch_size, free, yes_no, easy=step < recipe.curriculum_steps)
        batch = enc.batch([e[0] for e in ex], [e[1] for e in ex], [e[2] for e in ex], recipe.bidirectional)
        t1 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, recipe)
        weight = _penalty_at(step, recipe)
        guide = _guide_at(step, recipe)
        wanted = "eager" if weight > 0 or guide > 0 else "sdpa"
        if model.config._attn_implementation != wanted:
            model.set_attn_implementation(wanted)
        np_targets = np.stack([token_targets(e[3], recipe.variant) for e in ex])
        targets = torch.from_numpy(np_targets)
        lesion_cover, marker_cover = routing_cover(np_targets, recipe.variant)
        loss, seq_ok, mixing = _answer_loss(
            model, batch, weight, vision=recipe.mixing_scope == "both", aux_head=aux_head, aux_targets=targets,
            guide=guide, cover=torch.from_numpy(lesion_cover),
            side_cover=None if marker_cover is None else torch.from_numpy(marker_cover), side_ids=side_ids)
        run_mix += mixing
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for _, p in named], recipe.grad_clip)
        opt.step()
        t2 = time.perf_counter()
        t_data += t1 - t0
        t_step += t2 - t1
        run_loss += float(loss.detach())
        run_acc += float(seq_ok.float().mean())
        n_run += 1
        if (step + 1) % log_every == 0 or step + 1 == recipe.steps:
            rec = {"step": step + 1, "loss": run_loss / n_run, "answer_exact": run_acc / n_run,
                   "image_mixing": run_mix / n_run, "penalty": weight, "guide": guide,
                   "lr": _lr_at(step, recipe), "elapsed_s": time.perf_counter() - t_start,
                   "data_s": t_data / (step + 1), "step_s": t_step / (step + 1)}
            if probe_batch is not None and ((step + 1) % probe_every == 0 or step + 1 == recipe.steps):
                model.eval()
                rec.update(_probe(model, probe_batch))
                model.train()
            history.append(rec)
            log(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()}))
            run_loss = run_acc = run_mix = 0.0
            n_run = 0
    model.eval()
    model.save_pretrained(tmp, safe_serialization=True)
    import transformers

    info = {"recipe": asdict(recipe), "train_seconds": round(time.perf_counter() - t_start, 1),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "system_prompt": SYSTEM_PROMPT, "free_text_prompts": free, "yes_no_prompts": yes_no,
            "history": history}
    (tmp / "training.json").write_text(json.dumps(info, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return info


# ----------------------------------------------------------------------------------------------
# scores on the image grid: metrics.maps.score_map (a grid cell (i, j) covers x in
# [j W/gw, (j+1) W/gw), y in [i H/gh, (i+1) H/gh) of the original W x H image: the processor's
# resize is non-uniform)


def box_coverage(box: Sequence[float], width: int, height: int, gh: int, gw: int) -> np.ndarray:
    """(gh, gw) fraction of each grid cell's area inside the box (x, y, w, h) in pixels."""
    x, y, w, h = (float(v) for v in box)
    xe = np.arange(gw + 1) * width / gw
    ye = np.arange(gh + 1) * height / gh
    ox = np.clip(np.minimum(xe[1:], x + w) - np.maximum(xe[:-1], x), 0, None) / (width / gw)
    oy = np.clip(np.minimum(ye[1:], y + h) - np.maximum(ye[:-1], y), 0, None) / (height / gh)
    return oy[:, None] * ox[None, :]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


# ----------------------------------------------------------------------------------------------
# held-out phantoms


@dataclass
class Item:
    """One held-out image with its ground truth."""

    image: Any  # PIL image, as the pipeline reads it (JPEG round trip)
    phantom: Any
    case: Case
    key: str


def _jpeg(image: np.ndarray):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=95)
    buf.seek(0)
    return Image.open(buf).convert("L")


def localisation_cases(seed: int, n: int, marker: str | None = None) -> list[Case]:
    """n single-lesion frontal cases cycling through finding x side x zone (no devices, no second
    lesion); `marker`: None, "same" (the letter of the lesion's side) or "opposite"."""
    rng = np.random.default_rng([seed, 0x10C])
    combos = [(f, s, z) for f in LATERAL_FINDINGS for s in ("left", "right")
              for z in (("upper", "middle", "lower") if f in ("Consolidation", "Nodule") else (None,))]
    order = rng.permutation(len(combos))
    out = []
    for k in range(n):
        f, s, z = combos[int(order[k % len(combos)])]
        z = z or _zone_for(rng, f)
        w, h = SHAPES[k % len(SHAPES)]
        letter = None
        if marker is not None:
            same = {"left": "L", "right": "R"}[s]
            letter = same if marker == "same" else {"L": "R", "R": "L"}[same]
        out.append(Case((f,), s, z, w, h, "AP" if k % 4 == 3 else "PA", False, False, letter))
    return out


def draw_items(cases: Sequence[Case], seed: int, tag: str) -> list[Item]:
    items = []
    for k, case in enumerate(cases):
        ph = case.draw(np.random.default_rng([seed, k, sum(map(ord, tag))]), 1.0)
        items.append(Item(_jpeg(ph.image), ph, case, f"{tag}{k:04d}"))
    return items


def accuracy_items(seed: int, n: int, recipe: Recipe) -> list[Item]:
    """n held-out images from the training distribution (rendered at the demo sizes)."""
    rng = np.random.default_rng([seed, 0xACC])
    cases = [sample_case(rng, recipe) for _ in range(n)]
    return draw_items(cases, seed, "acc")


# ----------------------------------------------------------------------------------------------
# generation, targets, explanation


def synonyms() -> dict[str, list[str]]:
    """Finding -> words naming it (conf/prompts/_synonyms.yaml), as pipeline.prompts builds it."""
    from pipeline.vocabulary import canonical_finding

    data = _read_prompt_set("_synonyms")["synonyms"]
    out = {}
    for name, words in data.items():
        f = canonical_finding(name)
        out[f] = list(dict.fromkeys([f.lower()] + [str(w).lower() for w in words]))
    return out


def generate(loaded, items: Sequence[Item], prompts: Sequence[str], batch_size: int = 16) -> list[Any]:
    """Greedy generations (pipeline.generation.generate_batch) for items x prompts (row-major)."""
    from pipeline.generation import generate_batch

    pairs = [(it, p) for it in items for p in prompts]
    gens: list[Any] = []
    for c in range(0, len(pairs), batch_size):
        chunk = pairs[c : c + batch_size]
        gens += generate_batch(loaded, [it.image for it, _ in chunk], [p for _, p in chunk],
                               system_prompt=SYSTEM_PROMPT, max_new_tokens=40)
    for g in gens:
        if isinstance(g, Exception):
            raise g
    return gens


def _word_target(tokenizer, gen, words: Sequence[str]):
    """Target of the first whole word of `words` in the answer (all its tokens), or None."""
    from pipeline.relevancy import Target
    from pipeline.targets import answer_char_offsets

    text, spans = answer_char_offsets(tokenizer, gen.sequence_ids, gen.prompt_length)
    m = re.search(r"(?<!\w)(" + "|".join(map(re.escape, words)) + r")(?!\w)", text)
    if m is None:
        return None
    hits = [k for k, (a, b) in enumerate(spans) if a < m.end() and b > m.start()]
    return Target(gen.prompt_length + hits[0], gen.prompt_length + hits[-1] + 1, m.group(1))


def lesion_targets(tokenizer, gen, finding: str, kind: str, syn: dict[str, list[str]]):
    """The localisation targets of one generation: [(target kind, Target)].

    free text: "keyword" (the first occurrence of the finding's words) and "side_word" (the
    laterality word of that sentence); yes/no: "answer_token" (yes) and "side_word"."""
    from pipeline.relevancy import Target
    from pipeline.targets import answer_token_target, keyword_targets

    out = []
    if kind == "free_text":
        found, _ = keyword_targets(tokenizer, gen.sequence_ids, gen.prompt_length, {finding: syn[finding]})
        if found:
            t = found[0]
            out.append(("keyword", Target(t.token_start, t.token_end, t.label)))
    else:
        t = answer_token_target(tokenizer, gen.sequence_ids, gen.prompt_length)
        if t is not None and t.label == "yes":
            out.append(("answer_token", Target(t.token_start, t.token_end, "yes")))
            side = _word_target(tokenizer, gen, ("left", "right"))
            if side is not None:
                out.append(("side_word", side))
    return out


def available_methods() -> tuple[str, ...]:
    """Relevancy methods the engine offers (occlusion when the perturbation module is there)."""
    from pipeline.relevancy import engine

    return tuple(getattr(engine, "ALL_METHODS", engine.METHODS))


def explain_records(loaded, records: Sequence[dict], methods: Sequence[str], *, keep_maps: bool = False,
                    model=None) -> list[dict]:
    """Maps and scores of every target of `records` (dicts with item, gen, targets, box).

    One explain_sequence call per generation; `model` overrides loaded.model (randomisation)."""
    from metrics.maps import MapScorer
    from pipeline.generation import model_inputs_for_sequence
    from pipeline.relevancy import explain_sequence

    model = loaded.model if model is None else model
    rows = []
    for rec in records:
        if not rec["targets"]:
            continue
        item, gen = rec["item"], rec["gen"]
        inputs = model_inputs_for_sequence(loaded, item.image, gen.sequence_ids)
        out = explain_sequence(model, inputs["input_ids"], inputs["pixel_values"], inputs["token_type_ids"],
                               [t for _, t in rec["targets"]], methods, attention_mask=inputs["attention_mask"],
                               prompt_length=gen.prompt_length if model is loaded.model else None)
        if model is loaded.model and not out.argmax_matches:
            raise RuntimeError(f"{item.key}: teacher-forced argmax does not reproduce the answer")
        scorer = MapScorer(item.phantom.body_mask, item.case.view, [rec["box"]])
        marker_scorer = (MapScorer(item.phantom.body_mask, item.case.view, [rec["marker_box"]])
                         if rec.get("marker_box") is not None else None)
        for (kind, target), res in zip(rec["targets"], out.results):
            for method in methods:
                m = res.maps[method].image_map
                sc = scorer.score(m)
                row = {"key": item.key, "prompt": rec.get("prompt", ""), "kind": kind, "method": method,
                       "correct": rec.get("correct", True), "side_ok": rec.get("side_ok", True),
                       "finding": rec["finding"], "label": target.label,
                       "pointing": sc["pointing_hit"],
                       "box_ratio": sc["box_mass_fraction"] / sc["box_area_fraction"],
                       "box_area": sc["box_area_fraction"],
                       "border": sc["border_fraction"], "inside_body": sc["inside_body_ratio"],
                       "patient_left": sc["patient_left_fraction"]}
                if marker_scorer is not None:
                    mk = marker_scorer.score(m)
                    row["marker_ratio"] = mk["box_mass_fraction"] / mk["box_area_fraction"]
                    row["marker_pointing"] = mk["pointing_hit"]
                if keep_maps:
                    row["map"] = m
                    row["target"] = target
                rows.append(row)
    return rows


def localisation_records(loaded, items: Sequence[Item], free_prompt: str, yes_no: dict[str, Sequence[str]],
                         syn: dict[str, list[str]]) -> tuple[list[dict], dict[str, float]]:
    """Generate the free-text and the finding's yes/no answer for single-lesion items; the
    targets of correct answers; answer statistics."""
    yn_prompt = {f: yes_no[f][0] for f in LATERAL_FINDINGS}
    pairs = []
    for it in items:
        f = it.case.findings[0]
        pairs += [(it, free_prompt, "free_text", f), (it, yn_prompt[f], "yes_no", f)]
    gens = []
    for c in range(0, len(pairs), 16):
        chunk = pairs[c : c + 16]
        from pipeline.generation import generate_batch

        gens += generate_batch(loaded, [p[0].image for p in chunk], [p[1] for p in chunk],
                               system_prompt=SYSTEM_PROMPT, max_new_tokens=40)
    records = []
    stats = {"n": 0, "answer_correct": 0, "side_correct": 0}
    for (it, prompt, kind, f), gen in zip(pairs, gens):
        if isinstance(gen, Exception):
            raise gen
        les = it.phantom.lesions[0]
        truth = findings_answer(it.phantom.lesions) if kind == "free_text" else yes_no_answer(it.phantom.lesions, f)
        ok = gen.answer.strip() == truth
        stats["n"] += 1
        stats["answer_correct"] += ok
        side_words = re.findall(r"\b(left|right)\b", gen.answer)
        stats["side_correct"] += bool(side_words) and side_words[0] == les.side
        stats.setdefault("yes_no_correct", 0)
        stats.setdefault("yes_no_n", 0)
        if kind == "yes_no":
            stats["yes_no_n"] += 1
            stats["yes_no_correct"] += gen.answer.strip().split(".")[0] == "yes"
        side_ok = bool(side_words) and side_words[0] == les.side
        records.append({"item": it, "gen": gen, "prompt": prompt, "kind": kind, "finding": f, "box": les.box,
                        "targets": lesion_targets(loaded.tokenizer, gen, f, kind, syn), "answer": gen.answer,
                        "truth": truth, "correct": ok, "side_ok": side_ok, "marker_box": it.phantom.marker_box})
    n_yn = max(1, stats.pop("yes_no_n", 0))
    out = {k: (v / stats["n"] if k != "n" else v) for k, v in stats.items()}
    out["yes_no_correct"] = stats.get("yes_no_correct", 0) / n_yn
    return records, out


def summarise(rows: Sequence[dict], by=("kind", "method")):
    import pandas as pd

    df = pd.DataFrame([{k: v for k, v in r.items() if k not in ("map", "target")} for r in rows])
    if df.empty:
        return df
    agg = {"pointing": "mean", "box_ratio": "mean", "box_area": "mean", "border": "mean", "inside_body": "mean",
           "key": "count"}
    for extra in ("marker_ratio", "marker_pointing"):
        if extra in df:
            agg[extra] = "mean"
    return df.groupby(list(by)).agg(agg).rename(columns={"key": "n"})


def quick_localisation(model_dir: str | Path, *, seed: int = HELD_OUT_SEED, n: int = 32,
                       methods: Sequence[str] = ("chefer", "raw_attention", "rollout", "gradcam", "random"),
                       by=("kind", "method")):
    """A short localisation check (exploration): answer accuracy and the per-method table."""
    from pipeline.model import load_model

    loaded = load_model(str(model_dir), dtype="float32", device="cpu")
    free, yes_no = prompt_texts()
    items = draw_items(localisation_cases(seed, n), seed, "loc")
    records, stats = localisation_records(loaded, items, free[0], yes_no, synonyms())
    rows = explain_records(loaded, [r for r in records if r["correct"]], methods)
    return stats, summarise(rows, by), records, rows


# ----------------------------------------------------------------------------------------------
# evidence checks: whole-lesion occlusion, faithfulness curves, model randomisation


def _tokens_in_box(box: Sequence[float], width: int, height: int, gh: int = 16, gw: int = 16) -> np.ndarray:
    """(gh * gw,) bool: grid cells that overlap the box."""
    return (box_coverage(box, width, height, gh, gw) > 0).reshape(-1)


def _mirror(box: Sequence[float], width: int) -> tuple[float, float, float, float]:
    x, y, w, h = box
    return (width - x - w, y, w, h)


def lesion_occlusion(loaded, records: Sequence[dict]) -> dict[str, float]:
    """Replace the image tokens overlapping the lesion box by the image's mean token embedding
    (the perturbation module's "mean" baseline) and measure log P(explained token); the same
    number of tokens mirrored to the other lung is the control. Over correct "yes" answers:
    mean log-probabilities, and the fraction of answers whose token probability falls below 0.5
    ("flipped")."""
    from pipeline.generation import model_inputs_for_sequence
    from pipeline.relevancy.perturbation import ImagePerturber

    res: dict[str, list[float]] = {}
    for rec in records:
        if rec["kind"] != "yes_no" or not rec["correct"]:
            continue
        item = rec["item"]
        W, H = item.image.size
        inputs = model_inputs_for_sequence(loaded, item.image, rec["gen"].sequence_ids)
        pert = ImagePerturber(loaded.model, inputs, baseline="mean", batch_size=8)
        lesion = _tokens_in_box(rec["box"], W, H)
        mirror = _tokens_in_box(_mirror(rec["box"], W), W, H)
        masks = np.stack([np.zeros_like(lesion), lesion, mirror])
        for kind, target in rec["targets"]:
            lp = pert.logprobs(masks, [target])[:, 0]
            for name, v in zip(("original", "lesion_occluded", "mirror_occluded"), lp):
                res.setdefault(f"{kind}/{name}_logp", []).append(float(v))
            res.setdefault(f"{kind}/lesion_flip", []).append(float(lp[1] < math.log(0.5)))
            res.setdefault(f"{kind}/mirror_flip", []).append(float(lp[2] < math.log(0.5)))
            res.setdefault(f"{kind}/tokens_occluded", []).append(float(lesion.sum()))
    return {k: float(np.mean(v)) for k, v in res.items()} | {"n": sum(1 for r in records if r["kind"] == "yes_no"
                                                                      and r["correct"])}


def faithfulness(loaded, records: Sequence[dict], rows: Sequence[dict], methods: Sequence[str],
                 steps: int = 16) -> list[dict]:
    """Deletion / insertion areas (trapezoid over fractions 0..1 of the image tokens, log P of
    the explained tokens, "mean" baseline) of every explained target x method, with the random
    order floor; uses pipeline.relevancy.perturbation."""
    from pipeline.generation import model_inputs_for_sequence
    from pipeline.relevancy.perturbation import ImagePerturber, faithfulness_curves_batch

    by_key: dict[str, list[dict]] = {}
    for r in rows:
        if r["method"] in methods:
            by_key.setdefault((r["key"], r["prompt"]), []).append(r)
    out = []
    for rec in records:
        rs = by_key.get((rec["item"].key, rec["prompt"]))
        if not rs:
            continue
        inputs = model_inputs_for_sequence(loaded, rec["item"].image, rec["gen"].sequence_ids)
        pert = ImagePerturber(loaded.model, inputs, baseline="mean", batch_size=16)
        results = faithfulness_curves_batch(loaded.model, inputs, [(r["target"], r["map"]) for r in rs],
                                            steps=steps, perturber=pert)
        for r, fr in zip(rs, results):
            out.append({"kind": r["kind"], "method": r["method"], "deletion_auc": fr.deletion_auc,
                        "insertion_auc": fr.insertion_auc, "random_deletion_auc": fr.random_deletion_auc,
                        "random_insertion_auc": fr.random_insertion_auc, "original": fr.original})
    return out


def _reinit_(module, generator, std: float) -> None:
    """Re-initialise a module's parameters: weights ~ N(0, std), biases 0, norm scales reset."""
    import torch

    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) * std)
            elif "norm" in name.lower() and "weight" in name:
                p.zero_() if "layer_norm" not in name else p.fill_(1.0)
            else:
                p.zero_()


def randomisation_stages(model) -> list[tuple[str, list]]:
    """Cascading randomisation from the top: (name, modules re-initialised so far)."""
    lm = model.model.language_model
    stages, mods = [], []
    n = len(lm.layers)
    for i in reversed(range(n)):
        mods = mods + [lm.layers[i]]
        stages.append((f"text layers {i}-{n - 1}", list(mods)))
    mods = mods + [model.model.multi_modal_projector]
    stages.append(("+ projector", list(mods)))
    mods = mods + [model.model.vision_tower]
    stages.append(("+ vision tower", list(mods)))
    return stages


def randomisation_check(loaded, records: Sequence[dict], methods: Sequence[str], seed: int = 0) -> list[dict]:
    """Spearman correlation between the trained model's maps and those of copies with layers
    re-initialised cascading from the top (Adebayo et al. 2018), same sequences and targets."""
    import copy

    import torch

    trained = explain_records(loaded, records, methods, keep_maps=True)
    out = []
    std = float(getattr(loaded.model.config.get_text_config(), "initializer_range", 0.02))
    for name, _ in randomisation_stages(loaded.model):
        model = copy.deepcopy(loaded.model)
        gen = torch.Generator().manual_seed(seed)
        for mod in dict(randomisation_stages(model))[name]:
            _reinit_(mod, gen, std)
        model.eval()
        rand = explain_records(loaded, records, methods, keep_maps=True, model=model)
        for a, b in zip(trained, rand):
            out.append({"stage": name, "kind": a["kind"], "method": a["method"],
                        "spearman": spearman(a["map"], b["map"]), "pointing": b["pointing"]})
        del model
    return out


# ----------------------------------------------------------------------------------------------
# the evaluation report


def _first_word(answer: str) -> str:
    m = re.match(r"\s*([a-z]+)", answer.lower())
    return m.group(1) if m else ""


def answer_accuracy(loaded, items: Sequence[Item], free: Sequence[str], yes_no: dict[str, Sequence[str]],
                    prompt_set: str = "default") -> dict[str, Any]:
    """Yes/no accuracy, laterality and zone words, free-text exact match on `items`."""
    data = _read_prompt_set(prompt_set)
    variants = [v for v in data["variants"] if v["kind"] == "free_text" or v.get("finding") in ANSWER_FINDINGS]
    prompts = [str(v["text"]) for v in variants]
    gens = generate(loaded, items, prompts)
    yn_ok = yn_n = side_ok = side_n = zone_ok = zone_n = ft_ok = ft_n = ft_side_ok = ft_side_n = 0
    per_finding: dict[str, list[int]] = {}
    examples = []
    k = 0
    for it in items:
        for v in variants:
            gen = gens[k]
            k += 1
            answer = gen.answer.strip()
            if v["kind"] == "free_text":
                truth = findings_answer(it.phantom.lesions)
                ft_n += 1
                ft_ok += answer == truth
                for les in it.phantom.lesions:
                    if les.side and les.finding in ANSWER_FINDINGS:
                        ft_side_n += 1
                        word = {"Pleural Effusion": "pleural effusion", "Pneumothorax": "pneumothorax"}.get(
                            les.finding, les.finding.lower())
                        m = re.search(r"\b(left|right)\b[a-z ]*?\b" + word + r"\b", answer)
                        ft_side_ok += bool(m) and m.group(1) == les.side
                if len(examples) < 6:
                    examples.append((v["text"], answer, truth))
                continue
            f = v["finding"]
            truth = yes_no_answer(it.phantom.lesions, f)
            got = _first_word(answer)
            ok = got == _first_word(truth)
            yn_n += 1
            yn_ok += ok
            per_finding.setdefault(f, []).append(int(ok))
            if truth.startswith("yes. ") and got == "yes":
                t_side, t_zone = truth.split()[1], truth.split()[2]
                words = answer.split()
                side_n += 1
                side_ok += len(words) > 1 and words[1] == t_side
                zone_n += 1
                zone_ok += len(words) > 2 and words[2] == t_zone
    return {"prompt_set": prompt_set, "images": len(items), "yes_no_n": yn_n, "yes_no_accuracy": yn_ok / max(1, yn_n),
            "yes_no_by_finding": {f: float(np.mean(v)) for f, v in per_finding.items()},
            "laterality_n": side_n, "laterality_accuracy": side_ok / max(1, side_n),
            "zone_accuracy": zone_ok / max(1, zone_n),
            "free_text_n": ft_n, "free_text_exact": ft_ok / max(1, ft_n),
            "free_text_laterality_n": ft_side_n, "free_text_laterality": ft_side_ok / max(1, ft_side_n),
            "examples": examples}


def _md(df, floatfmt: str = ".3f") -> str:
    try:
        return df.to_markdown(floatfmt=floatfmt)
    except ImportError:  # tabulate missing
        return df.to_string(float_format=lambda v: format(v, floatfmt))


def evaluate(model_dir: str | Path, *, seed: int = HELD_OUT_SEED, shortcut_dir: str | Path | None = None,
             n_accuracy: int = 120, n_localisation: int = 48, n_faithfulness: int = 24, n_randomisation: int = 12,
             methods: Sequence[str] | None = None, sections: Sequence[str] = ("accuracy", "localisation", "occlusion",
                                                                                "faithfulness", "randomisation",
                                                                                "shortcut"),
             log=print) -> dict[str, Any]:
    """Every number of docs/demo_model.md for `model_dir` on held-out phantoms drawn from `seed`."""
    import pandas as pd
    import torch

    from pipeline.model import load_model

    t0 = time.perf_counter()
    loaded = load_model(str(model_dir), dtype="float32", device="cpu")
    methods = list(methods or available_methods())
    free, yes_no = prompt_texts()
    syn = synonyms()
    report: dict[str, Any] = {"model_dir": str(model_dir), "seed": seed, "methods": methods}
    recipe = Recipe(**{k: v for k, v in _training_info(model_dir).get("recipe", {}).items()
                       if k in Recipe.__dataclass_fields__})
    if "accuracy" in sections:
        items = accuracy_items(seed, n_accuracy, replace(recipe, variant="clean"))
        acc = answer_accuracy(loaded, items, free, yes_no, "default")
        sens = answer_accuracy(loaded, items[: max(8, n_accuracy // 4)], free, yes_no, "sensitivity")
        report["accuracy"] = {"default": acc, "sensitivity": sens}
        log(f"\n## Answers on {len(items)} held-out phantoms (seed {seed})\n")
        for name, a in report["accuracy"].items():
            log(f"- {name} prompts: yes/no accuracy {a['yes_no_accuracy']:.3f} (n={a['yes_no_n']}), laterality word "
                f"{a['laterality_accuracy']:.3f} (n={a['laterality_n']}), zone word {a['zone_accuracy']:.3f}, "
                f"free-text exact {a['free_text_exact']:.3f} (n={a['free_text_n']}), free-text laterality "
                f"{a['free_text_laterality']:.3f} (n={a['free_text_laterality_n']})")
        log("- yes/no by finding: " + ", ".join(f"{f} {v:.3f}" for f, v in acc["yes_no_by_finding"].items()))
        for p, a, t in acc["examples"][:4]:
            log(f"  - {p!r} -> {a!r} (truth {t!r})")

    records: list[dict] = []
    rows: list[dict] = []
    if {"localisation", "occlusion", "faithfulness", "randomisation"} & set(sections):
        items = draw_items(localisation_cases(seed, n_localisation), seed, "loc")
        records, stats = localisation_records(loaded, items, free[0], yes_no, syn)
        report["localisation_answers"] = stats
        good = [r for r in records if r["correct"]]
        rows = explain_records(loaded, good, methods, keep_maps=True)
        if not rows:
            raise RuntimeError(f"{model_dir}: none of the {len(records)} localisation answers was exactly right, "
                               f"so there is nothing to localise (answers: {stats})")
        table = summarise(rows)
        by_finding = summarise([r for r in rows if r["method"] in ("chefer", "occlusion", "random")],
                               ("kind", "finding", "method"))
        report["localisation"] = json.loads(table.reset_index().to_json(orient="records"))
        report["localisation_by_finding"] = json.loads(by_finding.reset_index().to_json(orient="records"))
        log(f"\n## Localisation on {len(items)} single-lesion held-out phantoms ({len(good)} of {len(records)} "
            f"answers exactly right and explained)\n")
        log(f"answers: {json.dumps({k: round(v, 3) for k, v in stats.items()})}\n")
        log(_md(table[["n", "pointing", "box_ratio", "box_area", "border", "inside_body"]]))
        log("\nby finding (chefer, occlusion, random):\n")
        log(_md(by_finding[["n", "pointing", "box_ratio", "box_area"]]))
    if "occlusion" in sections and records:
        occ = lesion_occlusion(loaded, records)
        report["lesion_occlusion"] = occ
        log("\n## Whole-lesion occlusion (image tokens overlapping the box -> mean token; control: mirrored box)\n")
        log(json.dumps({k: round(v, 3) for k, v in occ.items()}, indent=1))
    if "faithfulness" in sections and rows:
        keys = list(dict.fromkeys((r["key"], r["prompt"]) for r in rows))[:n_faithfulness]
        sub = [r for r in rows if (r["key"], r["prompt"]) in set(keys)]
        fm = [m for m in methods if m in ("chefer", "raw_attention", "rollout", "gradcam", "occlusion", "random",
                                          "attention_flow", "consensus")]
        fa = pd.DataFrame(faithfulness(loaded, records, sub, fm))
        ftab = fa.groupby(["kind", "method"]).mean(numeric_only=True)
        report["faithfulness"] = json.loads(ftab.reset_index().to_json(orient="records"))
        log(f"\n## Deletion / insertion (log P of the explained tokens, 16 steps, {len(keys)} sequences)\n")
        log(_md(ftab))
    if "randomisation" in sections and records:
        good = [r for r in records if r["correct"] and r["targets"]][:n_randomisation]
        rm = [m for m in methods if m in ("chefer", "raw_attention", "rollout", "gradcam")]
        ra = pd.DataFrame(randomisation_check(loaded, good, rm, seed=seed))
        stage_order = list(dict.fromkeys(ra["stage"]))
        rtab = ra.groupby(["stage", "method"], sort=False)["spearman"].mean().unstack("method").loc[stage_order]
        report["randomisation"] = json.loads(rtab.reset_index().to_json(orient="records"))
        log(f"\n## Cascading randomisation: Spearman(trained map, randomised map), {len(good)} sequences\n")
        log(_md(rtab))
    if "shortcut" in sections and shortcut_dir is not None:
        report["shortcut"] = shortcut_comparison(model_dir, shortcut_dir, seed=seed, n=n_localisation, log=log)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["torch_threads"] = torch.get_num_threads()
    log(f"\n(evaluation took {report['seconds']} s)")
    return report


def model_card(report: dict[str, Any], model_dir: str | Path) -> dict[str, Any]:
    """The evaluation as the report shows it (pipeline.model.VALIDATION_FILE): "about",
    "summary" ([name, value] pairs, in order), "tables" (name -> records), "notes"."""
    info = _training_info(model_dir)
    recipe = info.get("recipe") or {}
    weights = sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))
    summary: list[tuple[str, Any]] = [
        ("variant", recipe.get("variant")),
        (f"training seconds (torch threads: {info.get('threads')})", info.get("train_seconds")),
        ("training steps (vision pre-training + full)", f"{recipe.get('vision_pretrain_steps')} + {recipe.get('steps')}"),
        ("parameters", info.get("parameters") or _count_parameters(model_dir)),
        ("weights (MB)", round(weights / 1e6, 2)),
        ("held-out seed", report.get("seed")),
    ]
    acc = (report.get("accuracy") or {}).get("default")
    if acc:
        summary += [
            ("yes/no accuracy (default prompts)", acc["yes_no_accuracy"]), ("yes/no answers", acc["yes_no_n"]),
            ("laterality word correct (yes answers)", acc["laterality_accuracy"]),
            ("laterality answers", acc["laterality_n"]), ("zone word correct", acc["zone_accuracy"]),
            ("free-text answer exact", acc["free_text_exact"]),
            ("free-text laterality correct", acc["free_text_laterality"])]
    sens = (report.get("accuracy") or {}).get("sensitivity")
    if sens:
        summary.append(("yes/no accuracy (sensitivity prompts)", sens["yes_no_accuracy"]))
    occ = report.get("lesion_occlusion") or {}
    for kind in ("answer_token", "side_word"):
        if f"{kind}/lesion_flip" in occ:
            summary.append((f"{kind}: flipped by occluding the lesion / the mirrored box",
                            f"{occ[f'{kind}/lesion_flip']:.3f} / {occ[f'{kind}/mirror_flip']:.3f}"))
    tables = {k: report[k] for k in ("localisation", "faithfulness", "randomisation") if report.get(k)}
    if report.get("shortcut"):
        tables["shortcut_answers"] = report["shortcut"]["answers"]
        tables["shortcut_maps"] = report["shortcut"]["maps"]
    return {
        "about": (f"Measured by `python -m pipeline.train_demo --evaluate {model_dir}` on phantoms drawn "
                  f"from a seed never used in training (see docs/demo_model.md). Localisation: single-lesion "
                  f"phantoms; pointing = argmax cell in the lesion box; box_ratio = map mass in the box / box area "
                  f"fraction (1 = uniform)."),
        "summary": summary, "tables": tables,
        "notes": (["This is the deliberately flawed variant: its laterality words read the corner side marker. On "
                   "images without a marker naming the side its laterality word is at chance."]
                  if recipe.get("variant") == "shortcut" else []),
    }


def _count_parameters(model_dir: str | Path) -> int:
    from safetensors import safe_open

    n = 0
    for f in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(f), framework="np") as st:
            for k in st.keys():
                n += int(np.prod(st.get_slice(k).get_shape()))
    return n


def _training_info(model_dir: str | Path) -> dict[str, Any]:
    p = Path(model_dir) / "training.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def shortcut_comparison(clean_dir: str | Path, shortcut_dir: str | Path, *, seed: int = HELD_OUT_SEED, n: int = 48,
                        methods: Sequence[str] = ("chefer", "raw_attention", "rollout", "gradcam", "random"),
                        log=print) -> dict[str, Any]:
    """Both models on the same single-lesion phantoms, each with a side marker whose letter
    agrees ("same") or disagrees ("opposite") with the lesion's side. Laterality accuracy, and
    for the laterality word of every yes/no answer: pointing game on the lesion, mass on the
    marker, border fraction, inside-body ratio."""
    import pandas as pd

    from pipeline.model import load_model

    free, yes_no = prompt_texts()
    syn = synonyms()
    acc_rows, map_rows = [], []
    for name, d in (("clean", clean_dir), ("shortcut", shortcut_dir)):
        loaded = load_model(str(d), dtype="float32", device="cpu")
        for marker in ("same", "opposite"):
            items = draw_items(localisation_cases(seed, n, marker=marker), seed, "mk" + marker)
            records, stats = localisation_records(loaded, items, free[0], yes_no, syn)
            acc_rows.append({"model": name, "marker": marker, "laterality": stats["side_correct"],
                             "answers_exact": stats["answer_correct"], "yes_no": stats["yes_no_correct"]})
            yn = [dict(r, targets=[t for t in r["targets"] if t[0] == "side_word"]) for r in records
                  if r["kind"] == "yes_no"]
            for row in explain_records(loaded, yn, methods):
                map_rows.append(dict(row, model=name, marker=marker))
    acc = pd.DataFrame(acc_rows).set_index(["model", "marker"])
    maps = pd.DataFrame(map_rows).groupby(["model", "marker", "method"]).agg(
        n=("key", "count"), lesion_pointing=("pointing", "mean"), marker_pointing=("marker_pointing", "mean"),
        marker_mass_ratio=("marker_ratio", "mean"), border=("border", "mean"), inside_body=("inside_body", "mean"))
    log(f"\n## Shortcut: both models, the same {n} single-lesion phantoms with a side marker\n")
    log(_md(acc))
    log("\nlaterality word of the yes/no answers:\n")
    log(_md(maps))
    return {"answers": json.loads(acc.reset_index().to_json(orient="records")),
            "maps": json.loads(maps.reset_index().to_json(orient="records"))}


# ----------------------------------------------------------------------------------------------
# command line


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.train_demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="model directory to write (train)")
    ap.add_argument("--variant", choices=("clean", "shortcut"), default="clean")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seed", type=int, default=None,
                    help=f"training seed (default {Recipe.seed}); with --evaluate the held-out seed "
                         f"(default {HELD_OUT_SEED})")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a Recipe field, e.g. --set image_mixing_penalty=0 (repeatable)")
    ap.add_argument("--evaluate", metavar="MODEL_DIR", help="evaluate a trained model directory instead")
    ap.add_argument("--shortcut", metavar="MODEL_DIR", default=None,
                    help="with --evaluate: the shortcut model to compare (default data/demo_model_shortcut if present)")
    ap.add_argument("--sections", default="accuracy,localisation,occlusion,faithfulness,randomisation,shortcut")
    ap.add_argument("--n-accuracy", type=int, default=120)
    ap.add_argument("--n-localisation", type=int, default=48)
    ap.add_argument("--json", metavar="PATH", help="with --evaluate: also write the numbers as JSON")
    ap.add_argument("--card", metavar="PATH", help="with --evaluate: write the model card the report shows "
                                                     "(MODEL_DIR/evaluation.json)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    if args.evaluate:
        shortcut = args.shortcut
        if shortcut is None and (REPO / "data" / "demo_model_shortcut").is_dir():
            shortcut = REPO / "data" / "demo_model_shortcut"
        report = evaluate(args.evaluate, seed=HELD_OUT_SEED if args.seed is None else args.seed,
                          shortcut_dir=shortcut, n_accuracy=args.n_accuracy, n_localisation=args.n_localisation,
                          sections=[s.strip() for s in args.sections.split(",") if s.strip()])
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1, default=str))
        if args.card:
            Path(args.card).write_text(json.dumps(model_card(report, args.evaluate), indent=1, default=str))
        return 0
    if not args.out:
        ap.error("--out is required to train (or pass --evaluate MODEL_DIR)")
    recipe = Recipe(variant=args.variant)
    if args.steps is not None:
        recipe = replace(recipe, steps=args.steps)
    if args.seed is not None:
        recipe = replace(recipe, seed=args.seed)
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in Recipe.__dataclass_fields__ or not value:
            ap.error(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(Recipe.__dataclass_fields__)}")
        kind = type(getattr(recipe, key))
        parsed = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
        recipe = replace(recipe, **{key: parsed})
    info = train(args.out, recipe, threads=args.threads, log=lambda s: print(s, flush=True))
    print(f"trained in {info['train_seconds']} s with {info['threads']} threads -> {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
