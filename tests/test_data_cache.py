"""The array cache is reused across runs and invalidated when a file or a preprocessing setting changes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_search import CLASSES
from cxr_search.data import cache, integrity
from cxr_search.data.prepare import prepare
from cxr_search.data.scan import scan


def _image(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h, w = rng.integers(40, 70, 2)
    return rng.integers(0, 256, (h, w), dtype=np.uint8)


@pytest.fixture
def data(tmp_path, monkeypatch) -> Path:
    """A small Kaggle-layout folder (8 train + 2 test images per class, one patient each) and a private cache."""
    monkeypatch.setenv("CXR_SEARCH_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "data"
    seed = 0
    for split, n in (("train", 8), ("test", 2)):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                seed += 1
                Image.fromarray(_image(seed)).save(root / split / c / f"{c.lower()}{i}.png")
    return root


def _all_images(d) -> np.ndarray:
    return np.concatenate([d.train.images, d.val.images, d.test.images])


def _image_of(d, path: Path) -> np.ndarray:
    paths = np.concatenate([d.train.paths, d.val.paths, d.test.paths])
    return _all_images(d)[np.flatnonzero(paths == str(path))[0]]


def _no_decoding(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a cache hit must not decode images")

    monkeypatch.setattr(integrity, "examine_files", refuse)


def test_second_run_is_a_hit_that_decodes_nothing(data, monkeypatch):
    first = prepare(data, size=32, progress=False)
    assert first.report["cache"]["hit"] is False
    _no_decoding(monkeypatch)
    second = prepare(data, size=32, progress=False)
    assert second.report["cache"]["hit"] is True and second.cache_key == first.cache_key
    np.testing.assert_array_equal(_all_images(first), _all_images(second))
    assert second.report["summary"] == first.report["summary"]
    loaded = cache.build_or_load(scan(data), size=32)
    assert isinstance(loaded.images, np.memmap) and not loaded.images.flags.writeable  # shared, read-only


def test_changed_file_invalidates_and_touched_file_does_not(data, monkeypatch):
    first = prepare(data, size=32, progress=False)
    target = data / "train/NORMAL/normal3.png"
    os.utime(target, ns=(1, 1))  # new mtime, same bytes: the content key still matches
    with monkeypatch.context() as m:
        _no_decoding(m)
        touched = prepare(data, size=32, progress=False)
    assert touched.cache_key == first.cache_key
    Image.fromarray(255 - _image(999)).save(target)
    changed = prepare(data, size=32, progress=False)
    assert changed.cache_key != first.cache_key and changed.report["cache"]["hit"] is False
    assert not np.array_equal(_image_of(first, target), _image_of(changed, target))


@pytest.mark.parametrize("setting", [{"size": 24}, {"equalize": "clahe"}, {"equalize": "none"}])
def test_preprocessing_setting_changes_the_key(data, setting):
    base = prepare(data, size=32, progress=False)
    other = prepare(data, **{"size": 32, **setting}, progress=False)
    assert other.cache_key != base.cache_key and other.report["cache"]["hit"] is False
    assert other.train.images.shape[1:] == (setting.get("size", 32),) * 2


def test_moved_folder_reuses_the_content_addressed_cache(data, tmp_path, monkeypatch):
    first = prepare(data, size=32, progress=False)
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    _no_decoding(monkeypatch)
    again = prepare(moved, size=32, progress=False)
    assert again.cache_key == first.cache_key
    assert all(p.startswith(str(moved)) for p in again.train.paths)  # paths point at the new folder


def test_preprocess_resizes_whole_image_and_equalizes():
    gray = np.tile(np.linspace(100, 140, 80).astype(np.uint8), (40, 1))  # low-contrast 40x80 ramp
    plain = cache.preprocess(gray, size=32, equalize="none")
    equalized = cache.preprocess(gray, size=32, equalize="hist")
    assert plain.shape == equalized.shape == (32, 32)  # aspect ignored, as in the study
    assert plain.min() >= 99 and plain.max() <= 141  # resizing alone keeps the intensity range
    assert equalized.max() - equalized.min() > 200  # equalization stretches it to the full range
    assert np.all(np.diff(equalized[0].astype(int)) >= 0)  # and keeps the ordering
