"""Body masks of real radiographs under what datasets do to films: inverted grey values
(MONOCHROME1 shown raw), 16-bit and 12-bit-in-16-bit storage, letterbox and pillarbox bars (black
and white), a film pasted off-centre into a larger frame of background (flat, or noisy air), and
combinations. The variants are built here from the real films, and each Hannover lung mask is
transformed with its film.

- Every Hannover film and variant: at least 95 % of the lung-mask pixels inside the body, the body
  one connected piece, and off the padding or background added around the film (at most 1 % of
  it inside the body; 5 % for noisy air, where the body's outline is only as sharp as the mask's
  256 px working copy).
- Display-convention films (Hannover and NIH) and their variants are never read as inverted: the
  body equals the one found with `inverted=False`.
- Inverted variants are mostly recognised as such (the body equals the one with `inverted=True`).

Uses the full sets beside the checkout when present (../shared/data/real_cxr), else the small
copies in tests/data/real_cxr; skipped only when neither is there.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage

import metrics
from conftest import DATA, SHARED


def _root(name: str) -> Path:
    return SHARED / name if (SHARED / name).is_dir() else DATA / "real_cxr" / name


def _hannover_ids() -> list[str]:
    meta = _root("hannover") / "metadata.csv"
    return pd.read_csv(meta, dtype=str)["image_id"].tolist() if meta.is_file() else []


def _nih_paths() -> list[Path]:
    return sorted((_root("nih_cxr14") / "images").glob("*.png"))


@dataclass
class Variant:
    name: str
    image: np.ndarray
    lung: np.ndarray  # the lung mask moved with the film (all False when there is none)
    film: np.ndarray  # True on the original film's pixels, False on added padding / background
    inverted: bool  # tissue dark, air bright


def pad(a: np.ndarray, top: int, bottom: int, left: int, right: int, value) -> np.ndarray:
    """`a` inside a frame of constant `value` (top, bottom, left, right pixels wide)."""
    h, w = a.shape
    out = np.full((h + top + bottom, w + left + right), value, a.dtype)
    out[top:top + h, left:left + w] = a
    return out


def air_frame(img: np.ndarray, top: int, bottom: int, left: int, right: int, seed: int = 0) -> np.ndarray:
    """uint8 `img` inside a frame of noisy air: the film's own 1st-percentile grey, plus noise of
    standard deviation 2 (not flat enough to be padding for every line)."""
    h, w = img.shape
    rng = np.random.default_rng(seed)
    out = float(np.percentile(img, 1)) + 2.0 + rng.normal(0.0, 2.0, (h + top + bottom, w + left + right))
    out = np.clip(out, 0, 255).astype(np.uint8)
    out[top:top + h, left:left + w] = img
    return out


def variants(img: np.ndarray, lung: np.ndarray | None = None) -> list[Variant]:
    """The variants of a uint8 display-convention film `img` (H x W), with `lung` moved along."""
    h, w = img.shape
    lung = np.zeros((h, w), bool) if lung is None else lung
    ones = np.ones((h, w), bool)
    inv = 255 - img
    u16, u12 = img.astype(np.uint16) * 257, img.astype(np.uint16) * 16 + 100  # 12 bits, an offset
    inv_u12 = inv.astype(np.uint16) * 16 + 100
    out = [Variant("orig", img, lung, ones, False), Variant("inv", inv, lung, ones, True),
           Variant("u16", u16, lung, ones, False), Variant("inv_u16", 65535 - u16, lung, ones, True),
           Variant("u12", u12, lung, ones, False), Variant("inv_u12", inv_u12, lung, ones, True)]
    bh, bw = int(0.2 * h), int(0.2 * w)
    for colour, value in (("black", 0), ("white", 255)):
        for box, (t, b, l, r) in (("lb", (bh, bh, 0, 0)), ("pb", (0, 0, bw, bw))):  # letterbox, pillarbox
            moved, film = pad(lung, t, b, l, r, False), pad(ones, t, b, l, r, False)
            out.append(Variant(f"{box}_{colour}", pad(img, t, b, l, r, value), moved, film, False))
            out.append(Variant(f"inv_{box}_{colour}", pad(inv, t, b, l, r, value), moved, film, True))
    t, b, l, r = int(0.05 * h), int(0.45 * h), int(0.5 * w), int(0.1 * w)  # shifted up and right
    moved, film = pad(lung, t, b, l, r, False), pad(ones, t, b, l, r, False)
    framed, noisy = pad(img, t, b, l, r, 0), air_frame(img, t, b, l, r)
    out += [Variant("offc_black", framed, moved, film, False),
            Variant("inv_offc_white", 255 - framed, moved, film, True),
            Variant("inv_offc_black", pad(inv, t, b, l, r, 0), moved, film, True),
            Variant("offc_air", noisy, moved, film, False),
            Variant("inv_offc_air", 255 - noisy, moved, film, True)]
    big16 = pad(u16, t, b, l, r, 0)  # 16-bit, off-centre, then letterboxed
    moved2, film2 = pad(moved, bh, bh, 0, 0, False), pad(film, bh, bh, 0, 0, False)
    out += [Variant("u16_offc_lb_white", pad(big16, bh, bh, 0, 0, 65535), moved2, film2, False),
            Variant("inv_u16_offc_lb_black", pad(65535 - big16, bh, bh, 0, 0, 0), moved2, film2, True)]
    return out


@dataclass
class Outcome:
    name: str
    inverted: bool
    lung_inside: float  # share of the lung-mask pixels inside the body (nan without a lung mask)
    pieces: int  # connected components of the body
    off_film: float  # share of the added padding / background inside the body (0 without any)
    as_forced: bool  # the body equals the one found with the true polarity forced

    @property
    def off_film_limit(self) -> float:
        return 0.05 if self.name.endswith("offc_air") else 0.01


def evaluate(v: Variant) -> Outcome:
    body = metrics.body_mask(v.image)
    assert body.shape == v.image.shape[:2] and body.dtype == bool
    lung = v.lung.sum()
    outside = ~v.film
    return Outcome(v.name, v.inverted, float((body & v.lung).sum() / lung) if lung else float("nan"),
                   int(ndimage.label(body)[1]), float(body[outside].mean()) if outside.any() else 0.0,
                   bool(np.array_equal(body, metrics.body_mask(v.image, inverted=v.inverted))))


@lru_cache(maxsize=None)
def hannover_outcomes(image_id: str) -> tuple[Outcome, ...]:
    root = _root("hannover")
    img = np.asarray(Image.open(root / "images" / f"{image_id}.png"))
    lung = np.asarray(Image.open(root / "masks_lr" / f"{image_id}_lr.png")) > 0
    return tuple(evaluate(v) for v in variants(img, lung))


NIH_VARIANTS = {"u12", "inv", "inv_u16", "lb_white", "inv_lb_black", "pb_black", "inv_pb_white", "offc_air",
                "inv_offc_white", "inv_offc_air", "u16_offc_lb_white", "inv_u16_offc_lb_black"}


@lru_cache(maxsize=None)
def nih_outcomes(path: Path) -> tuple[Outcome, ...]:
    """A subset of the variants, of the film area-averaged to 512 px (to keep the test short; the
    1024 px originals are checked in test_real_cxr_metrics, all variants at full size by
    benchmarks/bench_polarity.py)."""
    img = Image.open(path).convert("L")  # the RGBA files: their grey values
    img = np.asarray(img.resize((512, 512), Image.BOX) if max(img.size) > 512 else img)
    return tuple(evaluate(v) for v in variants(img) if v.name in NIH_VARIANTS)


if not _hannover_ids() and not _nih_paths():
    pytest.skip("no real radiographs: neither ../shared/data/real_cxr nor tests/data/real_cxr", allow_module_level=True)


@pytest.mark.parametrize("image_id", _hannover_ids())
def test_hannover_variants_keep_the_lungs(image_id):
    for o in hannover_outcomes(image_id):
        assert o.lung_inside >= 0.95, o
        assert o.pieces == 1, o
        assert o.off_film <= o.off_film_limit, o
        if not o.inverted:
            assert o.as_forced, o  # a display-convention film is never read as inverted


@pytest.mark.parametrize("path", _nih_paths(), ids=lambda p: p.stem)
def test_nih_variants_display_films_never_flipped(path):
    for o in nih_outcomes(path):
        assert o.pieces == 1 and o.off_film <= o.off_film_limit, o
        if not o.inverted:
            assert o.as_forced, o


def test_inverted_variants_are_recognised():
    """Measured on the full sets: every inverted Hannover variant but those of b39f5cf9 (a patient
    off-centre with the mediastinum cues weak; its body still holds all the lungs) and every
    inverted NIH variant but those of 00001511_000 are found: 39 / 40 and 57 / 58 per variant."""
    outcomes = [o for i in _hannover_ids() for o in hannover_outcomes(i)]
    outcomes += [o for p in _nih_paths() for o in nih_outcomes(p)]
    inverted = [o for o in outcomes if o.inverted]
    found = sum(o.as_forced for o in inverted)
    assert found >= 0.95 * len(inverted) or len(inverted) < 100, (found, len(inverted))
    assert found >= 0.8 * len(inverted)
