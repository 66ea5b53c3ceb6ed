"""Body masks on synthetic and phantom images: framed and edge-to-edge bodies, inverted, RGBA,
16-bit and float input, side markers and burned-in text in corners, thin film edges, lungs
joined to the outside air by a thin gap, constant images."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

import metrics
from pipeline.phantoms import make_phantom


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


def _chest(h: int = 240, w: int = 200, *, air: int = 12, tissue: int = 170, lung: int = 70,
           edge_to_edge: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A plain synthetic frontal chest: (image uint8, body truth, lung truth)."""
    rng = np.random.default_rng(0)
    body = np.zeros((h, w), np.uint8)
    if edge_to_edge:
        body[:] = 1
    else:
        cv2.ellipse(body, (w // 2, int(0.6 * h)), (int(0.38 * w), int(0.45 * h)), 0, 0, 360, 1, -1)
    lungs = np.zeros((h, w), np.uint8)
    for cx in (int(0.33 * w), int(0.67 * w)):
        cv2.ellipse(lungs, (cx, int(0.52 * h)), (int(0.12 * w), int(0.24 * h)), 0, 0, 360, 1, -1)
    img = np.where(body > 0, tissue, air).astype(np.float64)
    img[lungs > 0] = lung
    img = cv2.GaussianBlur(img, (0, 0), 2) + rng.normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), body > 0, lungs > 0


@pytest.fixture(scope="module")
def phantoms():
    rng = np.random.default_rng(7)
    return [make_phantom(rng, width=w, height=h, view=v, side_marker="auto")
            for w, h, v in [(256, 256, "PA"), (320, 256, "AP"), (256, 320, "PA"), (256, 256, "AP")]]


def test_body_not_touching_the_edges():
    img, body, lungs = _chest()
    m = metrics.body_mask(img)
    assert m.shape == img.shape and m.dtype == bool
    assert _iou(m, body) > 0.95
    assert m[lungs].all()  # the dark lungs are inside the body
    assert not m[0].any() and not m[:, 0].any() and not m[:, -1].any()


def test_edge_to_edge_body_is_most_of_the_frame():
    img, _, lungs = _chest(edge_to_edge=True)
    m = metrics.body_mask(img)
    assert m.mean() > 0.95 and m[lungs].all()


def test_inverted_image_gives_the_same_body():
    img, body, lungs = _chest()
    ref = metrics.body_mask(img)
    inv = 255 - img  # MONOCHROME1-like: body dark, background bright, lungs bright
    auto = metrics.body_mask(inv)  # detected by default
    assert _iou(auto, ref) > 0.99 and auto[lungs].all()
    np.testing.assert_array_equal(metrics.body_mask(inv, inverted=True), ref)
    assert not metrics.tissue_is_dark(metrics.to_grey01(img))
    assert metrics.tissue_is_dark(metrics.to_grey01(inv))
    # the "dark side" of an Otsu split would be air + lungs: make sure that is not what we return
    assert not auto[0, 0] and auto[lungs].all() and _iou(auto, body) > 0.95


def test_rgba_sixteen_bit_and_float_inputs():
    img, _, _ = _chest()
    ref = metrics.body_mask(img)
    rgba = np.dstack([img] * 3 + [np.full_like(img, 255)])
    np.testing.assert_array_equal(metrics.body_mask(rgba), ref)
    np.testing.assert_array_equal(metrics.body_mask(rgba[..., :3]), ref)
    twelve = img.astype(np.uint16) * 16 + 300  # 12-bit values in a 16-bit array, with an offset
    assert _iou(metrics.body_mask(twelve), ref) > 0.995
    full16 = img.astype(np.uint16) * 257
    assert _iou(metrics.body_mask(full16), ref) > 0.995
    as_float = img.astype(np.float64) / 255.0 - 0.2
    assert _iou(metrics.body_mask(as_float), ref) > 0.995


def test_bright_letter_in_a_corner_is_excluded():
    img, body, _ = _chest()
    cv2.putText(img, "L", (170, 25), cv2.FONT_HERSHEY_SIMPLEX, 0.8, 255, 3)  # top-right corner
    cv2.putText(img, "PORTABLE", (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.35, 255, 1)  # burned-in text
    m = metrics.body_mask(img)
    assert not m[:30, 160:].any() and not m[:15, :90].any()
    assert _iou(m, body) > 0.95


def test_thin_bright_film_edge_does_not_shut_air_in():
    img, body, _ = _chest()
    img[:, -3:] = img[:, :3] = 230  # a bright film edge all round: the air touches no border
    img[-3:, :] = img[:3, :] = 230
    m = metrics.body_mask(img)
    assert _iou(m, body) > 0.95
    assert not m[100:200, 182:197].any()  # the air between the body and the film edge


def test_lung_joined_to_the_air_by_a_thin_gap_stays_inside():
    img, body, lungs = _chest(lung=30)  # hyperlucent lungs, nearly as dark as the air
    # a 5 px dark channel from the left lung through the chest wall to the air outside: a flood
    # from the border through every air-dark pixel would empty the lung
    cv2.line(img, (0, 125), (70, 125), 5, 5)
    m = metrics.body_mask(img)
    assert m[lungs].mean() > 0.99 and _iou(m, body) > 0.95


def test_phantom_bodies(phantoms):
    for ph in phantoms:
        m = metrics.body_mask(ph.image)
        assert m.shape == ph.image.shape and m.dtype == bool
        assert _iou(m, ph.body_mask) > 0.9
        lungs = ph.lung_mask > 0
        assert (m & lungs).sum() / lungs.sum() > 0.99
        np.testing.assert_array_equal(m, metrics.body_mask(ph.image, inverted=False))  # not flipped
        assert _iou(metrics.body_mask(255 - ph.image), m) > 0.98  # inverted: detected


def test_phantom_side_markers_are_excluded(phantoms):
    marked = [p for p in phantoms if p.marker is not None]
    assert marked
    for ph in marked:
        x, y, w, h = (int(round(v)) for v in ph.marker_box)
        m = metrics.body_mask(ph.image)
        letter = ph.image[y:y + h, x:x + w] > 128
        assert m[y:y + h, x:x + w][letter].mean() < 0.05


def test_phantom_edge_to_edge_and_large_images(phantoms):
    ph = make_phantom(np.random.default_rng(3), width=256, height=256, view="AP", edge_to_edge=True)
    m = metrics.body_mask(ph.image)
    assert m.mean() > 0.9 and (m & (ph.lung_mask > 0)).sum() / (ph.lung_mask > 0).sum() > 0.98
    small = phantoms[0]
    big = cv2.resize(small.image, (1024, 1024), interpolation=cv2.INTER_LINEAR)
    down = cv2.resize(metrics.body_mask(big).astype(np.uint8), (256, 256), interpolation=cv2.INTER_AREA) > 0
    assert _iou(down, metrics.body_mask(small.image)) > 0.95


def test_constant_and_degenerate_images_raise():
    for img in (np.full((64, 64), 7, np.uint8), np.zeros((32, 48), np.uint16), np.full((20, 20, 4), 9, np.uint8),
                np.full((16, 16), np.nan)):
        with pytest.raises(ValueError, match="constant"):
            metrics.body_mask(img)
    with pytest.raises(ValueError):
        metrics.body_mask(np.zeros((4, 4, 2), np.uint8))  # two channels: not an image layout
