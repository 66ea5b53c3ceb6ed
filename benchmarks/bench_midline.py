"""The patient's midline (metrics.midline) on real films: accuracy, the laterality criterion,
off-centre / letterboxed / flipped variants, NIH films and time per call (a script, not a test).

    python benchmarks/bench_midline.py [--no-variants] [--no-registration]

Data: ../shared/data/real_cxr beside the checkout when present, else the small copies in
tests/data/real_cxr.

Hannover films (lung masks: 1 = the patient's right lung, on the image's left; 2 = the left):
- truth: per row where both lungs exist, the midpoint between the right lung's medial edge and
  the left lung's; a least-squares line through those points; error = the found line minus the
  truth at mid-lung height (the middle of those rows), px and % of the width (+ = toward the
  image's right = the patient's left);
- criterion: each lung mask area-averaged onto a 16 x 16 grid (cells placed by non-uniform
  scaling), the share of its mass on the patient's left of the line (`left_of_midline_mask`):
  right lung <= 0.05 and left lung >= 0.95 to pass; shown for the masks as given and for
  re-registered masks (three films whose masks lie too far right, see tests/test_midline.py),
  and for the image's centre column (x = W / 2, the split used before);
- tune / hold: even / odd positions in metadata.csv (thresholds were chosen on "tune").
Variants: the film pasted into a frame 30 % wider at its left / right end (background the film's
air level or black), letterboxed (40 % black bars top + bottom or at the sides), flipped; the
error against the moved truth, and how far the line moved from "where the patient moved".
Time: `patient_midline` on 1024 x 1024 films, one thread, body mask excluded.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # one core, before numpy loads its BLAS

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import metrics  # noqa: E402
from metrics import midline as mid  # noqa: E402
from test_midline import MASK_OFFSET, VARIANTS, _shift, _split, _truth, _variant  # noqa: E402

cv2.setNumThreads(1)
SHARED = REPO.parent / "shared" / "data" / "real_cxr"
ROOT = SHARED if (SHARED / "hannover").is_dir() else REPO / "tests" / "data" / "real_cxr"


def _passes(right: float, left: float) -> bool:
    return right <= 0.05 and left >= 0.95


def _darkness(grey: np.ndarray, lungs: np.ndarray, dx: int) -> float:
    m = _shift(lungs, dx)
    beside = cv2.dilate(m.astype(np.uint8), np.ones((1, 31), np.uint8)).astype(bool) & ~m
    return float(grey[beside].mean() - grey[m].mean())


def hannover(variants: bool, registration: bool) -> None:
    meta = pd.read_csv(ROOT / "hannover" / "metadata.csv", dtype=str)
    rows, var_rows = [], []
    for pos, rec in enumerate(meta.itertuples()):
        img = np.asarray(Image.open(ROOT / "hannover" / "images" / f"{rec.image_id}.png"))
        lr = np.asarray(Image.open(ROOT / "hannover" / "masks_lr" / f"{rec.image_id}_lr.png"))
        h, w = lr.shape
        grey, body = metrics.to_grey01(img), metrics.body_mask(img)
        ml = mid.patient_midline(grey, body)
        reg = _shift(lr, MASK_OFFSET.get(rec.image_id, 0))
        ym, xm = _truth(reg)
        ys = [y for y in range(h) if (reg[y] == 1).any() and (reg[y] == 2).any()]
        truth_slope = np.polyfit(ys, [0.5 * (np.nonzero(reg[y] == 1)[0].max() + 1 + np.nonzero(reg[y] == 2)[0].min())
                                      for y in ys], 1)[0]
        err = float(ml.x_at(ym)) - xm
        r_given, l_given = _split(lr, ml)
        r_reg, l_reg = _split(reg, ml)
        r_ctr, l_ctr = _split(lr, mid.Midline(w / 2, 0.0, "image_centre", h, w))
        row = dict(id=rec.image_id, width=w, view=rec.projection.upper(), split="tune" if pos % 2 == 0 else "hold",
                   truth_x=xm, found_x=float(ml.x_at(ym)), err_px=err, err_pct=100 * err / w, slope=ml.slope,
                   truth_slope=truth_slope, score=ml.score, margin=ml.margin, source=ml.source,
                   right_given=r_given, left_given=l_given, right_reg=r_reg, left_reg=l_reg,
                   right_centre=r_ctr, left_centre=l_ctr, mask_offset=MASK_OFFSET.get(rec.image_id, 0))
        if registration:
            shifts = list(range(-70, 31, 2))
            row["best_offset"] = shifts[int(np.argmax([_darkness(grey, lr > 0, dx) for dx in shifts]))]
        rows.append(row)
        if variants:
            for name in VARIANTS:
                frame, masks, offset = _variant(img, reg, name)
                v = mid.patient_midline(metrics.to_grey01(frame), metrics.body_mask(frame))
                fy, fx = _truth(masks)
                if offset is None:
                    moved = float(v.x_at(h / 2)) - (w - float(ml.x_at(h / 2)))
                else:
                    moved = float(v.x_at(h / 2 + offset[1])) - (float(ml.x_at(h / 2)) + offset[0])
                vr, vl = _split(masks, v)
                fh, fw = masks.shape
                cr, cl = _split(masks, mid.Midline(fw / 2, 0.0, "image_centre", fh, fw))
                var_rows.append(dict(id=rec.image_id, variant=name, err_px=float(v.x_at(fy)) - fx, moved_px=moved,
                                     right=vr, left=vl, source=v.source, centre_ok=_passes(cr, cl)))
    df = pd.DataFrame(rows)
    pd.set_option("display.width", 250)
    pd.set_option("display.max_rows", 200)
    cols = ["id", "view", "split", "truth_x", "found_x", "err_px", "err_pct", "slope", "truth_slope", "score",
            "margin", "right_given", "left_given", "right_reg", "left_reg", "right_centre", "mask_offset"]
    if registration:
        cols.append("best_offset")
    print(f"Hannover films ({len(df)}, {ROOT}): x and errors in px (films {df.width.min()}-{df.width.max()} px "
          f"wide), at mid-lung height")
    shown = df[cols].round({"truth_x": 1, "found_x": 1, "err_px": 1, "err_pct": 2, "slope": 3, "truth_slope": 3,
                            "score": 3, "margin": 3, "right_given": 3, "left_given": 3, "right_reg": 3,
                            "left_reg": 3, "right_centre": 3})
    print(shown.to_string(index=False))
    print()
    for name, part in [("all", df), ("tune", df[df.split == "tune"]), ("hold", df[df.split == "hold"])]:
        e, pct = part.err_px.abs(), part.err_pct.abs()
        print(f"{name:5s} n={len(part):2d}  |error| median {e.median():.1f} px ({pct.median():.2f} % of the width), "
              f"p90 {e.quantile(0.9):.1f}, max {e.max():.1f} px ({pct.max():.2f} %); "
              f"signed mean {part.err_px.mean():+.1f}")
    worst = df.reindex(df.err_px.abs().sort_values(ascending=False).index).head(5)
    print("worst:", ", ".join(f"{r.id} {r.err_px:+.1f} px" for r in worst.itertuples()))
    ok_given = [_passes(r.right_given, r.left_given) for r in df.itertuples()]
    ok_reg = [_passes(r.right_reg, r.left_reg) for r in df.itertuples()]
    ok_ctr = [_passes(r.right_centre, r.left_centre) for r in df.itertuples()]
    print("criterion (right lung <= 0.05 and left lung >= 0.95 on the patient's left):")
    print(f"  midline, masks as given:      {sum(ok_given)}/{len(df)} pass; max right {df.right_given.max():.3f}, "
          f"min left {df.left_given.min():.3f}; fail: {[i for i, o in zip(df.id, ok_given) if not o]}")
    print(f"  midline, re-registered masks: {sum(ok_reg)}/{len(df)} pass; max right {df.right_reg.max():.3f}, "
          f"min left {df.left_reg.min():.3f}; fail: {[i for i, o in zip(df.id, ok_reg) if not o]}")
    print(f"  image centre, masks as given: {sum(ok_ctr)}/{len(df)} pass; max right {df.right_centre.max():.3f}, "
          f"min left {df.left_centre.min():.3f}; fail: {[i for i, o in zip(df.id, ok_ctr) if not o]}")
    print(f"sources: {df.source.value_counts().to_dict()}; min score {df.score.min():.3f}, "
          f"min margin {df.margin.min():.3f}")
    if var_rows:
        vd = pd.DataFrame(var_rows)
        print("\nvariants (error against the moved truth; 'moved' = line shift minus the patient's shift):")
        for name, part in vd.groupby("variant", sort=False):
            fails = [r.id for r in part.itertuples() if not _passes(r.right, r.left)]
            print(f"  {name:13s} |error| median {part.err_px.abs().median():5.1f} "
                  f"max {part.err_px.abs().max():5.1f} px; "
                  f"|moved| median {part.moved_px.abs().median():4.1f} max {part.moved_px.abs().max():5.1f} px; "
                  f"max right {part.right.max():.3f} min left {part.left.min():.3f}; criterion fails {fails}; "
                  f"fallbacks {int((part.source != 'image').sum())}; image-centre split passes "
                  f"{int(part.centre_ok.sum())}/{len(part)}")


def nih() -> list[np.ndarray]:
    paths = sorted((ROOT / "nih_cxr14" / "images").glob("*.png"))
    res, films = [], []
    for p in paths:
        img = np.asarray(Image.open(p))
        grey, body = metrics.to_grey01(img), metrics.body_mask(img)
        films.append((grey, body))
        ml = mid.patient_midline(grey, body)
        rows = np.nonzero(body.any(1))[0]
        top, bottom = rows[0], rows[-1] + 1
        inside = []
        for y in range(int(top + 0.25 * (bottom - top)), int(top + 0.75 * (bottom - top))):
            cols = np.nonzero(body[y])[0]
            x = float(ml.x_at(y + 0.5))
            inside.append(min(x - cols[0], cols[-1] + 1 - x) / (cols[-1] + 1 - cols[0]))
        res.append(dict(id=p.stem, x0=ml.x0, slope=ml.slope, score=ml.score, margin=ml.margin, source=ml.source,
                        inside=min(inside)))
    df = pd.DataFrame(res)
    print(f"\nNIH films ({len(df)}): sources {df.source.value_counts().to_dict()}; "
          f"|slope| max {df.slope.abs().max():.3f} "
          f"(median {df.slope.abs().median():.3f}); x0 from {df.x0.min():.0f} to {df.x0.max():.0f} px of 1024; "
          f"the line's distance to the nearer body edge over rows 25-75 % of the body, min {df.inside.min():.2f} of "
          f"the row's body width; min score {df.score.min():.3f}, min margin {df.margin.min():.3f}")
    return films


def timing(films) -> None:
    if not films:
        rng = np.random.default_rng(0)
        from pipeline.phantoms import make_phantom
        films = []
        for _ in range(10):
            img = make_phantom(rng, width=1024, height=1024).image
            films.append((metrics.to_grey01(img), metrics.body_mask(img)))
    films = [(g, b) for g, b in films if g.shape == (1024, 1024)]
    for g, b in films[:3]:
        mid.patient_midline(g, b)  # warm-up
    per, split = [], []
    for g, b in films:
        t = time.perf_counter()
        ml = mid.patient_midline(g, b)
        per.append(time.perf_counter() - t)
        t = time.perf_counter()
        metrics.cell_coverage(mid.left_of_midline_mask(ml), 16, 16)
        split.append(time.perf_counter() - t)
    per, split = 1000 * np.array(per), 1000 * np.array(split)
    print(f"\ntime per 1024 x 1024 film, one thread ({len(per)} films): "
          f"patient_midline median {np.median(per):.1f} ms, "
          f"p90 {np.percentile(per, 90):.1f}, max {per.max():.1f}; left_of_midline_mask + 16 x 16 cell shares "
          f"median {np.median(split):.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-variants", action="store_true", help="skip the off-centre / letterbox / flip variants")
    ap.add_argument("--no-registration", action="store_true", help="skip the mask registration search")
    args = ap.parse_args()
    hannover(not args.no_variants, not args.no_registration)
    timing(nih())


if __name__ == "__main__":
    main()
