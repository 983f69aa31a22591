"""Class balance for training: oversampling (the study's choice) or inverse-frequency class weights."""

from __future__ import annotations

import numpy as np
from sklearn.utils.class_weight import compute_class_weight

from cxr_search import CLASSES


def oversample_indices(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Training indices in which every class appears as often as the majority class, shuffled.

    Each minority class is repeated whole as many times as fits, and the remainder is drawn without
    replacement, so no image is repeated more than once more than any other image of its class.

    Args:
        labels: int [N] class index per training image.
        rng: numpy Generator (seeded by the caller for reproducible epochs).

    Returns:
        int64 indices into ``labels``, length n_classes_present * majority count.
    """
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) == 0:
        return np.zeros(0, np.int64)
    target = counts.max()
    parts = []
    for c, n in zip(classes, counts, strict=True):
        members = np.flatnonzero(labels == c)
        whole, rest = divmod(int(target), int(n))
        parts.append(np.tile(members, whole))
        parts.append(rng.choice(members, size=rest, replace=False))
    return rng.permutation(np.concatenate(parts)).astype(np.int64)


def class_weights(labels: np.ndarray, n_classes: int = len(CLASSES)) -> np.ndarray:
    """Inverse-frequency class weights, normalized so that the average weight over the samples is 1.

    Uses scikit-learn's ``compute_class_weight("balanced")``: w_c = N / (n_present_classes * N_c). A class
    absent from ``labels`` gets weight 0.

    Args:
        labels: int [N] class index per training image.
        n_classes: length of the returned vector.

    Returns:
        float32 [n_classes].
    """
    labels = np.asarray(labels)
    weights = np.zeros(n_classes, np.float32)
    present = np.unique(labels)
    if len(present):
        weights[present] = compute_class_weight("balanced", classes=present, y=labels)
    return weights
