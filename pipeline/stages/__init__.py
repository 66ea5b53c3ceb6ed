"""Stages: each reads the previous stages' tables from the run store and writes its own."""
from __future__ import annotations

from importlib import import_module
from typing import Callable

_MODULES = {
    "load": "pipeline.stages.load",
    "generate": "pipeline.stages.generate",
    "explain": "pipeline.stages.explain",
    "faithfulness": "pipeline.stages.faithfulness",
    "score": "pipeline.stages.score",
    "compact": "pipeline.stages.compact",
    "report": "pipeline.stages.report",
}


def get_stage(name: str) -> Callable:
    """The `run(ctx)` function of a stage (imported lazily: `load` does not need torch)."""
    return import_module(_MODULES[name]).run
