"""Robust reading of chest X-ray image files (PNG, JPEG, TIFF, ..., DICOM) into one convention.

Every successfully read file becomes a :class:`LoadedImage` whose ``pixels`` are a C-contiguous
``float32`` array of shape ``(height, width)`` with values in ``[0, 1]`` in the *display*
convention of radiographs: bright = dense (bone white, air black). Row 0 is the top of the image
as displayed (EXIF orientation applied); column 0 is the image's left.

Intensity conventions, by source:

* 8-bit files (greyscale, palette, colour, bilevel): value / 255. No contrast stretching.
* Colour files: ITU-R 601 luma (Pillow's ``"L"`` conversion), CMYK via Pillow's RGB conversion.
* Alpha: a *varying* alpha channel is composited over black (``grey * alpha``). A *constant*
  alpha channel carries no information (e.g. NIH ChestX-ray14 files saved as RGBA with alpha
  255 everywhere) and is ignored, so such a file equals its grey version.
* 16-bit / 32-bit integer and float files (``I;16``, ``I``, ``F``): scaled linearly from the
  image's own minimum..maximum to 0..1 (their nominal range is rarely used in full). A constant
  image becomes all zeros.
* DICOM (``.dcm``/``.dicom`` name or ``DICM`` magic at byte 128; a ``.dcm`` name whose content
  is not DICOM is retried through Pillow): modality LUT (Rescale Slope/Intercept or Modality
  LUT Sequence), then the first VOI LUT (VOI LUT Sequence, else Window Center/Width) mapped
  onto 0..1 by the VOI function's own output range; without (usable) VOI data the modality
  values are scaled by their min..max. MONOCHROME1 (and a Presentation LUT Shape of INVERSE)
  is inverted so that the result follows the display convention.

Every failure raises :class:`ImageReadError` with a machine-readable ``kind``. The pixel count is
checked from the header before any pixel data is decoded (decompression-bomb guard).
"""

from __future__ import annotations

import os
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "ERROR_KINDS",
    "ImageReadError",
    "LoadedImage",
    "read_image",
    "to_rgb_pil",
    "to_uint8",
]

#: Every value :attr:`ImageReadError.kind` can take.
ERROR_KINDS: frozenset[str] = frozenset(
    {
        "missing",
        "zero_byte",
        "not_an_image",
        "truncated",
        "too_large",
        "too_small",
        "unsupported",
        "dicom_no_pixels",
        "dicom_unavailable",
    }
)

#: Pillow formats accepted for non-DICOM files. Restricting the list keeps formats with weak
#: signatures (e.g. TGA) from "recognising" random bytes as an image.
PIL_FORMATS: tuple[str, ...] = (
    "PNG",
    "JPEG",  # also opens multi-picture (MPO) JPEGs
    "TIFF",
    "BMP",
    "GIF",
    "WEBP",
    "JPEG2000",
    "PPM",
)

_DICOM_SUFFIXES = (".dcm", ".dicom")
_DICOM_MAGIC_OFFSET = 128
_DICOM_MAGIC = b"DICM"


class ImageReadError(ValueError):
    """Raised for any file that cannot be read as an image.

    ``kind`` is a short machine-readable category (one of :data:`ERROR_KINDS`), ``path`` the file
    as given, ``reason`` the human-readable cause; ``str(exc)`` names the file and the reason.
    """

    kind: str
    path: str
    reason: str

    def __init__(self, kind: str, path: str | os.PathLike[str], reason: str) -> None:
        if kind not in ERROR_KINDS:
            raise ValueError(f"unknown ImageReadError kind {kind!r}")
        self.kind = kind
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path!r} [{kind}]: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep the exception picklable (worker processes send it back to the parent).
        return (type(self), (self.kind, self.path, self.reason))


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image in the display convention.

    ``pixels``: float32, shape (height, width), values in [0, 1], bright = dense.
    ``width``/``height``: in pixels, after EXIF orientation.
    ``source_format``: lower-case container format ("png", "jpeg", "tiff", "dicom", ...).
    ``source_mode``: Pillow mode of the file ("L", "I;16", "RGBA", "P", "CMYK", ...) or the DICOM
    Photometric Interpretation ("MONOCHROME1", ...).
    ``bit_depth``: bits per sample in the file (8, 16, 1 for bilevel, Bits Stored for DICOM).
    """

    pixels: np.ndarray
    width: int
    height: int
    source_format: str
    source_mode: str
    bit_depth: int


# --------------------------------------------------------------------------------------------
# public helpers
# --------------------------------------------------------------------------------------------


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Convert [0, 1] floats to uint8 (x * 255, rounded half to even, clipped; NaN -> 0)."""
    arr = np.nan_to_num(np.asarray(pixels, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0)
    return np.ascontiguousarray(np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8))


def to_rgb_pil(image: LoadedImage) -> Image.Image:
    """Return an 8-bit RGB Pillow copy of ``image`` (grey replicated in R, G, B), same size."""
    grey = Image.fromarray(to_uint8(image.pixels))
    return grey.convert("RGB")


def read_image(
    path: str | os.PathLike[str],
    *,
    max_pixels: int = 60_000_000,
    min_side: int = 8,
) -> LoadedImage:
    """Read one image file into a :class:`LoadedImage` (see the module docstring for conventions).

    ``max_pixels``: refuse (kind "too_large") files whose header declares more than this many
    pixels (width * height of one frame), before decoding. ``min_side``: refuse (kind
    "too_small") images whose smaller side is below this many pixels. DICOM is recognised by a
    ``.dcm``/``.dicom`` suffix or the ``DICM`` magic at byte 128; everything else goes through
    Pillow. Multi-frame files: the first frame is used. Raises :class:`ImageReadError`.
    """
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ImageReadError("missing", path, "no such file") from None
    except OSError as exc:
        raise ImageReadError("missing", path, f"cannot access the file ({exc})") from None
    if not p.is_file():
        raise ImageReadError("not_an_image", path, "not a regular file")
    if st.st_size == 0:
        raise ImageReadError("zero_byte", path, "the file is empty (0 bytes)")

    try:
        with open(p, "rb") as fh:
            head = fh.read(_DICOM_MAGIC_OFFSET + len(_DICOM_MAGIC))
    except OSError as exc:
        raise ImageReadError("missing", path, f"cannot open the file ({exc})") from None

    has_magic = head[_DICOM_MAGIC_OFFSET:] == _DICOM_MAGIC
    if has_magic:
        image = _read_dicom(p, path, has_magic=True, max_pixels=max_pixels, min_side=min_side)
    elif p.suffix.lower() in _DICOM_SUFFIXES:
        # A .dcm name without the DICM magic: an old preamble-less DICOM file, or a mislabelled
        # raster file; try DICOM first, then Pillow, and report the DICOM reason if both fail.
        try:
            image = _read_dicom(
                p, path, has_magic=False, max_pixels=max_pixels, min_side=min_side
            )
        except ImageReadError as dicom_exc:
            if dicom_exc.kind != "not_an_image":
                raise
            try:
                image = _read_pil(p, path, max_pixels=max_pixels, min_side=min_side)
            except ImageReadError as pil_exc:
                if pil_exc.kind != "not_an_image":
                    raise
                raise dicom_exc from None
    else:
        image = _read_pil(p, path, max_pixels=max_pixels, min_side=min_side)

    if min(image.width, image.height) < min_side:
        # Normally caught from the header already; this is the backstop for odd paths.
        raise ImageReadError(
            "too_small", path, f"{image.width}x{image.height} pixels, smaller side < {min_side}"
        )
    return image


# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------


def _check_size(path: str | os.PathLike[str], width: int, height: int, max_pixels: int) -> None:
    """Refuse a header-declared size before decoding (kind "too_large"; empty -> "not_an_image")."""
    if width <= 0 or height <= 0:
        raise ImageReadError(
            "not_an_image", path, f"header declares an empty size {width}x{height}"
        )
    n = int(width) * int(height)
    if n > max_pixels:
        raise ImageReadError(
            "too_large",
            path,
            f"header declares {width}x{height} = {n} pixels, over the limit of {max_pixels} "
            "(max_pixels); refused before decoding",
        )


def _check_min_side(path: str | os.PathLike[str], width: int, height: int, min_side: int) -> None:
    """Refuse an image whose smaller side is below ``min_side`` pixels (kind "too_small")."""
    if min(width, height) < min_side:
        raise ImageReadError(
            "too_small", path, f"{width}x{height} pixels, smaller side < {min_side}"
        )


def _scale_min_max(values: np.ndarray) -> np.ndarray:
    """Linearly map an array from its own min..max onto 0..1 (float64; constant -> zeros)."""
    arr = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(arr)
    if not finite.all():
        arr = np.where(finite, arr, np.nan)
    if not finite.any():
        return np.zeros(arr.shape, dtype=np.float64)
    lo = float(np.nanmin(arr))
    hi = float(np.nanmax(arr))
    if not hi > lo:
        return np.zeros(arr.shape, dtype=np.float64)
    out = (arr - lo) / (hi - lo)
    return np.nan_to_num(out, nan=0.0)


def _finish(unit: np.ndarray) -> np.ndarray:
    """Clip to [0, 1], replace NaN by 0 and return a C-contiguous float32 array."""
    arr = np.nan_to_num(np.asarray(unit, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0)
    arr = np.clip(arr, 0.0, 1.0).astype(np.float32)
    return np.ascontiguousarray(arr)


# --------------------------------------------------------------------------------------------
# Pillow path
# --------------------------------------------------------------------------------------------

_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    EOFError,
    ValueError,
    IndexError,
    struct.error,
    zlib.error,
)


def _pil_formats() -> list[str]:
    """The allowed Pillow formats that this Pillow build can open."""
    Image.init()
    return [f for f in PIL_FORMATS if f in Image.OPEN]


def _read_pil(
    p: Path, path: str | os.PathLike[str], *, max_pixels: int, min_side: int
) -> LoadedImage:
    # Note: catch_warnings changes process-wide filters for the duration of the call.
    with warnings.catch_warnings():
        # Pillow's own bomb check warns between MAX_IMAGE_PIXELS and twice that: make it an error
        # so it cannot leak; it is reported as "too_large" like Pillow's hard error.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(p, formats=_pil_formats())
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageReadError(
                "too_large", path, f"refused before decoding by Pillow's pixel limit: {exc}"
            ) from None
        except UnidentifiedImageError:
            raise ImageReadError(
                "not_an_image", path, "not a recognised image format (is it a text/HTML file?)"
            ) from None
        except _DECODE_ERRORS as exc:
            raise ImageReadError("not_an_image", path, f"unreadable image header ({exc})") from None

        with im:
            fmt = (im.format or p.suffix.lstrip(".") or "unknown").lower()
            width, height = im.size
            _check_size(path, width, height, max_pixels)
            _check_min_side(path, width, height, min_side)
            try:
                if getattr(im, "n_frames", 1) > 1:
                    im.seek(0)
                im.load()  # full decode; truncated data raises here
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise ImageReadError(
                    "too_large", path, f"refused by Pillow's pixel limit: {exc}"
                ) from None
            except MemoryError:
                raise ImageReadError(
                    "too_large", path, f"not enough memory to decode {width}x{height} pixels"
                ) from None
            except _DECODE_ERRORS as exc:
                raise ImageReadError(
                    "truncated",
                    path,
                    f"the {fmt.upper()} header parsed but the pixel data could not be decoded in "
                    f"full (truncated or corrupt file): {exc}",
                ) from None

            source_mode = im.mode
            bit_depth = _pil_bit_depth(im)
            try:
                oriented = ImageOps.exif_transpose(im)
            except Exception as exc:  # malformed EXIF: refuse rather than guess the orientation
                raise ImageReadError(
                    "unsupported", path, f"could not apply the EXIF orientation ({exc})"
                ) from None
            try:
                unit = _pil_to_unit(oriented)
            except (ValueError, OSError, TypeError, KeyError) as exc:
                raise ImageReadError(
                    "unsupported",
                    path,
                    f"cannot convert Pillow mode {source_mode!r} to grey ({exc})",
                ) from None

    h, w = unit.shape
    return LoadedImage(
        pixels=_finish(unit),
        width=int(w),
        height=int(h),
        source_format=fmt,
        source_mode=source_mode,
        bit_depth=bit_depth,
    )


def _pil_bit_depth(im: Image.Image) -> int:
    """Bits per sample as stored in the file (best effort from the Pillow mode and tags)."""
    mode = im.mode
    if mode == "1":
        return 1
    if mode.startswith("I;16"):
        return 16
    if mode in ("I", "F"):
        if im.format == "PNG":
            return 16  # Pillow opens 16-bit greyscale PNGs as "I" in some versions
        tags = getattr(im, "tag_v2", None)
        if tags is not None:
            bps = tags.get(258)  # TIFF BitsPerSample
            if isinstance(bps, (tuple, list)) and bps:
                return int(bps[0])
            if isinstance(bps, int):
                return bps
        return 32
    return 8


def _alpha_weight(alpha: np.ndarray) -> np.ndarray | None:
    """Alpha as 0..1 weights, or None when the channel is constant (and thus ignored)."""
    if alpha.size == 0 or alpha.min() == alpha.max():
        return None
    return alpha.astype(np.float64) / 255.0


def _pil_to_unit(im: Image.Image) -> np.ndarray:
    """Convert a loaded Pillow image to a float64 H x W array in [0, 1] (see module docstring)."""
    mode = im.mode

    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(im)
        if arr.ndim != 2:
            raise ValueError(f"unexpected array shape {arr.shape} for mode {mode}")
        return _scale_min_max(arr)

    if mode == "L":
        return np.asarray(im, dtype=np.float64) / 255.0
    if mode == "1":
        return np.asarray(im.convert("L"), dtype=np.float64) / 255.0

    if mode == "P":
        if "transparency" in im.info:
            im = im.convert("RGBA")
            mode = "RGBA"
        else:
            return np.asarray(im.convert("L"), dtype=np.float64) / 255.0
    if mode == "PA":
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("La", "RGBa"):
        im = im.convert("LA" if mode == "La" else "RGBA")
        mode = im.mode

    if mode == "LA":
        arr = np.asarray(im)
        grey = arr[..., 0].astype(np.float64) / 255.0
        weight = _alpha_weight(arr[..., 1])
        return grey if weight is None else grey * weight
    if mode == "RGBA":
        alpha = np.asarray(im.getchannel("A"))
        grey = np.asarray(im.convert("RGB").convert("L"), dtype=np.float64) / 255.0
        weight = _alpha_weight(alpha)
        return grey if weight is None else grey * weight

    if mode == "RGB":
        return np.asarray(im.convert("L"), dtype=np.float64) / 255.0
    # CMYK (incl. Adobe-inverted JPEG, undone by the decoder), YCbCr, LAB, HSV, RGBX, ...
    return np.asarray(im.convert("RGB").convert("L"), dtype=np.float64) / 255.0


# --------------------------------------------------------------------------------------------
# DICOM path
# --------------------------------------------------------------------------------------------


def _import_pydicom(path: str | os.PathLike[str]) -> Any:
    try:
        import pydicom  # noqa: PLC0415 - optional dependency, imported lazily
    except ImportError:
        raise ImageReadError(
            "dicom_unavailable",
            path,
            "DICOM support needs pydicom, which is not installed: pip install .[dicom]",
        ) from None
    return pydicom


def _dicom_luts() -> tuple[Any, Any]:
    """(apply_modality_lut, apply_voi_lut) from pydicom >= 3 or the older location."""
    try:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut  # noqa: PLC0415
    except ImportError:  # pydicom < 3
        from pydicom.pixel_data_handlers.util import (  # noqa: PLC0415
            apply_modality_lut,
            apply_voi_lut,
        )
    return apply_modality_lut, apply_voi_lut


def _read_dicom(
    p: Path, path: str | os.PathLike[str], *, has_magic: bool, max_pixels: int, min_side: int
) -> LoadedImage:
    pydicom = _import_pydicom(path)
    from pydicom.errors import InvalidDicomError  # noqa: PLC0415

    try:
        ds = pydicom.dcmread(p, force=not has_magic)
    except InvalidDicomError as exc:
        raise ImageReadError("not_an_image", path, f"not a DICOM file ({exc})") from None
    except (EOFError, OSError, struct.error) as exc:
        kind = "truncated" if has_magic else "not_an_image"
        raise ImageReadError(kind, path, f"the DICOM header could not be parsed ({exc})") from None
    except Exception as exc:  # pydicom raises many types on garbage input
        kind = "truncated" if has_magic else "not_an_image"
        raise ImageReadError(kind, path, f"the DICOM header could not be parsed ({exc})") from None

    has_pixels = any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
    if not has_pixels:
        if not has_magic and not any(k in ds for k in ("SOPClassUID", "Modality", "Rows")):
            raise ImageReadError("not_an_image", path, "no DICOM content found")
        raise ImageReadError("dicom_no_pixels", path, "the DICOM file has no Pixel Data element")

    try:
        rows = int(ds.Rows)
        cols = int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        raise ImageReadError(
            "unsupported", path, "the DICOM file has pixel data but no valid Rows/Columns"
        ) from None
    _check_size(path, cols, rows, max_pixels)
    _check_min_side(path, cols, rows, min_side)

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    bits_stored = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)) or 8)

    frame = _decode_dicom_first_frame(ds, path)

    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        if frame.ndim != 2:
            raise ImageReadError(
                "unsupported", path, f"unexpected {photometric} frame shape {frame.shape}"
            )
        unit = _dicom_mono_to_unit(frame, ds, path)
        invert = photometric == "MONOCHROME1"
        if str(ds.get("PresentationLUTShape", "")).strip().upper() == "INVERSE":
            invert = not invert
        if invert:
            unit = 1.0 - unit
    elif photometric == "RGB" or photometric.startswith("YBR"):
        # pydicom returns YBR data converted to RGB by default; reduce to ITU-R 601 luma.
        if frame.ndim != 3 or frame.shape[-1] != 3:
            raise ImageReadError(
                "unsupported", path, f"unexpected {photometric} frame shape {frame.shape}"
            )
        rgb = frame.astype(np.float64)
        luma = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
        unit = luma / float(2**bits_stored - 1)
    else:
        raise ImageReadError(
            "unsupported",
            path,
            f"DICOM Photometric Interpretation {photometric!r} is not supported",
        )

    h, w = unit.shape
    return LoadedImage(
        pixels=_finish(unit),
        width=int(w),
        height=int(h),
        source_format="dicom",
        source_mode=photometric,
        bit_depth=bits_stored,
    )


def _decode_dicom_first_frame(ds: Any, path: str | os.PathLike[str]) -> np.ndarray:
    """Decode only the first frame where pydicom allows it (pydicom >= 3), else all then [0]."""
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    ts_name = getattr(tsyntax, "name", None) or str(tsyntax or "unknown transfer syntax")
    try:
        try:
            from pydicom.pixels import pixel_array  # noqa: PLC0415
        except ImportError:
            pixel_array = None
        if pixel_array is not None:
            arr = pixel_array(ds, index=0)
        else:
            arr = ds.pixel_array
            if int(ds.get("NumberOfFrames", 1) or 1) > 1:
                arr = arr[0]
    except (NotImplementedError, RuntimeError, ImportError) as exc:
        raise ImageReadError(
            "unsupported",
            path,
            f"cannot decode DICOM pixel data in transfer syntax {ts_name!r} (a decoder plugin "
            f"such as pylibjpeg or GDCM may be needed): {exc}",
        ) from None
    except MemoryError:
        raise ImageReadError(
            "too_large", path, "not enough memory to decode the pixel data"
        ) from None
    except (ValueError, EOFError, OSError, struct.error, IndexError) as exc:
        raise ImageReadError(
            "truncated", path, f"the DICOM pixel data could not be decoded in full: {exc}"
        ) from None
    return np.asarray(arr)


def _dicom_mono_to_unit(frame: np.ndarray, ds: Any, path: str | os.PathLike[str]) -> np.ndarray:
    """Modality LUT, then VOI LUT / window mapped to 0..1, else min..max (MONOCHROME2 sense).

    The first VOI LUT Sequence item wins over Window Center/Width (pydicom's default); a VOI
    that cannot be applied (e.g. Window Width 0) falls back to min..max of the modality values.
    """
    apply_modality_lut, apply_voi_lut = _dicom_luts()
    try:
        values = np.asarray(apply_modality_lut(frame, ds), dtype=np.float64)
    except Exception as exc:
        raise ImageReadError(
            "unsupported", path, f"cannot apply the DICOM modality LUT / rescale ({exc})"
        ) from None

    voi_lut = ds.get("VOILUTSequence")
    has_voi_lut = bool(voi_lut) and all(
        voi_lut[0].get(k) is not None for k in ("LUTDescriptor", "LUTData")
    )
    has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    if not (has_voi_lut or has_window):
        return _scale_min_max(values)

    try:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            if has_voi_lut:
                # LUT inputs are discrete entries: index with the rounded modality values.
                lut_in = np.rint(np.nan_to_num(values)).astype(np.int64)
                out = np.asarray(apply_voi_lut(lut_in, ds), dtype=np.float64)
                # The LUT's own output range: run every LUT input through it.
                desc = [int(v) for v in voi_lut[0].LUTDescriptor]
                n_entries = desc[0] or 2**16
                probe = np.arange(desc[1], desc[1] + n_entries, dtype=np.int64)
                lut_out = np.asarray(apply_voi_lut(probe, ds), dtype=np.float64)
                lo, hi = float(lut_out.min()), float(lut_out.max())
            else:
                out = np.asarray(apply_voi_lut(values, ds), dtype=np.float64)
                # Window output at -inf / +inf = the window's lower / upper output level.
                ends = np.asarray(
                    apply_voi_lut(np.array([-np.inf, np.inf], dtype=np.float64), ds),
                    dtype=np.float64,
                )
                lo, hi = float(ends[0]), float(ends[1])
    except Exception:
        # Archives carry broken VOI data (zero window width, malformed LUT); the stored values
        # are still usable, so fall back to the min..max mapping instead of refusing the file.
        return _scale_min_max(values)

    if not np.isfinite([lo, hi]).all() or lo == hi:
        return _scale_min_max(out)
    return (out - lo) / (hi - lo)
