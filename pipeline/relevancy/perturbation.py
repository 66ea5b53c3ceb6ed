"""Perturbation of the image soft tokens: faithfulness curves and occlusion maps.

What is perturbed. Gemma 3 style models project the vision tower's output to ``M`` soft-token
embeddings (``M = 256`` for MedGemma, a 16 x 16 grid) and write them into the language model's
``inputs_embeds`` at the positions where ``input_ids == model.config.image_token_id`` (sequence
order = row-major grid order). A *variant* replaces some of those ``M`` embeddings by a
*baseline* vector and leaves everything else unchanged: the same ids, attention mask,
``token_type_ids`` (so Gemma 3's bidirectional attention inside the image block is built exactly
as at generation), position ids and text embeddings.

Baselines (``baseline=``):

- ``"mean"`` (default): the mean of this image's ``M`` soft-token embeddings (float32 mean, cast
  to the model dtype). It keeps the scale and the image-wide statistics the language model is
  used to while removing what is specific to each location, so a drop in the target's
  log-probability measures spatial evidence rather than the shock of an out-of-distribution
  input.
- ``"zero"``: the zero vector (out of distribution for Gemma 3, whose soft tokens have large
  norms; useful as a harsher check).

Score. For a target explaining ``input_ids[0, start:end]`` (see :class:`~.inputs.Target`) the
score of a variant is its log-probability ``sum_{p in [start, end)} log_softmax(logits[p-1])[input_ids[p]]``
in nats, computed in float32 whatever the model dtype.

How it is computed (:class:`ImagePerturber`). One pass records the language model's input
embeddings of the real sequence (vision tower + projector + text embedding, exactly as in
generation) through a forward pre-hook on the text decoder that stops the forward there, so the
image features are computed once. Variants are then run in batches (batch dimension = variants,
at most ``batch_size`` per forward pass, which bounds memory): the model is called with the
batched ``input_ids``, ``attention_mask``, ``position_ids`` and ``token_type_ids`` and no pixel
values, so it builds its masks as usual, and a pre-hook on the text decoder swaps in the variants'
embeddings. The forward is cut after the last explained token of the chunk and only the needed
logit rows are computed. The hooks are set on the model object: do not run two perturbation
passes on one model concurrently. Dropout is off (eval mode, restored afterwards); no gradients.

Faithfulness curves (:func:`faithfulness_curves`, :func:`faithfulness_curves_batch`). With
``steps`` S, fractions ``f_i = i / S`` (``i = 0..S``) of the ``M`` image tokens, i.e.
``k_i = floor(f_i * M + 0.5)`` tokens:

- deletion: the ``k_i`` most relevant tokens replaced by the baseline (order: descending map
  value, ties broken by the lower token index first);
- insertion: every token replaced except the ``k_i`` most relevant ones (start from all-baseline,
  reveal the most relevant first);
- random deletion / insertion: the same with a random order,
  ``numpy.random.default_rng(seed).permutation(M)``, shared by every target and map of the call
  (so the floor is computed once per sequence and reproducible from ``seed``).

``deletion[0] == insertion[S]`` is the unperturbed log-probability and
``deletion[S] == insertion[0]`` the all-baseline one. Areas under the curves use the trapezoid
rule over ``f`` in [0, 1] (unit: nats); a faithful map has a lower deletion AUC and a higher
insertion AUC than the random floor. Identical variants (shared end points, the random floor,
several targets or methods with equal maps) are run once.

Occlusion (:func:`occlusion_maps`, method ``"occlusion"`` of :func:`~.engine.explain_sequence`):
the grid is tiled from the top-left corner into non-overlapping ``block x block`` squares of
tokens (edge squares are smaller when ``block`` does not divide the grid). For each square,
``drop = logprob(original) - logprob(square replaced by the baseline)``, and every token of the
square gets ``max(0, drop)``. The map is raw and non-negative; every square shares one forward
pass for all targets of the sequence. An all-zero map means no square decreased the target's
log-probability; failures (non-finite log-probabilities, the substitution hook not firing) raise
instead of returning a map.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .capture import find_language_model, no_grad_attention
from .inputs import Target, as_target, grid_shape

__all__ = [
    "BASELINES",
    "FaithfulnessResult",
    "ImagePerturber",
    "faithfulness_curves",
    "faithfulness_curves_batch",
    "forward_embeddings",
    "occlusion_maps",
    "relevance_order",
    "trapezoid_auc",
]

BASELINES: tuple[str, ...] = ("mean", "zero")

#: logit rows turned into float32 log-softmax at once (bounds the float32 copy of (rows, vocab)).
_ROW_SLICE = 128


# --------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class FaithfulnessResult:
    """Deletion / insertion curves of one (target, map) pair.

    All curves are float32 arrays of shape ``(steps + 1,)`` holding the target's log-probability
    (nats) at ``fractions`` (float32, ``i / steps``) of the image tokens removed (deletion) or
    revealed (insertion); ``counts`` are the numbers of tokens ``k_i`` behind each fraction.
    ``order`` is the relevance order used (token indices, most relevant first) and ``seed`` the
    seed of the random order.
    """

    target: Target
    baseline: str
    seed: int
    fractions: np.ndarray
    counts: np.ndarray
    order: np.ndarray
    deletion: np.ndarray
    insertion: np.ndarray
    random_deletion: np.ndarray
    random_insertion: np.ndarray

    @property
    def original(self) -> float:
        """Unperturbed log-probability (``deletion[0]``)."""
        return float(self.deletion[0])

    @property
    def all_baseline(self) -> float:
        """Log-probability with every image token replaced (``deletion[-1]``)."""
        return float(self.deletion[-1])

    @property
    def deletion_auc(self) -> float:
        """Trapezoid area under the deletion curve over fractions 0..1 (nats; lower is better)."""
        return trapezoid_auc(self.fractions, self.deletion)

    @property
    def insertion_auc(self) -> float:
        """Trapezoid area under the insertion curve (nats; higher is better)."""
        return trapezoid_auc(self.fractions, self.insertion)

    @property
    def random_deletion_auc(self) -> float:
        """Area under the random-order deletion curve (the floor of ``deletion_auc``)."""
        return trapezoid_auc(self.fractions, self.random_deletion)

    @property
    def random_insertion_auc(self) -> float:
        """Area under the random-order insertion curve (the floor of ``insertion_auc``)."""
        return trapezoid_auc(self.fractions, self.random_insertion)

    def columns(self) -> dict[str, Any]:
        """The ``faithfulness`` table's value columns (keys and shard excluded)."""
        return {
            "baseline": self.baseline,
            "fractions": self.fractions.tolist(),
            "deletion": self.deletion.tolist(),
            "insertion": self.insertion.tolist(),
            "random_deletion": self.random_deletion.tolist(),
            "random_insertion": self.random_insertion.tolist(),
            "deletion_auc": self.deletion_auc,
            "insertion_auc": self.insertion_auc,
            "random_deletion_auc": self.random_deletion_auc,
            "random_insertion_auc": self.random_insertion_auc,
        }


def trapezoid_auc(x: np.ndarray | Sequence[float], y: np.ndarray | Sequence[float]) -> float:
    """Trapezoid rule ``sum_i (x_{i+1} - x_i) * (y_i + y_{i+1}) / 2`` in float64."""
    xs = np.asarray(x, dtype=np.float64)
    ys = np.asarray(y, dtype=np.float64)
    if xs.shape != ys.shape or xs.ndim != 1 or xs.size < 2:
        raise ValueError(f"need two 1-D arrays of equal length >= 2, got {xs.shape} and {ys.shape}")
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) * 0.5))


def relevance_order(image_map: np.ndarray | Sequence[float]) -> np.ndarray:
    """Token indices by descending map value, ties broken by the lower index first (int64).

    ``image_map`` is the grid (row-major) or the flat vector of the ``M`` image tokens; it must be
    finite.
    """
    values = np.asarray(image_map, dtype=np.float64).reshape(-1)
    if not np.isfinite(values).all():
        raise ValueError("image map has non-finite values")
    return np.argsort(-values, kind="stable").astype(np.int64)


# --------------------------------------------------------------------------------------------
# helpers


def _field(inputs: Mapping[str, Any] | Any, name: str) -> Any:
    if isinstance(inputs, Mapping):
        return inputs.get(name)
    return getattr(inputs, name, None)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd for the duration; the training flag is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


class _Recorded(Exception):
    """Raised by the recording hook to stop the forward pass once the embeddings are known."""


def _split_ids(args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, tuple]:
    ids = kwargs.get("input_ids")
    if ids is None and args:
        ids, args = args[0], args[1:]
    return ids, args


# --------------------------------------------------------------------------------------------
# machinery


class ImagePerturber:
    """Log-probabilities of targets of one sequence under many image-token perturbations.

    Args:
        model: a Gemma 3 style vision-language model (any dtype/device).
        inputs: the sequence's forward inputs, a mapping (or object) with ``input_ids`` (1, N),
            ``pixel_values``, ``token_type_ids`` (1, N; recommended: without them Gemma 3 uses
            causal attention inside the image block) and optionally ``attention_mask`` (1, N),
            as given at generation (e.g. :func:`pipeline.generation.model_inputs_for_sequence`).
        baseline: ``"mean"`` or ``"zero"`` (see the module docstring).
        batch_size: variants per forward pass (bounds memory).

    Construction runs the vision tower once. ``image_positions`` (M,) are the sequence positions
    of the image soft tokens, in sequence (= row-major grid) order; a replacement mask's column
    ``i`` refers to ``image_positions[i]``.
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: Mapping[str, Any] | Any,
        *,
        baseline: str = "mean",
        batch_size: int = 16,
    ) -> None:
        if baseline not in BASELINES:
            raise ValueError(f"unknown baseline {baseline!r}; known: {', '.join(BASELINES)}")
        if int(batch_size) < 1:
            raise ValueError("batch_size must be >= 1")
        self.model = model
        self.baseline_name = baseline
        self.batch_size = int(batch_size)
        self.language_model = find_language_model(model)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype

        input_ids = _field(inputs, "input_ids")
        pixel_values = _field(inputs, "pixel_values")
        token_type_ids = _field(inputs, "token_type_ids")
        attention_mask = _field(inputs, "attention_mask")
        if input_ids is None or input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError("inputs['input_ids'] must have shape (1, N)")
        if pixel_values is None:
            raise ValueError("inputs have no pixel_values: nothing to perturb")
        self.ids_cpu = input_ids[0].detach().to("cpu", torch.long)
        self.seq_len = int(self.ids_cpu.numel())
        self.ids = input_ids.detach().to(self.device, torch.long)
        self.token_type_ids = None if token_type_ids is None else token_type_ids.detach().to(self.device)
        self.attention_mask = None if attention_mask is None else attention_mask.detach().to(self.device)
        self.position_ids = None
        if self.attention_mask is not None:
            # as generate() does: positions count only attended tokens (left padding)
            am = self.attention_mask.long()
            self.position_ids = (am.cumsum(-1) - 1).masked_fill(am == 0, 0)
        pv = pixel_values.detach().to(self.device)
        if pv.is_floating_point():
            pv = pv.to(self.dtype)

        image_token_id = int(model.config.image_token_id)
        self.image_positions = torch.nonzero(self.ids_cpu == image_token_id).flatten()
        if self.image_positions.numel() == 0:
            raise ValueError(f"no image tokens (id {image_token_id}) in input_ids")
        self._img_pos_dev = self.image_positions.to(self.device)

        with _eval_mode(model):
            self.embeds = self._record_embeddings(pv)  # (1, N, D), model dtype
            image_embeds = self.embeds[0, self._img_pos_dev]
            if baseline == "mean":
                base = image_embeds.float().mean(dim=0)
            else:
                base = torch.zeros(image_embeds.shape[-1], device=self.device, dtype=torch.float32)
            self.baseline = base.to(self.embeds.dtype)  # (D,)

    @property
    def num_image_tokens(self) -> int:
        """Number ``M`` of image soft tokens."""
        return int(self.image_positions.numel())

    def _record_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        box: dict[str, torch.Tensor] = {}

        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            embeds = kwargs.get("inputs_embeds")
            if embeds is None:
                ids, _ = _split_ids(args, kwargs)
                if ids is None:
                    raise RuntimeError("the language model was called with neither input_ids nor inputs_embeds")
                embeds = mod.embed_tokens(ids)
            box["embeds"] = embeds.detach().clone()
            raise _Recorded

        handle = self.language_model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.model(
                input_ids=self.ids,
                pixel_values=pixel_values,
                token_type_ids=self.token_type_ids,
                attention_mask=self.attention_mask,
                position_ids=self.position_ids,
                use_cache=False,
            )
        except _Recorded:
            pass
        finally:
            handle.remove()
        embeds = box.get("embeds")
        if embeds is None:
            raise RuntimeError("the language model's input embeddings could not be recorded")
        if embeds.shape[:2] != (1, self.seq_len):
            raise RuntimeError(f"recorded embeddings have shape {tuple(embeds.shape)}, expected (1, {self.seq_len}, D)")
        if not bool(torch.isfinite(embeds[0, self._img_pos_dev]).all()):
            raise RuntimeError("the image soft-token embeddings are not finite")
        return embeds

    def _check_targets(self, targets: Sequence[Target | tuple[int, int]]) -> list[Target]:
        out = [as_target(t) for t in targets]
        last_image = int(self.image_positions[-1])
        for t in out:
            if t.end > self.seq_len:
                raise ValueError(f"target [{t.start}, {t.end}) exceeds the sequence length {self.seq_len}")
            if t.start <= last_image:
                raise ValueError(
                    f"target [{t.start}, {t.end}) starts inside or before the image block (last image token at "
                    f"{last_image}); only tokens after the image can depend on it"
                )
        return out

    def logprobs(
        self,
        replaced: np.ndarray | torch.Tensor,
        targets: Sequence[Target | tuple[int, int]],
        which: Sequence[Sequence[int]] | None = None,
    ) -> np.ndarray:
        """Log-probabilities of ``targets`` under each variant.

        Args:
            replaced: (V, M) bool; row ``v`` marks the image tokens variant ``v`` replaces by the
                baseline (all False: the unperturbed sequence).
            targets: spans after the image block (see :class:`~.inputs.Target`).
            which: optional, per variant the indices of the targets to score (default: all).
                Variants are sorted by it before chunking, so chunks share logit rows.

        Returns:
            (V, T) float32 log-probabilities in nats; NaN where a (variant, target) was not
            requested. Raises ``RuntimeError`` on non-finite values or when the substitution
            did not reach the language model.
        """
        targets = self._check_targets(targets)
        mask = torch.as_tensor(np.asarray(replaced, dtype=bool))
        m = self.num_image_tokens
        if mask.dim() != 2 or mask.shape[1] != m:
            raise ValueError(f"replaced must have shape (V, {m}), got {tuple(mask.shape)}")
        n_var, n_tgt = int(mask.shape[0]), len(targets)
        if which is None:
            wanted = [tuple(range(n_tgt))] * n_var
        else:
            if len(which) != n_var:
                raise ValueError(f"which has {len(which)} entries for {n_var} variants")
            wanted = [tuple(sorted({int(i) for i in w})) for w in which]
            for w in wanted:
                if w and not (0 <= w[0] and w[-1] < n_tgt):
                    raise ValueError(f"target index out of range in {w}")
        out = np.full((n_var, n_tgt), np.nan, dtype=np.float32)
        order = sorted((v for v in range(n_var) if wanted[v]), key=lambda v: (wanted[v], v))
        if not order:
            return out
        with _eval_mode(self.model):
            for c0 in range(0, len(order), self.batch_size):
                chunk = order[c0 : c0 + self.batch_size]
                values = self._run_chunk(mask[chunk], [wanted[v] for v in chunk], targets)
                for row, v in enumerate(chunk):
                    for ti in wanted[v]:
                        out[v, ti] = values[row, ti]
        requested = np.zeros_like(out, dtype=bool)
        for v in order:
            requested[v, list(wanted[v])] = True
        if not np.isfinite(out[requested]).all():
            raise RuntimeError("perturbed log-probabilities are not finite")
        return out

    def _run_chunk(
        self, mask: torch.Tensor, wanted: list[tuple[int, ...]], targets: list[Target]
    ) -> np.ndarray:
        """Forward one chunk of variants; returns (B, T) float32 (NaN where not wanted)."""
        b = int(mask.shape[0])
        n = max(targets[ti].end for w in wanted for ti in w)  # cut after the last explained token
        rows = sorted({p - 1 for w in wanted for ti in w for p in targets[ti].positions})
        row_index = {r: k for k, r in enumerate(rows)}
        keep = torch.tensor(rows, device=self.device, dtype=torch.long)

        embeds = self.embeds[:, :n].expand(b, -1, -1).clone()  # (B, n, D)
        sub = mask.to(self.device)[:, :, None]  # (B, M, 1)
        img = self._img_pos_dev
        embeds[:, img] = torch.where(sub, self.baseline, embeds[:, img])
        prefix = {"input_ids": self.ids, "token_type_ids": self.token_type_ids,
                  "attention_mask": self.attention_mask, "position_ids": self.position_ids}
        out = forward_embeddings(self.model, self.language_model, embeds, prefix, keep)
        logits = out.logits  # (B, K, V)

        # (variant, kept row, token, output slot) for every explained token of every wanted target
        var_idx, row_idx, tok, slot = [], [], [], []
        n_tgt = len(targets)
        for vb, w in enumerate(wanted):
            for ti in w:
                for p in targets[ti].positions:
                    var_idx.append(vb)
                    row_idx.append(row_index[p - 1])
                    tok.append(int(self.ids_cpu[p]))
                    slot.append(vb * n_tgt + ti)
        dev = logits.device
        var_t, row_t = torch.tensor(var_idx, device=dev), torch.tensor(row_idx, device=dev)
        tok_t, slot_t = torch.tensor(tok, device=dev), torch.tensor(slot, device=dev)
        total = torch.zeros(b * n_tgt, device=dev, dtype=torch.float32)
        for s0 in range(0, len(var_idx), _ROW_SLICE):
            s = slice(s0, s0 + _ROW_SLICE)
            x = logits[var_t[s], row_t[s]].float()  # (S, V)
            lp = x.gather(1, tok_t[s, None])[:, 0] - torch.logsumexp(x, dim=-1)
            total.index_add_(0, slot_t[s], lp)
        values = total.view(b, n_tgt).cpu().numpy().astype(np.float32)
        for vb, w in enumerate(wanted):
            values[vb, [ti for ti in range(n_tgt) if ti not in w]] = np.nan
        return values


def forward_embeddings(model: nn.Module, language_model: nn.Module, embeds: torch.Tensor,
                       prefix: Mapping[str, torch.Tensor | None], keep: torch.Tensor) -> Any:
    """One forward pass of the variants ``embeds`` (B, n, D) of a sequence's language-model input.

    ``prefix``: ``input_ids``, ``token_type_ids``, ``attention_mask``, ``position_ids`` of the
    sequence, each (1, >= n) or ``None``; their first ``n`` positions are expanded to the batch,
    so the model builds its masks as at generation (no pixel values: a pre-hook on the text
    decoder swaps in ``embeds``). ``keep``: the logit rows to compute. Runs on "sdpa" where the
    language model uses "eager" (:func:`~.capture.no_grad_attention`); gradients flow to
    ``embeds`` when it requires grad. Returns the model output (``logits`` (B, len(keep), V)).
    """
    b, n = int(embeds.shape[0]), int(embeds.shape[1])
    calls = 0

    def hook(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        nonlocal calls
        ids, args = _split_ids(args, kwargs)
        current = kwargs.get("inputs_embeds")
        shape = tuple(current.shape[:2]) if current is not None else tuple(ids.shape) if ids is not None else None
        if shape != (b, n):
            raise RuntimeError(f"language model called with a (batch, length) of {shape}, expected {(b, n)}")
        calls += 1
        kwargs = dict(kwargs)
        kwargs["inputs_embeds"] = embeds
        kwargs["input_ids"] = None
        return args, kwargs

    def expand(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x[:, :n].expand(b, -1).contiguous()

    handle = language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with no_grad_attention(model):
            out = model(
                input_ids=expand(prefix["input_ids"]),
                pixel_values=None,
                token_type_ids=expand(prefix.get("token_type_ids")),
                attention_mask=expand(prefix.get("attention_mask")),
                position_ids=expand(prefix.get("position_ids")),
                use_cache=False,
                logits_to_keep=keep,
            )
    finally:
        handle.remove()
    if calls != 1:
        raise RuntimeError(f"the embedding substitution ran {calls} times in one forward pass, expected once")
    if out.logits.shape[:2] != (b, len(keep)):
        raise RuntimeError("the model ignored logits_to_keep; cannot map logit rows")
    return out


# --------------------------------------------------------------------------------------------
# faithfulness curves


def _step_counts(m: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    if int(steps) < 1:
        raise ValueError("steps must be >= 1")
    fractions = np.linspace(0.0, 1.0, int(steps) + 1)
    counts = np.floor(fractions * m + 0.5).astype(np.int64)
    return fractions.astype(np.float32), counts


def faithfulness_curves_batch(
    model: nn.Module,
    inputs: Mapping[str, Any] | Any,
    pairs: Sequence[tuple[Target | tuple[int, int], np.ndarray]],
    *,
    steps: int = 8,
    baseline: str = "mean",
    seed: int = 0,
    batch_size: int = 16,
    perturber: ImagePerturber | None = None,
) -> list[FaithfulnessResult]:
    """Deletion / insertion curves for several (target, image map) pairs of one sequence.

    The image features are computed once and every distinct variant of every pair (see the
    module docstring: end points and the random floor are shared) is run in chunks of
    ``batch_size`` variants. ``image_map`` is the (grid_h, grid_w) map or the flat (M,) vector in
    row-major order; only its order matters. ``perturber`` reuses an :class:`ImagePerturber` of
    the same sequence (its baseline and batch size then apply). Returns one
    :class:`FaithfulnessResult` per pair, in order.
    """
    if perturber is None:
        perturber = ImagePerturber(model, inputs, baseline=baseline, batch_size=batch_size)
    m = perturber.num_image_tokens
    fractions, counts = _step_counts(m, steps)
    random_order = np.random.default_rng(int(seed)).permutation(m).astype(np.int64)

    targets: list[Target] = []
    target_index: dict[tuple[int, int], int] = {}
    variant_of: dict[bytes, int] = {}
    masks: list[np.ndarray] = []
    wanted: list[set[int]] = []

    def variant(replaced: np.ndarray, ti: int) -> int:
        key = np.packbits(replaced).tobytes()
        v = variant_of.get(key)
        if v is None:
            v = variant_of[key] = len(masks)
            masks.append(replaced)
            wanted.append(set())
        wanted[v].add(ti)
        return v

    def curve(order: np.ndarray, ti: int, insertion: bool) -> list[int]:
        ids = []
        for k in counts:
            replaced = np.full(m, insertion, dtype=bool)
            replaced[order[:k]] = not insertion
            ids.append(variant(replaced, ti))
        return ids

    plans = []
    for target, image_map in pairs:
        t = as_target(target)
        flat = np.asarray(image_map, dtype=np.float32).reshape(-1)
        if flat.size != m:
            raise ValueError(f"image map has {flat.size} values for {m} image tokens")
        ti = target_index.setdefault((t.start, t.end), len(targets))
        if ti == len(targets):
            targets.append(t)
        order = relevance_order(flat)
        plans.append((t, ti, order, [curve(order, ti, False), curve(order, ti, True),
                                     curve(random_order, ti, False), curve(random_order, ti, True)]))
    if not plans:
        return []

    values = perturber.logprobs(np.stack(masks), targets, [sorted(w) for w in wanted])
    results = []
    for t, ti, order, (dele, ins, rdel, rins) in plans:
        results.append(
            FaithfulnessResult(
                target=t,
                baseline=perturber.baseline_name,
                seed=int(seed),
                fractions=fractions.copy(),
                counts=counts.copy(),
                order=order,
                deletion=values[dele, ti].astype(np.float32),
                insertion=values[ins, ti].astype(np.float32),
                random_deletion=values[rdel, ti].astype(np.float32),
                random_insertion=values[rins, ti].astype(np.float32),
            )
        )
    return results


def faithfulness_curves(
    model: nn.Module,
    inputs: Mapping[str, Any] | Any,
    target: Target | tuple[int, int],
    image_map: np.ndarray,
    *,
    steps: int = 8,
    baseline: str = "mean",
    seed: int = 0,
    batch_size: int = 16,
) -> FaithfulnessResult:
    """Deletion / insertion curves of one target and image map (see :func:`faithfulness_curves_batch`)."""
    return faithfulness_curves_batch(
        model, inputs, [(target, image_map)], steps=steps, baseline=baseline, seed=seed, batch_size=batch_size
    )[0]


# --------------------------------------------------------------------------------------------
# occlusion


def occlusion_blocks(grid_h: int, grid_w: int, block: int) -> list[np.ndarray]:
    """Token indices (row-major) of each ``block x block`` square, tiled from the top-left."""
    if int(block) < 1:
        raise ValueError("occlusion block must be >= 1")
    idx = np.arange(grid_h * grid_w).reshape(grid_h, grid_w)
    return [
        idx[r : r + block, c : c + block].reshape(-1)
        for r in range(0, grid_h, block)
        for c in range(0, grid_w, block)
    ]


def occlusion_maps(
    model: nn.Module,
    inputs: Mapping[str, Any] | Any,
    targets: Sequence[Target | tuple[int, int]],
    *,
    grid: tuple[int, int] | None = None,
    block: int = 1,
    baseline: str = "mean",
    batch_size: int = 16,
    perturber: ImagePerturber | None = None,
) -> np.ndarray:
    """Occlusion maps ``max(0, logprob(original) - logprob(square replaced))`` (T, grid_h, grid_w).

    ``grid`` defaults to the square root of the image-token count. One variant per square plus
    the unperturbed one, shared by all targets, in chunks of ``batch_size``. Float32, raw,
    non-negative (see the module docstring for the all-zero case); raises on any failure.
    """
    targets = [as_target(t) for t in targets]
    if not targets:
        raise ValueError("no targets given")
    if perturber is None:
        perturber = ImagePerturber(model, inputs, baseline=baseline, batch_size=batch_size)
    m = perturber.num_image_tokens
    gh, gw = grid_shape(m, grid)
    blocks = occlusion_blocks(gh, gw, int(block))
    masks = np.zeros((len(blocks) + 1, m), dtype=bool)  # row 0: unperturbed
    for i, tokens in enumerate(blocks):
        masks[i + 1, tokens] = True
    values = perturber.logprobs(masks, targets)  # (1 + blocks, T)
    drops = np.maximum(values[0][None, :] - values[1:], 0.0)  # (blocks, T)
    out = np.zeros((len(targets), m), dtype=np.float32)
    for i, tokens in enumerate(blocks):
        out[:, tokens] = drops[i][:, None]
    if not np.isfinite(out).all():
        raise RuntimeError("occlusion map has non-finite values")
    return out.reshape(len(targets), gh, gw)
