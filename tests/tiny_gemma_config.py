"""Tiny, randomly initialised Gemma 3 vision-language models for fast CPU tests.

The model is a real ``transformers.Gemma3ForConditionalGeneration`` (SigLIP vision tower,
average-pooling projector, Gemma 3 text decoder with interleaved sliding-window and global
layers), only small: it exercises the same code paths as MedGemma in well under a second.

Token conventions of the tiny vocabulary (``TINY_VOCAB`` ids):

- ``PAD_ID`` 0, ``EOS_ID`` 1, ``BOS_ID`` 2,
- ``BOI_ID`` begin of image, ``EOI_ID`` end of image, ``IMAGE_ID`` image soft token
  (``model.config.image_token_id``), all inside the vocabulary as in MedGemma,
- ordinary text tokens are drawn from ``[TEXT_LOW, TEXT_HIGH)``.

``make_tiny_inputs`` lays a sequence out as
``[bos, prefix text..., boi, image x grid_h*grid_w, eoi, suffix text..., answer...]``, so the image
block does not start at position 1 (hard-coded offsets would be caught by tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

TINY_VOCAB = 300
PAD_ID = 0
EOS_ID = 1
BOS_ID = 2
BOI_ID = 296
EOI_ID = 297
IMAGE_ID = 298
TEXT_LOW = 3
TEXT_HIGH = 290


def make_tiny_gemma3(
    seed: int = 0,
    *,
    num_layers: int = 4,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    intermediate_size: int = 128,
    vocab_size: int = TINY_VOCAB,
    sliding_window: int = 8,
    layer_types: list[str] | None = None,
    image_size: int = 32,
    patch_size: int = 4,
    mm_tokens_per_image: int = 16,
    vision_hidden_size: int = 32,
    vision_layers: int = 1,
    attn_logit_softcapping: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> Gemma3ForConditionalGeneration:
    """Build a seeded tiny Gemma 3 VLM in eval mode with frozen parameters.

    ``layer_types`` defaults to alternating sliding/global layers (sliding first), so both
    kinds exist for any ``num_layers >= 2``. The multimodal projector is re-initialised with
    random weights: Gemma 3's own init zeroes it, which would make every image token equal.
    """
    if layer_types is None:
        layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
    text_config = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        sliding_window=sliding_window,
        layer_types=layer_types,
        max_position_embeddings=1024,
        attn_logit_softcapping=attn_logit_softcapping,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=BOS_ID,
    )
    vision_config = SiglipVisionConfig(
        hidden_size=vision_hidden_size,
        intermediate_size=2 * vision_hidden_size,
        num_hidden_layers=vision_layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        num_channels=3,
    )
    config = Gemma3Config(
        text_config=text_config,
        vision_config=vision_config,
        mm_tokens_per_image=mm_tokens_per_image,
        boi_token_index=BOI_ID,
        eoi_token_index=EOI_ID,
        image_token_index=IMAGE_ID,
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        proj = model.model.multi_modal_projector.mm_input_projection_weight
        proj.copy_(torch.randn(proj.shape, generator=gen) * (1.0 / proj.shape[0] ** 0.5))
        # Gemma's RMSNorm weights are zero-centred (scale = 1 + w); give them some spread so that
        # the norms are not all identities.
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") and "language_model" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    model = model.to(dtype)
    model.eval()
    model.requires_grad_(False)
    return model


@dataclass
class TinyInputs:
    """A tiny multimodal sequence: ids (1 x N), pixel values, token types and layout."""

    input_ids: torch.Tensor
    pixel_values: torch.Tensor
    token_type_ids: torch.Tensor
    image_start: int
    num_image_tokens: int
    prompt_length: int


def make_tiny_inputs(
    model: Gemma3ForConditionalGeneration,
    *,
    seed: int = 0,
    prefix_len: int = 3,
    suffix_len: int = 4,
    answer_len: int = 6,
    greedy_answer: bool = False,
) -> TinyInputs:
    """Random ids and pixels laid out like a chat prompt with one image, plus an answer.

    With ``greedy_answer`` the answer tokens are produced by teacher-forced greedy decoding of
    the model itself (bidirectional image attention, i.e. with ``token_type_ids``), so that the
    engine's ``argmax_matches`` check must pass; otherwise they are random.
    """
    gen = torch.Generator().manual_seed(seed)
    n_img = int(model.config.mm_tokens_per_image)
    vis = model.config.vision_config
    prefix = torch.randint(TEXT_LOW, TEXT_HIGH, (prefix_len,), generator=gen)
    suffix = torch.randint(TEXT_LOW, TEXT_HIGH, (suffix_len,), generator=gen)
    ids = torch.cat(
        [
            torch.tensor([BOS_ID]),
            prefix,
            torch.tensor([BOI_ID]),
            torch.full((n_img,), IMAGE_ID),
            torch.tensor([EOI_ID]),
            suffix,
        ]
    ).long()
    prompt_length = ids.numel()
    pixel_values = torch.rand((1, vis.num_channels, vis.image_size, vis.image_size), generator=gen) * 2 - 1
    pixel_values = pixel_values.to(model.dtype)
    if greedy_answer:
        with torch.no_grad():
            for _ in range(answer_len):
                tt = (ids == IMAGE_ID).long()[None]
                logits = model(input_ids=ids[None], pixel_values=pixel_values, token_type_ids=tt).logits
                ids = torch.cat([ids, logits[0, -1].argmax().view(1)])
    else:
        ids = torch.cat([ids, torch.randint(TEXT_LOW, TEXT_HIGH, (answer_len,), generator=gen)])
    input_ids = ids[None].long()
    token_type_ids = (input_ids == IMAGE_ID).long()
    return TinyInputs(
        input_ids=input_ids,
        pixel_values=pixel_values,
        token_type_ids=token_type_ids,
        image_start=1 + prefix_len + 1,
        num_image_tokens=n_img,
        prompt_length=prompt_length,
    )
