"""The method registry: every relevancy method is one function registered by name.

A method declares its family (see :mod:`pipeline.method_names`), what it needs and whether it
has a text map::

    @register_method("my_method", family="attention", needs=("attention",), text_map=False)
    def my_method(x: MethodInputs) -> torch.Tensor:
        \"\"\"One line for the methods table. Then the formula, units and citation.\"\"\"
        return ...  # (C, M) image-token map of the x.targets

The engine (:func:`pipeline.relevancy.explain_sequence`) runs one captured forward pass, the
batched vector-Jacobian products only when a requested method declared gradients, and calls
each method with a :class:`MethodInputs` holding the common fields plus exactly what it
declared (reading anything else raises ``AttributeError``).

Needs (:data:`NEEDS`):

- ``attention``: list over layers ``l = 0..L-1`` of the post-softmax probabilities ``A_l``
  (H, N, N), model dtype, detached;
- ``attention_readout``: (L, C, H, N) float32 ``w @ A_{l,h}``, the read-out rows' attention
  (shared by the attention mixes, computed once per sequence);
- ``attention_grads``: list over layers of ``d s / d A_l`` (C, H, N, N), model dtype: the
  gradients of the C targets' scores (batched VJPs; the method is called once per chunk);
- ``embeddings``: (M, D) image soft-token embeddings entering the language model, detached;
- ``embedding_grads``: (C, M, D) ``d s / d`` those embeddings (batched VJPs, per chunk);
- ``passes``: its own forward passes, after the shared graph is released: the model, the
  :class:`~.inputs.SequenceInputs`, the forwarded prefix's language-model inputs and the score
  selection (see :class:`OwnPasses`).

Return: a float32 tensor (C, N) over the forwarded positions when ``text_map`` (the image map is
read at the image positions), else (C, M) over the image tokens; or a :class:`MethodOutput`
adding per-target diagnostics (e.g. ``completeness_error``). Maps must be finite and
non-negative.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline import method_names

from .inputs import SequenceInputs

__all__ = [
    "NEEDS",
    "GRADIENT_NEEDS",
    "MethodInputs",
    "MethodOutput",
    "MethodSpec",
    "OwnPasses",
    "call_method",
    "get_method",
    "methods_table",
    "register_method",
    "registered",
    "resolve_methods",
    "unregister_method",
]

NEEDS: tuple[str, ...] = (
    "attention", "attention_readout", "attention_grads", "embeddings", "embedding_grads", "passes",
)
#: needs served per chunk of targets by the batched vector-Jacobian products
GRADIENT_NEEDS: frozenset[str] = frozenset({"attention_grads", "embedding_grads"})


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: ``fn(MethodInputs) -> Tensor | MethodOutput``."""

    name: str
    family: str
    needs: frozenset[str]
    text_map: bool
    fn: Callable[[MethodInputs], Any]
    summary: str

    @property
    def per_chunk(self) -> bool:
        """Called once per gradient chunk (it declared attention or embedding gradients)."""
        return bool(self.needs & GRADIENT_NEEDS)

    @property
    def own_passes(self) -> bool:
        """Runs its own forward passes (after the shared one)."""
        return "passes" in self.needs


@dataclass
class MethodOutput:
    """A map (see the module docstring) plus per-target float32 diagnostics, each (C,)."""

    maps: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class OwnPasses:
    """What a method with its own passes gets (need ``passes``).

    ``model``; ``sequence`` the whole sequence as given; ``prefix`` the forwarded prefix's
    language-model inputs (``input_ids``, ``token_type_ids``, ``attention_mask``,
    ``position_ids``, each (1, n) on the model's device or ``None``), ``embeds`` (1, n, D) its
    language-model input embeddings (model dtype, detached), ``keep`` the kept logit rows and
    ``score`` the :class:`~.scores.ScoreSelection` (over kept rows) of the targets.
    """

    model: torch.nn.Module
    sequence: SequenceInputs
    prefix: dict[str, torch.Tensor | None]
    embeds: torch.Tensor
    keep: torch.Tensor
    score: Any


class MethodInputs:
    """What one method call gets. Always: ``targets`` (the C targets of this call),
    ``target_index`` (their indices among all targets), ``readout`` (C, N) float32 read-out
    weights ``w``, ``image_positions`` (M,) long, ``grid`` (grid_h, grid_w), ``seed`` (the
    ``random`` method's base seed), ``options`` (the engine's keyword options, a dict). The
    declared needs are attributes of the same names; others raise ``AttributeError``."""

    def __init__(self, method: str, common: dict[str, Any], declared: dict[str, Any]):
        self.method = method
        self.declared = frozenset(declared)
        self.__dict__.update(common)
        self.__dict__.update(declared)

    def __getattr__(self, name: str) -> Any:
        if name in NEEDS:
            raise AttributeError(f"method {self.method!r} did not declare {name!r} (its needs: "
                                 f"{', '.join(sorted(self.declared)) or 'none'})")
        raise AttributeError(name)


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(name: str, *, family: str, needs: Sequence[str] = (), text_map: bool = False,
                    replace: bool = False) -> Callable[[Callable], Callable]:
    """Decorator registering ``fn`` as method ``name`` (see the module docstring).

    The summary in the methods table is the first line of ``fn``'s docstring. ``replace`` allows
    re-registering a name (tests)."""
    unknown = set(needs) - set(NEEDS)
    if unknown:
        raise ValueError(f"method {name!r}: unknown needs {sorted(unknown)}; known: {', '.join(NEEDS)}")
    if family not in method_names.FAMILIES:
        raise ValueError(f"method {name!r}: unknown family {family!r}; known: {', '.join(method_names.FAMILIES)}")

    def decorate(fn: Callable) -> Callable:
        if name in _REGISTRY and not replace:
            raise ValueError(f"method {name!r} is already registered")
        doc = inspect.getdoc(fn) or ""
        spec = MethodSpec(name, family, frozenset(needs), bool(text_map), fn, doc.split("\n\n")[0].replace("\n", " "))
        method_names.declare(name, family)
        _REGISTRY[name] = spec
        return fn

    return decorate


def unregister_method(name: str) -> None:
    """Remove a method registered at run time (built-in methods stay)."""
    if name in method_names.BUILTIN:
        raise ValueError(f"{name!r} is a built-in method")
    _REGISTRY.pop(name, None)
    method_names.forget(name)


def registered() -> dict[str, MethodSpec]:
    """name -> spec of every registered method, in registration order."""
    _load_builtins()
    return dict(_REGISTRY)


def get_method(name: str) -> MethodSpec:
    """The spec of ``name``; ``ValueError`` naming the known methods when unknown."""
    _load_builtins()
    if name not in _REGISTRY:
        raise ValueError(f"unknown relevancy method {name!r}; known: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def resolve_methods(methods: Sequence[str] | str) -> tuple[MethodSpec, ...]:
    """Specs of ``methods`` (a name or names), duplicates dropped, order kept."""
    if isinstance(methods, str):
        methods = (methods,)
    specs = tuple(get_method(m) for m in dict.fromkeys(methods))
    if not specs:
        raise ValueError("no relevancy method requested")
    return specs


def methods_table() -> str:
    """The Markdown methods table of docs/methods.md, from the registry (built-in order)."""
    specs = registered()
    order = list(method_names.BUILTIN) + [n for n in specs if n not in method_names.BUILTIN]
    lines = ["| method | family | needs | text map | what |", "|---|---|---|---|---|"]
    for name in order:
        s = specs[name]
        needs = ", ".join(n for n in NEEDS if n in s.needs) or "-"
        lines.append(f"| `{name}` | {s.family} | {needs} | {'yes' if s.text_map else 'no'} | {s.summary} |")
    return "\n".join(lines)


def _load_builtins() -> None:
    from . import library  # noqa: F401  (registers the built-in methods on import)


def call_method(spec: MethodSpec, common: dict[str, Any], available: dict[str, Any]) -> MethodOutput:
    """Call ``spec`` with the common fields and exactly its declared needs from ``available``."""
    missing = spec.needs - set(available)
    if missing:
        raise RuntimeError(f"method {spec.name!r}: the engine did not provide {sorted(missing)}")
    out = spec.fn(MethodInputs(spec.name, common, {k: available[k] for k in spec.needs}))
    return out if isinstance(out, MethodOutput) else MethodOutput(out)

