"""Tests for pipeline.images: the corpus in tests/data/image_corpus plus targeted checks."""

from __future__ import annotations

import csv
import importlib.util
import pickle
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from pipeline.images import (
    ERROR_KINDS,
    ImageReadError,
    LoadedImage,
    read_image,
    to_rgb_pil,
    to_uint8,
)

DATA_DIR = Path(__file__).resolve().parent / "data"
CORPUS_DIR = DATA_DIR / "image_corpus"
CORPUS_CSV = CORPUS_DIR / "corpus.csv"
NIH_RGBA = Path("/work/shared/data/real_cxr/nih_cxr14/images/00000100_000.png")


def _load_generator():
    spec = importlib.util.spec_from_file_location(
        "make_image_corpus", DATA_DIR / "make_image_corpus.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _load_generator()
REF = gen.reference_image().astype(np.float64) / 255.0  # (64, 48), display convention


def _rows() -> list[dict[str, str]]:
    with open(CORPUS_CSV, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


ROWS = _rows()


def _corpus(name: str) -> Path:
    return CORPUS_DIR / name


def _save(tmp_path: Path, name: str, im: Image.Image, **kwargs: object) -> Path:
    path = tmp_path / name
    im.save(path, **kwargs)
    return path


# ------------------------------------------------------------------------------------------
# corpus
# ------------------------------------------------------------------------------------------


def test_corpus_csv_is_complete_and_small() -> None:
    assert len(ROWS) >= 14
    assert set(ROWS[0]) == {"file", "expect", "kind", "note"}
    total = 0
    for row in ROWS:
        assert row["expect"] in ("ok", "error")
        if row["expect"] == "ok":
            assert row["kind"] == ""
        else:
            assert row["kind"] in ERROR_KINDS
        path = _corpus(row["file"])
        if row["kind"] == "missing":
            assert not path.exists()
            continue
        size = path.stat().st_size
        assert size < 20_000, row["file"]
        total += size
    assert total < 300_000
    kinds = {row["kind"] for row in ROWS}
    assert {"missing", "zero_byte", "not_an_image", "truncated", "too_large", "too_small",
            "dicom_no_pixels", "unsupported"} <= kinds


def test_corpus_csv_matches_generator() -> None:
    expected = [(name, expect, kind) for name, _data, expect, kind, _note in gen.build_corpus()]
    assert [(r["file"], r["expect"], r["kind"]) for r in ROWS] == expected


@pytest.mark.parametrize("row", ROWS, ids=[r["file"] for r in ROWS])
def test_corpus_entry(row: dict[str, str]) -> None:
    path = _corpus(row["file"])
    if row["expect"] == "ok":
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            img = read_image(path)
        assert isinstance(img, LoadedImage)
        px = img.pixels
        assert px.dtype == np.float32
        assert px.ndim == 2 and px.flags["C_CONTIGUOUS"]
        assert px.shape == (img.height, img.width) == (gen.HEIGHT, gen.WIDTH)
        assert np.isfinite(px).all()
        assert px.min() >= 0.0 and px.max() <= 1.0
        assert img.source_format and img.source_mode and img.bit_depth >= 1
    else:
        with pytest.raises(ImageReadError) as info:
            read_image(path)
        assert info.value.kind == row["kind"], str(info.value)
        assert row["file"] in str(info.value)


# files that decode exactly to the reference picture
@pytest.mark.parametrize(
    "name",
    [
        "gray8.png",
        "gray16.png",
        "rgb.png",
        "rgba_const_alpha.png",
        "palette.png",
        "palette_transparency.png",
        "exif_rot3.png",
        "gray16_multipage.tif",
        "two_frames.gif",
        "dicom_no_window.dcm",
    ],
)
def test_lossless_files_equal_reference(name: str) -> None:
    np.testing.assert_allclose(read_image(_corpus(name)).pixels, REF, atol=1e-6)


@pytest.mark.parametrize("name", ["gray.jpg", "rgb.jpg", "cmyk.jpg", "exif_rot6.jpg"])
def test_lossy_files_near_reference(name: str) -> None:
    px = read_image(_corpus(name)).pixels
    assert px.shape == REF.shape
    assert np.abs(px - REF).mean() < 0.02
    # orientation: bright marker in the top-left corner, air in the top-right one
    assert px[3:7, 3:9].mean() > 0.9
    assert px[:8, -8:].mean() < 0.1


@pytest.mark.parametrize(
    ("name", "fmt", "mode", "bits"),
    [
        ("gray8.png", "png", "L", 8),
        ("gray16.png", "png", "I;16", 16),
        ("rgba_const_alpha.png", "png", "RGBA", 8),
        ("palette.png", "png", "P", 8),
        ("bilevel.png", "png", "1", 1),
        ("cmyk.jpg", "jpeg", "CMYK", 8),
        ("gray16_multipage.tif", "tiff", "I;16", 16),
        ("dicom_mono2.dcm", "dicom", "MONOCHROME2", 12),
        ("dicom_mono1.dcm", "dicom", "MONOCHROME1", 12),
        ("dicom_by_magic", "dicom", "MONOCHROME2", 12),
    ],
)
def test_source_metadata(name: str, fmt: str, mode: str, bits: int) -> None:
    img = read_image(_corpus(name))
    assert (img.source_format, img.source_mode, img.bit_depth) == (fmt, mode, bits)


def test_constant_images() -> None:
    assert np.all(read_image(_corpus("constant.png")).pixels == np.float32(128 / 255))
    assert np.all(read_image(_corpus("constant16.png")).pixels == 0.0)


def test_bilevel_values() -> None:
    px = read_image(_corpus("bilevel.png")).pixels
    assert set(np.unique(px).tolist()) == {0.0, 1.0}
    np.testing.assert_array_equal(px, (REF * 255 >= 128).astype(np.float32))


# ------------------------------------------------------------------------------------------
# 16-bit, alpha, palette
# ------------------------------------------------------------------------------------------


def test_16bit_scaled_by_own_min_max(tmp_path: Path) -> None:
    arr = np.full((8, 10), 2000, dtype=np.uint16)
    arr[0, 0] = 1000
    arr[-1, -1] = 3000
    arr[4, 5] = 2500
    img = read_image(_save(tmp_path, "a.png", Image.fromarray(arr)))
    assert img.source_mode == "I;16" and img.bit_depth == 16
    assert img.pixels[0, 0] == 0.0 and img.pixels[-1, -1] == 1.0
    assert img.pixels[1, 1] == pytest.approx(0.5)
    assert img.pixels[4, 5] == pytest.approx(0.75)


def test_float_tiff_with_nan_never_returns_nan(tmp_path: Path) -> None:
    arr = np.linspace(-1.0, 3.0, 80, dtype=np.float32).reshape(8, 10)
    arr[2, 2] = np.nan
    arr[3, 3] = np.inf
    img = read_image(_save(tmp_path, "f.tif", Image.fromarray(arr, mode="F")))
    assert np.isfinite(img.pixels).all()
    assert img.pixels.min() == 0.0 and img.pixels.max() == 1.0


@pytest.mark.parametrize("alpha", [255, 128, 0])
def test_rgba_constant_alpha_equals_grey(tmp_path: Path, alpha: int) -> None:
    grey = Image.fromarray(gen.reference_image())
    rgba = grey.convert("RGBA")
    rgba.putalpha(alpha)
    img = read_image(_save(tmp_path, "c.png", rgba))
    np.testing.assert_allclose(img.pixels, REF, atol=1e-6)


def test_rgba_varying_alpha_composited_over_black(tmp_path: Path) -> None:
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    alpha = np.full((8, 8), 255, dtype=np.uint8)
    alpha[:, 4:] = 51  # 20 % opaque
    im = Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA")
    px = read_image(_save(tmp_path, "v.png", im)).pixels
    luma = round(0.299 * 200 + 0.587 * 100 + 0.114 * 50) / 255.0  # Pillow's integer luma
    np.testing.assert_allclose(px[:, :4], luma, atol=1 / 255)
    np.testing.assert_allclose(px[:, 4:], luma * 0.2, atol=1 / 255)


def test_la_file_composited_with_its_alpha() -> None:
    px = read_image(_corpus("la_half_alpha.png")).pixels
    half = gen.WIDTH // 2
    np.testing.assert_allclose(px[:, :half], REF[:, :half], atol=1e-6)
    np.testing.assert_allclose(px[:, half:], REF[:, half:] * 128 / 255, atol=1e-6)


def test_palette_transparency_composited(tmp_path: Path) -> None:
    arr = np.full((8, 8), 200, dtype=np.uint8)
    arr[:4] = 100
    im = Image.fromarray(arr).convert("P")
    index_of_200 = int(np.asarray(im)[-1, -1])
    px = read_image(_save(tmp_path, "t.png", im, transparency=index_of_200)).pixels
    np.testing.assert_allclose(px[:4], 100 / 255, atol=1e-6)
    np.testing.assert_array_equal(px[4:], 0.0)


# ------------------------------------------------------------------------------------------
# DICOM
# ------------------------------------------------------------------------------------------


def test_monochrome1_equals_monochrome2() -> None:
    m2 = read_image(_corpus("dicom_mono2.dcm")).pixels
    m1 = read_image(_corpus("dicom_mono1.dcm")).pixels
    # the LINEAR window's half-pixel offset differs by 1/(width-1) between the mirrored files
    np.testing.assert_allclose(m1, m2, atol=2.0 / (gen.DICOM_WIDTH - 1))
    assert m2[3:7, 3:9].mean() > 0.9  # marker (dense) is bright in both
    assert m1[3:7, 3:9].mean() > 0.9


def test_dicom_mono2_window_numbers() -> None:
    px = read_image(_corpus("dicom_mono2.dcm")).pixels.astype(np.float64)
    modality = gen.reference_image().astype(np.float64) * 16 * gen.DICOM_SLOPE + gen.DICOM_INTERCEPT
    c, w = gen.DICOM_CENTER - 0.5, gen.DICOM_WIDTH - 1
    expected = np.clip((modality - c) / w + 0.5, 0.0, 1.0)
    np.testing.assert_allclose(px, expected, atol=1e-6)


def test_dicom_multiframe_uses_first_frame() -> None:
    first = read_image(_corpus("dicom_multiframe.dcm")).pixels
    np.testing.assert_allclose(first, read_image(_corpus("dicom_mono2.dcm")).pixels, atol=1e-7)


def _tiny_stored() -> np.ndarray:
    stored = np.zeros((8, 8), dtype=np.uint16)
    stored[0] = [0, 50, 75, 100, 149, 150, 200, 4095]
    return stored


# slope 2, intercept -100 -> modality [-100, 0, 50, 100, 198, 200, 300, 8090]
# LINEAR window c=100, w=201: c-0.5 = 99.5, w-1 = 200; m <= -0.5 -> 0, m > 199.5 -> 1,
# else (m - 99.5) / 200 + 0.5
TINY_EXPECTED = np.array([0.0, 0.0025, 0.2525, 0.5025, 0.9925, 1.0, 1.0, 1.0])


def test_dicom_rescale_and_window_by_hand(tmp_path: Path) -> None:
    path = tmp_path / "tiny.dcm"
    path.write_bytes(
        gen.dicom_bytes(_tiny_stored(), slope=2.0, intercept=-100.0, center=100.0, width=201.0)
    )
    px = read_image(path).pixels
    np.testing.assert_allclose(px[0], TINY_EXPECTED, atol=1e-6)
    np.testing.assert_array_equal(px[1:], 0.0)  # stored 0 -> modality -100 -> below window


def test_dicom_monochrome1_by_hand(tmp_path: Path) -> None:
    path = tmp_path / "tiny1.dcm"
    path.write_bytes(
        gen.dicom_bytes(
            _tiny_stored(), photometric="MONOCHROME1", slope=2.0, intercept=-100.0,
            center=100.0, width=201.0,
        )
    )
    px = read_image(path).pixels
    np.testing.assert_allclose(px[0], 1.0 - TINY_EXPECTED, atol=1e-6)
    np.testing.assert_array_equal(px[1:], 1.0)


def test_dicom_without_window_uses_min_max_of_modality_values(tmp_path: Path) -> None:
    path = tmp_path / "nowin.dcm"
    path.write_bytes(
        gen.dicom_bytes(_tiny_stored(), slope=2.0, intercept=-100.0, center=None, width=None)
    )
    px = read_image(path).pixels
    np.testing.assert_allclose(px[0], _tiny_stored()[0] / 4095.0, atol=1e-6)


def test_dicom_constant_image(tmp_path: Path) -> None:
    path = tmp_path / "const.dcm"
    path.write_bytes(gen.dicom_bytes(np.full((8, 8), 7, np.uint16), center=None, width=None))
    px = read_image(path).pixels
    assert np.isfinite(px).all() and np.all(px == 0.0)


def test_dicom_voi_lut_sequence(tmp_path: Path) -> None:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    src = tmp_path / "base.dcm"
    stored = np.zeros((8, 8), dtype=np.uint16)
    stored[0, :3] = [500, 1500, 3000]
    src.write_bytes(gen.dicom_bytes(stored, slope=None, intercept=None, center=None, width=None))
    ds = pydicom.dcmread(src)
    item = Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 16])  # LUT Descriptor: entries, first, bits
    lut = (np.clip(np.arange(4096) - 1000, 0, 1000) * 4).astype(np.uint16)  # 0..4000
    item.add_new(0x00283006, "US", lut.tolist())  # LUT Data
    ds.VOILUTSequence = Sequence([item])
    path = tmp_path / "voilut.dcm"
    ds.save_as(path, enforce_file_format=True)
    px = read_image(path).pixels
    np.testing.assert_allclose(px[0, :3], [0.0, 0.5, 1.0], atol=1e-6)


def test_dicom_broken_window_falls_back_to_min_max(tmp_path: Path) -> None:
    path = tmp_path / "w0.dcm"
    path.write_bytes(
        gen.dicom_bytes(_tiny_stored(), slope=None, intercept=None, center=100.0, width=0.0)
    )
    px = read_image(path).pixels
    np.testing.assert_allclose(px[0], _tiny_stored()[0] / 4095.0, atol=1e-6)


def test_dicom_without_preamble_read_by_extension(tmp_path: Path) -> None:
    data = _corpus("dicom_mono2.dcm").read_bytes()
    assert data[128:132] == b"DICM"
    path = tmp_path / "nopreamble.dcm"
    path.write_bytes(data[132:])
    img = read_image(path)
    assert img.source_format == "dicom"
    np.testing.assert_allclose(img.pixels, read_image(_corpus("dicom_mono2.dcm")).pixels, atol=1e-7)


def test_png_named_dcm_falls_back_to_pillow(tmp_path: Path) -> None:
    path = tmp_path / "mislabelled.dcm"
    path.write_bytes(_corpus("gray8.png").read_bytes())
    img = read_image(path)
    assert img.source_format == "png"
    np.testing.assert_allclose(img.pixels, REF, atol=1e-6)


def test_dicom_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pydicom", None)  # makes `import pydicom` fail
    with pytest.raises(ImageReadError) as info:
        read_image(_corpus("dicom_mono2.dcm"))
    assert info.value.kind == "dicom_unavailable"
    assert "pip install .[dicom]" in str(info.value)


# ------------------------------------------------------------------------------------------
# orientation, size limits, bombs
# ------------------------------------------------------------------------------------------


def test_exif_orientation_applied() -> None:
    raw = Image.open(_corpus("exif_rot6.jpg"))
    assert raw.size == (gen.HEIGHT, gen.WIDTH)  # stored transposed: width 64, height 48
    img = read_image(_corpus("exif_rot6.jpg"))
    assert (img.height, img.width) == (gen.HEIGHT, gen.WIDTH)
    assert np.abs(img.pixels - REF).mean() < 0.02
    # of the two 90-degree rotations of the stored pixels, only the one Orientation 6 asks for
    # (clockwise) matches the reference; the other is clearly wrong
    stored = np.asarray(raw.convert("L"), dtype=np.float64) / 255.0
    clockwise, counter = np.rot90(stored, -1), np.rot90(stored, 1)
    assert np.abs(clockwise - REF).mean() < 0.02
    assert np.abs(counter - REF).mean() > 0.05
    np.testing.assert_allclose(img.pixels, clockwise, atol=1e-6)


def test_bomb_refused_without_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decode(self, *args, **kwargs):  # pragma: no cover - must not run
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with pytest.raises(ImageReadError) as info:
        read_image(_corpus("bomb_60000x60000.png"))
    elapsed = time.perf_counter() - t0
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert info.value.kind == "too_large"
    assert elapsed < 1.0
    assert rss_after - rss_before < 100_000  # KiB on Linux: far below the 3.6 GB a decode needs


def test_own_pixel_limit_checked_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(gen.png_with_declared_size(9000, 9000))  # 81 MP: under Pillow's own limit

    def no_decode(self, *args, **kwargs):  # pragma: no cover - must not run
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert info.value.kind == "too_large"
    assert "9000x9000" in str(info.value) and "max_pixels" in str(info.value)
    with pytest.raises(ImageReadError) as info:
        read_image(_corpus("gray8.png"), max_pixels=1000)
    assert info.value.kind == "too_large"


def test_dicom_pixel_limit_checked_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("pydicom")
    import pydicom.pixels

    def no_decode(*args, **kwargs):  # pragma: no cover - must not run
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(pydicom.pixels, "pixel_array", no_decode)
    with pytest.raises(ImageReadError) as info:
        read_image(_corpus("dicom_mono2.dcm"), max_pixels=1000)
    assert info.value.kind == "too_large"


def test_pillow_bomb_warning_does_not_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    # 64 x 48 = 3072 pixels: between Pillow's (patched) limit and twice it -> Pillow only warns
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageReadError) as info:
            read_image(_corpus("gray8.png"))
    assert info.value.kind == "too_large"
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_min_side(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError) as info:
        read_image(_corpus("gray8.png"), min_side=50)
    assert info.value.kind == "too_small"
    assert read_image(_corpus("tiny_4x4.png"), min_side=4).pixels.shape == (4, 4)


def test_truncated_does_not_enable_truncated_loading() -> None:
    with pytest.raises(ImageReadError):
        read_image(_corpus("truncated.png"))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_directory_is_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError) as info:
        read_image(tmp_path)
    assert info.value.kind == "not_an_image"


# ------------------------------------------------------------------------------------------
# helpers and the error type
# ------------------------------------------------------------------------------------------


def test_to_uint8() -> None:
    out = to_uint8(np.array([[0.0, 0.5, 1.0, -1.0, 2.0, np.nan, 0.2]]))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[0, 128, 255, 0, 255, 0, 51]])


def test_to_rgb_pil() -> None:
    img = read_image(_corpus("gray16.png"))
    rgb = to_rgb_pil(img)
    assert rgb.mode == "RGB"
    assert rgb.size == (img.width, img.height)
    arr = np.asarray(rgb)
    for ch in range(3):
        np.testing.assert_array_equal(arr[..., ch], to_uint8(img.pixels))


def test_error_is_picklable_and_valueerror() -> None:
    err = ImageReadError("truncated", "/x/y.png", "cut short")
    assert isinstance(err, ValueError)
    back = pickle.loads(pickle.dumps(err))
    assert (back.kind, back.path, back.reason) == (err.kind, err.path, err.reason)
    assert str(back) == str(err)
    with pytest.raises(ValueError):
        ImageReadError("bogus", "/x", "r")


def test_accepts_str_and_pathlike() -> None:
    a = read_image(str(_corpus("gray8.png"))).pixels
    b = read_image(_corpus("gray8.png")).pixels
    np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(not NIH_RGBA.exists(), reason="real NIH ChestX-ray14 image not available")
def test_real_nih_rgba_image() -> None:
    img = read_image(NIH_RGBA)
    assert img.source_mode == "RGBA"
    assert (img.height, img.width) == (1024, 1024)
    expected = np.asarray(Image.open(NIH_RGBA).convert("L"), dtype=np.float64) / 255.0
    np.testing.assert_allclose(img.pixels, expected, atol=1e-6)
    # a plausible chest film: not constant, a good share of bright (dense) pixels
    assert img.pixels.std() > 0.1
