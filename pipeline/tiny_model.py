"""Build a tiny, randomly initialised Gemma 3 vision-language model directory offline.

The directory has the same layout as ``google/medgemma-4b-it`` (config, safetensors weights,
generation config, tokenizer, image processor, processor config and chat template) and loads
through ``AutoModelForImageTextToText`` / ``AutoProcessor`` exactly like the real model, so the
loading, generation and explanation code can be exercised on a CPU in seconds.

Differences from MedGemma, all deliberate:

* The tokenizer is a small byte-fallback BPE (Gemma style: spaces become ``"▁"`` and start a
  word piece) trained on :data:`DEFAULT_VOCAB_WORDS`. Words outside that list are split into
  several pieces, so multi-piece words are easy to produce.
* The multimodal projector is re-initialised with small random weights (Gemma 3's own
  initialisation zeroes it, which would make every image token identical).
* The tied embedding rows of the control tokens that never appear in an answer (``<pad>``,
  ``<bos>``, ``<unk>``, ``<mask>``, ``<start_of_turn>`` and the three image tokens) are scaled
  down so that the random model (practically) never predicts them.
"""

from __future__ import annotations

import json
import string
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["DEFAULT_VOCAB_WORDS", "GEMMA_CHAT_TEMPLATE", "SPECIAL_TOKENS", "build_tiny_gemma3"]

#: Special tokens, in id order (ids 0..9); names as in Gemma 3's tokenizer.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
)

#: Words that become single tokens (with and without the "▁" word-boundary marker, lower case
#: and capitalised). Everything else is spelled with shorter pieces or byte fallback.
DEFAULT_VOCAB_WORDS: tuple[str, ...] = tuple(
    """
    a an the and or but not no yes is are was were be been has have had with without of in on at
    to from for by as this that these those there here it its which who what where when how
    than then also may might can could should would will seen noted shown present absent
    seems appears appear likely unlikely possible probable suggest suggests suggestive
    consistent compatible evidence sign signs finding findings image images study view views
    chest thorax thoracic lung lungs pulmonary pleural effusion heart cardiac size silhouette
    mediastinum mediastinal contour contours hilar hila trachea airway bronchi bronchial
    left right both bilateral unilateral upper lower middle mid base bases apex apical basal
    lobe lobes zone zones field fields side sided costophrenic angle angles hemidiaphragm
    diaphragm rib ribs spine bone bones soft tissue tissues clavicle shoulder
    normal abnormal clear stable unchanged new old acute chronic mild moderate severe small
    large tiny minimal focal diffuse patchy streaky linear nodular dense
    opacity opacities consolidation atelectasis edema pneumonia infection mass nodule nodules
    lesion fracture fractures collapse scarring fibrosis emphysema hyperinflation
    enlarged enlargement borderline widened
    tube tubes line lines catheter pacemaker device devices wire wires sternotomy
    support position positioned tip projects overlying
    patient frontal lateral portable ap pa supine upright
    x ray radiograph radiology report impression describe question answer please
    you expert radiologist look any do does
    one two three small
    """.split()
)

#: A Gemma-style chat template: an optional system message is folded into the first user turn
#: ("system\n\n" prefix), image items become ``<start_of_image>`` (which the processor expands).
GEMMA_CHAT_TEMPLATE: str = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}"
    "{{ raise_exception('Invalid content type') }}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

_SPACE = "\u2581"  # SentencePiece word-boundary marker used by Gemma's tokenizer


def _train_bpe(vocab_words: Sequence[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a deterministic BPE over the word list; returns (vocab, merges) with special
    tokens at ids 0..9 and the 256 byte-fallback tokens after them."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    forms: list[str] = []
    seen: set[str] = set()
    for word in vocab_words:
        word = word.strip()
        if not word or any(ch.isspace() for ch in word):
            raise ValueError(f"vocab word {word!r} must be a non-empty word without whitespace")
        for form in (word, _SPACE + word, word.capitalize(), _SPACE + word.capitalize()):
            if form not in seen:
                seen.add(form)
                forms.append(form)
    alphabet = sorted(set(string.ascii_letters + string.digits + string.punctuation + _SPACE + "\n"))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(
        vocab_size=1_000_000, min_frequency=1, initial_alphabet=alphabet, show_progress=False, special_tokens=[]
    )
    bpe.train_from_iterator(forms, trainer)
    trained = json.loads(bpe.to_str())["model"]

    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    # "\n" is whitespace for the trainer's pre-tokenizer; keep it as its own piece like Gemma.
    pieces = sorted(trained["vocab"].items(), key=lambda kv: kv[1])
    for piece, _ in [*pieces, ("\n", -1), ("\n\n", -1)]:
        if piece not in vocab:
            vocab[piece] = len(vocab)
    merges = [tuple(m) if not isinstance(m, str) else tuple(m.split(" ", 1)) for m in trained["merges"]]
    merges.append(("\n", "\n"))
    return vocab, merges  # type: ignore[return-value]


def _build_tokenizer(vocab_words: Sequence[str]):
    """A GemmaTokenizer over the tiny BPE, with Gemma 3's special-token attributes."""
    from tokenizers import AddedToken
    from transformers import GemmaTokenizer

    vocab, merges = _train_bpe(vocab_words)
    tokenizer = GemmaTokenizer(
        vocab=vocab,
        merges=merges,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        mask_token="<mask>",
        add_bos_token=True,
        add_eos_token=False,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        # Named extra special tokens: Gemma3Processor reads tokenizer.boi_token, .eoi_token,
        # .image_token (and their *_id counterparts).
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )
    tokenizer.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ("<start_of_turn>", "<end_of_turn>")],
        special_tokens=True,
    )
    for token, expected in zip(SPECIAL_TOKENS, range(len(SPECIAL_TOKENS))):
        got = tokenizer.convert_tokens_to_ids(token)
        if got != expected:  # pragma: no cover - guards the id layout the config relies on
            raise RuntimeError(f"special token {token} got id {got}, expected {expected}")
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    return tokenizer


def _build_image_processor(image_size: int):
    """Gemma 3 image processor with MedGemma's settings at a tiny resolution."""
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        from transformers import Gemma3ImageProcessor as ImageProcessor
    else:  # the PIL backend computes the same thing and saves the same config
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil as ImageProcessor

    return ImageProcessor(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        do_resize=True,
        do_convert_rgb=True,
        resample=2,  # PIL bilinear
        do_pan_and_scan=False,
    )


def build_tiny_gemma3(
    out_dir: str | Path,
    *,
    seed: int = 0,
    vocab_words: Sequence[str] = DEFAULT_VOCAB_WORDS,
    text_layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    image_size: int = 32,
    patch_size: int = 4,
    mm_tokens_per_image: int = 16,
    sliding_window: int = 24,
    layer_types: Sequence[str] | None = None,
    max_position_embeddings: int = 512,
    intermediate_size: int | None = None,
    vision_layers: int = 1,
    vision_hidden: int = 32,
    vision_intermediate: int | None = None,
    vision_heads: int = 2,
) -> Path:
    """Write a tiny Gemma 3 model + processor to ``out_dir`` and return its path.

    ``layer_types`` defaults to alternating sliding / full attention (starting with sliding).
    ``sliding_window`` should exceed ``mm_tokens_per_image`` (as 1024 > 256 in MedGemma) and be
    shorter than a typical prompt so that the window is exercised.
    ``intermediate_size`` defaults to ``2 * hidden``; the SigLIP vision tower has
    ``vision_layers`` encoder layers (0: patch and position embeddings only) of width
    ``vision_hidden`` with ``vision_heads`` heads and an MLP of ``vision_intermediate``
    (default ``2 * vision_hidden``).
    """
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3Processor,
        Gemma3TextConfig,
        GenerationConfig,
        SiglipVisionConfig,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    patches_per_side = image_size // patch_size
    tokens_per_side = int(round(mm_tokens_per_image**0.5))
    if (
        image_size % patch_size
        or tokens_per_side**2 != mm_tokens_per_image
        or patches_per_side % tokens_per_side
    ):
        raise ValueError(
            "image_size/patch_size must be a multiple of sqrt(mm_tokens_per_image) "
            f"(got image_size={image_size}, patch_size={patch_size}, mm_tokens_per_image={mm_tokens_per_image})"
        )
    if layer_types is None:
        layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(text_layers)]
    if len(layer_types) != text_layers:
        raise ValueError(f"layer_types has {len(layer_types)} entries for {text_layers} layers")

    tokenizer = _build_tokenizer(vocab_words)
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    processor = Gemma3Processor(
        image_processor=_build_image_processor(image_size),
        tokenizer=tokenizer,
        chat_template=GEMMA_CHAT_TEMPLATE,
        image_seq_length=mm_tokens_per_image,
    )

    text_config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=int(intermediate_size) if intermediate_size is not None else hidden * 2,
        num_hidden_layers=text_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        sliding_window=sliding_window,
        layer_types=list(layer_types),
        max_position_embeddings=max_position_embeddings,
        pad_token_id=ids["<pad>"],
        bos_token_id=ids["<bos>"],
        eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]],
    )
    vision_config = SiglipVisionConfig(
        hidden_size=int(vision_hidden),
        intermediate_size=int(vision_intermediate) if vision_intermediate is not None else 2 * int(vision_hidden),
        num_hidden_layers=int(vision_layers),
        num_attention_heads=int(vision_heads),
        image_size=image_size,
        patch_size=patch_size,
        vision_use_head=False,
        layer_norm_eps=1e-6,
    )
    config = Gemma3Config(
        text_config=text_config,
        vision_config=vision_config,
        mm_tokens_per_image=mm_tokens_per_image,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
        pad_token_id=ids["<pad>"],
        bos_token_id=ids["<bos>"],
        eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]],
    )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Gemma3ForConditionalGeneration(config)
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            proj = model.model.multi_modal_projector.mm_input_projection_weight
            proj.copy_(torch.randn(proj.shape, generator=generator) * (0.5 / proj.shape[0] ** 0.5))
            embed = model.get_input_embeddings().weight
            quiet = [ids[t] for t in SPECIAL_TOKENS if t not in ("<eos>", "<end_of_turn>")]
            embed[quiet] *= 0.05
    model.eval()

    # Like MedGemma's generation_config.json (which samples by default: the pipeline must
    # switch to greedy itself).
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<bos>"],
        pad_token_id=ids["<pad>"],
        eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]],
        do_sample=True,
        top_k=64,
        top_p=0.95,
    )
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out
