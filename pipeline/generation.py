"""Greedy answer generation for image + prompt samples, and inputs for the explanation pass.

Conventions (the explanation stage relies on them):

* Decoding is greedy (``do_sample=False``, ``num_beams=1``) whatever the model's own
  generation config says (MedGemma's samples by default), batched with LEFT padding, and stops
  at ``<end_of_turn>`` or ``<eos>`` or after ``max_new_tokens``.
* The image placeholder tokens (image soft token, begin/end of image) are never generated
  (suppressed): an answer containing them could not be fed back with its image.
* ``Generation.sequence_ids`` are the prompt ids as the processor built them (no padding)
  followed by the generated ids up to and INCLUDING the stopping ``<end_of_turn>``/``<eos>``
  token when one was generated. So ``sequence_ids`` is exactly what the model read/produced, a
  forward pass over it reproduces every generated token, and answer targets exclude the
  trailing stop token themselves. ``Generation.answer`` is the decoded answer without special
  tokens (see :func:`pipeline.targets.decode_answer`).
* A failing sample (prompt longer than the context, out of memory, ...) does not lose the
  others: if a batch fails, its samples are retried one by one and the failing slot holds the
  exception object.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from .model import LoadedModel
from .targets import decode_answer

__all__ = [
    "Generation",
    "build_messages",
    "encode_inputs",
    "generate_batch",
    "model_inputs_for_sequence",
    "stop_token_ids",
]


@dataclass
class Generation:
    """One greedy answer and the full token sequence it came from."""

    answer: str
    sequence_ids: list[int]  # prompt + generated ids, no padding
    prompt_length: int
    n_new_tokens: int
    stopped: str  # "eos" | "max_new_tokens"


def build_messages(prompt_text: str, system_prompt: str | None = None) -> list[dict]:
    """MedGemma chat messages: optional system turn, then a user turn with [image, text]."""
    messages: list[dict] = []
    if system_prompt:
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt_text}]})
    return messages


def _with_image(messages: list[dict], image: Image.Image) -> list[dict]:
    out = copy.deepcopy(messages)
    for message in out:
        for item in message["content"]:
            if item.get("type") == "image":
                item["image"] = image
    return out


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def encode_inputs(
    loaded: LoadedModel, image: Image.Image, prompt_text: str, system_prompt: str | None = None
) -> dict[str, torch.Tensor]:
    """Chat-template and process one sample: input_ids, attention_mask, pixel_values,
    token_type_ids (1 x N tensors, on CPU, as the processor returns them)."""
    messages = _with_image(build_messages(prompt_text, system_prompt), _rgb(image))
    enc = loaded.processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    out = {k: enc[k] for k in ("input_ids", "attention_mask", "pixel_values", "token_type_ids") if k in enc}
    if "token_type_ids" not in out:
        out["token_type_ids"] = (out["input_ids"] == loaded.image_token_id).long()
    return out


def _pixel_values(loaded: LoadedModel, image: Image.Image) -> torch.Tensor:
    """Pixel values exactly as the processor computes them inside ``apply_chat_template``."""
    processor = loaded.processor
    kwargs: dict[str, Any] = {}
    defaults = getattr(type(processor), "images_kwargs", None)
    if isinstance(defaults, dict) and "do_pan_and_scan" in defaults:
        kwargs["do_pan_and_scan"] = defaults["do_pan_and_scan"]
    features = processor.image_processor(_rgb(image), return_tensors="pt", **kwargs)
    return features["pixel_values"]


def model_inputs_for_sequence(
    loaded: LoadedModel, image: Image.Image, sequence_ids: Sequence[int]
) -> dict[str, torch.Tensor]:
    """Forward-pass inputs for a stored sequence (explanation pass): the same computation as
    generation, i.e. ids, an all-ones mask, token_type_ids marking the image soft tokens, and
    pixel values in the model's dtype on its device."""
    ids = torch.tensor([list(map(int, sequence_ids))], dtype=torch.long)
    image_mask = ids == loaded.image_token_id
    pixel_values = _pixel_values(loaded, image)
    per_image = int(getattr(loaded.model.config, "mm_tokens_per_image", 0) or 0)
    n_image_tokens = int(image_mask.sum())
    if per_image and n_image_tokens != per_image * pixel_values.shape[0]:
        raise ValueError(
            f"sequence has {n_image_tokens} image tokens (id {loaded.image_token_id}) but the image gives "
            f"{pixel_values.shape[0]} x {per_image}; was it generated with another processor or model?"
        )
    device = loaded.device
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "token_type_ids": image_mask.long().to(device),
        "pixel_values": pixel_values.to(device=device, dtype=loaded.dtype),
    }


def stop_token_ids(loaded: LoadedModel) -> list[int]:
    """Ids that end an answer: <end_of_turn>, <eos> and the generation config's eos ids."""
    ids: set[int] = set()
    eos = getattr(loaded.model.generation_config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos is not None:
        ids.update(int(i) for i in eos)
    tok_eos = loaded.processor.tokenizer.eos_token_id
    if tok_eos is not None:
        ids.add(int(tok_eos))
    if loaded.end_of_turn_id is not None:
        ids.add(int(loaded.end_of_turn_id))
    return sorted(ids)


def _generation_kwargs(loaded: LoadedModel, max_new_tokens: int, pad_id: int) -> dict[str, Any]:
    """Greedy decoding settings; everything not set here comes from the model's own config."""
    config = loaded.model.config
    never = {loaded.image_token_id}
    for name in ("boi_token_id", "eoi_token_id"):
        value = getattr(config, name, None)
        if value is not None:
            never.add(int(value))
    never.update(int(i) for i in (getattr(loaded.model.generation_config, "suppress_tokens", None) or []))
    # Passed as generate() kwargs: they override the model's generation_config.json (MedGemma's
    # samples with top_k/top_p), whose sampling-only flags are then ignored.
    return {
        "do_sample": False,
        "num_beams": 1,
        "max_new_tokens": int(max_new_tokens),
        "eos_token_id": stop_token_ids(loaded),
        "pad_token_id": pad_id,
        "suppress_tokens": sorted(never),
        "return_dict_in_generate": False,
        "output_scores": False,
    }


def _pad_id(loaded: LoadedModel) -> int:
    pad = loaded.processor.tokenizer.pad_token_id
    if pad is None:
        pad = getattr(loaded.model.generation_config, "pad_token_id", None)
    if pad is None:
        pad = stop_token_ids(loaded)[0]
    return int(pad)


def _collate_left(encodings: Sequence[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad 1 x N encodings into a batch."""
    length = max(e["input_ids"].shape[1] for e in encodings)
    n = len(encodings)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    token_type_ids = torch.zeros((n, length), dtype=torch.long)
    for row, enc in enumerate(encodings):
        size = enc["input_ids"].shape[1]
        input_ids[row, length - size :] = enc["input_ids"][0]
        attention_mask[row, length - size :] = enc["attention_mask"][0]
        token_type_ids[row, length - size :] = enc["token_type_ids"][0]
    pixel_values = torch.cat([e["pixel_values"] for e in encodings], dim=0)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": token_type_ids,
        "pixel_values": pixel_values,
    }


@torch.inference_mode()
def _generate_encoded(
    loaded: LoadedModel, encodings: Sequence[dict[str, torch.Tensor]], max_new_tokens: int
) -> list[Generation]:
    pad_id = _pad_id(loaded)
    batch = _collate_left(encodings, pad_id)
    device = loaded.device
    inputs = {k: v.to(device) for k, v in batch.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
    gen_kwargs = _generation_kwargs(loaded, max_new_tokens, pad_id)
    output = loaded.model.generate(**inputs, **gen_kwargs)
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    new_tokens = sequences[:, batch["input_ids"].shape[1] :].tolist()
    stops = set(gen_kwargs["eos_token_id"])
    tokenizer = loaded.processor.tokenizer
    results: list[Generation] = []
    for enc, row in zip(encodings, new_tokens):
        prompt = [int(i) for i in enc["input_ids"][0].tolist()]
        stop_at = next((k for k, tid in enumerate(row) if tid in stops), None)
        if stop_at is None:
            generated, stopped = [int(t) for t in row[:max_new_tokens]], "max_new_tokens"
        else:
            generated, stopped = [int(t) for t in row[: stop_at + 1]], "eos"
        sequence = prompt + generated
        results.append(
            Generation(
                answer=decode_answer(tokenizer, sequence, len(prompt)),
                sequence_ids=sequence,
                prompt_length=len(prompt),
                n_new_tokens=len(generated),
                stopped=stopped,
            )
        )
    return results


def _context_limit(loaded: LoadedModel) -> int | None:
    config = loaded.model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text_config, "max_position_embeddings", None)
    return int(limit) if limit else None


def _release_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def generate_batch(
    loaded: LoadedModel,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    *,
    system_prompt: str | None = None,
    max_new_tokens: int = 64,
) -> list[Generation | Exception]:
    """Greedy answers for (image, prompt) pairs, one result or exception per pair, in order.

    Results do not depend on how samples are batched (up to floating-point effects of
    batching in reduced precision on GPUs).
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    results: list[Generation | Exception | None] = [None] * len(prompts)
    encodings: dict[int, dict[str, torch.Tensor]] = {}
    limit = _context_limit(loaded)
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        try:
            enc = encode_inputs(loaded, image, prompt, system_prompt)
            n = enc["input_ids"].shape[1]
            if limit is not None and n + max_new_tokens > limit:
                raise ValueError(
                    f"prompt of {n} tokens + max_new_tokens={max_new_tokens} exceeds the model's context of "
                    f"{limit} tokens"
                )
            encodings[i] = enc
        except Exception as exc:  # noqa: BLE001 - reported per sample
            results[i] = exc
    todo = list(encodings)
    if todo:
        try:
            for i, gen in zip(todo, _generate_encoded(loaded, [encodings[i] for i in todo], max_new_tokens)):
                results[i] = gen
        except Exception as batch_exc:  # noqa: BLE001 - retry one by one
            _release_memory()
            if len(todo) == 1:
                results[todo[0]] = batch_exc
            else:
                for i in todo:
                    try:
                        results[i] = _generate_encoded(loaded, [encodings[i]], max_new_tokens)[0]
                    except Exception as exc:  # noqa: BLE001
                        _release_memory()
                        results[i] = exc
    return [r if r is not None else RuntimeError("no result") for r in results]
