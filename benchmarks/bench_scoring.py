"""Scoring throughput (not a test): maps per second on one core with the body mask cached, and body
masks per second on 1024 x 1024 images; each against a reference measured in the same run.

    python benchmarks/bench_scoring.py [--maps 20000] [--images 20]

Reference for map scoring: `metrics.score_map` per map (rebuilds the image geometry every call).
Reference for body masks: the same algorithm run at full resolution (work_size = 1024).
"""
from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core

import cv2  # noqa: E402
import numpy as np  # noqa: E402

import metrics  # noqa: E402
from pipeline.phantoms import make_phantom  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--maps", type=int, default=20000)
    ap.add_argument("--images", type=int, default=20)
    args = ap.parse_args()
    cv2.setNumThreads(1)
    rng = np.random.default_rng(0)
    ph = make_phantom(rng, width=1024, height=1024, view="PA", findings=["Nodule"])
    body = metrics.body_mask(ph.image)
    boxes = [l.box for l in ph.lesions]
    grids = rng.random((args.maps, 16, 16)) ** 4

    scorer = metrics.MapScorer(body, "PA", boxes)
    scorer.score(grids[0])  # geometry for 16 x 16 built once
    t0 = time.perf_counter()
    for g in grids:
        scorer.score(g)
    cached = args.maps / (time.perf_counter() - t0)

    n_ref = max(20, args.maps // 100)
    t0 = time.perf_counter()
    for g in grids[:n_ref]:
        metrics.score_map(g, body, "PA", boxes)
    per_map = n_ref / (time.perf_counter() - t0)

    images = [make_phantom(rng, width=1024, height=1024, view="PA").image for _ in range(args.images)]
    t0 = time.perf_counter()
    for im in images:
        metrics.body_mask(im)
    masks = args.images / (time.perf_counter() - t0)
    n_full = max(2, args.images // 5)
    t0 = time.perf_counter()
    for im in images[:n_full]:
        metrics.body_mask(im, work_size=1024)
    masks_full = n_full / (time.perf_counter() - t0)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, 1 thread")
    print(f"map scoring, 16x16 grid on 1024x1024, boxes: {cached:,.0f} maps/s cached (MapScorer)  vs "
          f"{per_map:,.1f} maps/s uncached (score_map)  ratio {cached / per_map:,.0f}x")
    print(f"body masks, 1024x1024: {masks:,.1f} /s (256 px working copy)  vs {masks_full:,.2f} /s full resolution  "
          f"ratio {masks / masks_full:,.1f}x")


if __name__ == "__main__":
    main()
