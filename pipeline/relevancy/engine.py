"""Relevancy engine: runs the registered methods (:mod:`.registry`, :mod:`.library`) on one sequence.

One forward pass per sequence captures every language-model layer's attention probabilities
``A_l`` and input embeddings; when a requested method declared gradients, the gradients of all
targets' scores w.r.t. the ``A_l`` and / or the embeddings are computed together with batched
vector-Jacobian products (chunks of ``chunk_size`` targets; no parameter gradient is ever
formed). Each method gets exactly what it declared; methods with their own passes run after the
shared graph is released.

Target convention (causal LM): a :class:`~.inputs.Target` ``(start, end)`` explains the tokens
``input_ids[0, start:end]``; its score is chosen by ``score`` (:mod:`.scores`; default the sum
of the actual tokens' logits ``sum_p logits[p-1, input_ids[p]]``, Chefer's), and its read-out
is the mean over ``p`` of row ``p-1``.

Maps: the image map is the read-out vector restricted to the positions where
``input_ids == model.config.image_token_id`` (sequence order, row-major), reshaped to
``(grid_h, grid_w)``; the text map (methods with ``text_map``) is the read-out vector over all
``N`` input positions (image positions included). All maps are raw, float32, non-negative; any
failure raises.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.method_names import BUILTIN

from .capture import capture
from .inputs import (
    SequenceInputs,
    Target,
    as_target,
    clock,
    grid_shape,
    inference_state,
    model_device_dtype,
)
from .registry import (
    MethodOutput,
    MethodSpec,
    OwnPasses,
    call_method,
    registered,
    resolve_methods,
)
from .scores import ScoreSelection, target_scores

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
    "explain",
    "explain_sequence",
]

_BUILTIN_SPECS = {n: s for n, s in registered().items() if n in BUILTIN}
#: every built-in method
ALL_METHODS: tuple[str, ...] = tuple(BUILTIN)
#: built-in methods computed from the one captured forward pass (no passes of their own)
METHODS: tuple[str, ...] = tuple(n for n in BUILTIN if not _BUILTIN_SPECS[n].own_passes)
PERTURBATION_METHODS: tuple[str, ...] = tuple(n for n in BUILTIN if _BUILTIN_SPECS[n].family == "perturbation")
GRADIENT_METHODS: frozenset[str] = frozenset(n for n in BUILTIN if _BUILTIN_SPECS[n].family == "gradient")
TEXT_MAP_METHODS: frozenset[str] = frozenset(n for n in BUILTIN if _BUILTIN_SPECS[n].text_map)


@dataclass
class MethodMap:
    """One method's maps for one target: ``image_map`` (grid_h, grid_w) float32 raw and
    ``text_map`` (N,) float32 over all input positions, or ``None`` where not defined;
    ``extras``: the method's per-target diagnostics (e.g. ``completeness_error``)."""

    image_map: np.ndarray
    text_map: np.ndarray | None = None
    extras: dict[str, float] = field(default_factory=dict)


@dataclass
class TargetResult:
    """Maps of every requested method for one target; ``score`` is the target score (float32,
    of ``ExplainOutput.score_kind``); ``counterpart`` the contrast token id (``None``: none)."""

    target: Target
    index: int
    score: float
    maps: dict[str, MethodMap]
    counterpart: int | None = None


@dataclass
class ExplainOutput:
    """Result of :func:`explain` for one sequence.

    ``argmax_matches``: whether the teacher-forced argmax at ``p-1`` equals ``input_ids[p]`` for
    every generated position ``p`` in ``[prompt_length, forward_len)`` (``None`` when no
    ``prompt_length`` was given); ``argmax_mismatches`` lists the failing ``p``.
    ``image_tokens_ok``: the image-token count equals ``grid_h * grid_w`` (and
    ``model.config.mm_tokens_per_image`` where the config has it). ``forward_len`` is the length
    of the forwarded prefix (the input is cut after the last target's end unless
    ``truncate=False``). ``batched``: every chunk used the vectorised VJP path (``None`` when
    no method needed the shared gradients). ``timings``: wall seconds per phase (device
    synchronised); methods with their own passes are timed under their name.
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
    score_kind: str = "logit"
    timings: dict[str, float] = field(default_factory=dict)

    def map(self, target_index: int, method: str) -> MethodMap:
        """The maps of ``method`` for the ``target_index``-th target."""
        return self.results[target_index].maps[method]


@dataclass(frozen=True)
class Readout:
    """Read-out attention: ``heads`` (L, T, H, N) float32 ``w @ A_{l,h}``; ``mean`` (L, T, N) its head mean."""

    heads: torch.Tensor
    mean: torch.Tensor

    def select(self, idx: list[int]) -> Readout:
        return Readout(self.heads[:, idx], self.mean[:, idx])


# --------------------------------------------------------------------------------------------
# memory


def gradient_bytes_per_target(model: nn.Module, seq_len: int, embed_grad: bool = True) -> int:
    """Bytes one target's gradients occupy in a batched chunk: the gradient of its score w.r.t.
    every layer's attention probabilities (layers x heads x N x N, model dtype), one float32
    N x N product per layer while propagating, and the gradient w.r.t. the input embeddings."""
    text = getattr(model.config, "text_config", model.config)
    layers, heads = int(text.num_hidden_layers), int(text.num_attention_heads)
    hidden = int(text.hidden_size)
    _, dtype = model_device_dtype(model)
    item = torch.finfo(dtype).bits // 8
    n2 = seq_len * seq_len
    return layers * heads * n2 * item + n2 * 4 + (seq_len * hidden * item if embed_grad else 0)


def chunk_for_budget(model: nn.Module, seq_len: int, budget_bytes: float, cap: int) -> int:
    """Targets per gradient chunk so that their gradients fit `budget_bytes` (at least 1, at most `cap`)."""
    return max(1, min(int(cap), int(budget_bytes // gradient_bytes_per_target(model, seq_len))))


# --------------------------------------------------------------------------------------------
# phases


@dataclass
class _Prepared:
    """The forwarded prefix and what the phases share (see :func:`_prepare`)."""

    device: torch.device
    n_full: int
    n_fwd: int
    ids_cpu: torch.Tensor
    prefix: dict[str, torch.Tensor | None]
    pixel_values: torch.Tensor | None
    img_pos: torch.Tensor
    grid: tuple[int, int]
    image_tokens_ok: bool
    keep: torch.Tensor
    row_index: dict[int, int]
    check_pos: list[int]
    check_range: tuple[int, int] | None


def _check_call(seq: SequenceInputs, targets: list[Target], chunk_size: int) -> None:
    seq.check()
    if not targets:
        raise ValueError("no targets given")
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    for t in targets:
        if t.end > seq.seq_len:
            raise ValueError(f"target [{t.start}, {t.end}) exceeds the sequence length {seq.seq_len}")


def _prepare(model: nn.Module, seq: SequenceInputs, targets: list[Target], truncate: bool,
             grid: tuple[int, int] | None) -> _Prepared:
    """Cut the sequence after the last target (``truncate``), move it to the model, find the
    image tokens and the logit rows to compute (read-out rows and the argmax check's rows)."""
    device, dtype = model_device_dtype(model)
    n_full = seq.seq_len
    ids_cpu = seq.input_ids[0].detach().to("cpu", torch.long)
    n_fwd = max(t.end for t in targets) if truncate else n_full
    ids = seq.input_ids[:, :n_fwd].to(device=device, dtype=torch.long)
    tt = seq.token_type_ids[:, :n_fwd].to(device) if seq.token_type_ids is not None else None
    am = seq.attention_mask[:, :n_fwd].to(device) if seq.attention_mask is not None else None
    # as generate() does: positions count only attended tokens (left padding)
    position_ids = None if am is None else (am.long().cumsum(-1) - 1).masked_fill(am == 0, 0)
    pv = seq.pixel_values
    if pv is not None:
        pv = pv.to(device=device, dtype=dtype if pv.is_floating_point() else pv.dtype)

    image_token_id = int(model.config.image_token_id)
    img_pos = torch.nonzero(ids[0] == image_token_id).flatten()
    n_img = int(img_pos.numel())
    if n_img == 0:
        raise ValueError(f"no image tokens (id {image_token_id}) in input_ids")
    if n_img != int((ids_cpu == image_token_id).sum()):
        raise ValueError("a target ends before the last image token; image maps need the whole image block")
    gh, gw = grid_shape(n_img, grid)
    expected = getattr(model.config, "mm_tokens_per_image", None)

    check_range = None if seq.prompt_length is None else (max(int(seq.prompt_length), 1), n_fwd)
    check_pos = list(range(*check_range)) if check_range else []
    rows_needed = sorted({r for t in targets for r in t.readout_rows} | {p - 1 for p in check_pos})
    return _Prepared(
        device=device, n_full=n_full, n_fwd=n_fwd, ids_cpu=ids_cpu,
        prefix={"input_ids": ids, "token_type_ids": tt, "attention_mask": am, "position_ids": position_ids},
        pixel_values=pv, img_pos=img_pos, grid=(gh, gw),
        image_tokens_ok=n_img == gh * gw and (expected is None or n_img == int(expected)),
        keep=torch.tensor(rows_needed, device=device, dtype=torch.long),
        row_index={r: i for i, r in enumerate(rows_needed)}, check_pos=check_pos, check_range=check_range,
    )


def _argmax_mismatches(logits: torch.Tensor, prep: _Prepared) -> list[int]:
    """Generated positions whose teacher-forced argmax differs from the sequence's token."""
    if not prep.check_pos:
        return []
    with torch.no_grad():
        rows = torch.tensor([prep.row_index[p - 1] for p in prep.check_pos], device=prep.device)
        pred = logits.detach()[rows].argmax(dim=-1).cpu()
    actual = prep.ids_cpu[prep.check_pos[0] : prep.check_pos[-1] + 1]
    return [prep.check_pos[i] for i in torch.nonzero(pred != actual).flatten().tolist()]


def _readout_weights(targets: list[Target], n_fwd: int, device: torch.device) -> torch.Tensor:
    """``w`` (T, n_fwd) float32: row ``t`` is the mean of the unit rows ``p - 1`` of target ``t``."""
    w = torch.zeros((len(targets), n_fwd), device=device, dtype=torch.float32)
    for ti, t in enumerate(targets):
        w[ti, t.start - 1 : t.end - 1] = 1.0 / (t.end - t.start)
    return w


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


def _gradient_methods(specs: list[MethodSpec], rec, scores: torch.Tensor, probs: list[torch.Tensor],
                      common: dict[str, Any], shared: dict[str, Any], chunk_size: int, batched: bool
                      ) -> tuple[dict[str, Any], bool]:
    """Call each per-chunk method once per chunk of targets with that chunk's gradients."""
    needs = set().union(*(s.needs for s in specs))
    inputs = (list(rec.probs) if "attention_grads" in needs else []) + (
        [rec.inputs_embeds] if "embedding_grads" in needs else [])
    n_layers, img = len(probs), common["image_positions"]
    parts: dict[str, list] = {s.name: [] for s in specs}
    used_batched = True
    for c0 in range(0, scores.shape[0], chunk_size):
        idx = list(range(c0, min(c0 + chunk_size, scores.shape[0])))
        grads, ok = _vjp(scores, inputs, idx, batched and used_batched)
        used_batched = used_batched and ok
        # The captured tensors are on the graph: keep these products off it.
        with torch.no_grad():
            avail = dict(shared, **_chunk_shared(shared, idx))
            if "attention_grads" in needs:
                avail["attention_grads"] = [g[:, 0] for g in grads[:n_layers]]
            if "embedding_grads" in needs:
                avail["embedding_grads"] = grads[-1][:, 0, img]
            chunk_common = dict(common, targets=[common["targets"][i] for i in idx], target_index=idx,
                                readout=common["readout"][idx])
            for s in specs:
                parts[s.name].append(call_method(s, chunk_common, avail))
        del grads, avail
    return {name: _concat(outs) for name, outs in parts.items()}, used_batched


def _chunk_shared(shared: dict[str, Any], idx: list[int]) -> dict[str, Any]:
    """The per-target shared resources restricted to a chunk's targets."""
    return {"attention_readout": shared["attention_readout"].select(idx)} if "attention_readout" in shared else {}


def _concat(outs: list[MethodOutput]) -> MethodOutput:
    """One method's chunk outputs joined along the targets."""
    if len(outs) == 1:
        return outs[0]
    keys = outs[0].extras.keys()
    return MethodOutput(torch.cat([o.maps for o in outs]), {k: torch.cat([o.extras[k] for o in outs]) for k in keys})


def _attention_readout(probs: list[torch.Tensor], w: torch.Tensor) -> Readout:
    """(L, T, H, N) read-out attention and its head mean, computed once per sequence."""
    heads = torch.stack([torch.einsum("tn,hnm->thm", w, a.float()) for a in probs])
    return Readout(heads, heads.mean(dim=2))


def _check_map(name: str, x: torch.Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        raise RuntimeError(f"{name}: map has non-finite values")
    if bool((x < 0).any()):
        raise RuntimeError(f"{name}: map has negative values")


def _to_numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(device="cpu", dtype=torch.float32).numpy().astype(np.float32, copy=True)


def _assemble(specs: tuple[MethodSpec, ...], outputs: dict[str, Any], targets: list[Target], scores: list[float],
              counterparts: Sequence[int | None], prep: _Prepared) -> list[TargetResult]:
    """Per-target :class:`TargetResult` (numpy float32, raw); checks every map."""
    img = prep.img_pos.cpu()
    gh, gw = prep.grid
    cpu: dict[str, tuple[torch.Tensor, dict[str, list[float]]]] = {}
    for s in specs:
        x = outputs[s.name].maps.detach().to("cpu", torch.float32)
        _check_map(s.name, x)
        cpu[s.name] = (x, {k: v.detach().cpu().float().tolist() for k, v in outputs[s.name].extras.items()})
    results = []
    for ti, t in enumerate(targets):
        per_method: dict[str, MethodMap] = {}
        for s in specs:
            x, extras = cpu[s.name]
            ex = {k: float(v[ti]) for k, v in extras.items()}
            if s.text_map:
                text = torch.zeros(prep.n_full, dtype=torch.float32)
                text[: prep.n_fwd] = x[ti]  # positions >= n_fwd are never attended by the read-out rows
                per_method[s.name] = MethodMap(_to_numpy(x[ti][img]).reshape(gh, gw), _to_numpy(text), ex)
            else:
                per_method[s.name] = MethodMap(_to_numpy(x[ti]).reshape(gh, gw), None, ex)
        results.append(TargetResult(t, ti, float(scores[ti]), per_method, counterparts[ti]))
    return results


def _captured_forward(model: nn.Module, prep: _Prepared, sel: ScoreSelection, grad: bool) -> tuple[Any, Any, torch.Tensor]:
    """The shared forward pass with attention capture: (model output, recorder, scores (T,)
    float32, on the autograd graph when ``grad``)."""
    with capture(model, grad=grad) as rec, torch.set_grad_enabled(grad):
        out = model(input_ids=prep.prefix["input_ids"], pixel_values=prep.pixel_values,
                    token_type_ids=prep.prefix["token_type_ids"], attention_mask=prep.prefix["attention_mask"],
                    position_ids=prep.prefix["position_ids"], use_cache=False, logits_to_keep=prep.keep)
        if out.logits.shape[1] != prep.keep.numel():
            raise RuntimeError("the model ignored logits_to_keep; cannot map logit rows")
        scores = target_scores(out.logits, sel)[0]
    if not rec.complete():
        raise RuntimeError("attention capture missed layers; is the text model using the capture implementation?")
    return out, rec, scores


# --------------------------------------------------------------------------------------------
# entry points


def explain(
    model: nn.Module,
    inputs: SequenceInputs,
    targets: Sequence[Target | tuple[int, int]],
    methods: Sequence[str] | str,
    *,
    grid: tuple[int, int] | None = None,
    chunk_size: int = 8,
    seed: int = 0,
    truncate: bool = True,
    batched: bool = True,
    score: str = "logit",
    counterparts: Sequence[int | None] | None = None,
    occlusion_block: int = 1,
    occlusion_baseline: str = "mean",
    perturbation_batch_size: int = 16,
    ig_steps: int = 16,
    ig_baseline: str = "mean",
) -> ExplainOutput:
    """Explain several targets of one sequence with one shared forward pass.

    Args:
        model: a Gemma 3 style vision-language model (e.g. ``Gemma3ForConditionalGeneration``);
            any dtype and device. It is run in eval mode with frozen parameters (both restored).
        inputs: the sequence (:class:`~.inputs.SequenceInputs`), exactly as generated.
        targets: spans to explain, see :class:`~.inputs.Target`.
        methods: registered method names (:func:`.registry.registered`).
        grid: (grid_h, grid_w) of the image tokens; default the square root of their count.
        chunk_size: targets per batched gradient call (bounds memory: the gradients of
            ``chunk_size`` targets w.r.t. every layer's probabilities are held at once).
        seed: base seed of the ``random`` method (per target: ``(seed, start, end)``).
        truncate: forward only ``input_ids[:, :max end]`` (later positions cannot influence the
            explained logits); the argmax check then covers that prefix only.
        batched: use batched vector-Jacobian products (falls back per target on failure).
        score: ``logit`` | ``logprob`` | ``contrast`` (:mod:`.scores`): what gradient methods
            explain and ``TargetResult.score`` holds. ``counterparts``: per target the contrast
            token id or ``None`` (``contrast`` only; ``None`` targets get their plain logit).
        occlusion_block, occlusion_baseline, perturbation_batch_size: the ``occlusion`` method
            (and the integrated-gradients batches), see :mod:`.perturbation`.
        ig_steps, ig_baseline: the ``integrated_gradients`` method, see
            :mod:`.integrated_gradients`.

    Returns:
        :class:`ExplainOutput`. Gradient methods use float32 arithmetic on the captured
        (model-dtype) probabilities and gradients.
    """
    t_start = time.perf_counter()
    specs = resolve_methods(methods)
    targets = [as_target(t) for t in targets]
    _check_call(inputs, targets, chunk_size)
    prep = _prepare(model, inputs, targets, truncate, grid)
    sel = ScoreSelection.build(targets, prep.ids_cpu, prep.row_index, score, counterparts)
    options = dict(occlusion_block=occlusion_block, occlusion_baseline=occlusion_baseline,
                   perturbation_batch_size=perturbation_batch_size, ig_steps=ig_steps, ig_baseline=ig_baseline)
    per_chunk = [s for s in specs if s.per_chunk]
    shared_specs = [s for s in specs if not s.per_chunk and not s.own_passes]
    own = [s for s in specs if s.own_passes]
    needs = set().union(*(s.needs for s in specs))
    need_grad = bool(per_chunk)
    timings: dict[str, float] = {}
    outputs: dict[str, Any] = {}

    with inference_state(model):
        t0 = clock(prep.device)
        out, rec, scores = _captured_forward(model, prep, sel, need_grad)
        timings["forward"] = clock(prep.device) - t0
        if rec.inputs_embeds is None and needs & {"embeddings", "embedding_grads", "passes"}:
            raise RuntimeError("the language model's inputs_embeds were not recorded")
        probs = [p[0].detach() for p in rec.probs]  # each (H, n_fwd, n_fwd), model dtype, off the graph
        mismatches = _argmax_mismatches(out.logits[0], prep)

        common = dict(targets=targets, target_index=list(range(len(targets))),
                      readout=_readout_weights(targets, prep.n_fwd, prep.device), image_positions=prep.img_pos,
                      grid=prep.grid, seed=int(seed), options=options)
        shared: dict[str, Any] = {"attention": probs}
        if rec.inputs_embeds is not None:
            shared["embeddings"] = rec.inputs_embeds.detach()[0, prep.img_pos]
        t0 = clock(prep.device)
        if "attention_readout" in needs:
            with torch.no_grad():
                shared["attention_readout"] = _attention_readout(probs, common["readout"])
        used_batched = True
        if per_chunk:
            grad_out, used_batched = _gradient_methods(per_chunk, rec, scores, probs, common, shared,
                                                       chunk_size, batched)
            outputs.update(grad_out)
        timings["gradients"] = clock(prep.device) - t0

        t0 = clock(prep.device)
        with torch.no_grad():
            for s in shared_specs:
                outputs[s.name] = call_method(s, common, shared)
        timings["attention_methods"] = clock(prep.device) - t0

        score_values = scores.detach().cpu().tolist()
        num_layers = len(probs)
        embeds = rec.inputs_embeds.detach() if own else None
        del scores, out, rec, shared, probs  # release the graph and the captured tensors

        # after the graph is released: methods with their own passes
        for s in own:
            t0 = clock(prep.device)
            passes = OwnPasses(model, inputs, prep.prefix, embeds, prep.keep, sel)
            outputs[s.name] = call_method(s, common, {"passes": passes})
            timings[s.name] = clock(prep.device) - t0

    t0 = clock(prep.device)
    results = _assemble(specs, outputs, targets, score_values, sel.counterparts, prep)
    timings["assemble"] = clock(prep.device) - t0
    timings["total"] = clock(prep.device) - t_start
    return ExplainOutput(
        results=results, methods=tuple(s.name for s in specs), grid_h=prep.grid[0], grid_w=prep.grid[1],
        image_positions=prep.img_pos.cpu().numpy().astype(np.int64), seq_len=prep.n_full, forward_len=prep.n_fwd,
        num_layers=num_layers, argmax_matches=None if inputs.prompt_length is None else not mismatches,
        argmax_mismatches=mismatches, argmax_checked=prep.check_range, image_tokens_ok=prep.image_tokens_ok,
        batched=(used_batched and batched) if need_grad else None, score_kind=sel.kind, timings=timings,
    )


def explain_sequence(
    model: nn.Module,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None,
    token_type_ids: torch.Tensor | None,
    targets: Sequence[Target | tuple[int, int]],
    methods: Sequence[str] | str,
    *,
    attention_mask: torch.Tensor | None = None,
    prompt_length: int | None = None,
    **options: Any,
) -> ExplainOutput:
    """:func:`explain` with the sequence given as separate tensors (``input_ids`` (1, N),
    ``pixel_values``, ``token_type_ids`` (1, N) or ``None``, ``attention_mask`` (1, N) or
    ``None``, ``prompt_length``); ``options`` are :func:`explain`'s keyword arguments."""
    seq = SequenceInputs(input_ids, pixel_values, token_type_ids, attention_mask, prompt_length)
    return explain(model, seq, targets, methods, **options)
