"""Body masks on synthetic and phantom images: framed and edge-to-edge bodies, inverted, RGBA,
16-bit input, side markers in corners."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

import metrics
from pipeline.phantoms import make_phantom


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


@pytest.fixture(scope="module")
def phantoms():
    rng = np.random.default_rng(7)
    return [make_phantom(rng, width=w, height=h, view=v, side_marker="auto")
            for w, h, v in [(256, 256, "PA"), (320, 256, "AP"), (256, 320, "PA"), (256, 256, "AP")]]


def test_phantom_bodies(phantoms):
    for ph in phantoms:
        m = metrics.body_mask(ph.image)
        assert m.shape == ph.image.shape and m.dtype == bool
        assert _iou(m, ph.body_mask) > 0.9
        lungs = ph.lung_mask > 0
        assert (m & lungs).sum() / lungs.sum() > 0.99  # the dark lungs are inside the body


def test_side_marker_is_excluded(phantoms):
    marked = [p for p in phantoms if p.marker is not None]
    assert marked
    for ph in marked:
        x, y, w, h = (int(round(v)) for v in ph.marker_box)
        m = metrics.body_mask(ph.image)
        letter = ph.image[y:y + h, x:x + w] > 128
        assert m[y:y + h, x:x + w][letter].mean() < 0.05


def test_edge_to_edge_body():
    ph = make_phantom(np.random.default_rng(3), width=256, height=256, view="AP", edge_to_edge=True)
    m = metrics.body_mask(ph.image)
    assert m.mean() > 0.9 and (m & (ph.lung_mask > 0)).sum() / (ph.lung_mask > 0).sum() > 0.98


def test_inverted_rgba_and_16bit_inputs(phantoms):
    ph = phantoms[0]
    ref = metrics.body_mask(ph.image)
    inverted = 255 - ph.image
    assert _iou(metrics.body_mask(inverted, inverted=True), ref) > 0.98
    assert _iou(metrics.body_mask(inverted, inverted=None), ref) > 0.98  # detected
    rgba = np.dstack([ph.image] * 3 + [np.full_like(ph.image, 255)])
    assert _iou(metrics.body_mask(rgba), ref) > 0.99
    sixteen = ph.image.astype(np.uint16) * 16 + 300  # 12-bit values in a 16-bit array
    assert _iou(metrics.body_mask(sixteen), ref) > 0.99
    big = cv2.resize(ph.image, (1024, 1024), interpolation=cv2.INTER_LINEAR)
    assert _iou(cv2.resize(metrics.body_mask(big).astype(np.uint8), (256, 256)) > 0, ref) > 0.95


def test_burned_in_text_in_a_corner_is_excluded():
    img = np.full((200, 200), 10, np.uint8)
    cv2.ellipse(img, (100, 120), (70, 85), 0, 0, 360, 150, -1)  # body
    cv2.ellipse(img, (75, 110), (20, 40), 0, 0, 360, 60, -1)  # lungs (dark, inside)
    cv2.ellipse(img, (125, 110), (20, 40), 0, 0, 360, 60, -1)
    cv2.putText(img, "PORTABLE", (5, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.45, 255, 1)
    m = metrics.body_mask(img)
    assert m[:20, :100].sum() == 0
    assert m[110, 75] and m[110, 125]  # lungs inside


def test_constant_image_raises():
    with pytest.raises(ValueError, match="constant"):
        metrics.body_mask(np.full((64, 64), 7, np.uint8))
