"""Write the small image-reading corpus used by tests/test_images.py.

Usage: ``python tests/data/make_image_corpus.py [out_dir]`` (default: ``image_corpus/`` next to
this script). Deterministic: the same library versions give byte-identical files. Writes a set of
valid files in many encodings of one synthetic chest-like picture plus broken or hostile files,
and ``corpus.csv`` with columns ``file,expect,kind,note`` (expect "ok" or "error"; kind is the
expected ``ImageReadError.kind`` for errors, empty for ok files).

The reference picture (:func:`reference_image`) is 64 rows x 48 columns, 8-bit, display
convention (bright = dense), with a bright marker block in the top-left corner so that flips,
rotations and transpositions are visible. Files meant to decode to it exactly or nearly say so in
their note; the tests recompute the reference from this module.
"""

from __future__ import annotations

import csv
import io
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

HEIGHT = 64  # rows
WIDTH = 48  # columns

# DICOM test parameters (shared with the tests).
DICOM_BITS_STORED = 12
DICOM_SLOPE = 2.0
DICOM_INTERCEPT = -1000.0
DICOM_CENTER = 3000.0  # in modality units (after rescale)
DICOM_WIDTH = 6000.0
DICOM_STORED_MAX = 2**DICOM_BITS_STORED - 1  # 4095

_UID_ROOT = "1.2.826.0.1.3680043.10.1137."  # fixed root; suffixes below are arbitrary digits


def reference_image() -> np.ndarray:
    """The synthetic chest-like picture: uint8, shape (64, 48), min 0, max 255."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float64)
    cy, cx = HEIGHT * 0.55, WIDTH * 0.5
    img = np.zeros((HEIGHT, WIDTH), dtype=np.float64)
    body = ((y - cy) / (HEIGHT * 0.48)) ** 2 + ((x - cx) / (WIDTH * 0.46)) ** 2 <= 1.0
    img[body] = 130.0 + 60.0 * (y[body] / HEIGHT)  # soft tissue, denser towards the abdomen
    for side in (-1, 1):  # lungs: darker ellipses either side of the spine
        lung = ((y - HEIGHT * 0.45) / (HEIGHT * 0.28)) ** 2 + (
            (x - cx - side * WIDTH * 0.22) / (WIDTH * 0.15)
        ) ** 2 <= 1.0
        img[lung] = 45.0 + 25.0 * (y[lung] / HEIGHT)
    spine = (np.abs(x - cx) <= 2) & body
    img[spine] = 215.0
    rng = np.random.default_rng(20240607)
    img += rng.normal(0.0, 2.0, size=img.shape) * body
    img = np.clip(img, 1.0, 250.0)
    img[~body] = 0.0  # air
    img[2:8, 2:10] = 255.0  # asymmetric marker, top-left
    return np.rint(img).astype(np.uint8)


# ------------------------------------------------------------------------------------------
# builders
# ------------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def png_with_declared_size(width: int, height: int) -> bytes:
    """A structurally valid 8-bit greyscale PNG whose IHDR declares width x height, with a tiny
    IDAT (one compressed row) - a decompression bomb stand-in that must be refused unread."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64, 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def dicom_bytes(
    stored: np.ndarray | None,
    *,
    photometric: str = "MONOCHROME2",
    slope: float | None = DICOM_SLOPE,
    intercept: float | None = DICOM_INTERCEPT,
    center: float | None = DICOM_CENTER,
    width: float | None = DICOM_WIDTH,
    bits_stored: int = DICOM_BITS_STORED,
    uid_suffix: str = "1",
    transfer_syntax: str | None = None,
    encapsulated: bytes | None = None,
    rows_cols: tuple[int, int] | None = None,
) -> bytes:
    """Build a small uncompressed (explicit VR little endian) DICOM file from scratch.

    ``stored``: uint16 array (rows, cols) or (frames, rows, cols) of stored values, or None for a
    file without Pixel Data. ``encapsulated`` with ``transfer_syntax`` writes that compressed
    payload instead (used for an undecodable transfer syntax).
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian

    sop_class = UID("1.2.840.10008.5.1.4.1.1.1")  # Computed Radiography Image Storage
    sop_instance = UID(_UID_ROOT + uid_suffix)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = UID(transfer_syntax) if transfer_syntax else ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID(_UID_ROOT + "999")
    meta.ImplementationVersionName = "CXR_CORPUS_1"

    ds = FileDataset("corpus.dcm", {}, file_meta=meta, preamble=b"\x00" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.StudyInstanceUID = UID(_UID_ROOT + uid_suffix + ".1")
    ds.SeriesInstanceUID = UID(_UID_ROOT + uid_suffix + ".2")
    ds.Modality = "CR"
    ds.PatientID = "SYNTHETIC"
    ds.PatientName = "Synthetic^Corpus"
    ds.ViewPosition = "PA"

    if stored is not None or rows_cols is not None:
        if stored is not None:
            rows, cols = stored.shape[-2:]
        else:
            assert rows_cols is not None
            rows, cols = rows_cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.Rows = int(rows)
        ds.Columns = int(cols)
        ds.BitsAllocated = 16
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1
        ds.PixelRepresentation = 0
        if slope is not None and intercept is not None:
            ds.RescaleSlope = f"{slope:g}"
            ds.RescaleIntercept = f"{intercept:g}"
            ds.RescaleType = "US"
        if center is not None and width is not None:
            ds.WindowCenter = f"{center:g}"
            ds.WindowWidth = f"{width:g}"
    if stored is not None:
        if stored.ndim == 3:
            ds.NumberOfFrames = int(stored.shape[0])
        ds.PixelData = np.ascontiguousarray(stored.astype("<u2")).tobytes()
    elif encapsulated is not None:
        from pydicom.encaps import encapsulate

        ds.PixelData = encapsulate([encapsulated])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True

    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _pil_bytes(im: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------
# corpus
# ------------------------------------------------------------------------------------------


def build_corpus() -> list[tuple[str, bytes | None, str, str, str]]:
    """All entries as (file name, content or None for 'missing', expect, kind, note)."""
    ref = reference_image()
    grey = Image.fromarray(ref)
    inverted = Image.fromarray(255 - ref)
    ref16 = ref.astype(np.uint16) * 16 + 100  # 12-bit-ish data in a 16-bit container
    entries: list[tuple[str, bytes | None, str, str, str]] = []

    def ok(name: str, data: bytes, note: str) -> None:
        entries.append((name, data, "ok", "", note))

    def err(name: str, data: bytes | None, kind: str, note: str) -> None:
        entries.append((name, data, "error", kind, note))

    # ---- valid raster files -----------------------------------------------------------
    ok("gray8.png", _pil_bytes(grey, "PNG"), "8-bit greyscale L; equals reference/255 exactly")
    ok(
        "gray16.png",
        _pil_bytes(Image.fromarray(ref16), "PNG"),
        "16-bit greyscale (ref*16+100); min..max scaling gives reference/255",
    )
    ok("rgb.png", _pil_bytes(grey.convert("RGB"), "PNG"), "RGB with R=G=B; equals reference")
    rgba = grey.convert("RGBA")
    ok(
        "rgba_const_alpha.png",
        _pil_bytes(rgba, "PNG"),
        "RGBA with alpha 255 everywhere (NIH ChestX-ray14 quirk); equals reference",
    )
    ok(
        "palette.png",
        _pil_bytes(grey.convert("P"), "PNG"),
        "palette P, grey palette; equals reference",
    )
    ok(
        "palette_transparency.png",
        _pil_bytes(grey.convert("P"), "PNG", transparency=0),
        "palette P with index 0 (black air) transparent; over black equals reference",
    )
    la_alpha = np.full_like(ref, 255)
    la_alpha[:, WIDTH // 2 :] = 128
    la = Image.merge("LA", (grey, Image.fromarray(la_alpha)))
    ok(
        "la_half_alpha.png",
        _pil_bytes(la, "PNG"),
        "LA, right half alpha 128; composited over black",
    )
    ok(
        "bilevel.png",
        _pil_bytes(grey.point(lambda v: 255 if v >= 128 else 0).convert("1"), "PNG"),
        "mode 1 bilevel; values 0 or 1",
    )
    ok(
        "constant.png",
        _pil_bytes(Image.fromarray(np.full((HEIGHT, WIDTH), 128, np.uint8)), "PNG"),
        "constant 8-bit image; all 128/255",
    )
    ok(
        "constant16.png",
        _pil_bytes(Image.fromarray(np.full((HEIGHT, WIDTH), 3000, np.uint16)), "PNG"),
        "constant 16-bit image; all zeros (no division by zero)",
    )
    ok("gray.jpg", _pil_bytes(grey, "JPEG", quality=95), "greyscale JPEG; near reference")
    ok("rgb.jpg", _pil_bytes(grey.convert("RGB"), "JPEG", quality=95), "RGB JPEG; near reference")
    ok(
        "cmyk.jpg",
        _pil_bytes(grey.convert("RGB").convert("CMYK"), "JPEG", quality=95),
        "CMYK JPEG with Adobe marker (inverted storage); near reference",
    )
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    ok(
        "exif_rot6.jpg",
        _pil_bytes(grey.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif),
        "stored rotated, EXIF Orientation 6; displayed upright near reference",
    )
    exif3 = Image.Exif()
    exif3[0x0112] = 3  # Orientation: rotate 180 degrees
    ok(
        "exif_rot3.png",
        _pil_bytes(grey.transpose(Image.Transpose.ROTATE_180), "PNG", exif=exif3),
        "stored upside down, EXIF Orientation 3 (PNG eXIf); equals reference",
    )
    ok(
        "gray16_multipage.tif",
        _pil_bytes(
            Image.fromarray(ref16),
            "TIFF",
            save_all=True,
            append_images=[Image.fromarray((4095 - ref16).astype(np.uint16))],
        ),
        "16-bit TIFF, 2 pages (second inverted); first page equals reference",
    )
    ok(
        "two_frames.gif",
        _pil_bytes(grey.convert("P"), "GIF", save_all=True, append_images=[inverted.convert("P")]),
        "GIF, 2 frames (second inverted); first frame equals reference",
    )

    # ---- DICOM ----------------------------------------------------------------------------
    stored = ref.astype(np.uint16) * 16  # 0..4080, 12 bits stored in 16
    mono2 = dicom_bytes(stored, uid_suffix="2")
    ok(
        "dicom_mono2.dcm",
        mono2,
        "MONOCHROME2, 12 bits stored, slope 2 intercept -1000, window 3000/6000",
    )
    # stored 4095-v gives modality slope*4095 + 2*intercept - m: mirror the centre the same way
    mono1_center = DICOM_SLOPE * DICOM_STORED_MAX + 2 * DICOM_INTERCEPT - DICOM_CENTER
    ok(
        "dicom_mono1.dcm",
        dicom_bytes(
            (DICOM_STORED_MAX - stored).astype(np.uint16),
            photometric="MONOCHROME1",
            center=mono1_center,
            uid_suffix="3",
        ),
        "MONOCHROME1 storing 4095-v with the mirrored window; reads equal to dicom_mono2.dcm",
    )
    ok(
        "dicom_multiframe.dcm",
        dicom_bytes(
            np.stack([stored, DICOM_STORED_MAX - stored]).astype(np.uint16), uid_suffix="4"
        ),
        "MONOCHROME2, 2 frames (second inverted); first frame equals dicom_mono2.dcm",
    )
    ok(
        "dicom_no_window.dcm",
        dicom_bytes(stored, slope=None, intercept=None, center=None, width=None, uid_suffix="5"),
        "MONOCHROME2 without rescale or window; min..max gives reference/255",
    )
    ok("dicom_by_magic", mono2, "DICOM without a file extension, found by the DICM magic")
    err(
        "dicom_no_pixels.dcm",
        dicom_bytes(None, rows_cols=(HEIGHT, WIDTH), uid_suffix="6"),
        "dicom_no_pixels",
        "valid DICOM header, no Pixel Data element",
    )
    err(
        "dicom_mpeg2.dcm",
        dicom_bytes(
            None,
            rows_cols=(HEIGHT, WIDTH),
            uid_suffix="7",
            transfer_syntax="1.2.840.10008.1.2.4.100",  # MPEG2 Main Profile / Main Level
            encapsulated=b"\x00\x00\x01\xb3" + b"\x00" * 60,
        ),
        "unsupported",
        "compressed transfer syntax (MPEG2) with no decoder available",
    )
    err(
        "dicom_truncated.dcm",
        mono2[: len(mono2) - (HEIGHT * WIDTH)],
        "truncated",
        "DICOM cut in the middle of the Pixel Data",
    )
    err(
        "text.dcm",
        b"patient list\nid,name\n1,anonymous\n" * 4,
        "not_an_image",
        "text file named .dcm",
    )

    # ---- broken or hostile files ------------------------------------------------------------
    err("missing.png", None, "missing", "listed but not present on disk")
    err("empty.png", b"", "zero_byte", "zero-byte file")
    png = _pil_bytes(grey, "PNG")
    err("truncated.png", png[: len(png) // 2], "truncated", "gray8.png cut in half")
    jpg = _pil_bytes(grey, "JPEG", quality=95)
    err("truncated.jpg", jpg[: len(jpg) // 2], "truncated", "gray.jpg cut in half")
    err(
        "text.png",
        b"This is not an image.\nIt is a plain text file with a .png name.\n",
        "not_an_image",
        "text file named .png",
    )
    err(
        "html_error.jpg",
        (
            b"<!DOCTYPE html>\n<html><head><title>403 Forbidden</title></head>\n"
            b"<body><h1>Forbidden</h1><p>You don't have permission to access this resource."
            b"</p></body></html>\n"
        ),
        "not_an_image",
        "HTML error page saved under an image name (failed download)",
    )
    err(
        "random_bytes.png",
        np.random.default_rng(7).integers(0, 256, size=2048, dtype=np.uint8).tobytes(),
        "not_an_image",
        "2 KiB of random bytes",
    )
    err(
        "bomb_60000x60000.png",
        png_with_declared_size(60000, 60000),
        "too_large",
        "IHDR declares 60000x60000 with a tiny IDAT; refused before decoding",
    )
    err(
        "tiny_4x4.png",
        _pil_bytes(Image.fromarray(ref[:4, :4]), "PNG"),
        "too_small",
        "4x4 pixels, below min_side 8",
    )
    return entries


def write_corpus(out_dir: Path) -> Path:
    """Write every corpus file and corpus.csv into ``out_dir``; return the CSV path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = build_corpus()
    for name, data, _expect, _kind, _note in entries:
        target = out_dir / name
        if data is None:
            if target.exists():
                target.unlink()
            continue
        target.write_bytes(data)
    csv_path = out_dir / "corpus.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["file", "expect", "kind", "note"])
        for name, _data, expect, kind, note in entries:
            writer.writerow([name, expect, kind, note])
    return csv_path


def main(argv: list[str]) -> int:
    out_dir = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent / "image_corpus"
    csv_path = write_corpus(out_dir)
    total = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file())
    print(f"wrote {csv_path} ({total} bytes in {out_dir})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
