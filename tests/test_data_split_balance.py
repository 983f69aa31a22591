"""Splits never put a patient (or a duplicate pair) in two splits; class balance matches the study's recipe."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_search.data.balance import class_weights, oversample_indices
from cxr_search.data.split import make_splits
from cxr_search.errors import CxrError


def _dataset(seed: int = 0, n_patients: int = 120):
    """Patients with 1-4 images each, imbalanced classes (like the Kaggle set), 20% of patients in test."""
    rng = np.random.default_rng(seed)
    per_patient = rng.integers(1, 5, n_patients)
    patient_class = rng.choice(3, n_patients, p=[0.1, 0.65, 0.25])
    patient_split = np.where(rng.random(n_patients) < 0.2, "test", "train")
    patients = np.repeat([f"p{i}" for i in range(n_patients)], per_patient)
    labels = np.repeat(patient_class, per_patient)
    split = np.repeat(patient_split, per_patient)
    return labels, patients, split


def _patients(patients, idx) -> set:
    return set(patients[idx])


def test_validation_split_is_grouped_by_patient_and_stratified():
    labels, patients, split = _dataset()
    s = make_splits(labels, patients, split, val_fraction=0.2, seed=0)
    train_pool = np.flatnonzero(split == "train")
    np.testing.assert_array_equal(np.sort(np.concatenate([s["train"], s["val"]])), train_pool)
    np.testing.assert_array_equal(s["test"], np.flatnonzero(split == "test"))
    assert not _patients(patients, s["train"]) & _patients(patients, s["val"])
    assert 0.12 < len(s["val"]) / len(train_pool) < 0.28
    for c in range(3):  # every class keeps roughly its share in val
        share_pool = (labels[train_pool] == c).mean()
        share_val = (labels[s["val"]] == c).mean()
        assert abs(share_val - share_pool) < 0.1


def test_split_is_seeded():
    labels, patients, split = _dataset()
    a, b = make_splits(labels, patients, split, seed=3), make_splits(labels, patients, split, seed=3)
    c = make_splits(labels, patients, split, seed=4)
    np.testing.assert_array_equal(a["val"], b["val"])
    assert not np.array_equal(a["val"], c["val"])


def test_shared_patients_and_duplicates_are_dropped_from_test_or_kept():
    labels, patients, split = _dataset()
    patients = patients.copy()
    test_idx = np.flatnonzero(split == "test")
    train_idx = np.flatnonzero(split == "train")
    patients[test_idx[0]] = patients[train_idx[0]]  # a patient in both splits
    pairs = np.array([[train_idx[5], test_idx[3]]])  # a test image duplicating a training image
    dropped = make_splits(labels, patients, split, duplicate_pairs=pairs, duplicate_policy="drop")
    assert set(dropped["dropped"]) == {test_idx[0], test_idx[3]}
    assert not set(dropped["test"]) & set(dropped["dropped"])
    kept = make_splits(labels, patients, split, duplicate_pairs=pairs, duplicate_policy="keep")
    np.testing.assert_array_equal(kept["test"], test_idx)
    assert len(kept["dropped"]) == 0
    with pytest.raises(CxrError, match="duplicate_policy"):
        make_splits(labels, patients, split, duplicate_policy="ignore")


def test_duplicates_of_different_patients_stay_in_one_split():
    labels, patients, split = _dataset()
    train_idx = np.flatnonzero(split == "train")
    pairs = np.stack([train_idx[:40], train_idx[-40:]], axis=1)  # link images of unrelated patients
    for seed in range(5):
        s = make_splits(labels, patients, split, duplicate_pairs=pairs, seed=seed)
        in_val = np.isin(pairs, s["val"])
        assert np.all(in_val[:, 0] == in_val[:, 1])


@pytest.mark.parametrize("resplit", [True, False])
def test_resplit_or_no_test_split_draws_test_by_patient(resplit):
    labels, patients, split = _dataset()
    given = split if resplit else np.full(len(split), "")  # flat layout: no split at all
    s = make_splits(labels, patients, given, resplit=resplit, seed=1)
    parts = [_patients(patients, s[k]) for k in ("train", "val", "test")]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert sum(len(s[k]) for k in ("train", "val", "test")) == len(labels)
    assert 0.12 < len(s["test"]) / len(labels) < 0.28


def test_bad_fraction_or_too_few_patients_is_a_clear_error():
    labels, patients, split = _dataset()
    with pytest.raises(CxrError, match="val_fraction"):
        make_splits(labels, patients, split, val_fraction=0.0)
    with pytest.raises(CxrError, match=r"too few .*5 per class"):  # one image per class: train needs all three
        make_splits(np.array([0, 1, 2]), np.array(["a", "b", "c"]), np.array(["train"] * 3))
    with pytest.raises(CxrError, match=r"too few images to split by patient: 2 patient"):
        make_splits(np.array([0, 1]), np.array(["a", "b"]), np.array(["", ""]))


@pytest.mark.parametrize("per_class", [(5, 5, 5), (4, 3, 3)])
def test_tiny_flat_sets_split_with_every_class_in_training(per_class):
    """15 images (5 per class) and 10 images in all used to raise sklearn's "n_splits=5 cannot be greater..."."""
    labels = np.repeat([0, 1, 2], per_class)
    patients = np.array([f"p{i}" for i in range(len(labels))])
    for seed in range(5):
        s = make_splits(labels, patients, np.full(len(labels), ""), seed=seed)
        assert set(labels[s["train"]]) == {0, 1, 2}
        assert len(s["val"]) and len(s["test"])
        assert sorted(np.concatenate([s["train"], s["val"], s["test"]]).tolist()) == list(range(len(labels)))


def test_oversampling_repeats_minorities_up_to_the_majority():
    labels = np.array([0] * 7 + [1] * 30 + [2] * 12)
    idx = oversample_indices(labels, np.random.default_rng(0))
    assert np.bincount(labels[idx]).tolist() == [30, 30, 30]
    assert set(idx) == set(range(len(labels)))  # no image left out
    repeats = np.bincount(idx, minlength=len(labels))
    for c, n in ((0, 7), (1, 30), (2, 12)):  # balanced repetition: floor or ceil of 30 / n
        r = repeats[labels == c]
        assert r.min() >= 30 // n and r.max() <= -(-30 // n)


def test_class_weights_are_sklearn_balanced_weights():
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.array([0] * 7 + [1] * 30 + [2] * 12)
    w = class_weights(labels)
    np.testing.assert_allclose(w, compute_class_weight("balanced", classes=np.arange(3), y=labels), rtol=1e-6)
    assert w[0] > w[2] > w[1]
    assert np.isclose(w[labels].mean(), 1.0)  # normalized: the average sample weight is 1
    assert class_weights(np.array([1, 1, 2]))[0] == 0.0  # an absent class gets no weight
