"""Bad input never crashes the data layer: every bad file is quarantined with its reason, good files decode right."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_search.data import decode as decode_mod
from cxr_search.data import integrity
from cxr_search.data.decode import DecodeError, decode
from cxr_search.data.prepare import prepare
from cxr_search.data.scan import scan
from cxr_search.errors import CxrError

GRADIENT16 = np.tile(np.linspace(300, 4000, 64).round().astype(np.uint16), (40, 1))  # 12-bit data in 16 bits


def _png(path: Path, array: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, **kw).save(path)
    return path


def _noise(seed: int, shape=(48, 40)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME1") -> Path:
    """A 12-bit CR DICOM file (pydicom) with the given photometric interpretation."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def bad_folder(tmp_path: Path) -> Path:
    """A Kaggle-layout folder mixing good files in odd formats with every kind of bad input."""
    root = tmp_path / "data"
    covid, normal, pneu = root / "train/COVID19", root / "train/NORMAL", root / "train/PNEUMONIA"
    _png(covid / "grad16.png", GRADIENT16)
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., :3] = 100
    rgba[:, :16, 3] = 255  # left half opaque, right half transparent
    _png(covid / "rgba.png", rgba)
    palette = Image.fromarray(_noise(1, (32, 32)) // 64, mode="L").convert("P")
    palette.putpalette([0, 0, 0, 90, 90, 90, 170, 170, 170, 255, 255, 255] + [0] * 756)
    palette.save(covid / "palette.png")
    Image.new("CMYK", (32, 32), (0, 0, 0, 100)).save(covid / "cmyk.jpg", quality=95)
    write_dicom(covid / "mono1.dcm", GRADIENT16)
    (covid / "zero.png").write_bytes(b"")
    (covid / "text.png").write_text("not an image, just text with a .png name\n")
    buf = io.BytesIO()
    Image.fromarray(_noise(2, (64, 64))).save(buf, "JPEG")
    (covid / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    _png(covid / "bomb.png", _noise(3, (100, 100)))  # 10,000 px: over the limit the tests set
    outside = _png(tmp_path / "outside" / "secret.png", _noise(4))
    os.symlink(outside, covid / "escape.png")
    _png(normal / "a.png", _noise(5))
    _png(normal / "b.png", _noise(6))
    _png(pneu / "c.png", _noise(7))
    Image.fromarray(_noise(8)).save(pneu / "d.bmp")
    Image.fromarray(_noise(9)).save(pneu / "e.tif")
    (root / "test/NORMAL").mkdir(parents=True)  # empty class folder
    _png(root / "test/COVID19/f.png", _noise(10))
    _png(root / "test/PNEUMONIA/g.png", _noise(11))
    _png(root / "train/Lung_Opacity/h.png", _noise(12))  # unknown class
    return root


@pytest.fixture
def small_bomb_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # warns above 5,000 px, raises above 10,000


def test_scan_reports_unknown_empty_and_escaping_entries(bad_folder):
    result = scan(bad_folder)
    reasons = {q["path"]: q["reason"] for q in result.quarantined}
    assert result.layout == "kaggle"
    assert "symlink leaves the data root" in reasons[os.path.join("train", "COVID19", "escape.png")]
    assert "unknown class folder" in reasons[os.path.join("train", "Lung_Opacity")]
    assert "empty class folder" in reasons[os.path.join("test", "NORMAL")]
    paths = set(result.records["path"])
    assert str(bad_folder / "train/COVID19/escape.png") not in paths
    assert not any("Lung_Opacity" in p for p in paths)
    assert len(result.records) == 16  # every file inside a known class folder, bad or not, except the symlink


def test_every_bad_file_is_quarantined_with_its_reason(bad_folder, small_bomb_limit):
    report = integrity.check(bad_folder, workers=1, progress=False)
    reasons = {Path(q["path"]).name: q["reason"] for q in report.quarantined}
    assert "empty file" in reasons["zero.png"]
    assert "not a supported image" in reasons["text.png"]
    assert "truncated" in reasons["truncated.jpg"]
    assert "decompression bomb" in reasons["bomb.png"]
    assert "symlink leaves the data root" in reasons["escape.png"]
    assert set(reasons) == {"zero.png", "text.png", "truncated.jpg", "bomb.png", "escape.png", "Lung_Opacity",
                            "NORMAL"}
    assert report.n_usable == 16 - 4
    assert report.counts["train"] == {"COVID19": 5, "PNEUMONIA": 3, "NORMAL": 2}
    assert report.counts["test"] == {"COVID19": 1, "PNEUMONIA": 1, "NORMAL": 0}
    assert any("no usable image of NORMAL" in w for w in report.warnings)


def test_bomb_guard_refuses_images_above_the_pixel_limit(tmp_path, small_bomb_limit):
    big_png = _png(tmp_path / "big.png", _noise(0, (60, 100)))  # 6,000 px: Pillow warns, we refuse
    big_dicom = write_dicom(tmp_path / "big.dcm", np.zeros((60, 100), np.uint16))
    for path in (big_png, big_dicom):
        with pytest.raises(DecodeError, match="decompression bomb"):
            decode(path)
    decode(_png(tmp_path / "small.png", _noise(0, (40, 100))))  # 4,000 px: fine


def test_sixteen_bit_gradient_keeps_its_ordering(bad_folder):
    gray = decode(bad_folder / "train/COVID19/grad16.png")
    v = GRADIENT16.astype(np.float64)
    expected = np.rint((v - v.min()) * 255 / (v.max() - v.min())).astype(np.uint8)
    assert gray.dtype == np.uint8 and gray.shape == GRADIENT16.shape
    np.testing.assert_array_equal(gray, expected)  # scaled by the actual range, not clamped at 255
    assert len(np.unique(gray)) > 60


def test_monochrome1_dicom_is_inverted(bad_folder):
    gray = decode(bad_folder / "train/COVID19/mono1.dcm")
    row = gray[0].astype(int)
    assert row[0] == 255 and row[-1] == 0  # the smallest stored value is white in MONOCHROME1
    assert np.all(np.diff(row) <= 0)


def test_colour_modes_become_the_expected_gray(bad_folder):
    rgba = decode(bad_folder / "train/COVID19/rgba.png")
    assert np.all(rgba[:, :16] == 100) and np.all(rgba[:, 16:] == 0)  # transparent -> black
    with Image.open(bad_folder / "train/COVID19/palette.png") as im:
        assert im.mode == "P"
        expected = np.asarray(im.convert("L"))
    np.testing.assert_array_equal(decode(bad_folder / "train/COVID19/palette.png"), expected)
    with Image.open(bad_folder / "train/COVID19/cmyk.jpg") as im:
        assert im.mode == "CMYK"
    cmyk = decode(bad_folder / "train/COVID19/cmyk.jpg")
    assert abs(float(cmyk.mean()) - 155) < 3  # K=100 of 255 -> gray 155


def test_format_is_decided_by_content_not_extension(tmp_path):
    png_named_jpg = tmp_path / "x.jpg"
    Image.fromarray(_noise(0)).save(png_named_jpg, format="PNG")
    np.testing.assert_array_equal(decode(png_named_jpg), _noise(0))
    gif = tmp_path / "y.png"
    Image.fromarray(_noise(1)).save(gif, format="GIF")
    with pytest.raises(DecodeError, match="not a supported image"):
        decode(gif)
    assert decode_mod.sniff_format(b"\x00" * 128 + b"DICM") == "DICOM"


def test_a_class_without_usable_image_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_SEARCH_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "data"
    for i in range(6):
        _png(root / f"train/COVID19/c{i}.png", _noise(i))
        _png(root / f"train/NORMAL/n{i}.png", _noise(10 + i))
    (root / "train/PNEUMONIA").mkdir(parents=True)
    (root / "train/PNEUMONIA/p0.png").write_bytes(b"")
    (root / "train/PNEUMONIA/p1.png").write_text("text")
    with pytest.raises(CxrError, match=r"class PNEUMONIA has no usable image .*quarantined.*empty file"):
        prepare(root, size=32, progress=False)


def test_missing_or_unrecognised_folder_names_the_accepted_layouts(tmp_path):
    with pytest.raises(CxrError, match=r"does not exist.*accepted layouts"):
        scan(tmp_path / "nope")
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff/holiday").mkdir()
    with pytest.raises(CxrError, match=r"no recognisable layout.*holiday.*accepted layouts"):
        scan(tmp_path / "stuff")
    (tmp_path / "empty/NORMAL").mkdir(parents=True)
    with pytest.raises(CxrError, match=r"no images found.*accepted layouts"):
        scan(tmp_path / "empty")


def test_flat_layout_with_aliases_and_patient_names(tmp_path):
    root = tmp_path / "flat"
    _png(root / "covid-19/a.png", _noise(0))
    _png(root / "Viral Pneumonia/person12_virus_3.png", _noise(1))
    _png(root / "Viral Pneumonia/person12_virus_4.png", _noise(2))
    _png(root / "normal/phantom-p000007-i01.png", _noise(3))
    result = scan(root)
    rec = result.records.set_index(result.records["path"].map(lambda p: Path(p).name))
    assert result.layout == "flat" and set(rec["split"]) == {""}
    assert rec.loc["a.png", "label"] == "COVID19"
    assert rec.loc["person12_virus_3.png", "label"] == "PNEUMONIA"
    assert rec.loc["person12_virus_3.png", "patient_id"] == rec.loc["person12_virus_4.png", "patient_id"] == "person12"
    assert rec.loc["phantom-p000007-i01.png", "patient_id"] == "p000007"
    assert rec.loc["a.png", "patient_id"] != rec.loc["phantom-p000007-i01.png", "patient_id"]  # one per image


def test_csv_manifest_layout(tmp_path):
    root = tmp_path / "m"
    _png(root / "img/a.png", _noise(0))
    _png(root / "img/b.png", _noise(1))
    _png(tmp_path / "outside.png", _noise(2))
    (root / "labels.csv").write_text(
        "path,label,patient_id,split\n"
        "img/a.png,COVID,P1,train\n"
        "img/b.png,normal,P2,test\n"
        "img/missing.png,NORMAL,P3,train\n"
        "../outside.png,NORMAL,P4,train\n"
        "img/a.png,Lung Opacity,P5,train\n"
    )
    for given in (root / "labels.csv", root):  # the CSV itself, or the folder holding it
        result = scan(given)
        assert result.layout == "manifest"
        assert result.records[["label", "patient_id", "split"]].values.tolist() == [
            ["COVID19", "P1", "train"], ["NORMAL", "P2", "test"]]
        reasons = {q["path"]: q["reason"] for q in result.quarantined}
        assert "does not exist" in reasons["img/missing.png"]
        assert "leaves" in reasons["../outside.png"]
        assert "unknown label" in reasons["img/a.png"]
    (root / "bad.csv").write_text("file,class\nimg/a.png,COVID\n")
    with pytest.raises(CxrError, match="lacks column"):
        scan(root / "bad.csv")
