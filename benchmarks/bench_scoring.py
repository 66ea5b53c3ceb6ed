"""Scoring throughput (a script, not a test), on one core.

    python benchmarks/bench_scoring.py [--maps 20000] [--images 20] [--grid 16]

Maps: 16 x 16 maps on a 1024 x 1024 image with a box, the body mask computed once.
- `MapScorer.score` per map (geometry cached per image and grid shape: O(cells) per map);
- `MapScorer.score_many` (the same, vectorised over a batch);
- `score_map` per map (rebuilds the geometry every call: O(H W) per map);
- a straightforward per-map implementation: upsample the map to the image's 1024 x 1024 pixels
  (each pixel takes the cell holding its centre, the cell's mass spread evenly over its pixels)
  and sum over pixel masks for every score.
Body masks: 1024 x 1024 radiographs (the real NIH films beside the checkout when present, else
phantoms), `body_mask` with its 256 px working copy vs the same algorithm at full resolution.
All are measured in the same run; ratios are printed against the straightforward versions.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # one core, before numpy loads its BLAS

import cv2  # noqa: E402
import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import metrics  # noqa: E402


def straightforward_score(grid: np.ndarray, body: np.ndarray, view: str, boxes: list) -> dict[str, float]:
    """Per-map reference: every score from the map upsampled to the image's pixels."""
    h, w = body.shape
    gh, gw = grid.shape
    iy = np.minimum(((np.arange(h) + 0.5) * gh / h).astype(int), gh - 1)
    ix = np.minimum(((np.arange(w) + 0.5) * gw / w).astype(int), gw - 1)
    counts = np.bincount(iy, minlength=gh)[:, None] * np.bincount(ix, minlength=gw)[None, :]
    total = float(grid.sum())
    per_pixel = (grid / counts)[iy][:, ix] / total  # sums to 1 over the image
    ring = np.ones((gh, gw), bool)
    ring[1:-1, 1:-1] = False
    rows = np.flatnonzero(body.any(axis=1))
    y0, y1 = rows[0], rows[-1] + 1
    cuts = np.round(y0 + (y1 - y0) * np.arange(4) / 3).astype(int)
    thirds = np.array([per_pixel[cuts[k]:cuts[k + 1]].sum() for k in range(3)])
    box = metrics.boxes_to_mask(boxes, h, w)
    p = grid / total
    nz = p[p > 0]
    vals = np.sort(grid.ravel())
    # Otsu over cell values, by brute force over every split
    best, thr = -1.0, None
    for k in range(1, vals.size):
        if vals[k] == vals[k - 1]:
            continue
        a, b = vals[:k], vals[k:]
        var = (k / vals.size) * (1 - k / vals.size) * (a.mean() - b.mean()) ** 2
        if var > best:
            best, thr = var, vals[k - 1]
    on = (grid > thr)[iy][:, ix]
    top = np.unravel_index(int(np.argmax(grid)), grid.shape)
    cx, cy = (top[1] + 0.5) * w / gw, (top[0] + 0.5) * h / gh
    return {
        "mass": total,
        "inside_body_ratio": float(per_pixel[body].sum()),
        "border_fraction": float(per_pixel[ring[iy][:, ix]].sum()),
        "entropy_bits": float(-(nz * np.log2(nz)).sum()),
        "patient_left_fraction": float(per_pixel[:, w // 2:].sum()) if metrics.is_frontal(view) else np.nan,
        "apical_fraction": float(thirds[0] / thirds.sum()),
        "pointing_hit": float(any(x <= cx < x + bw and y <= cy < y + bh for x, y, bw, bh in boxes)),
        "box_mass_fraction": float(per_pixel[box].sum()),
        "box_area_fraction": float(box.mean()),
        "box_iou": float((on & box).sum() / (on | box).sum()),
        "body_area_fraction": float(body.mean()),
    }


def _images(n: int, rng: np.random.Generator) -> tuple[list[np.ndarray], str]:
    nih = REPO.parent / "shared" / "data" / "real_cxr" / "nih_cxr14" / "images"
    if nih.is_dir():
        from PIL import Image

        files = sorted(nih.glob("*.png"))[:n]
        return [np.asarray(Image.open(f)) for f in files], f"{len(files)} NIH ChestX-ray14 films"
    from pipeline.phantoms import make_phantom

    return [make_phantom(rng, width=1024, height=1024, view="PA").image for _ in range(n)], f"{n} phantoms"


def _rate(fn, items) -> float:
    t0 = time.perf_counter()
    for it in items:
        fn(it)
    return len(items) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--maps", type=int, default=20000)
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--grid", type=int, default=16)
    args = ap.parse_args()
    cv2.setNumThreads(1)
    rng = np.random.default_rng(0)
    images, source = _images(args.images, rng)
    body = metrics.body_mask(images[0])
    boxes = [(300.0, 420.0, 180.0, 150.0)]
    g = args.grid
    grids = rng.random((args.maps, g, g)) ** 4

    scorer = metrics.MapScorer(body, "PA", boxes)
    scorer.score(grids[0])  # the geometry for this grid shape, built once
    cached = _rate(scorer.score, grids)
    t0 = time.perf_counter()
    scorer.score_many(grids)
    batch = args.maps / (time.perf_counter() - t0)
    n_ref = max(20, args.maps // 200)
    uncached = _rate(lambda x: metrics.score_map(x, body, "PA", boxes), grids[:n_ref])
    naive = _rate(lambda x: straightforward_score(x, body, "PA", boxes), grids[:n_ref])
    # the two agree (1024 / 16 = 64: every cell edge is a pixel edge); only the apical third's
    # cut, rounded to a whole pixel row here, differs slightly
    diffs = {}
    for x in grids[:20]:
        a, b = scorer.score(x), straightforward_score(x, body, "PA", boxes)
        for k in b:
            if np.isfinite(b[k]):
                diffs[k] = max(diffs.get(k, 0.0), abs(a[k] - b[k]))
    worst = max(diffs, key=diffs.get)

    masks = _rate(metrics.body_mask, images)
    n_full = max(2, len(images) // 5)
    masks_full = _rate(lambda im: metrics.body_mask(im, work_size=1024), images[:n_full])

    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cpus; one thread; "
          f"python {platform.python_version()}, numpy {np.__version__}, opencv {cv2.__version__}")
    print(f"map scoring, {g}x{g} maps on a {body.shape[1]}x{body.shape[0]} image with a box, body mask cached:")
    print(f"  MapScorer.score       {cached:>12,.0f} maps/s   ({1e6 / cached:.1f} us/map)")
    print(f"  MapScorer.score_many  {batch:>12,.0f} maps/s")
    print(f"  score_map (uncached)  {uncached:>12,.1f} maps/s")
    print(f"  straightforward       {naive:>12,.1f} maps/s   (pixel-level, per map)")
    print(f"  ratio cached / straightforward {cached / naive:,.0f}x, batch / straightforward {batch / naive:,.0f}x; "
          f"largest difference between them {diffs[worst]:.1e} ({worst})")
    print(f"body masks, {source}, 1024x1024:")
    print(f"  body_mask (256 px working copy)  {masks:8.1f} /s ({1e3 / masks:.1f} ms)")
    print(f"  same algorithm at full resolution {masks_full:7.2f} /s   ratio {masks / masks_full:.1f}x")


if __name__ == "__main__":
    main()
