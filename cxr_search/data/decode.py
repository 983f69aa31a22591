"""Safe decoding of one X-ray file to an 8-bit grayscale array.

Formats are whitelisted by content (magic bytes), never by file extension: PNG, JPEG, BMP, TIFF (Pillow) and
DICOM (pydicom). Pillow's decompression-bomb guard stays on and is treated as an error. High bit-depth data
(16-bit PNG/TIFF, 32-bit integer or float images, DICOM) is scaled explicitly from the image's actual value
range to 0..255, which keeps the ordering of values; Pillow's own ``convert("L")`` would clamp them.
Every failure is a :class:`DecodeError` with a one-line reason for the integrity report.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Content signatures of the accepted formats -> the Pillow format name that may open them.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
ACCEPTED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "DICOM")

# Pillow modes read as gray/colour 8-bit, and the high bit-depth ones scaled explicitly.
_COLOUR_MODES = {"RGB", "RGBX", "CMYK", "YCbCr", "RGBA", "RGBa", "LA", "La", "P", "PA", "1", "L"}
_WIDE_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
_EXIF_ORIENTATION = 0x0112


class DecodeError(Exception):
    """A file that cannot be used as an image; ``reason`` is a short sentence for the integrity report."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def sniff_format(head: bytes) -> str | None:
    """The accepted format whose signature starts ``head`` (the first 132 bytes of a file), else None."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "DICOM"
    for magic, fmt in _SIGNATURES:
        if head.startswith(magic):
            return fmt
    return None


def decode(path: str | Path) -> np.ndarray:
    """Read one image file as uint8 grayscale.

    Args:
        path: the file; its format is decided by its content (PNG, JPEG, BMP, TIFF or DICOM).

    Returns:
        np.ndarray uint8 [H, W].

    Raises:
        DecodeError: with a reason (empty file, unsupported content, truncated data, decompression bomb, ...).
    """
    return decode_with_info(path)[0]


def decode_with_info(path: str | Path) -> tuple[np.ndarray, str]:
    """Like :func:`decode`, also returning a ``"FORMAT/mode"`` description (e.g. ``"PNG/I;16"``) for reports."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError as e:
        raise DecodeError(f"cannot read file: {e.strerror or e}") from None
    if not head:
        raise DecodeError("empty file (0 bytes)")
    fmt = sniff_format(head)
    if fmt is None:
        raise DecodeError(f"not a supported image: content is none of {', '.join(ACCEPTED_FORMATS)}")
    if fmt == "DICOM":
        return _decode_dicom(path)
    return _decode_pillow(path, fmt)


def _decode_pillow(path: Path, fmt: str) -> tuple[np.ndarray, str]:
    try:
        with warnings.catch_warnings():
            # The bomb guard warns above MAX_IMAGE_PIXELS and raises above twice that: both are refusals here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=[fmt]) as img:
                img.load()  # decode now so truncated data fails here, not later
                mode = img.mode
                if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:  # a phone photo of a film, rotated by its tag
                    img = ImageOps.exif_transpose(img)
                gray = _pillow_to_gray(img)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise DecodeError(f"decompression bomb guard: {e}") from None
    except DecodeError:
        raise
    except (OSError, ValueError, SyntaxError) as e:  # Pillow's errors for truncated/corrupt data
        raise DecodeError(f"corrupt or truncated {fmt}: {e}") from None
    return gray, f"{fmt}/{mode}"


def _pillow_to_gray(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in _WIDE_MODES:
        return scale_to_uint8(np.asarray(img))
    if mode not in _COLOUR_MODES:
        raise DecodeError(f"unsupported pixel mode {mode!r}")
    if mode in ("P", "PA"):
        img = img.convert("RGBA")  # keeps palette transparency as alpha
    elif mode in ("La", "RGBa"):
        img = img.convert(mode.replace("a", "A"))
    if img.mode in ("RGBA", "LA"):
        # Transparent pixels become black (the air around a radiograph); opaque pixels keep their gray.
        alpha = np.asarray(img.getchannel("A"), dtype=np.float32) / 255.0
        gray = np.asarray(img.convert("RGB" if img.mode == "RGBA" else "L").convert("L"), dtype=np.float32)
        return np.rint(gray * alpha).astype(np.uint8)
    if img.mode in ("CMYK", "YCbCr", "RGBX"):
        img = img.convert("RGB")
    return np.asarray(img.convert("L"), dtype=np.uint8)


def scale_to_uint8(values: np.ndarray) -> np.ndarray:
    """Linearly map an array's actual value range [min, max] onto 0..255 (order-preserving; constant -> 0).

    Args:
        values: any real-valued 2-D array (16-bit, 32-bit integer, float).
    """
    v = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(v)
    if not finite.all():
        v = np.where(finite, v, np.nan)
    lo, hi = np.nanmin(v), np.nanmax(v)
    if not np.isfinite(lo) or hi <= lo:
        return np.zeros(v.shape, dtype=np.uint8)
    out = np.rint((v - lo) * (255.0 / (hi - lo)))
    return np.nan_to_num(out, nan=0.0).astype(np.uint8)


def _decode_dicom(path: Path) -> tuple[np.ndarray, str]:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(path)
        rows, cols = int(ds.Rows), int(ds.Columns)
        limit = Image.MAX_IMAGE_PIXELS
        if limit and rows * cols > limit:  # the same guard Pillow applies to other formats
            raise DecodeError(f"decompression bomb guard: {rows}x{cols} pixels exceeds the limit of {limit}")
        arr = ds.pixel_array
    except DecodeError:
        raise
    except Exception as e:  # pydicom raises many types for bad or compressed data; all are a reason here
        raise DecodeError(f"unreadable DICOM: {type(e).__name__}: {e}") from None
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        arr = arr[0]  # multi-frame: the first frame
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        if arr.ndim != 3:
            raise DecodeError(f"unsupported DICOM photometric interpretation {photometric}")
        rgb = arr.astype(np.float64)  # pydicom returns RGB for colour data it can convert
        gray = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
        return scale_to_uint8(gray), f"DICOM/{photometric}"
    values = apply_modality_lut(arr, ds)  # stored values -> physical units (rescale slope/intercept or LUT)
    values = apply_voi_lut(values, ds)  # window/VOI LUT when the file defines one; unchanged otherwise
    gray = scale_to_uint8(values)
    if photometric == "MONOCHROME1":  # minimum value is white: invert so that dense tissue is bright
        gray = 255 - gray
    return gray, f"DICOM/{photometric}"
