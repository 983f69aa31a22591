"""Train/val/test index splits, stratified by class and grouped by patient, with a policy for leaked images.

Images are grouped by patient and, transitively, by duplicate pairs (an image and its near-copy always land in
the same split when the split is ours to draw). The validation split is one fold of scikit-learn's
``StratifiedGroupKFold`` over the training images (``val_fraction=0.2`` -> 5 folds, as in the study). With
``resplit=True``, or when the data has no test split (flat folders), every image is pooled and the test split
is drawn the same way first. When the data's own test split shares patients or duplicates with training
images, ``duplicate_policy="drop"`` removes those images from the test split (they are returned as
``dropped``); ``"keep"`` keeps them and the report warns.

Small data sets: a class with fewer images than folds gets fewer folds (a larger hold-out), and a class that
would be missing from training gets one of its held-out patients back, so every set with at least
``MIN_PATIENTS`` patients splits; the report warns when val or test lack a class. Fewer patients is one
:class:`CxrError` line saying how many images are needed (:func:`split_problem`).
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

from cxr_search.errors import CxrError

DUPLICATE_POLICIES = ("drop", "keep")
MIN_PATIENTS = 3  # train, val and test each need one
GOOD_PER_CLASS = 5  # images per class with which every split can hold every class (5 folds)


def split_problem(labels: np.ndarray, patient_ids: np.ndarray, split: np.ndarray, *, resplit: bool = False) -> str | None:
    """Why these images cannot be split into train/val/test by patient, or None when they can.

    Args:
        labels: class of each usable image (any hashable values).
        patient_ids: patient of each image.
        split: split given by the data per image: "train", "test" or "".
        resplit: the test split is drawn here even if the data has one.
    """
    labels, patients, split = (np.asarray(a).astype(str) for a in (labels, patient_ids, split))
    drawn = resplit or not (split == "test").any()
    pool = np.ones(len(labels), bool) if drawn else split != "test"
    n_patients = len(np.unique(patients[pool]))
    needed = MIN_PATIENTS if drawn else 2
    if n_patients >= needed:
        return None
    counts = ", ".join(f"{c}: {n}" for c, n in zip(*np.unique(labels, return_counts=True), strict=True)) or "none"
    where = "" if drawn else " in the training split"
    return (f"too few images to split by patient: {n_patients} patient(s){where} ({counts} images); "
            f"train, val{' and test' if drawn else ''} need one patient each: add images, at least "
            f"{needed} patients in all and {GOOD_PER_CLASS} images per class for every class in every split")


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
    problem = split_problem(labels, patient_ids, split, resplit=resplit)
    if problem:
        raise CxrError(problem)
    patients = np.unique(np.asarray(patient_ids).astype(str), return_inverse=True)[1]
    groups = linked_groups(patients, pairs, n)
    everything = np.arange(n)
    dropped = np.zeros(0, np.int64)
    if resplit or not (split == "test").any():
        test = _hold_out(everything, labels, groups, test_fraction, seed, "test")
        pool, test = _every_class_kept(np.setdiff1d(everything, test), test, labels, groups)
    else:
        test = everything[split == "test"]
        pool = everything[split != "test"]
        leaked = _leaked(test, pool, patients, pairs)
        if duplicate_policy == "drop":
            dropped = leaked
            test = np.setdiff1d(test, leaked)
    val = _hold_out(pool, labels, groups, val_fraction, seed, "validation")
    train, val = _every_class_kept(np.setdiff1d(pool, val), val, labels, groups)
    if not len(val) or not len(test):
        raise CxrError(f"too few patients to give val and test an image each ({len(np.unique(groups))} groups of "
                       f"linked images); add images, {GOOD_PER_CLASS} per class for every class in every split")
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
    """One StratifiedGroupKFold fold of ``idx`` (about ``fraction`` of it, whole groups only).

    Fewer groups, or a largest class smaller than the folds, give fewer folds (a larger hold-out).
    """
    n_groups = len(np.unique(groups[idx]))
    if n_groups < 2:
        raise CxrError(f"only {n_groups} patient left to draw a {what} split from; add images, "
                       f"{GOOD_PER_CLASS} per class for every class in every split")
    largest = int(np.bincount(labels[idx]).max())
    n_splits = min(max(2, round(1 / fraction)), n_groups, max(2, largest))
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    if largest < 2:  # one image per class: nothing to stratify, groups only
        folds = GroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # rare classes get fewer folds than n_splits; fine for a hold-out
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        _, held = next(folds.split(np.zeros(len(idx)), labels[idx], groups[idx]))
    return idx[held]


def _every_class_kept(kept: np.ndarray, held: np.ndarray, labels: np.ndarray,
                      groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Move back from ``held`` one group of each class that ``kept`` lacks (training must see every class)."""
    for c in np.unique(labels[held]):
        if (labels[kept] == c).any():
            continue
        group = groups[held[labels[held] == c][0]]
        back = held[groups[held] == group]
        kept, held = np.union1d(kept, back), np.setdiff1d(held, back)
    return kept, held


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
