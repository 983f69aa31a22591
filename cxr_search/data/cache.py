"""Preprocess a scanned data set once into a content-addressed, memory-mapped uint8 array cache.

Preprocessing: decode to 8-bit grayscale (:mod:`cxr_search.data.decode`), then the recorded albumentations
pipeline of :mod:`cxr_search.data.preprocess` (resize the whole image to ``size x size``, then histogram
equalization, CLAHE or nothing); ``predict`` replays the same record on new files.

Cache policy. A folder ``cache_root()/arrays/<content key>/`` holds ``images.npy`` (uint8 [N, size, size], the
usable images only), ``facts.parquet`` (every scanned record: relative path, label, patient, split, decode
result) and ``pairs.parquet`` (duplicate pairs). The content key hashes every file's bytes (BLAKE2b) with its
relative path, label, split and patient, the preprocessing settings and ``CACHE_VERSION``; moving the data
folder keeps the key. Hashing thousands of files costs seconds, so a stat index
``arrays/by-stat/<stat key>`` maps a hash of every file's (relative path, size, mtime_ns), the root and the
settings to the content key: a run over unchanged files reads no file contents. A file rewritten with the same
size and mtime (e.g. ``cp -p`` of a different file) is not noticed; delete the cache folder to force a rebuild.
Folders are written to a temporary name and renamed, so concurrent builders never see a half-written cache and
concurrent trials share one read-only memory map.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_search.data import integrity
from cxr_search.data.preprocess import Preprocessing
from cxr_search.data.scan import ScanResult, relative_path
from cxr_search.io.paths import cache_root

# Bump when decoding or preprocessing changes what an image becomes. 2: the albumentations pipeline uses
# INTER_AREA when any side shrinks (1: only when both did), so images with one side above and one below
# the target size changed (tests/test_data_cache.py compares the two on phantoms).
CACHE_VERSION = 2


@dataclass
class ArrayCache:
    """A loaded cache: usable images (memory-mapped) and the facts of every scanned record."""

    key: str
    folder: Path
    images: np.ndarray  # uint8 [N_usable, size, size], read-only memory map
    facts: pd.DataFrame  # one row per record: path (absolute), label, patient_id, split, ok, reason, ...
    pairs: pd.DataFrame  # duplicate pairs: a, b index usable rows (= rows of images), kind, similarity
    hit: bool  # True when nothing was decoded

    @property
    def usable(self) -> pd.DataFrame:
        """Facts of the usable records, in the order of ``images``."""
        return self.facts[self.facts["ok"]].reset_index(drop=True)


def preprocess(gray: np.ndarray, size: int = 128, equalize: str = "hist") -> np.ndarray:
    """Resize a grayscale image to ``size x size`` (aspect ignored) and equalize its contrast.

    Args:
        gray: uint8 [H, W].
        size: output side in pixels.
        equalize: "hist" (global histogram equalization), "clahe" or "none".

    Returns:
        uint8 [size, size], exactly what the cache stores (:class:`Preprocessing` is the one definition).
    """
    return Preprocessing.build(size, equalize)(gray)


def build_or_load(
    scan_result: ScanResult,
    *,
    size: int = 128,
    equalize: str = "hist",
    workers: int | None = None,
    progress: bool = True,
) -> ArrayCache:
    """Load the cache of these files and settings, building it (decode, preprocess, find duplicates) if missing.

    Args:
        scan_result: the scanned data folder; quarantined entries are not part of the cache.
        size: image side in pixels after resizing.
        equalize: "hist", "clahe" or "none".
        workers: decoding processes on a miss (default: all cores).
        progress: show a progress bar while decoding.

    Returns:
        ArrayCache; ``hit`` tells whether it was reused.
    """
    pipeline = Preprocessing.build(size, equalize)  # validates the settings
    arrays = cache_root() / "arrays"
    settings = {"size": size, "equalize": equalize, "version": CACHE_VERSION,
                "thumb": integrity.THUMB_SIZE, "near_threshold": integrity.NEAR_THRESHOLD}
    records = scan_result.records
    paths = records["path"].tolist()  # lists: iterating arrow-backed string columns is slow
    rel = [relative_path(p, scan_result.root) for p in paths]
    described = list(zip(rel, records["label"].tolist(), records["split"].tolist(), records["patient_id"].tolist(),
                         strict=True))
    stat_key = _digest([settings, str(scan_result.root), [(*d, *_stat(p)) for d, p in zip(described, paths,
                                                                                          strict=True)]])
    stat_file = arrays / "by-stat" / stat_key
    key = stat_file.read_text().strip() if stat_file.is_file() else ""
    hit = bool(key) and (arrays / key / "images.npy").is_file()
    if not hit:
        key = _digest([settings, [(*d, h) for d, h in zip(described, _content_hashes(paths), strict=True)]])
        hit = (arrays / key / "images.npy").is_file()
        if not hit:
            _build(arrays, key, scan_result, rel, pipeline, workers, progress)
        _write_atomic(stat_file, key)
    return _load(arrays / key, key, scan_result.root, hit)


def _build(arrays: Path, key: str, scan_result: ScanResult, rel: list[str], pipeline: Preprocessing,
           workers: int | None, progress: bool) -> None:
    tmp = arrays / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        paths = scan_result.records["path"].tolist()
        facts, thumbs, images = [], [], []
        for f in integrity.examine_files(paths, preprocess=pipeline, workers=workers, progress=progress):
            if f.ok:
                thumbs.append(f.thumb)
                images.append(f.image)
            f.thumb = f.image = None  # keep only the small facts per record
            facts.append(f)
        stacked = np.stack(images) if images else np.zeros((0, pipeline.size, pipeline.size), np.uint8)
        np.save(tmp / "images.npy", stacked)
        table = integrity.facts_table(scan_result, facts)
        table["path"] = rel  # relative: the cache stays valid if the data folder moves
        table.to_parquet(tmp / "facts.parquet", index=False)
        thumb_array = np.stack(thumbs) if thumbs else np.zeros((0, integrity.THUMB_SIZE**2), np.float32)
        pairs = integrity.find_duplicates([f.pixel_hash for f in facts if f.ok], thumb_array)
        pairs.to_parquet(tmp / "pairs.parquet", index=False)
        (tmp / "meta.json").write_text(json.dumps({"key": key, "size": pipeline.size, "equalize": pipeline.equalize,
                                                   "version": CACHE_VERSION, "n_usable": len(images),
                                                   "preprocessing": pipeline.to_dict()}))
        try:
            tmp.rename(arrays / key)
        except OSError:  # a concurrent builder finished first; its arrays are identical
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load(folder: Path, key: str, root: Path, hit: bool) -> ArrayCache:
    images = np.load(folder / "images.npy", mmap_mode="r")
    facts = pd.read_parquet(folder / "facts.parquet")
    facts["path"] = [os.path.join(root, p) for p in facts["path"].tolist()]
    facts["ok"] = facts["ok"].astype(bool)
    pairs = pd.read_parquet(folder / "pairs.parquet")
    return ArrayCache(key, folder, images, facts, pairs, hit)


def _stat(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:  # vanished or unreadable: decoding will quarantine it
        return -1, -1
    return st.st_size, st.st_mtime_ns


def _content_hashes(paths: list[str]) -> list[str]:
    """BLAKE2b of each file's bytes, in threads (hashlib releases the GIL on large buffers)."""
    def one(path: str) -> str:
        h = hashlib.blake2b(digest_size=16)
        try:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        except OSError as e:  # unreadable: decoding will quarantine it with the reason
            return f"unreadable:{e.errno}"
        return h.hexdigest()

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        return list(pool.map(one, paths))


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)
