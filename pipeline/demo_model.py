"""The embedded demo models (`model=demo`, `model=demo_shortcut`).

`data/demo_model` ships a small Gemma 3 vision-language model (MedGemma's architecture and
16 x 16 image-token grid, a tiny vocabulary) trained by `pipeline.train_demo` on the synthetic
chest radiograph phantoms, where the evidence for every answer lies in a known box. It loads
through the same code as MedGemma (`pipeline.model.load_model`) and carries its held-out
validation (`evaluation.json`), which the report shows. See docs/demo_model.md.

`data/demo_model_shortcut` is the deliberately flawed variant: its laterality words were trained
on images whose corner side marker always named the lesion's side.
"""
from __future__ import annotations

from pathlib import Path


class DemoModelMissing(FileNotFoundError):
    """A demo model's weights are not where they should be."""


def ensure_demo_model(path: Path) -> Path:
    """Return `path` if it holds a demo model's weights; otherwise raise DemoModelMissing saying
    how to restore or retrain them."""
    path = Path(path)
    if any(path.glob("*.safetensors")):
        return path
    variant = " --variant shortcut" if path.name.endswith("shortcut") else ""
    raise DemoModelMissing(
        f"the demo model's weights are missing: no *.safetensors in {str(path)!r}. They ship with the "
        f"repository (`git checkout -- data/{path.name}`); to retrain them (about 25 minutes on 2 CPU cores): "
        f"`python -m pipeline.train_demo --out data/{path.name}{variant}`."
    )
