"""Source-shortcut audit: can the label be predicted from everything *except* the lungs?

Published COVID-19 X-ray models learnt where an image came from (size, format, borders, burned-in markers)
instead of the disease (DeGrave et al. 2021). The audit fits a small tree ensemble (scikit-learn's
``ExtraTreesClassifier``, 60 trees) on

- file metadata: format and pixel mode (bit depth, channels), height, width, aspect ratio, file size and bytes
  per pixel;
- image statistics outside the lung fields: border strips, corner patches, global intensity
  (:func:`cxr_search.data.quality.image_stats`);

cross-validated by patient (``StratifiedGroupKFold``, 5 folds), and reports the balanced accuracy of its
out-of-fold predictions with a 95% bootstrap interval against chance (1 / number of classes). When the
interval's lower end is more than ``MARGIN`` above chance, the labels carry a shortcut: a warning says so and
names the feature group (metadata or image) that carries it.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd

from cxr_search.data.quality import STAT_NAMES

MARGIN = 0.05  # balanced accuracy this far above chance (at the interval's lower end) is "clearly above"
MIN_PER_CLASS = 5  # images per class needed for 5-fold cross-validation
N_BOOTSTRAP = 1000
METADATA_COLUMNS = ("height", "width", "aspect", "log_file_bytes", "bytes_per_pixel")
IMAGE_COLUMNS = tuple(f"stat_{n}" for n in STAT_NAMES if n != "sharpness")  # sharpness sees the lungs too


def features(table: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """The audit's feature matrix from a facts table (usable rows) and its column groups.

    Args:
        table: rows with format, height, width, file_bytes and ``stat_*`` columns.

    Returns:
        (features, {"metadata": [...], "image": [...]}).
    """
    h = table["height"].astype(float).to_numpy()
    w = table["width"].astype(float).to_numpy()
    size = table["file_bytes"].astype(float).to_numpy()
    x = pd.DataFrame({
        "height": h, "width": w, "aspect": w / np.maximum(h, 1), "log_file_bytes": np.log1p(size),
        "bytes_per_pixel": size / np.maximum(h * w, 1),
    })
    formats = pd.get_dummies(table["format"].astype(str).reset_index(drop=True), prefix="format", dtype=float)
    image = table[list(IMAGE_COLUMNS)].astype(float).reset_index(drop=True)
    x = pd.concat([x, formats, image], axis=1)
    return x, {"metadata": list(METADATA_COLUMNS) + list(formats.columns), "image": list(IMAGE_COLUMNS)}


def audit(table: pd.DataFrame, *, seed: int = 0) -> dict[str, Any]:
    """Cross-validated balanced accuracy of predicting the label from metadata and non-lung image statistics.

    Args:
        table: facts of the usable images (label, patient_id, format, height, width, file_bytes, stat_*).
        seed: seeds the folds, the classifier and the bootstrap.

    Returns:
        JSON-able dict: ``status`` ("ok" | "skipped"), ``balanced_accuracy``, ``ci`` [low, high], ``chance``,
        ``n_images``, ``classes``, ``shortcut`` (bool), per-group balanced accuracy when a shortcut is found,
        and ``reason`` when skipped.
    """
    missing = {"format", "height", "width", "file_bytes", *IMAGE_COLUMNS} - set(table.columns)
    labels = table["label"].astype(str).to_numpy() if "label" in table else np.array([])
    counts = pd.Series(labels).value_counts()
    if missing:
        return {"status": "skipped", "reason": f"facts lack {', '.join(sorted(missing))}", "shortcut": False}
    if len(counts) < 2 or counts.min() < MIN_PER_CLASS:
        return {"status": "skipped", "shortcut": False,
                "reason": f"needs at least {MIN_PER_CLASS} usable images in each of 2+ classes "
                          f"(has {', '.join(f'{c}: {n}' for c, n in counts.items()) or 'none'})"}
    x, groups = features(table)
    patients = table["patient_id"].astype(str).to_numpy()
    ba, ci = _cross_validated(x, labels, patients, seed)
    chance = 1.0 / len(counts)
    result: dict[str, Any] = {
        "status": "ok", "balanced_accuracy": round(ba, 4), "ci": [round(ci[0], 4), round(ci[1], 4)],
        "chance": round(chance, 4), "n_images": len(labels), "classes": sorted(counts.index.tolist()),
        "shortcut": bool(ci[0] > chance + MARGIN), "margin": MARGIN,
    }
    if result["shortcut"]:  # which kind of feature carries it
        result["groups"] = {name: round(_cross_validated(x[cols], labels, patients, seed)[0], 4)
                            for name, cols in groups.items()}
    return result


def warning(result: dict[str, Any]) -> str | None:
    """The report's warning line for an audit result with a shortcut, else None."""
    if not result.get("shortcut"):
        return None
    lo, hi = result["ci"]
    groups = result.get("groups", {})
    carried = f" (file metadata alone: {groups['metadata']:.2f}, image borders/corners/intensity alone: " \
              f"{groups['image']:.2f})" if groups else ""
    return (f"source shortcut: the label is predictable without the lungs, balanced accuracy "
            f"{result['balanced_accuracy']:.2f} [{lo:.2f}, {hi:.2f}] vs chance {result['chance']:.2f}{carried}; "
            "a model may learn where images came from instead of the disease")


def _cross_validated(x: pd.DataFrame, labels: np.ndarray, patients: np.ndarray, seed: int) -> tuple[float, tuple]:
    from sklearn.ensemble import ExtraTreesClassifier
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict

    # Extremely randomised trees: no scaling needed, mixed one-hot and continuous features, < 1 s a fit on 6k images
    clf = ExtraTreesClassifier(n_estimators=60, min_samples_leaf=3, class_weight="balanced", n_jobs=1,
                               random_state=seed)
    folds = StratifiedGroupKFold(n_splits=MIN_PER_CLASS, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # a rare class gets fewer folds than n_splits: fine for an audit
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        pred = cross_val_predict(clf, x.to_numpy(np.float64), labels, cv=folds, groups=patients)
    ba = float(balanced_accuracy_score(labels, pred))
    classes, y = np.unique(labels, return_inverse=True)
    correct = (pred == labels).astype(np.float64)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(N_BOOTSTRAP):  # balanced accuracy = mean per-class recall, with bincount (sklearn's is slow)
        idx = rng.integers(0, len(y), len(y))
        n = np.bincount(y[idx], minlength=len(classes))
        if (n > 0).all():
            boots.append(float(np.mean(np.bincount(y[idx], weights=correct[idx], minlength=len(classes)) / n)))
    lo, hi = np.percentile(boots, [2.5, 97.5]) if boots else (ba, ba)
    return ba, (float(lo), float(hi))
