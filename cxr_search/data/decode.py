"""Safe decoding of one X-ray file to an 8-bit grayscale array.

Formats are whitelisted by content (magic bytes), never by file extension: PNG, JPEG, BMP, TIFF (Pillow) and
DICOM (pydicom), including DICOM written without the 128-byte preamble and "DICM" header (recognised by its
first data element). Compressed DICOM pixel data (JPEG Lossless, JPEG Extended 12-bit, JPEG-LS, JPEG 2000, RLE)
is decoded by pydicom's plugins (pylibjpeg with -libjpeg, -openjpeg and -rle). Multi-frame DICOM gives its
first frame, and says so in the format ("DICOM/MONOCHROME2/first of 10 frames"). Pillow's decompression-bomb
guard stays on and is treated as an error. High bit-depth data (16-bit PNG/TIFF, 32-bit integer or float
images, DICOM) is scaled explicitly from the image's actual value range to 0..255, which keeps the ordering of
values; Pillow's own ``convert("L")`` would clamp them. Every failure is a :class:`DecodeError` with a one-line
reason a person understands ("DICOM holds no image: RT Plan") for the integrity report.
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


# DICOM without preamble starts with its first data element: group 0x0002 (file meta) or 0x0008 (identifying),
# little or big endian, then an element number and, in explicit VR, two upper-case letters.
_HEADERLESS_DICOM_GROUPS = (b"\x02\x00", b"\x08\x00", b"\x00\x08")


def sniff_format(head: bytes) -> str | None:
    """The accepted format whose signature starts ``head`` (the first 132 bytes of a file), else None."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "DICOM"
    for magic, fmt in _SIGNATURES:
        if head.startswith(magic):
            return fmt
    if len(head) >= 8 and head[:2] in _HEADERLESS_DICOM_GROUPS:
        explicit_vr = head[4:6].isalpha() and head[4:6].isupper()
        implicit_length = int.from_bytes(head[4:8], "little") < 1 << 16  # a short first element
        if explicit_vr or implicit_length:
            return "DICOM-headerless"
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
    if fmt.startswith("DICOM"):
        return _decode_dicom(path, headerless=fmt == "DICOM-headerless")
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


def _decode_dicom(path: Path, headerless: bool = False) -> tuple[np.ndarray, str]:
    import pydicom

    try:
        ds = pydicom.dcmread(path, force=headerless)
    except Exception as e:  # pydicom raises many types for bad headers; all are a reason here
        raise DecodeError(f"unreadable DICOM header: {_one_line(e)}") from None
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        _set_transfer_syntax(ds)  # no file meta header: say how the reader found the data encoded
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")) \
            or "Rows" not in ds or "Columns" not in ds:
        kind = _dicom_kind(ds)
        if kind.endswith("Image"):  # an image object whose pixels were left out (a header-only export)
            raise DecodeError(f"DICOM {kind} without pixel data (header only)")
        raise DecodeError(f"DICOM holds no image: {kind}")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (TypeError, ValueError) as e:
        raise DecodeError(f"DICOM image size unreadable: {_one_line(e)}") from None
    limit = Image.MAX_IMAGE_PIXELS
    if limit and rows * cols > limit:  # the same guard Pillow applies to other formats
        raise DecodeError(f"decompression bomb guard: {rows}x{cols} pixels exceeds the limit of {limit}")
    frames = _int_or(ds.get("NumberOfFrames"), 1)
    try:
        from pydicom.pixels import pixel_array

        arr = pixel_array(ds, index=0) if frames > 1 else ds.pixel_array  # multi-frame: decode the first only
    except Exception as e:  # missing decoder, truncated or inconsistent pixel data
        raise DecodeError(_pixel_reason(ds, e)) from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    described = f"DICOM/{photometric}" + (f"/first of {frames} frames" if frames > 1 else "")
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        try:
            arr = apply_color_lut(arr, ds)
        except Exception as e:
            raise DecodeError(f"DICOM palette colour image without a usable palette: {_one_line(e)}") from None
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise DecodeError(f"unsupported DICOM photometric interpretation {photometric}")
        rgb = arr.astype(np.float64)  # pydicom returns RGB for the colour data it converts (YBR included)
        gray = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
        return scale_to_uint8(gray), described
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(arr, ds)  # stored values -> physical units (rescale slope/intercept or LUT)
    values = apply_voi_lut(values, ds)  # window/VOI LUT when the file defines one; unchanged otherwise
    gray = scale_to_uint8(values)
    if photometric == "MONOCHROME1":  # minimum value is white: invert so that dense tissue is bright
        gray = 255 - gray
    return gray, described


def _set_transfer_syntax(ds) -> None:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    implicit, little = ds.original_encoding
    if not hasattr(ds, "file_meta") or ds.file_meta is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                      ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def _dicom_kind(ds) -> str:
    """What a DICOM file holds, in words: its SOP class ("RT Plan", "Basic Text SR"), else modality."""
    uid = ds.get("SOPClassUID") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
    name = getattr(uid, "name", "") if uid else ""
    if name and name != str(uid):
        return name.removesuffix(" Storage")
    if ds.get("DirectoryRecordSequence") is not None:
        return "a DICOMDIR (an index of other files)"
    modality = ds.get("Modality")
    return f"modality {modality}" if modality else "no pixel data, no SOP class"


def _pixel_reason(ds, error: Exception) -> str:
    text = _one_line(error)
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    syntax_name = getattr(syntax, "name", str(syntax or "unknown transfer syntax"))
    if "missing dependencies" in text or "Unable to decode" in text or "Unable to decompress" in text:
        return f"DICOM pixel data ({syntax_name}) could not be decoded: {text[:200]}"
    if "less than expected" in text or "truncated" in text.lower():
        return f"DICOM pixel data truncated: {text[:200]}"
    return f"unreadable DICOM pixel data ({syntax_name}): {type(error).__name__}: {text[:200]}"


def _int_or(value, default: int) -> int:
    try:
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def _one_line(error: Exception) -> str:
    """An exception message on one line (pydicom's span several), for the report."""
    return " ".join(str(error).split())
