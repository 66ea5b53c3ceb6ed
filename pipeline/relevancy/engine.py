"""Relevancy engine: Chefer et al. (2021) relevancy and attention baselines for one sequence.

One forward pass per sequence captures every language-model layer's attention probabilities
``A_l``; gradients of all targets' scores with respect to all ``A_l`` are then computed together
with batched vector-Jacobian products; no parameter gradient is ever formed.

Target convention (causal LM): a :class:`Target` ``(start, end)`` explains the tokens
``input_ids[0, start:end]``. Its score is ``sum_{p=start}^{end-1} logits[p-1, input_ids[p]]`` (the
logit of the actual token, not of the argmax; the logit at ``p-1`` predicts ``p``), and its
relevancy is read out as the mean over ``p`` of row ``p-1`` of ``R``. A single token is the same
with one ``p``.

Maps: the image map is the read-out vector restricted to the positions where
``input_ids == model.config.image_token_id`` (sequence order, row-major), reshaped to
``(grid_h, grid_w)``; the text map is the read-out vector over all ``N`` input positions (image
positions included). All maps are raw, float32, non-negative; any failure raises.

``occlusion`` is the one method that needs no captured tensor: it re-runs the model with image
soft tokens replaced by a baseline (batched variants, see :mod:`.perturbation`) and maps
``max(0, logprob(original) - logprob(occluded))`` per token or ``occlusion_block`` square.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from pipeline.method_names import ALL_METHODS, CAPTURED_METHODS, PERTURBATION_METHODS

from .capture import capture
from .methods import (
    abar,
    activation_norm_map,
    attention_flow_map,
    chefer_rows,
    consensus_map,
    gradcam_map,
    head_importance_map,
    layer_weighted_map,
    rollout_step,
)

__all__ = [
    "ALL_METHODS",
    "METHODS",
    "PERTURBATION_METHODS",
    "GRADIENT_METHODS",
    "TEXT_MAP_METHODS",
    "Target",
    "MethodMap",
    "TargetResult",
    "ExplainOutput",
    "explain_sequence",
]

METHODS: tuple[str, ...] = CAPTURED_METHODS
GRADIENT_METHODS: frozenset[str] = frozenset({"chefer", "gradcam"})
TEXT_MAP_METHODS: frozenset[str] = frozenset({"chefer", "raw_attention", "rollout"})
_ATTENTION_BASELINES = frozenset({"layer_weighted", "head_importance", "attention_flow", "consensus"})


@dataclass(frozen=True)
class Target:
    """Explained tokens ``input_ids[0, start:end]`` (``1 <= start < end``), with an optional label.

    Score ``sum_{p in [start, end)} logits[p-1, input_ids[p]]``; read-out rows ``p-1``, weight
    ``1 / (end - start)`` each.
    """

    start: int
    end: int
    label: str = ""

    def __post_init__(self) -> None:
        if not (isinstance(self.start, (int, np.integer)) and isinstance(self.end, (int, np.integer))):
            raise TypeError(f"Target start/end must be integers, got {self.start!r}, {self.end!r}")
        if self.start < 1:
            raise ValueError(f"Target start must be >= 1 (position 0 has no predicting logit), got {self.start}")
        if self.end <= self.start:
            raise ValueError(f"Target end must be > start, got [{self.start}, {self.end})")

    @property
    def positions(self) -> range:
        """Positions ``p`` of the explained tokens."""
        return range(int(self.start), int(self.end))

    @property
    def readout_rows(self) -> range:
        """Logit / relevancy rows ``p - 1``."""
        return range(int(self.start) - 1, int(self.end) - 1)


@dataclass
class MethodMap:
    """One method's maps for one target: ``image_map`` (grid_h, grid_w) float32 raw and
    ``text_map`` (N,) float32 over all input positions, or ``None`` where not defined."""

    image_map: np.ndarray
    text_map: np.ndarray | None = None


@dataclass
class TargetResult:
    """Maps of every requested method for one target; ``score`` is the target score (float32)."""

    target: Target
    index: int
    score: float
    maps: dict[str, MethodMap]


@dataclass
class ExplainOutput:
    """Result of :func:`explain_sequence` for one sequence.

    ``argmax_matches``: whether the teacher-forced argmax at ``p-1`` equals ``input_ids[p]`` for
    every generated position ``p`` in ``[prompt_length, forward_len)`` (``None`` when no
    ``prompt_length`` was given); ``argmax_mismatches`` lists the failing ``p``.
    ``image_tokens_ok``: the image-token count equals ``grid_h * grid_w`` (and
    ``model.config.mm_tokens_per_image`` where the config has it). ``forward_len`` is the length
    of the forwarded prefix (the input is cut after the last target's end unless
    ``truncate=False``). ``batched``: every chunk used the vectorised VJP path (``None`` when
    no gradient method was requested). ``timings``: wall seconds per phase (not synchronised
    with the device; the benchmark synchronises).
    """

    results: list[TargetResult]
    methods: tuple[str, ...]
    grid_h: int
    grid_w: int
    image_positions: np.ndarray
    seq_len: int
    forward_len: int
    num_layers: int
    argmax_matches: bool | None
    argmax_mismatches: list[int]
    argmax_checked: tuple[int, int] | None
    image_tokens_ok: bool
    batched: bool | None
    timings: dict[str, float] = field(default_factory=dict)

    def map(self, target_index: int, method: str) -> MethodMap:
        """The maps of ``method`` for the ``target_index``-th target."""
        return self.results[target_index].maps[method]


# --------------------------------------------------------------------------------------------
# helpers


def _check_methods(methods: Sequence[str]) -> tuple[str, ...]:
    if isinstance(methods, str):
        methods = (methods,)
    out: list[str] = []
    for m in methods:
        if m not in ALL_METHODS:
            raise ValueError(f"unknown relevancy method {m!r}; known: {', '.join(ALL_METHODS)}")
        if m not in out:
            out.append(m)
    if not out:
        raise ValueError("no relevancy method requested")
    return tuple(out)


def _as_target(t: Target | tuple[int, int]) -> Target:
    if isinstance(t, Target):
        return t
    if isinstance(t, (tuple, list)) and len(t) == 2:
        return Target(int(t[0]), int(t[1]))
    raise TypeError(f"expected a Target or a (start, end) pair, got {t!r}")


def gradient_bytes_per_target(model: nn.Module, seq_len: int, embed_grad: bool = True) -> int:
    """Bytes one target's gradients occupy in a batched chunk: the gradient of its score w.r.t.
    every layer's attention probabilities (layers x heads x N x N, model dtype), one float32
    N x N product per layer while propagating, and the gradient w.r.t. the input embeddings."""
    text = getattr(model.config, "text_config", model.config)
    layers, heads = int(text.num_hidden_layers), int(text.num_attention_heads)
    hidden = int(text.hidden_size)
    _, dtype = _model_device_dtype(model)
    item = torch.finfo(dtype).bits // 8
    n2 = seq_len * seq_len
    return layers * heads * n2 * item + n2 * 4 + (seq_len * hidden * item if embed_grad else 0)


def chunk_for_budget(model: nn.Module, seq_len: int, budget_bytes: float, cap: int) -> int:
    """Targets per gradient chunk so that their gradients fit `budget_bytes` (at least 1, at most `cap`)."""
    return max(1, min(int(cap), int(budget_bytes // gradient_bytes_per_target(model, seq_len))))


def _clock(device: torch.device) -> float:
    """Wall seconds after the device's queued work has finished (CUDA runs asynchronously, so
    phase timings without the synchronisation would be charged to whichever phase waits next)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters())
    return param.device, param.dtype


def _grid(count: int, grid: tuple[int, int] | None) -> tuple[int, int]:
    if grid is not None:
        gh, gw = int(grid[0]), int(grid[1])
        if gh * gw != count:
            raise ValueError(f"grid {gh}x{gw} does not match the {count} image tokens")
        return gh, gw
    side = math.isqrt(count)
    if side * side != count:
        raise ValueError(f"{count} image tokens is not a perfect square; pass grid=(h, w)")
    return side, side


@contextmanager
def _inference_state(model: nn.Module) -> Iterator[None]:
    """Eval mode and frozen parameters for the duration; both restored afterwards."""
    was_training = model.training
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)
        model.train(was_training)


def _vjp(
    scores: torch.Tensor, inputs: list[torch.Tensor], idx: list[int], batched: bool
) -> tuple[list[torch.Tensor], bool]:
    """Gradients of ``scores[i]`` for ``i in idx`` w.r.t. ``inputs``, stacked on a new dim 0.

    Batched: one ``autograd.grad`` call with a stacked one-hot ``grad_outputs`` (C, T) and
    ``is_grads_batched=True`` (vmap over the backward pass). Falls back to one backward per
    target (``retain_graph``) when the batched call raises. Returns (grads, used_batched).
    """
    if batched:
        onehot = torch.zeros((len(idx), scores.shape[0]), device=scores.device, dtype=scores.dtype)
        onehot[torch.arange(len(idx), device=scores.device), torch.as_tensor(idx, device=scores.device)] = 1.0
        try:
            grads = torch.autograd.grad(
                scores, inputs, grad_outputs=onehot, retain_graph=True, is_grads_batched=True
            )
            return list(grads), True
        except (RuntimeError, NotImplementedError) as exc:
            warnings.warn(
                f"batched vector-Jacobian products failed ({type(exc).__name__}: {exc}); "
                "falling back to one backward pass per target",
                RuntimeWarning,
                stacklevel=3,
            )
    per_target = [torch.autograd.grad(scores[i], inputs, retain_graph=True) for i in idx]
    return [torch.stack([g[k] for g in per_target]) for k in range(len(inputs))], False


def _to_numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(device="cpu", dtype=torch.float32).numpy().astype(np.float32, copy=True)


def _check_map(name: str, x: torch.Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        raise RuntimeError(f"{name}: map has non-finite values")
    if bool((x < 0).any()):
        raise RuntimeError(f"{name}: map has negative values")


# --------------------------------------------------------------------------------------------
# main entry point


def explain_sequence(
    model: nn.Module,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None,
    token_type_ids: torch.Tensor | None,
    targets: Sequence[Target | tuple[int, int]],
    methods: Sequence[str],
    *,
    attention_mask: torch.Tensor | None = None,
    prompt_length: int | None = None,
    grid: tuple[int, int] | None = None,
    chunk_size: int = 8,
    seed: int = 0,
    truncate: bool = True,
    batched: bool = True,
    occlusion_block: int = 1,
    occlusion_baseline: str = "mean",
    perturbation_batch_size: int = 16,
) -> ExplainOutput:
    """Explain several targets of one sequence with one forward pass.

    Args:
        model: a Gemma 3 style vision-language model (e.g. ``Gemma3ForConditionalGeneration``);
            any dtype and device. It is run in eval mode with frozen parameters (both restored).
        input_ids: (1, N) the full model input (prompt + answer), exactly as generated.
        pixel_values: the image tensor given at generation (cast to the model's dtype/device).
        token_type_ids: (1, N) as given at generation (1 on image tokens switches on Gemma 3's
            bidirectional image attention), or ``None`` if generation ran without them.
        targets: spans to explain, see :class:`Target`.
        methods: names from :data:`ALL_METHODS` (:data:`METHODS` plus ``occlusion``).
        attention_mask: optional (1, N) padding mask, as given at generation.
        prompt_length: first generated position; enables the ``argmax_matches`` check.
        grid: (grid_h, grid_w) of the image tokens; default the square root of their count.
        chunk_size: targets per batched gradient call (bounds memory: the gradients of
            ``chunk_size`` targets w.r.t. every layer's probabilities are held at once).
        seed: base seed of the ``random`` method (per target: ``(seed, start, end)``; the explain stage derives ``seed`` from ``explain.seed`` and the sample id).
        truncate: forward only ``input_ids[:, :max end]`` (later positions cannot influence the
            explained logits); the argmax check then covers that prefix only.
        batched: use batched vector-Jacobian products (falls back per target on failure).
        occlusion_block: side, in image tokens, of the squares the ``occlusion`` method replaces
            (1: every token on its own); see :func:`.perturbation.occlusion_maps`.
        occlusion_baseline: what replaces an occluded token's embedding: ``"mean"`` (the mean
            image soft-token embedding of this image) or ``"zero"``.
        perturbation_batch_size: occluded variants per forward pass (bounds memory).

    Returns:
        :class:`ExplainOutput`. Gradient methods (``chefer``, ``gradcam``) use float32 arithmetic
        on the captured (model-dtype) probabilities and gradients.
    """
    t_start = time.perf_counter()
    methods = _check_methods(methods)
    targets = [_as_target(t) for t in targets]
    if not targets:
        raise ValueError("no targets given")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must have shape (1, N), got {tuple(input_ids.shape)}")
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    n_full = int(input_ids.shape[1])
    for t in targets:
        if t.end > n_full:
            raise ValueError(f"target [{t.start}, {t.end}) exceeds the sequence length {n_full}")
    if prompt_length is not None and not (1 <= prompt_length <= n_full):
        raise ValueError(f"prompt_length {prompt_length} outside [1, {n_full}]")

    device, dtype = _model_device_dtype(model)
    ids_cpu = input_ids[0].detach().to("cpu", torch.long)
    n_fwd = max(t.end for t in targets) if truncate else n_full
    ids = input_ids[:, :n_fwd].to(device=device, dtype=torch.long)
    tt = token_type_ids[:, :n_fwd].to(device) if token_type_ids is not None else None
    am = attention_mask[:, :n_fwd].to(device) if attention_mask is not None else None
    position_ids = None
    if am is not None:
        # as generate() does: positions count only attended tokens (left padding)
        position_ids = (am.long().cumsum(-1) - 1).masked_fill(am == 0, 0)
    pv = pixel_values
    if pv is not None:
        pv = pv.to(device=device, dtype=dtype if pv.is_floating_point() else pv.dtype)

    image_token_id = int(model.config.image_token_id)
    n_img_full = int((ids_cpu == image_token_id).sum())
    img_pos = torch.nonzero(ids[0] == image_token_id).flatten()
    n_img = int(img_pos.numel())
    if n_img == 0:
        raise ValueError(f"no image tokens (id {image_token_id}) in input_ids")
    if n_img != n_img_full:
        raise ValueError("a target ends before the last image token; image maps need the whole image block")
    grid_h, grid_w = _grid(n_img, grid)
    expected = getattr(model.config, "mm_tokens_per_image", None)
    image_tokens_ok = n_img == grid_h * grid_w and (expected is None or n_img == int(expected))

    # logits rows to compute: every read-out row, plus the rows checked by the argmax test
    check_range: tuple[int, int] | None = None
    check_pos: list[int] = []
    if prompt_length is not None:
        check_range = (max(int(prompt_length), 1), n_fwd)
        check_pos = list(range(*check_range))
    rows_needed = sorted({r for t in targets for r in t.readout_rows} | {p - 1 for p in check_pos})
    row_index = {r: i for i, r in enumerate(rows_needed)}
    keep = torch.tensor(rows_needed, device=device, dtype=torch.long)

    need_grad = bool(GRADIENT_METHODS.intersection(methods))
    need_attn_rows = bool(
        {"raw_attention", "rollout"}.intersection(methods) or _ATTENTION_BASELINES.intersection(methods)
    )
    n_targets = len(targets)
    timings: dict[str, float] = {}

    with _inference_state(model):
        t0 = _clock(device)
        with capture(model, grad=need_grad) as rec, torch.set_grad_enabled(need_grad):
            out = model(
                input_ids=ids,
                pixel_values=pv,
                token_type_ids=tt,
                attention_mask=am,
                position_ids=position_ids,
                use_cache=False,
                logits_to_keep=keep,
            )
            logits = out.logits[0]  # (K, V), rows `rows_needed`
            if logits.shape[0] != len(rows_needed):
                raise RuntimeError("the model ignored logits_to_keep; cannot map logit rows")
            # scores (T,), float32, on the graph when gradients are needed
            sel_rows, sel_cols, sel_tgt = [], [], []
            for ti, t in enumerate(targets):
                for p in t.positions:
                    sel_rows.append(row_index[p - 1])
                    sel_cols.append(int(ids_cpu[p]))
                    sel_tgt.append(ti)
            picked = logits[torch.tensor(sel_rows, device=device), torch.tensor(sel_cols, device=device)].float()
            scores = torch.zeros(n_targets, device=device, dtype=torch.float32).index_add(
                0, torch.tensor(sel_tgt, device=device), picked
            )
        timings["forward"] = _clock(device) - t0
        if not rec.complete():
            raise RuntimeError("attention capture missed layers; is the text model using the capture implementation?")
        probs = [p[0].detach() for p in rec.probs]  # each (H, n_fwd, n_fwd), model dtype, off the graph
        embeds = rec.inputs_embeds
        num_layers = len(probs)

        # self-check: teacher-forced argmax reproduces the generated tokens
        mismatches: list[int] = []
        if check_pos:
            with torch.no_grad():
                rows = torch.tensor([row_index[p - 1] for p in check_pos], device=device)
                pred = logits.detach()[rows].argmax(dim=-1).cpu()
            actual = ids_cpu[check_pos[0] : check_pos[-1] + 1]
            mismatches = [check_pos[i] for i in torch.nonzero(pred != actual).flatten().tolist()]
        argmax_matches = None if prompt_length is None else not mismatches

        # read-out weights w (T, n_fwd): mean of e_{p-1}
        w = torch.zeros((n_targets, n_fwd), device=device, dtype=torch.float32)
        for ti, t in enumerate(targets):
            w[ti, t.start - 1 : t.end - 1] = 1.0 / (t.end - t.start)

        maps: dict[str, torch.Tensor] = {}  # method -> (T, n_fwd) or (T, M)
        used_batched = True
        inputs: list[torch.Tensor] = []

        # gradient methods
        t0 = _clock(device)
        if need_grad:
            if embeds is None:
                raise RuntimeError("the language model's inputs_embeds were not recorded")
            want_chefer = "chefer" in methods
            want_gradcam = "gradcam" in methods
            if want_chefer:
                inputs.extend(rec.probs)
            if want_gradcam:
                inputs.append(embeds)
            chefer_out = torch.zeros((n_targets, n_fwd), device=device, dtype=torch.float32)
            gradcam_out = torch.zeros((n_targets, n_img), device=device, dtype=torch.float32)
            embeds_img = embeds.detach()[0, img_pos] if want_gradcam else None
            for c0 in range(0, n_targets, chunk_size):
                idx = list(range(c0, min(c0 + chunk_size, n_targets)))
                grads, ok = _vjp(scores, inputs, idx, batched and used_batched)
                used_batched = used_batched and ok
                # The captured tensors are on the graph: keep these products off it.
                with torch.no_grad():
                    if want_gradcam:
                        g_emb = grads.pop()  # (C, 1, N, D)
                        gradcam_out[idx] = gradcam_map(g_emb[:, 0, img_pos], embeds_img)
                        del g_emb
                    if want_chefer:
                        v = w[idx]
                        for layer in reversed(range(num_layers)):
                            v = chefer_rows(v, abar(grads[layer][:, 0], probs[layer]))
                            grads[layer] = None  # free as we go
                        chefer_out[idx] = v
                del grads
            if want_chefer:
                maps["chefer"] = chefer_out
            if want_gradcam:
                maps["gradcam"] = gradcam_out
        timings["gradients"] = _clock(device) - t0

        # attention-only methods (no gradients)
        t0 = _clock(device)
        with torch.no_grad():
            if need_attn_rows:
                read_heads = torch.stack(
                    [torch.einsum("tn,hnm->thm", w, a.float()) for a in probs]
                )  # (L, T, H, n_fwd)
                read_mean = read_heads.mean(dim=2)  # (L, T, n_fwd)
                if "raw_attention" in methods:
                    maps["raw_attention"] = read_mean[-1]
                if "rollout" in methods:
                    v = w.clone()
                    for a in reversed(probs):
                        v = rollout_step(v, a.float().mean(dim=0))
                    maps["rollout"] = v
                read_mean_img = read_mean[:, :, img_pos]
                lw = hi = fl = None
                if {"layer_weighted", "consensus"}.intersection(methods):
                    lw = layer_weighted_map(read_mean_img)
                if {"head_importance", "consensus"}.intersection(methods):
                    hi = head_importance_map(read_heads[..., img_pos])
                if {"attention_flow", "consensus"}.intersection(methods):
                    fl = attention_flow_map(read_mean_img)
                if "layer_weighted" in methods:
                    maps["layer_weighted"] = lw
                if "head_importance" in methods:
                    maps["head_importance"] = hi
                if "attention_flow" in methods:
                    maps["attention_flow"] = fl
                if "consensus" in methods:
                    maps["consensus"] = consensus_map(lw, hi, fl)
            if "activation_norm" in methods:
                if embeds is None:
                    raise RuntimeError("the language model's inputs_embeds were not recorded")
                maps["activation_norm"] = activation_norm_map(embeds.detach()[0, img_pos]).expand(n_targets, n_img)
        timings["attention_methods"] = _clock(device) - t0

        score_values = scores.detach().cpu().tolist()
        del scores, picked, logits, out, rec, probs, embeds, inputs  # release the graph

        # after the graph is released: occlusion re-runs the model on batches of variants
        if "occlusion" in methods:
            # imported here: the perturbation module builds on this one
            from .perturbation import occlusion_maps

            t0 = _clock(device)
            occ = occlusion_maps(
                model,
                {"input_ids": input_ids, "pixel_values": pixel_values, "token_type_ids": token_type_ids,
                 "attention_mask": attention_mask},
                targets,
                grid=(grid_h, grid_w),
                block=occlusion_block,
                baseline=occlusion_baseline,
                batch_size=perturbation_batch_size,
            )
            maps["occlusion"] = torch.from_numpy(occ.reshape(n_targets, n_img))
            timings["occlusion"] = _clock(device) - t0

    # assemble per-target outputs (numpy float32, raw)
    t0 = _clock(device)
    img_pos_cpu = img_pos.cpu()
    maps_cpu: dict[str, torch.Tensor] = {}
    for m, x in maps.items():
        x = x.detach().to("cpu", torch.float32)
        _check_map(m, x)
        maps_cpu[m] = x
    del maps
    results: list[TargetResult] = []
    for ti, t in enumerate(targets):
        per_method: dict[str, MethodMap] = {}
        for m in methods:
            if m == "random":
                rng = np.random.default_rng([int(seed), int(t.start), int(t.end)])
                per_method[m] = MethodMap(image_map=rng.random((grid_h, grid_w), dtype=np.float32))
            elif m in TEXT_MAP_METHODS:
                row = maps_cpu[m][ti]  # (n_fwd,)
                text = torch.zeros(n_full, dtype=torch.float32)
                text[:n_fwd] = row  # positions >= n_fwd are never attended by the read-out rows
                per_method[m] = MethodMap(
                    image_map=_to_numpy(row[img_pos_cpu]).reshape(grid_h, grid_w), text_map=_to_numpy(text)
                )
            else:
                per_method[m] = MethodMap(image_map=_to_numpy(maps_cpu[m][ti]).reshape(grid_h, grid_w))
        results.append(TargetResult(target=t, index=ti, score=float(score_values[ti]), maps=per_method))
    timings["assemble"] = _clock(device) - t0
    timings["total"] = _clock(device) - t_start

    return ExplainOutput(
        results=results,
        methods=methods,
        grid_h=grid_h,
        grid_w=grid_w,
        image_positions=img_pos_cpu.numpy().astype(np.int64),
        seq_len=n_full,
        forward_len=n_fwd,
        num_layers=num_layers,
        argmax_matches=argmax_matches,
        argmax_mismatches=mismatches,
        argmax_checked=check_range,
        image_tokens_ok=image_tokens_ok,
        batched=(used_batched and batched) if need_grad else None,
        timings=timings,
    )
