"""Metrics equal scikit-learn's, the study's recalls match a hand-worked confusion matrix, bootstrap CIs behave."""

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    log_loss,
    precision_score,
    recall_score,
    roc_auc_score,
)

from cxr_search import CLASSES
from cxr_search import metrics as M
from cxr_search.errors import CxrError

NAMES = [c.lower() for c in CLASSES]


def _predictions(n: int, seed: int, skill: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Random labels (all classes, unbalanced like the Kaggle set) and softmax probabilities that lean to the truth."""
    rng = np.random.default_rng(seed)
    y = rng.choice(3, size=n, p=[0.1, 0.65, 0.25])
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), y] += skill
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, probs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_scikit_learn(seed):
    y, probs = _predictions(500, seed)
    pred = probs.argmax(1)
    m = M.classification_metrics(y, probs)
    assert set(m) == set(M.METRIC_NAMES)
    assert m["acc"] == pytest.approx(accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["auroc_macro"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert m["nll"] == pytest.approx(log_loss(y, probs))
    for k, c in enumerate(NAMES):
        assert m[f"recall_{c}"] == pytest.approx(recall_score(y, pred, labels=[k], average="macro"))
        assert m[f"precision_{c}"] == pytest.approx(precision_score(y, pred, labels=[k], average="macro"))
    assert m["normal_recall"] == m["recall_normal"]
    np.testing.assert_array_equal(
        M.confusion(y, pred), np.array([[np.sum((y == t) & (pred == p)) for p in range(3)] for t in range(3)])
    )


def _from_confusion(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels and confident probabilities realising confusion matrix cm (rows true, columns predicted)."""
    y, pred = [], []
    for t in range(3):
        for p in range(3):
            y += [t] * cm[t, p]
            pred += [p] * cm[t, p]
    probs = np.full((len(y), 3), 0.1)
    probs[np.arange(len(y)), pred] = 0.8
    return np.array(y), probs


def test_study_recalls_match_hand_computed_confusion_matrix():
    c, p, n = (CLASSES.index(k) for k in ("COVID19", "PNEUMONIA", "NORMAL"))
    cm = np.zeros((3, 3), dtype=int)
    cm[c, [c, p, n]] = [40, 8, 2]  # 2 COVID cases called NORMAL: out of the COVID-vs-pneumonia recall
    cm[p, [c, p, n]] = [5, 150, 15]
    cm[n, [c, p, n]] = [1, 9, 90]
    y, probs = _from_confusion(cm)
    m = M.classification_metrics(y, probs)
    assert m["normal_recall"] == pytest.approx(90 / 100)
    assert m["covid_recall_vs_pneumonia"] == pytest.approx(40 / 48)
    assert m["disease_sensitivity"] == pytest.approx((40 + 8 + 5 + 150) / (50 + 170))
    assert m["recall_covid19"] == pytest.approx(40 / 50)
    assert m["precision_normal"] == pytest.approx(90 / (2 + 15 + 90))
    np.testing.assert_array_equal(M.confusion(y, probs.argmax(1)), cm)


def _ece_loop(probs, y, n_bins=15):
    conf, pred = probs.max(1), probs.argmax(1)
    edges = np.linspace(0, 1, n_bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            total += in_bin.mean() * abs((pred[in_bin] == y[in_bin]).mean() - conf[in_bin].mean())
    return total


@pytest.mark.parametrize("seed", [0, 1])
def test_ece_equals_loop_implementation(seed):
    y, probs = _predictions(700, seed, skill=2.0)
    assert M.ece(probs, y) == pytest.approx(_ece_loop(probs, y))
    assert M.ece(probs, y, n_bins=10) == pytest.approx(_ece_loop(probs, y, n_bins=10))
    assert M.classification_metrics(y, probs)["ece"] == pytest.approx(_ece_loop(probs, y))


def test_perfectly_calibrated_confident_model_has_zero_ece():
    y = np.array([0, 1, 2, 2])
    assert M.ece(np.eye(3)[y], y) == 0.0


def test_absent_class_gives_nan_not_a_crash():
    y, probs = _predictions(200, 0)
    keep = y != CLASSES.index("COVID19")
    m = M.classification_metrics(y[keep], probs[keep])
    assert np.isnan(m["recall_covid19"]) and np.isnan(m["covid_recall_vs_pneumonia"])
    assert np.isfinite(m["acc"]) and np.isfinite(m["normal_recall"])
    # AUROC averages the classes where it is defined: here PNEUMONIA and NORMAL one-vs-rest.
    yk, pk = y[keep], probs[keep]
    expected = np.mean([roc_auc_score(yk == k, pk[:, k]) for k in (1, 2)])
    assert m["auroc_macro"] == pytest.approx(expected)
    assert all(np.isnan(v) for v in M.classification_metrics(np.array([], int), np.zeros((0, 3))).values())


def test_diverged_model_gives_nan_metrics():
    y, probs = _predictions(50, 0)
    probs[3] = np.nan
    assert all(np.isnan(v) for v in M.classification_metrics(y, probs).values())


def test_bootstrap_percentiles_equal_numpy_over_per_resample_sklearn_metrics():
    y, probs = _predictions(150, 3)
    n_res, seed = 40, 7
    ci = M.bootstrap_ci(y, probs, n_resamples=n_res, seed=seed)
    idx = M.bootstrap_indices(y, n_res, seed=seed)
    per_resample = [M.classification_metrics(y[i], probs[i]) for i in idx]
    for name in M.METRIC_NAMES:
        values = np.array([r[name] for r in per_resample])
        point, lo, hi = ci[name]
        assert point == pytest.approx(M.classification_metrics(y, probs)[name])
        assert (lo, hi) == pytest.approx(tuple(np.percentile(values, [2.5, 97.5]))), name


def test_bootstrap_intervals_contain_point_and_shrink_with_more_samples():
    widths = []
    for n in (200, 3000):
        y, probs = _predictions(n, 11, skill=1.5)
        ci = M.bootstrap_ci(y, probs, n_resamples=400, seed=0)
        for name, (point, lo, hi) in ci.items():
            assert lo <= point <= hi, name
        widths.append({name: hi - lo for name, (_, lo, hi) in ci.items()})
    for name in ("acc", "macro_f1", "auroc_macro", "normal_recall", "covid_recall_vs_pneumonia", "nll"):
        assert widths[1][name] < 0.6 * widths[0][name], name  # ~ 1/sqrt(15) expected


def test_stratified_resampling_keeps_class_counts():
    y, _ = _predictions(300, 0)
    counts = np.bincount(y, minlength=3)
    strat = M.bootstrap_indices(y, 200, stratified=True, seed=1)
    assert strat.shape == (200, 300)
    assert all((np.bincount(y[i], minlength=3) == counts).all() for i in strat)
    plain = M.bootstrap_indices(y, 200, stratified=False, seed=1)
    assert any((np.bincount(y[i], minlength=3) != counts).any() for i in plain)


def test_bootstrap_subset_and_unknown_metric():
    y, probs = _predictions(100, 0)
    assert set(M.bootstrap_ci(y, probs, n_resamples=50, metrics=["acc", "ece"])) == {"acc", "ece"}
    with pytest.raises(CxrError, match="unknown metric"):
        M.bootstrap_ci(y, probs, metrics=["accuracy"])


def test_distribution_summary_matches_numpy():
    v = np.random.default_rng(0).normal(0.96, 0.01, size=50)
    s = M.distribution_summary(list(v) + [float("nan")])  # a failed run's NaN is left out
    assert s["n"] == 50
    assert s["mean"] == pytest.approx(v.mean()) and s["std"] == pytest.approx(v.std(ddof=1))
    assert (s["min"], s["max"]) == (v.min(), v.max())
    assert (s["p2_5"], s["p50"], s["p97_5"]) == pytest.approx(tuple(np.percentile(v, [2.5, 50, 97.5])))
