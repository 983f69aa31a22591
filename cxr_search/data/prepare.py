"""The one entry point trainers use: a folder of X-rays (or the default phantoms) -> split uint8 arrays."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxr_search import CLASSES
from cxr_search.errors import CxrError


@dataclass(frozen=True)
class SplitArrays:
    """One split, preprocessed: grayscale uint8 images and their labels (index into CLASSES)."""

    images: np.ndarray  # uint8 [N, H, W]
    labels: np.ndarray  # int64 [N]
    patient_ids: np.ndarray  # str [N]
    paths: np.ndarray  # str [N], source file of each image

    def __len__(self) -> int:
        return int(self.labels.shape[0])



@dataclass(frozen=True)
class PreparedData:
    """Train/val/test arrays plus what is needed to reproduce and report them. Picklable (Ray ships it)."""

    train: SplitArrays
    val: SplitArrays
    test: SplitArrays
    image_size: int
    classes: tuple[str, ...] = CLASSES
    cache_key: str = ""
    split_seed: int = 0
    report: dict[str, Any] = field(default_factory=dict)  # JSON-able integrity summary, incl. "warnings"
    # JSON-able record of the per-image preprocessing (data/preprocess.py): what `predict` replays on new files
    preprocessing: dict[str, Any] = field(default_factory=dict)


def prepare(
    data_dir: str | Path | None = None,
    *,
    size: int = 128,
    equalize: str = "hist",
    val_fraction: float = 0.2,
    seed: int = 0,
    resplit: bool = False,
    duplicate_policy: str = "drop",
    progress: bool = True,
) -> PreparedData:
    """Scan, check, decode/cache and split a data set: the arrays every trial trains and evaluates on.

    The second call with the same files and settings is a cache hit (no file is decoded or read).

    Args:
        data_dir: Kaggle-layout folder, flat class folders, or a CSV manifest; None = the default phantom set.
        size: image side in pixels (images are resized whole, aspect ignored, as in the study).
        equalize: "hist" (the study's histogram equalization), "clahe" or "none".
        val_fraction: share of the training patients held out for validation (the study used 0.2).
        seed: seed of the validation (and, with ``resplit``, test) split.
        resplit: pool every image and draw train/val/test by patient, ignoring the data's own split.
        duplicate_policy: "drop" test images that duplicate or share a patient with training images, or "keep".
        progress: show progress bars while decoding.

    Returns:
        PreparedData with uint8 images, the integrity report, split counts and warnings.

    Raises:
        CxrError: missing/unrecognised folder, bad option, or a class without a usable image.
    """
    from cxr_search.data import cache, integrity, phantoms, split
    from cxr_search.data.preprocess import Preprocessing
    from cxr_search.data.scan import scan

    root = Path(data_dir) if data_dir is not None else phantoms.default_dataset()
    scanned = scan(root)
    arrays = cache.build_or_load(scanned, size=size, equalize=equalize, progress=progress)
    report = integrity.summarize(scanned, arrays.facts, arrays.pairs, shortcut=_shortcut_audit(arrays)).to_dict()
    usable = arrays.usable
    labels = usable["label"].map(CLASSES.index).to_numpy(np.int64)
    _require_every_class(labels, np.arange(len(labels)), arrays.facts, scanned.root, "")
    has_test = bool((usable["split"] == "test").any())
    split_args = dict(val_fraction=val_fraction, seed=seed, resplit=resplit, duplicate_policy=duplicate_policy)
    idx = _load_splits(arrays.folder, split_args)
    if idx is None:
        idx = split.make_splits(
            labels, usable["patient_id"].to_numpy(str), usable["split"].to_numpy(str),
            duplicate_pairs=arrays.pairs[["a", "b"]].to_numpy(), **split_args,
        )
        _save_splits(arrays.folder, split_args, idx)
    _require_every_class(labels, idx["train"], arrays.facts, scanned.root, "training ")
    patient_ids = usable["patient_id"].to_numpy(str)
    paths = usable["path"].to_numpy(str)

    def arrays_for(ix: np.ndarray) -> SplitArrays:
        return SplitArrays(np.asarray(arrays.images[ix]), labels[ix], patient_ids[ix], paths[ix])

    parts = {name: arrays_for(idx[name]) for name in ("train", "val", "test")}
    drawn_test = resplit or not has_test
    report["split"] = {
        "seed": seed, "val_fraction": val_fraction, "resplit": drawn_test, "duplicate_policy": duplicate_policy,
        "size": size, "equalize": equalize,
        "counts": {name: {c: int((p.labels == i).sum()) for i, c in enumerate(CLASSES)} for name, p in parts.items()},
        "dropped_from_test": len(idx["dropped"]),
    }
    report["cache"] = {"key": arrays.key, "hit": arrays.hit, "folder": str(arrays.folder)}
    report["warnings"] = report["warnings"] + _split_warnings(report, idx, drawn_test, has_test, duplicate_policy)
    return PreparedData(
        train=parts["train"], val=parts["val"], test=parts["test"], image_size=size, classes=CLASSES,
        cache_key=arrays.key, split_seed=seed, report=report,
        preprocessing=Preprocessing.build(size, equalize).to_dict(),
    )


def _splits_file(folder: Path, split_args: dict) -> Path:
    name = hashlib.sha256(json.dumps(split_args, sort_keys=True).encode()).hexdigest()[:16]
    return folder / "splits" / f"{name}.npz"


def _load_splits(folder: Path, split_args: dict) -> dict[str, np.ndarray] | None:
    """Splits computed earlier for this cache and these arguments (StratifiedGroupKFold takes ~1 s on 6k)."""
    path = _splits_file(folder, split_args)
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as saved:
        return {k: saved[k] for k in saved.files}


def _save_splits(folder: Path, split_args: dict, idx: dict[str, np.ndarray]) -> None:
    path = _splits_file(folder, split_args)
    try:
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.npz")
        np.savez(tmp, **idx)
        os.replace(tmp, path)
    except OSError:  # a read-only shared cache: recompute next time
        pass


def _shortcut_audit(arrays) -> dict[str, Any]:
    """The source-shortcut audit of the cached images, computed once per cache (it fits a classifier, ~seconds)."""
    from cxr_search.data import shortcuts

    path = arrays.folder / "shortcuts.json"
    if path.is_file():
        return json.loads(path.read_text())
    result = shortcuts.audit(arrays.usable)
    try:
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, path)
    except OSError:  # a read-only shared cache: recompute next time
        pass
    return result


def _require_every_class(labels: np.ndarray, idx: np.ndarray, facts, root: Path, where: str) -> None:
    """A clear error, before any training, when a class has no usable image (in ``idx``)."""
    for i, c in enumerate(CLASSES):
        if (labels[idx] == i).any():
            continue
        bad = facts[(facts["label"] == c) & ~facts["ok"]]
        why = f"; its {len(bad)} files were quarantined, e.g. {bad['reason'].iloc[0]}" if len(bad) else ""
        raise CxrError(
            f"class {c} has no usable {where}image in {root}{why}. Add {c} images (run "
            f"`cxr-search data check {root}` to see every problem)"
        )


def _split_warnings(report: dict, idx: dict, drawn_test: bool, has_test: bool, policy: str) -> list[str]:
    out = []
    s = report["summary"]
    leak = f"{s['cross_split_duplicate_pairs']} duplicate pairs and {s['patients_in_several_splits']} patients"
    if drawn_test and has_test:
        out.append("resplit: train/val/test drawn by patient from all images; the data's own test split is ignored")
    elif drawn_test:
        out.append("the data has no test split: train/val/test drawn by patient (test 20%)")
    elif len(idx["dropped"]):
        out.append(f"{leak} shared between train and test: {len(idx['dropped'])} test images dropped "
                   f"(duplicate_policy='drop')")
    elif policy == "keep" and (s["cross_split_duplicate_pairs"] or s["patients_in_several_splits"]):
        out.append(f"{leak} shared between train and test kept (duplicate_policy='keep'): test scores are optimistic")
    for name in ("val", "test"):
        counts = report["split"]["counts"][name]
        missing = [c for c, n in counts.items() if n == 0]
        if missing:
            out.append(f"the {name} split has no image of {', '.join(missing)}")
    return out
