"""Real DICOM as hospitals export it, tried on the test files pydicom ships (an independent corpus): every file
holding a grayscale or RGB image decodes, the rest are quarantined with a reason a person understands."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from cxr_search.data.decode import DecodeError, decode, decode_with_info

READABLE = ("DICOM holds no image: ", "without pixel data (header only)", "DICOM pixel data truncated",
            "could not be decoded", "unreadable DICOM", "not a supported image")
# Compressed transfer syntaxes that need pydicom's decoder plugins (pylibjpeg + libjpeg/openjpeg/rle).
NEEDS_PLUGINS = {
    "SC_rgb_jpeg_gdcm.dcm": "JPEG Lossless, Process 14 (the usual PACS export of CR/DX films)",
    "MR_small_jpeg_ls_lossless.dcm": "JPEG-LS lossless",
    "JPEGLSNearLossless_16.dcm": "JPEG-LS near-lossless, 16 bit",
    "JPGExtended.dcm": "JPEG Extended, 12 bit",
    "GDCMJ2K_TextGBR.dcm": "JPEG 2000",
}


@pytest.fixture(scope="module")
def corpus() -> dict[str, tuple[bool, str]]:
    from pydicom.data import get_testdata_files

    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the odd files it was given on purpose
        for path in sorted(f for f in get_testdata_files() if f.endswith(".dcm") and os.path.isfile(f)):
            try:
                out[os.path.basename(path)] = (True, decode_with_info(path)[1])
            except DecodeError as e:
                out[os.path.basename(path)] = (False, e.reason)
    return out


def test_every_pydicom_test_file_decodes_or_has_a_readable_reason(corpus):
    assert len(corpus) >= 70
    for name, (ok, text) in corpus.items():
        if not ok:
            assert "\n" not in text and "AttributeError" not in text, (name, text)
            assert any(r in text for r in READABLE), (name, text)
    assert sum(ok for ok, _ in corpus.values()) >= 58  # 49 before the decoder plugins were installed


def test_compressed_transfer_syntaxes_decode_with_the_plugins(corpus):
    for name in NEEDS_PLUGINS:
        assert corpus[name][0], (name, NEEDS_PLUGINS[name], corpus[name][1])


def test_files_without_an_image_say_what_they_hold(corpus):
    assert corpus["rtplan.dcm"] == (False, "DICOM holds no image: RT Plan")
    assert corpus["test-SR.dcm"] == (False, "DICOM holds no image: Comprehensive SR")
    assert corpus["waveform_ecg.dcm"][1] == "DICOM holds no image: 12-lead ECG Waveform"
    assert corpus["ExplVR_LitEndNoMeta.dcm"][1] == "DICOM holds no image: RT Ion Plan"  # read without a header
    assert "truncated" in corpus["MR_truncated.dcm"][1]


def test_multi_frame_gives_the_first_frame_and_says_so(corpus):
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    assert corpus["rtdose.dcm"] == (True, "DICOM/MONOCHROME2/first of 15 frames")
    path = get_testdata_file("SC_rgb_rle_2frame.dcm")
    gray = decode(path)
    first = dcmread(path).pixel_array[0].astype(float)
    expected = first[..., 0] * 0.299 + first[..., 1] * 0.587 + first[..., 2] * 0.114
    assert gray.shape == expected.shape
    assert np.corrcoef(gray.ravel(), expected.ravel())[0, 1] > 0.999


def test_headerless_dicom_image_is_read(tmp_path: Path):
    """DICOM written without the 128-byte preamble and file meta header, as some exporters do."""
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1.1", generate_uid()  # Digital X-Ray
    ds.Modality = "DX"
    pixels = np.tile(np.arange(0, 4000, 50, dtype=np.uint16), (40, 1))
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    path = tmp_path / "export.dcm"
    ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert path.read_bytes()[128:132] != b"DICM"
    gray, fmt = decode_with_info(path)
    assert fmt == "DICOM/MONOCHROME2" and gray.shape == pixels.shape
    assert gray[0, 0] == 0 and gray[0, -1] == 255 and np.all(np.diff(gray[0].astype(int)) >= 0)
