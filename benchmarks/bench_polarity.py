"""Polarity (inversion) detection of `metrics.body_mask` on real radiographs and their variants (a
script, not a test), on one core.

    python benchmarks/bench_polarity.py [--against REV] [--repeats 3]

Films: the 40 Hannover films (expert lung masks) and 58 NIH ChestX-ray14 films beside the
checkout (../shared/data/real_cxr), else the small copies in tests/data/real_cxr. Variants: those
of tests/test_body_variants.py (inverted, 16-bit, 12-bit in 16-bit, letterbox / pillarbox bars in
black and white, off-centre in a larger frame of flat or noisy background, combinations), all at
full size. Printed:

- per variant: display films read as inverted (false alarms) or inverted films not read as
  inverted (misses), Hannover and NIH; for Hannover the smallest share of lung-mask pixels inside
  the auto body mask, bodies in more than one piece, and the largest share of the added padding /
  background inside the body;
- per cue of `tissue_is_dark`: its false votes on display originals and its votes on inverted
  ones, per set, with the display film closest to voting (held-out view: a threshold set on one
  set, checked on the other);
- time per `body_mask` call on the 1024 x 1024 NIH films (automatic polarity), and with
  `--against REV` the same for metrics/body.py as of git revision REV (e.g. the commit before a
  change), with the ratio.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # one core, before numpy loads its BLAS

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from scipy import ndimage  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import metrics  # noqa: E402
from metrics.body import polarity_cues  # noqa: E402
from test_body_variants import _hannover_ids, _nih_paths, _root, variants  # noqa: E402

cv2.setNumThreads(1)


def load_films():
    """[(set, id, uint8 grey film, lung mask or None)]"""
    films = []
    for i in _hannover_ids():
        root = _root("hannover")
        img = np.asarray(Image.open(root / "images" / f"{i}.png"))
        films.append(("hannover", i, img, np.asarray(Image.open(root / "masks_lr" / f"{i}_lr.png")) > 0))
    for p in _nih_paths():
        films.append(("nih", p.stem, np.asarray(Image.open(p).convert("L")), None))
    return films


def variant_table(films) -> dict:
    rows = defaultdict(lambda: {"n": 0, "wrong": 0, "lung_min": float("nan"), "pieces": 0, "off_film": 0.0,
                                "ids": []})
    for s, i, img, lung in films:
        for v in variants(img, lung):
            r = rows[(s, v.name)]
            r["inverted"] = v.inverted
            r["n"] += 1
            if polarity_cues(v.image)["inverted"] != v.inverted:
                r["wrong"] += 1
                r["ids"].append(i)
            body = metrics.body_mask(v.image)
            if lung is not None:
                inside = float((body & v.lung).sum() / v.lung.sum())
                r["lung_min"] = inside if np.isnan(r["lung_min"]) else min(r["lung_min"], inside)
            r["pieces"] += ndimage.label(body)[1] != 1
            if (~v.film).any():
                r["off_film"] = max(r["off_film"], float(body[~v.film].mean()))
    return rows


CUES = {  # cue -> (when it votes "inverted" on a film read as it is, the test)
    "mediastinum": ("< -0.1", lambda c: c["mediastinum"] < -0.1),
    "band": ("< -0.05", lambda c: c["band"] < -0.05),
    "abdomen": ("< -0.05", lambda c: c["abdomen"] < -0.05),
    "shape": ("dU >= 0.1, U_flipped <= 0.1", lambda c: c["vote_by"]["shape"] > 0),
    "air": ("ring rule, > 0", lambda c: c["vote_by"]["air"] > 0),
}


def _shape_du(c: dict) -> float:
    """The shape cue's dU where its second condition (U_flipped <= 0.1) holds, else -1."""
    return c["unexplained_as_is"] - c["unexplained_flipped"] if c["unexplained_flipped"] <= 0.1 else -1.0


def cue_table(films) -> None:
    per = {s: {"display": [], "inverted": []} for s in ("hannover", "nih")}
    for s, i, img, _ in films:
        per[s]["display"].append((i, polarity_cues(img)))
        per[s]["inverted"].append((i, polarity_cues(255 - img)))
    print("\nCues on the originals: false votes on display films / votes on the inverted copies, of n films")
    print(f"{'cue':<12} {'votes when':<28} {'Hannover':>14} {'NIH':>14}")
    for name, (desc, votes) in CUES.items():
        cells = [f"{sum(votes(c) for _, c in per[s]['display'])} / {sum(votes(c) for _, c in per[s]['inverted'])} "
                 f"of {len(per[s]['display'])}" for s in ("hannover", "nih")]
        print(f"{name:<12} {desc:<28} {cells[0]:>14} {cells[1]:>14}")
    for s in ("hannover", "nih"):
        for kind in ("display", "inverted"):
            hist = defaultdict(int)
            for _, c in per[s][kind]:
                hist[c["votes"]] += 1
            print(f"{s} {kind}: films by vote total {dict(sorted(hist.items()))} (read as inverted from 2)")
    print("\nHeld out. The display film closest to a false vote, per set:")
    for s in ("hannover", "nih"):
        d = per[s]["display"]
        closest = {k: min(d, key=lambda t, k=k: t[1][k]) for k in ("mediastinum", "band", "abdomen")}
        shape = max(d, key=lambda t: _shape_du(t[1]))
        print(f"  {s}: " + ", ".join(f"{k} {t[1][k]:+.3f} ({t[0]})" for k, t in closest.items())
              + f", shape dU {_shape_du(shape[1]):+.3f} ({shape[0]})")
    print("Thresholds of the two new cues set on one set alone, checked on the other:")
    for fit, check in (("hannover", "nih"), ("nih", "hannover")):
        # abdomen: half-way between 0 and the fitting set's closest display film
        t = -0.5 * min(c["abdomen"] for _, c in per[fit]["display"])
        fa = sum(c["abdomen"] < t for _, c in per[check]["display"])
        found = sum(c["abdomen"] < t for _, c in per[check]["inverted"])
        # shape: the next multiple of 0.05 above the fitting set's largest display dU
        u = 0.05 * (np.floor(max(_shape_du(c) for _, c in per[fit]["display"]) / 0.05) + 1)
        sfa = sum(_shape_du(c) >= u for _, c in per[check]["display"])
        sfound = sum(_shape_du(c) >= u for _, c in per[check]["inverted"])
        n = len(per[check]["inverted"])
        print(f"  set on {fit}: abdomen < {t:+.3f} -> on {check} {fa} false votes, {found} of {n} inverted voted; "
              f"shape dU >= {u:.2f} -> {sfa} false votes, {sfound} of {n} inverted voted")


def timing(films, against: str | None, repeats: int) -> None:
    imgs = [img for s, _, img, _ in films if s == "nih" and img.shape == (1024, 1024)]
    if not imgs:
        print("\nno 1024 x 1024 NIH films for the timing")
        return
    impls = [("this checkout", metrics.body_mask)]
    if against:
        code = subprocess.run(["git", "show", f"{against}:metrics/body.py"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "body_at_rev.py"
            path.write_text(code)
            spec = importlib.util.spec_from_file_location("body_at_rev", path)
            old = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(old)
        impls.append((f"at {against}", old.body_mask))
    best = {}
    for _ in range(repeats):  # interleaved, so both see the same machine load
        for name, fn in impls:
            t = time.perf_counter()
            for img in imgs:
                fn(img)
            per_call = (time.perf_counter() - t) / len(imgs)
            best[name] = min(best.get(name, per_call), per_call)
    print(f"\nbody_mask per call on {len(imgs)} 1024 x 1024 NIH films (best of {repeats}, one core):")
    for name, _ in impls:
        print(f"  {name:<20} {1000 * best[name]:7.2f} ms")
    if against:
        print(f"  ratio {best['this checkout'] / best[f'at {against}']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--against", help="git revision whose metrics/body.py to time against (e.g. HEAD before "
                                      "committing)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    films = load_films()
    print(f"{sum(s == 'hannover' for s, *_ in films)} Hannover and {sum(s == 'nih' for s, *_ in films)} NIH films")
    rows = variant_table(films)
    print(f"\n{'variant':<24} {'polarity':<9} {'Hannover wrong':>15} {'NIH wrong':>10} {'lung in body min':>17} "
          f"{'not 1 piece':>12} {'pad in body max':>16}")
    names = list(dict.fromkeys(name for _, name in rows))
    for name in names:
        h, n = rows[("hannover", name)], rows[("nih", name)]
        kind = "inverted" if h["inverted"] else "display"
        print(f"{name:<24} {kind:<9} {h['wrong']:>8} of {h['n']:<3} {n['wrong']:>4} of {n['n']:<3} "
              f"{h['lung_min']:>17.3f} {h['pieces'] + n['pieces']:>12} {max(h['off_film'], n['off_film']):>16.3f}")
    wrong = defaultdict(set)
    for (s, name), r in rows.items():
        for i in r["ids"]:
            wrong[(s, "missed" if r["inverted"] else "FALSE ALARM")].add(i)
    for (s, kind), ids in sorted(wrong.items()):
        print(f"  {s} {kind}: {', '.join(sorted(ids))}")
    totals = {k: [0, 0] for k in ("display", "inverted")}
    for r in rows.values():
        t = totals["inverted" if r["inverted"] else "display"]
        t[0] += r["wrong"]
        t[1] += r["n"]
    print(f"false alarms {totals['display'][0]} of {totals['display'][1]} display films and variants; "
          f"misses {totals['inverted'][0]} of {totals['inverted'][1]} inverted ones")
    cue_table(films)
    timing(films, args.against, args.repeats)


if __name__ == "__main__":
    main()
