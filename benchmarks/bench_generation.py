"""Generation throughput (not a test): batch 1 vs batched greedy decoding, measured in one run.

    python benchmarks/bench_generation.py [--samples 16] [--batch 8] [--new 32] [--device cpu|cuda] [--dtype float32|bfloat16]

A random Gemma 3 with MedGemma's 16 x 16 image-token grid (4 text layers, hidden 256) is built
offline; the same (image, prompt) pairs are decoded one by one and in batches through
`pipeline.generation.generate_batch`, and the answers are checked to be identical.
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.generation import generate_batch  # noqa: E402
from pipeline.model import load_model  # noqa: E402
from pipeline.tiny_model import build_tiny_gemma3  # noqa: E402

PROMPTS = ["Describe the findings in this chest X-ray.", "Is there a pleural effusion? Answer yes or no.",
           "Is there cardiomegaly? Answer yes or no.", "Is the heart bigger than normal? Answer yes or no."]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        build_tiny_gemma3(d, seed=0, text_layers=4, hidden=256, heads=4, kv_heads=2, head_dim=64, image_size=64,
                          patch_size=4, mm_tokens_per_image=256, sliding_window=512, max_position_embeddings=1024)
        lm = load_model(d, dtype=args.dtype, device=args.device)
        rng = np.random.default_rng(0)
        images = [Image.fromarray(rng.integers(0, 256, (256, 256), dtype=np.uint8)).convert("RGB")
                  for _ in range(args.samples)]
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.samples)]
        generate_batch(lm, images[:2], prompts[:2], max_new_tokens=4)  # warm-up

        def timed(bs: int):
            if lm.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = []
            for i in range(0, args.samples, bs):
                out += generate_batch(lm, images[i:i + bs], prompts[i:i + bs], max_new_tokens=args.new)
            if lm.device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t0, out

        t1, one = timed(1)
        tb, batched = timed(args.batch)
        same = all(a.sequence_ids == b.sequence_ids for a, b in zip(one, batched))
        tokens = sum(g.n_new_tokens for g in one)
        print(f"device {lm.device} ({platform.processor() or platform.machine()}), dtype {lm.dtype}, "
              f"{args.samples} samples, {tokens} new tokens")
        print(f"batch 1: {args.samples / t1:.2f} samples/s ({tokens / t1:.1f} tokens/s)")
        print(f"batch {args.batch}: {args.samples / tb:.2f} samples/s ({tokens / tb:.1f} tokens/s)")
        print(f"speed-up {t1 / tb:.2f}x; identical answers: {same}")


if __name__ == "__main__":
    main()
