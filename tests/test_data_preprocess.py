"""The recorded albumentations preprocessing: what the cache stores, replayable from its JSON record."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from cxr_search.data import cache
from cxr_search.data.decode import decode
from cxr_search.data.preprocess import Preprocessing, locate, read_record, write_record
from cxr_search.errors import CxrError


def preprocess_v1(gray: np.ndarray, size: int, equalize: str) -> np.ndarray:
    """The cache's preprocessing before the albumentations pipeline (CACHE_VERSION 1), kept as the reference."""
    interp = cv2.INTER_AREA if min(gray.shape) >= size else cv2.INTER_LINEAR
    out = cv2.resize(np.ascontiguousarray(gray), (size, size), interpolation=interp)
    if equalize == "hist":
        out = cv2.equalizeHist(out)
    elif equalize == "clahe":
        out = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(out)
    return out


def _phantom_images(root: Path) -> list[np.ndarray]:
    return [decode(p) for p in sorted(root.glob("t*/*/*")) if p.suffix in (".png", ".jpg")]


@pytest.mark.parametrize("equalize", ["hist", "clahe", "none"])
def test_pipeline_equals_the_old_preprocessing_except_where_one_side_shrinks_and_the_other_grows(tiny_phantoms,
                                                                                               equalize):
    images = _phantom_images(tiny_phantoms)
    assert len(images) == 120
    for size in (32, 64, 80):
        pipeline = Preprocessing.build(size, equalize)
        changed = 0
        for gray in images:
            new, old = pipeline(gray), preprocess_v1(gray, size, equalize)
            assert new.dtype == np.uint8 and new.shape == (size, size)
            mixed = min(gray.shape) < size < max(gray.shape)
            if not mixed:  # both sides shrink, both grow or stay: bit for bit the same as before
                np.testing.assert_array_equal(new, old)
                continue
            # albumentations averages (INTER_AREA) whenever a side shrinks, v1 only when both did:
            # the resize differs by a few grey levels (equalisation then stretches it), hence CACHE_VERSION 2
            changed += not np.array_equal(new, old)
            if equalize == "none":
                assert np.abs(new.astype(int) - old).max() <= 16
        if size == 32:
            assert changed == 0  # every phantom is larger than 32 px
    assert cache.CACHE_VERSION == 2


def test_record_round_trips_through_json_and_replays_the_same_pixels(tiny_phantoms, tmp_path):
    gray = _phantom_images(tiny_phantoms)[0]
    for equalize in ("hist", "clahe", "none"):
        built = Preprocessing.build(48, equalize)
        write_record(tmp_path / equalize, built.to_dict())
        replayed = Preprocessing.from_dict(json.loads(json.dumps(read_record(tmp_path / equalize))))
        assert replayed.to_dict() == built.to_dict()
        np.testing.assert_array_equal(replayed(gray), built(gray))
        np.testing.assert_array_equal(built(gray), cache.preprocess(gray, 48, equalize))
    names = [t["__class_fullname__"] for t in Preprocessing.build(48, "clahe").to_dict()["albumentations"]
             ["transform"]["transforms"]]
    assert names == ["Resize", "CLAHE"]


def test_the_cache_stores_exactly_what_the_record_replays_on_the_files(tiny_phantoms):
    from cxr_search.data.prepare import prepare

    data = prepare(tiny_phantoms, size=40, equalize="clahe", progress=False)
    replay = Preprocessing.from_dict(data.preprocessing)
    for split in (data.train, data.test):
        for path, image in list(zip(split.paths, split.images, strict=True))[:10]:
            np.testing.assert_array_equal(replay(decode(path)), image)


def test_bad_settings_and_records_are_one_line_errors(tmp_path):
    with pytest.raises(CxrError, match="equalize='histogram' is not one of hist, clahe, none"):
        Preprocessing.build(64, "histogram")
    with pytest.raises(CxrError, match="size=4 must be"):
        Preprocessing.build(4, "hist")
    with pytest.raises(CxrError, match="not a preprocessing record"):
        Preprocessing.from_dict({"size": 64})
    (tmp_path / "preprocessing.json").write_text("{broken")
    with pytest.raises(CxrError, match="unreadable"):
        read_record(tmp_path)


def test_locate_prefers_the_recorded_pipeline_and_refuses_members_that_disagree(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_record(a, Preprocessing.build(64, "hist").to_dict())
    write_record(b, Preprocessing.build(64, "clahe").to_dict())
    assert locate(folders=[a]).equalize == "hist"
    with pytest.raises(CxrError, match="different preprocessing"):
        locate(folders=[a, b])
    # no record in the folders: the experiment plan's data settings, which the caller passes
    assert locate(folders=[tmp_path / "none"], fallback=(96, "none")) == Preprocessing.build(96, "none")
    assert locate(folders=[], required=False) is None
    with pytest.raises(CxrError, match="no recorded preprocessing"):
        locate(folders=[tmp_path / "none"], where="x")
