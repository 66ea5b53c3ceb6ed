"""One explanation at a time, for a notebook: generate an answer and explain a token, a keyword
or the whole answer with the same engine the batch pipeline uses.

    from pipeline.explainer import Explainer
    ex = Explainer.from_pretrained("google/medgemma-4b-it")          # or a local directory
    res = ex.explain_keyword(image, "Describe the findings.", "effusion")
    res.image_relevancy            # (16, 16) raw Chefer map
    ex.overlay(image, res)         # PIL image: the map on the original image, correct geometry

Conventions: the token at position p is explained through the logit at p-1 of the actual token;
maps are raw (not normalised); the image map's cell (i, j) covers x in [j*W/gw, (j+1)*W/gw) and
y in [i*H/gh, (i+1)*H/gh) of the original W x H image.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from PIL import Image

from pipeline.generation import Generation, generate_batch, model_inputs_for_sequence
from pipeline.model import LoadedModel, load_model
from pipeline.relevancy import SequenceInputs, Target, explain
from pipeline.targets import TargetSpan, answer_span_target, answer_tokens_targets, keyword_targets


@dataclass
class ExplanationResult:
    """One explanation.

    image_relevancy: (grid_h, grid_w) raw map of `method` (Chefer by default).
    text_relevancy: (N,) relevancy over every input position (prompt, image tokens, answer).
    token_labels: the N tokens' strings, aligned with text_relevancy.
    raw_image_relevancy / raw_text_relevancy: the raw-attention baseline (last layer, head mean).
    maps: every computed method's image map. occurrences: the explained token spans.
    """

    image_relevancy: np.ndarray
    text_relevancy: np.ndarray | None
    token_labels: list[str]
    generated_text: str
    raw_image_relevancy: np.ndarray | None
    raw_text_relevancy: np.ndarray | None
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    occurrences: list[TargetSpan] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)


class Explainer:
    """Explains a Gemma 3 style model's answers about one image at a time."""

    def __init__(self, loaded: LoadedModel, *, method: str = "chefer", baselines: Sequence[str] = ("raw_attention",),
                 system_prompt: str | None = None, max_new_tokens: int = 128, chunk_size: int = 8, seed: int = 0):
        self.loaded = loaded
        self.method = method
        self.methods = tuple(dict.fromkeys([method, *baselines]))
        self.system_prompt = system_prompt
        self.max_new_tokens = max_new_tokens
        self.chunk_size = chunk_size
        self.seed = seed

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, revision: str | None = None, dtype: str = "auto",
                        device: str = "auto", device_map: str | None = None, **kwargs: Any) -> "Explainer":
        """Load a model (hub id or local directory) with the pipeline's loader."""
        return cls(load_model(name_or_path, revision=revision, dtype=dtype, device=device, device_map=device_map),
                   **kwargs)

    # -- generation ---------------------------------------------------------------------------

    def generate(self, image: Image.Image, prompt: str) -> Generation:
        """The model's greedy answer (raises what generation raised)."""
        (res,) = generate_batch(self.loaded, [image], [prompt], system_prompt=self.system_prompt,
                                max_new_tokens=self.max_new_tokens)
        if isinstance(res, Exception):
            raise res
        return res

    # -- explanations -------------------------------------------------------------------------

    def explain(self, image: Image.Image, prompt: str, token_position: int | None = None,
                generation: Generation | None = None) -> ExplanationResult:
        """Explain the answer token at `token_position` (an index into the full sequence, as in
        `generation.sequence_ids`); default: the first answer token."""
        gen = generation or self.generate(image, prompt)
        tokens = answer_tokens_targets(self.loaded.tokenizer, gen.sequence_ids, gen.prompt_length)
        if token_position is None:
            if not tokens:
                raise ValueError(f"the answer {gen.answer!r} has no token to explain")
            span = tokens[0]
        else:
            if not gen.prompt_length <= token_position < len(gen.sequence_ids):
                raise ValueError(f"token_position {token_position} is not an answer position "
                                 f"[{gen.prompt_length}, {len(gen.sequence_ids)})")
            span = next((t for t in tokens if t.token_start == token_position), None) or TargetSpan(
                "answer_tokens", self._token_label(gen.sequence_ids[token_position]), token_position,
                token_position + 1, -1, -1, "")
        return self._explain_spans(image, gen, [span])

    def explain_keyword(self, image: Image.Image, prompt: str, keyword: str,
                        generation: Generation | None = None) -> ExplanationResult:
        """Explain every whole-word occurrence of `keyword` (any number of tokens) in the answer.

        Each occurrence is explained as its own target; the result's maps are the mean over
        occurrences (each occurrence's maps are in metadata["per_occurrence"]). Raises
        LookupError when the answer does not contain the keyword: nothing else is explained.
        """
        gen = generation or self.generate(image, prompt)
        found, _ = keyword_targets(self.loaded.tokenizer, gen.sequence_ids, gen.prompt_length, {keyword: [keyword]})
        if not found:
            raise LookupError(f"{keyword!r} does not occur (as a whole word) in the answer {gen.answer!r}")
        return self._explain_spans(image, gen, found)

    def explain_answer_span(self, image: Image.Image, prompt: str,
                            generation: Generation | None = None) -> ExplanationResult:
        """Explain the whole answer (score: the sum of its tokens' logits; read-out: the mean of
        their rows)."""
        gen = generation or self.generate(image, prompt)
        return self._explain_spans(image, gen, [answer_span_target(self.loaded.tokenizer, gen.sequence_ids,
                                                                   gen.prompt_length)])

    def overlay(self, image: Image.Image, result: ExplanationResult | np.ndarray, **kwargs: Any) -> Image.Image:
        """The map drawn on the original image with the right geometry (see reports.overlay)."""
        from reports.overlay import overlay_map

        grid = result.image_relevancy if isinstance(result, ExplanationResult) else np.asarray(result)
        return overlay_map(image, grid, **kwargs)

    # -- internals ----------------------------------------------------------------------------

    def _token_label(self, token_id: int) -> str:
        return self.loaded.tokenizer.convert_ids_to_tokens(int(token_id))

    def _explain_spans(self, image: Image.Image, gen: Generation, spans: list[TargetSpan]) -> ExplanationResult:
        seq = SequenceInputs.of(model_inputs_for_sequence(self.loaded, image, gen.sequence_ids),
                                prompt_length=gen.prompt_length)
        out = explain(self.loaded.model, seq, [Target(s.token_start, s.token_end) for s in spans], self.methods,
                      chunk_size=self.chunk_size, seed=self.seed)

        def mean_map(method: str, text: bool) -> np.ndarray | None:
            arrs = [r.maps[method].text_map if text else r.maps[method].image_map for r in out.results]
            if any(a is None for a in arrs):
                return None
            return np.mean(np.stack(arrs), axis=0).astype(np.float32)

        labels = [self._token_label(t) for t in gen.sequence_ids]
        raw = "raw_attention" in self.methods
        return ExplanationResult(
            image_relevancy=mean_map(self.method, False),
            text_relevancy=mean_map(self.method, True),
            token_labels=labels,
            generated_text=gen.answer,
            raw_image_relevancy=mean_map("raw_attention", False) if raw else None,
            raw_text_relevancy=mean_map("raw_attention", True) if raw else None,
            maps={m: mean_map(m, False) for m in self.methods},
            occurrences=spans,
            metadata={
                "method": self.method,
                "grid": (out.grid_h, out.grid_w),
                "image_size": image.size,
                "image_positions": out.image_positions.tolist(),
                "prompt_length": gen.prompt_length,
                "sequence_ids": list(gen.sequence_ids),
                "scores": [r.score for r in out.results],
                "argmax_matches": out.argmax_matches,
                "image_tokens_ok": out.image_tokens_ok,
                "per_occurrence": [{m: r.maps[m].image_map for m in self.methods} for r in out.results],
                "model": self.loaded.name_or_path,
            },
        )
