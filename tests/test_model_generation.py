"""Model loading and greedy generation on a tiny Gemma 3 built offline."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.generation import (
    Generation,
    build_messages,
    encode_inputs,
    generate_batch,
    model_inputs_for_sequence,
    stop_token_ids,
)
from pipeline.model import (
    LoadedModel,
    ModelLoadError,
    describe,
    load_model,
    resolve_device,
    resolve_dtype,
    weights_fingerprint,
)
from pipeline.targets import decode_answer
from pipeline.tiny_model import build_tiny_gemma3

MAX_NEW = 12
PROMPTS = [
    "Is there a pleural effusion?",
    "Describe the findings in this chest x ray.",
    "Is there any pneumothorax on the left side or on the right side of the chest, and is the heart size normal?",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gemma3(tmp_path_factory.mktemp("tiny_gemma3"), seed=0)


@pytest.fixture(scope="module")
def loaded(tiny_dir: Path) -> LoadedModel:
    return load_model(str(tiny_dir), device="cpu")


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(40, 52), (64, 48), (33, 33)]
    out = [Image.fromarray(rng.integers(0, 256, size=s, dtype=np.uint8)) for s in sizes]
    out[1] = out[1].convert("RGB")
    return out


@pytest.fixture(scope="module")
def batched(loaded: LoadedModel, images: list[Image.Image]) -> list[Generation | Exception]:
    return generate_batch(loaded, images, PROMPTS, max_new_tokens=MAX_NEW)


# --- tiny model directory -------------------------------------------------------------------


def test_tiny_model_loads_with_auto_classes(tiny_dir: Path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    tok = processor.tokenizer
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    assert type(processor).__name__ == "Gemma3Processor"
    assert (tiny_dir / "model.safetensors").is_file()
    cfg = model.config
    assert cfg.image_token_id == tok.image_token_id == tok.convert_tokens_to_ids("<image_soft_token>")
    assert cfg.boi_token_id == tok.boi_token_id == processor.image_token_id  # processor's "image" id is boi
    assert cfg.eoi_token_id == tok.eoi_token_id
    assert tok.convert_tokens_to_ids("<end_of_turn>") in model.generation_config.eos_token_id
    assert set(cfg.text_config.layer_types) == {"sliding_attention", "full_attention"}
    assert processor.image_seq_length == cfg.mm_tokens_per_image == 16
    ip = processor.image_processor
    assert list(ip.image_mean) == [0.5] * 3 and list(ip.image_std) == [0.5] * 3
    # the projector is not zero, so image tokens differ from each other
    assert model.model.multi_modal_projector.mm_input_projection_weight.abs().sum() > 0
    # SentencePiece-style pieces: in-vocabulary words are one piece, others several
    pieces = tok.convert_ids_to_tokens(tok("a left effusion and cardiomegaly", add_special_tokens=False).input_ids)
    assert "\u2581left" in pieces and "\u2581effusion" in pieces
    assert len(pieces) > 5


def test_tiny_model_is_deterministic(tmp_path: Path, tiny_dir: Path) -> None:
    again = build_tiny_gemma3(tmp_path / "again", seed=0)
    other = build_tiny_gemma3(tmp_path / "other", seed=1)
    assert weights_fingerprint(again) == weights_fingerprint(tiny_dir)
    assert weights_fingerprint(other) != weights_fingerprint(tiny_dir)
    assert (again / "tokenizer.json").read_text() == (tiny_dir / "tokenizer.json").read_text()


# --- load_model -------------------------------------------------------------------------------


def test_load_model_fields(loaded: LoadedModel, tiny_dir: Path) -> None:
    tok = loaded.processor.tokenizer
    assert loaded.dtype == torch.float32 and loaded.device == torch.device("cpu")
    assert loaded.image_token_id == loaded.model.config.image_token_id == tok.image_token_id
    assert loaded.image_token_id != loaded.processor.image_token_id
    assert loaded.end_of_turn_id == tok.convert_tokens_to_ids("<end_of_turn>")
    assert loaded.fingerprint == weights_fingerprint(tiny_dir) and loaded.fingerprint.startswith("sha256:")
    assert loaded.resolved_revision is None and loaded.name_or_path == str(tiny_dir)
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    # default: SigLIP on sdpa, the language model on eager
    assert loaded.model.config.text_config._attn_implementation == "eager"
    assert loaded.model.config.vision_config._attn_implementation == "sdpa"
    assert describe(loaded)["attn_implementation"]["vision_config"] == "sdpa"


@pytest.mark.parametrize("name,text,vision", [("eager", "eager", "eager"), ("sdpa", "sdpa", "sdpa"),
                                              ("vision_sdpa", "eager", "sdpa")])
def test_load_model_attn_implementation(tiny_dir: Path, images: list[Image.Image], name: str, text: str,
                                        vision: str) -> None:
    lm = load_model(str(tiny_dir), device="cpu", attn_implementation=name)
    assert lm.model.config.text_config._attn_implementation == text
    assert lm.model.config.vision_config._attn_implementation == vision
    (res,) = generate_batch(lm, images[:1], ["Findings?"], max_new_tokens=4)
    assert isinstance(res, Generation) and res.n_new_tokens >= 1
    with pytest.raises(ValueError, match="flash"):
        load_model(str(tiny_dir), device="cpu", attn_implementation="flash")


def test_load_model_offline_env_and_bfloat16(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lm = load_model(str(tiny_dir), dtype="bfloat16", device="cpu")
    assert lm.dtype == torch.bfloat16
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    seq = encode_inputs(lm, Image.new("L", (20, 30), 128), "Yes?")["input_ids"][0].tolist()
    inputs = model_inputs_for_sequence(lm, Image.new("L", (20, 30), 128), seq)
    assert inputs["pixel_values"].dtype == torch.bfloat16


def test_load_model_from_hub_cache(tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-medgemma"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(tiny_dir, snapshot)
    blob = repo / "blobs" / "weights"
    blob.parent.mkdir()
    (snapshot / "model.safetensors").rename(blob)
    (snapshot / "model.safetensors").symlink_to(blob)  # the hub cache links snapshots to blobs
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lm = load_model("acme/tiny-medgemma", device="cpu", device_map="cpu")
    assert lm.resolved_revision == commit
    assert lm.fingerprint == weights_fingerprint(tiny_dir)
    assert lm.name_or_path == "acme/tiny-medgemma" and lm.device == torch.device("cpu")
    assert load_model("acme/tiny-medgemma", revision=commit, device="cpu").resolved_revision == commit


def test_load_model_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "missing" / "dir"))
    empty = tmp_path / "no_weights"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(str(empty))
    repo = "nonexistent-org/not-a-medgemma-xyz"
    with pytest.raises(ModelLoadError) as info:
        load_model(repo, local_files_only=True)
    message = str(info.value)
    assert repo in message and "model.name_or_path" in message and "HF_HUB_OFFLINE" in message
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="offline"):
        load_model(repo)


def test_resolve_dtype_and_device() -> None:
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16
    assert resolve_dtype("bfloat16", "cuda:1") == torch.bfloat16
    with pytest.raises(ValueError):
        resolve_dtype("int8", "cpu")
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device("cuda:1")


# --- encoding ---------------------------------------------------------------------------------


def test_build_messages() -> None:
    assert build_messages("Q?", None) == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}]
    msgs = build_messages("Q?", "You are an expert radiologist.")
    assert msgs[0] == {"role": "system", "content": [{"type": "text", "text": "You are an expert radiologist."}]}
    assert msgs[1]["role"] == "user"


def test_encode_inputs_layout(loaded: LoadedModel, images: list[Image.Image]) -> None:
    tok = loaded.processor.tokenizer
    enc = encode_inputs(loaded, images[0], "Is there a pleural effusion?", "You are an expert radiologist.")
    ids = enc["input_ids"][0]
    text = tok.decode(ids.tolist(), skip_special_tokens=False)
    n_img = loaded.model.config.mm_tokens_per_image
    expected = (
        "<bos><start_of_turn>user\nYou are an expert radiologist.\n\n\n\n<start_of_image>"
        + "<image_soft_token>" * n_img
        + "<end_of_image>\n\nIs there a pleural effusion?<end_of_turn>\n<start_of_turn>model\n"
    )
    assert text == expected
    assert int((ids == tok.bos_token_id).sum()) == 1
    assert torch.equal(enc["token_type_ids"][0], (ids == loaded.image_token_id).long())
    assert enc["pixel_values"].shape == (1, 3, 32, 32)
    no_system = tok.decode(encode_inputs(loaded, images[0], "Q")["input_ids"][0].tolist())
    assert no_system.startswith("<bos><start_of_turn>user\n\n\n<start_of_image>")


def test_model_inputs_for_sequence_matches_processor(loaded: LoadedModel, images: list[Image.Image]) -> None:
    enc = encode_inputs(loaded, images[1], PROMPTS[1])
    rebuilt = model_inputs_for_sequence(loaded, images[1], enc["input_ids"][0].tolist())
    for key in ("input_ids", "attention_mask", "token_type_ids", "pixel_values"):
        assert torch.equal(rebuilt[key], enc[key].to(rebuilt[key].dtype)), key
    with pytest.raises(ValueError, match="image tokens"):
        model_inputs_for_sequence(loaded, images[1], [t for t in enc["input_ids"][0].tolist() if t != loaded.image_token_id])


# --- generation -------------------------------------------------------------------------------


def test_batched_equals_one_by_one(
    loaded: LoadedModel, images: list[Image.Image], batched: list[Generation | Exception]
) -> None:
    assert all(isinstance(g, Generation) for g in batched)
    lengths = {g.prompt_length for g in batched}
    assert len(lengths) == 3  # different prompt lengths -> real left padding in the batch
    for image, prompt, g in zip(images, PROMPTS, batched):
        single = generate_batch(loaded, [image], [prompt], max_new_tokens=MAX_NEW)[0]
        assert isinstance(single, Generation)
        assert single == g
        prompt_ids = encode_inputs(loaded, image, prompt)["input_ids"][0].tolist()
        assert g.sequence_ids[: g.prompt_length] == prompt_ids  # no padding stored
        assert len(g.sequence_ids) == g.prompt_length + g.n_new_tokens
        assert g.answer == decode_answer(loaded.processor.tokenizer, g.sequence_ids, g.prompt_length)
        assert g.stopped == "max_new_tokens" and g.n_new_tokens == MAX_NEW
        assert loaded.image_token_id not in g.sequence_ids[g.prompt_length :]


def test_generation_is_deterministic(
    loaded: LoadedModel, images: list[Image.Image], batched: list[Generation | Exception]
) -> None:
    again = generate_batch(loaded, images, PROMPTS, max_new_tokens=MAX_NEW)
    assert again == batched


def test_teacher_forced_argmax_reproduces_generation(
    loaded: LoadedModel, images: list[Image.Image], batched: list[Generation | Exception]
) -> None:
    for image, g in zip(images, batched):
        assert isinstance(g, Generation)
        inputs = model_inputs_for_sequence(loaded, image, g.sequence_ids)
        with torch.no_grad():
            logits = loaded.model(**inputs).logits[0]
        predicted = logits[g.prompt_length - 1 : -1].argmax(-1).tolist()
        assert predicted == g.sequence_ids[g.prompt_length :]
        # token_type_ids matter: without them the image block is causal and the logits change
        no_tti = {k: v for k, v in inputs.items() if k != "token_type_ids"}
        with torch.no_grad():
            causal_logits = loaded.model(**no_tti).logits[0]
        assert not torch.allclose(causal_logits, logits)


def test_stops_at_end_of_turn(
    loaded: LoadedModel, images: list[Image.Image], batched: list[Generation | Exception]
) -> None:
    g0 = batched[0]
    assert isinstance(g0, Generation)
    answer = g0.sequence_ids[g0.prompt_length :]
    stop = answer[3]
    first = answer.index(stop)
    # Pretend the 4th generated token is <end_of_turn>: generation must stop right after it.
    fake = dataclasses.replace(loaded, end_of_turn_id=stop)
    assert stop in stop_token_ids(fake)
    res = generate_batch(fake, images, PROMPTS, max_new_tokens=MAX_NEW)
    r0 = res[0]
    assert isinstance(r0, Generation)
    assert r0.stopped == "eos" and r0.n_new_tokens == first + 1
    assert r0.sequence_ids == g0.sequence_ids[: g0.prompt_length + first + 1]
    for image, prompt, r in zip(images[1:], PROMPTS[1:], res[1:]):
        assert r == generate_batch(fake, [image], [prompt], max_new_tokens=MAX_NEW)[0]
    # the real <end_of_turn> is special: excluded from the answer text
    tok = loaded.processor.tokenizer
    seq = g0.sequence_ids + [loaded.end_of_turn_id]
    assert decode_answer(tok, seq, g0.prompt_length) == g0.answer


def test_failing_sample_does_not_lose_others(
    loaded: LoadedModel,
    images: list[Image.Image],
    batched: list[Generation | Exception],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    too_long = " ".join(["effusion"] * 600)  # beyond the tiny model's 512-token context
    res = generate_batch(loaded, [images[0], images[1]], [PROMPTS[0], too_long], max_new_tokens=MAX_NEW)
    assert res[0] == batched[0]
    assert isinstance(res[1], ValueError) and "context" in str(res[1])

    original = loaded.model.generate
    bad_length = batched[1].prompt_length if isinstance(batched[1], Generation) else -1

    def flaky_generate(*args, **kwargs):
        ids = kwargs["input_ids"]
        if ids.shape[0] > 1 or ids.shape[1] == bad_length:
            raise RuntimeError("CUDA out of memory (simulated)")
        return original(*args, **kwargs)

    monkeypatch.setattr(loaded.model, "generate", flaky_generate)
    res = generate_batch(loaded, images, PROMPTS, max_new_tokens=MAX_NEW)
    assert res[0] == batched[0] and res[2] == batched[2]
    assert isinstance(res[1], RuntimeError) and "out of memory" in str(res[1])


def test_generate_batch_argument_checks(loaded: LoadedModel, images: list[Image.Image]) -> None:
    with pytest.raises(ValueError):
        generate_batch(loaded, images[:2], PROMPTS, max_new_tokens=4)
    assert generate_batch(loaded, [], [], max_new_tokens=4) == []
