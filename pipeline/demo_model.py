"""The embedded demo model directory (`model=demo`).

If `data/demo_model` holds no weights, a small randomly initialised Gemma 3 with MedGemma's
16 x 16 image-token grid is built there (seeded, deterministic, offline) so that the demo runs
end to end through the same loading code as MedGemma. Its answers and maps carry no medical
meaning; they exercise the machinery.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

DEMO_SEED = 0


def ensure_demo_model(path: Path) -> Path:
    """Return `path`, building the random demo model there first if it has no weights."""
    path = Path(path)
    if any(path.glob("*.safetensors")):
        return path
    from pipeline.tiny_model import build_tiny_gemma3

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-model-", dir=path.parent))
    try:
        build_tiny_gemma3(tmp, seed=DEMO_SEED, text_layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16,
                          image_size=64, patch_size=4, mm_tokens_per_image=256, sliding_window=512,
                          max_position_embeddings=1024)
        if path.exists() and not any(path.glob("*.safetensors")):
            shutil.rmtree(path)
        try:
            os.replace(tmp, path)
        except OSError:  # built concurrently by another process
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
