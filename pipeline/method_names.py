"""Names and families of the relevancy methods (config values; stable across versions).

No torch here, so the configuration can validate ``explain.methods`` cheaply. The methods
themselves live in :mod:`pipeline.relevancy.library`, registered with
:func:`pipeline.relevancy.registry.register_method`; ``tests/test_methods_registry.py`` checks
that :data:`BUILTIN` lists exactly the registered built-in methods with the same families.
A method registered at run time (a plug-in, a test) is added here by the registry through
:func:`declare`, so validation knows it too.

Families:

- ``attention``: functions of the captured attention probabilities (no gradient);
- ``gradient``: need gradients of the target score (attention or embedding gradients of the
  shared forward pass, or their own gradient passes); they explain ``explain.score``;
- ``perturbation``: re-run the model on perturbed inputs (no gradient);
- ``floor``: target-independent baselines (a random map, the embeddings' norm).
"""
from __future__ import annotations

FAMILIES: tuple[str, ...] = ("attention", "gradient", "perturbation", "floor")

#: name -> family of the built-in methods, in the order the documentation lists them.
BUILTIN: dict[str, str] = {
    "chefer": "gradient",
    "legrad": "gradient",
    "gradcam": "gradient",
    "integrated_gradients": "gradient",
    "attnlrp": "gradient",
    "raw_attention": "attention",
    "rollout": "attention",
    "layer_weighted": "attention",
    "head_importance": "attention",
    "attention_flow": "attention",
    "consensus": "attention",
    "occlusion": "perturbation",
    "activation_norm": "floor",
    "random": "floor",
}

_KNOWN: dict[str, str] = dict(BUILTIN)


def declare(name: str, family: str) -> None:
    """Make ``name`` a valid method name of ``family`` (called by the registry)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown method family {family!r}; known: {', '.join(FAMILIES)}")
    if _KNOWN.get(name, family) != family:
        raise ValueError(f"method {name!r} is already declared with family {_KNOWN[name]!r}")
    _KNOWN[name] = family


def forget(name: str) -> None:
    """Remove a method declared at run time (built-in names stay)."""
    if name not in BUILTIN:
        _KNOWN.pop(name, None)


def known_methods() -> tuple[str, ...]:
    """Every valid method name: the built-in ones, then those declared at run time."""
    return tuple(_KNOWN)


def family_of(name: str) -> str:
    """The family of method ``name`` (KeyError if unknown)."""
    return _KNOWN[name]


def methods_of(*families: str) -> tuple[str, ...]:
    """Known method names of the given families, in :func:`known_methods` order."""
    return tuple(n for n, f in _KNOWN.items() if f in families)


#: Built-in names (a constant: the configuration's schema and older callers use it).
ALL_METHODS: tuple[str, ...] = tuple(BUILTIN)
