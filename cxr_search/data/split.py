"""Train/val/test index splits, stratified by class and grouped by patient, with a policy for leaked images.

Images are grouped by patient and, transitively, by duplicate pairs (an image and its near-copy always land in
the same split when the split is ours to draw). The validation split is one fold of scikit-learn's
``StratifiedGroupKFold`` over the training images (``val_fraction=0.2`` -> 5 folds, as in the study). With
``resplit=True``, or when the data has no test split (flat folders), every image is pooled and the test split
is drawn the same way first. When the data's own test split shares patients or duplicates with training
images, ``duplicate_policy="drop"`` removes those images from the test split (they are returned as
``dropped``); ``"keep"`` keeps them and the report warns.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import StratifiedGroupKFold

from cxr_search.errors import CxrError

DUPLICATE_POLICIES = ("drop", "keep")


def make_splits(
    labels: np.ndarray,
    patient_ids: np.ndarray,
    split: np.ndarray,
    *,
    duplicate_pairs: np.ndarray | None = None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
    resplit: bool = False,
    duplicate_policy: str = "drop",
) -> dict[str, np.ndarray]:
    """Split images into train/val/test so that no patient (and no duplicate pair) spans two splits.

    Args:
        labels: int [N] class index per image.
        patient_ids: str [N] patient of each image.
        split: str [N] split given by the data: "train", "test" or "" (none).
        duplicate_pairs: int [P, 2] index pairs of exact/near duplicate images.
        val_fraction: share of the training images (by patient) held out for validation, in (0, 0.5].
        test_fraction: share of all images put in test when the test split is drawn here, in (0, 0.5].
        seed: seeds the fold assignment; same inputs and seed, same split.
        resplit: pool all images and draw train/val/test here, ignoring the data's split.
        duplicate_policy: "drop" or "keep" test images that share a patient or a duplicate with training images.

    Returns:
        dict of sorted int64 index arrays: "train", "val", "test", and "dropped" (removed from test).
    """
    labels = np.asarray(labels)
    split = np.asarray(split).astype(str)
    n = len(labels)
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 < value <= 0.5:
            raise CxrError(f"{name}={value!r} must be in (0, 0.5]")
    if duplicate_policy not in DUPLICATE_POLICIES:
        raise CxrError(f"duplicate_policy={duplicate_policy!r} is not one of {', '.join(DUPLICATE_POLICIES)}")
    pairs = np.zeros((0, 2), np.int64) if duplicate_pairs is None else np.asarray(duplicate_pairs, np.int64)
    pairs = pairs.reshape(-1, 2)
    patients = np.unique(np.asarray(patient_ids).astype(str), return_inverse=True)[1]
    groups = linked_groups(patients, pairs, n)
    everything = np.arange(n)
    dropped = np.zeros(0, np.int64)
    if resplit or not (split == "test").any():
        test = _hold_out(everything, labels, groups, test_fraction, seed, "test")
        pool = np.setdiff1d(everything, test)
    else:
        test = everything[split == "test"]
        pool = everything[split != "test"]
        leaked = _leaked(test, pool, patients, pairs)
        if duplicate_policy == "drop":
            dropped = leaked
            test = np.setdiff1d(test, leaked)
    val = _hold_out(pool, labels, groups, val_fraction, seed, "validation")
    train = np.setdiff1d(pool, val)
    return {k: np.sort(v).astype(np.int64) for k, v in
            {"train": train, "val": val, "test": test, "dropped": dropped}.items()}


def linked_groups(patients: np.ndarray, pairs: np.ndarray, n: int) -> np.ndarray:
    """Group label per image: images are linked when they share a patient or form a duplicate pair."""
    first_of_patient = np.unique(patients, return_index=True)[1][patients]  # each image -> its patient's first
    rows = np.concatenate([np.arange(n), pairs[:, 0]])
    cols = np.concatenate([first_of_patient, pairs[:, 1]])
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def _hold_out(idx: np.ndarray, labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int,
              what: str) -> np.ndarray:
    """One StratifiedGroupKFold fold of ``idx`` (about ``fraction`` of it, whole groups only)."""
    n_splits = max(2, round(1 / fraction))
    n_groups = len(np.unique(groups[idx]))
    if n_groups < n_splits:
        raise CxrError(
            f"only {n_groups} patients available to draw a {what} split of {fraction:.0%} by patient "
            f"({n_splits} needed); add images or raise the fraction"
        )
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # rare classes get fewer folds than n_splits; fine for a hold-out
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        _, held = next(folds.split(np.zeros(len(idx)), labels[idx], groups[idx]))
    return idx[held]


def _leaked(test: np.ndarray, pool: np.ndarray, patients: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Test images that share a patient with, or duplicate, an image of the training pool."""
    in_pool = np.zeros(len(patients), bool)
    in_pool[pool] = True
    leaked = np.isin(patients[test], np.unique(patients[pool]))
    is_test = np.zeros(len(patients), bool)
    is_test[test] = True
    dup = np.zeros(len(patients), bool)
    for a, b in pairs:
        if in_pool[a] and is_test[b]:
            dup[b] = True
        elif in_pool[b] and is_test[a]:
            dup[a] = True
    return np.union1d(test[leaked], np.flatnonzero(dup)).astype(np.int64)
