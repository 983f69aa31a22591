"""Classification metrics with the names of DESIGN.md, calibration, and bootstrap confidence intervals.

Labels are indices into `cxr_search.CLASSES` (COVID19, PNEUMONIA, NORMAL); `probs` are [N, 3] class
probabilities in that order. A metric that is undefined on the data (e.g. the recall of a class with no
sample) is NaN, never an exception.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
)

from cxr_search import CLASSES
from cxr_search.errors import CxrError

COVID19, PNEUMONIA, NORMAL = (CLASSES.index(c) for c in ("COVID19", "PNEUMONIA", "NORMAL"))
_LABELS = list(range(len(CLASSES)))
_NAMES = [c.lower() for c in CLASSES]

METRIC_NAMES: tuple[str, ...] = (
    "acc",
    "macro_f1",
    "auroc_macro",
    *(f"recall_{c}" for c in _NAMES),
    *(f"precision_{c}" for c in _NAMES),
    "normal_recall",
    "covid_recall_vs_pneumonia",
    "disease_sensitivity",
    "ece",
    "nll",
)
# What the training loop reports on validation every epoch, and the direction that is better: the only metrics a
# search may optimise (test metrics are computed once per finished model and never feed a search).
VALIDATION_METRICS: dict[str, str] = {
    "val_loss": "min",
    "val_acc": "max",
    "val_macro_f1": "max",
    "val_normal_recall": "max",
    "val_covid_recall_vs_pneumonia": "max",
}


def classification_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """All the study's metrics for one set of predictions (the prediction is the most probable class).

    Args:
        y_true: int labels [N], indices into CLASSES.
        probs: float class probabilities [N, 3]. Non-finite values (a diverged model) give all-NaN metrics.

    Returns:
        dict with METRIC_NAMES as keys, plain floats.
    """
    y, p = _check(y_true, probs)
    if len(y) == 0 or not np.isfinite(p).all():
        return dict.fromkeys(METRIC_NAMES, float("nan"))
    pred = p.argmax(axis=1)
    precision, recall, _, _ = precision_recall_fscore_support(y, pred, labels=_LABELS, zero_division=np.nan)
    out = {
        "acc": accuracy_score(y, pred),
        "macro_f1": f1_score(y, pred, labels=_LABELS, average="macro", zero_division=np.nan),
        "auroc_macro": _auroc_macro(y, p),
        **{f"recall_{c}": recall[k] for k, c in enumerate(_NAMES)},
        **{f"precision_{c}": precision[k] for k, c in enumerate(_NAMES)},
        **_study_recalls(confusion(y, pred)[None]),
        "ece": ece(p, y),
        "nll": log_loss(y, p, labels=_LABELS),
    }
    return {k: float(np.asarray(out[k]).squeeze()) for k in METRIC_NAMES}


def nll(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (natural log; scikit-learn's `log_loss`)."""
    y, p = _check(y_true, probs)
    return float(log_loss(y, p, labels=_LABELS))


def confusion(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Confusion matrix [3, 3]: rows are true classes, columns predictions, in CLASSES order."""
    return confusion_matrix(np.asarray(y_true), np.asarray(y_pred), labels=_LABELS)


def ece(probs: np.ndarray, y: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error: equal-width bins on the max probability, bin i = (i/n_bins, (i+1)/n_bins].

    ECE = sum over bins of (bin size / N) * |accuracy in bin - mean confidence in bin|. Written by hand:
    scikit-learn's calibration_curve is binary-only and returns no ECE.

    Args:
        probs: float class probabilities [N, C].
        y: int labels [N].
        n_bins: number of equal-width confidence bins.
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y)
    if len(y) == 0:
        return float("nan")
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    bins = _confidence_bins(conf, n_bins)
    gap = np.bincount(bins, correct, minlength=n_bins) - np.bincount(bins, conf, minlength=n_bins)
    return float(np.abs(gap).sum() / len(y))


def bootstrap_indices(
    y_true: np.ndarray, n_resamples: int = 1000, *, stratified: bool = True, seed: int = 0
) -> np.ndarray:
    """Resampled row indices [n_resamples, N], drawn with replacement.

    Args:
        y_true: int labels [N].
        n_resamples: number of bootstrap resamples.
        stratified: resample within each true class, so every resample keeps the class counts of y_true.
        seed: random seed.
    """
    y = np.asarray(y_true)
    rng = np.random.default_rng(seed)
    if not stratified:
        return rng.integers(0, len(y), size=(n_resamples, len(y)))
    parts = []
    for k in np.unique(y):
        members = np.flatnonzero(y == k)
        parts.append(members[rng.integers(0, len(members), size=(n_resamples, len(members)))])
    return np.concatenate(parts, axis=1) if parts else np.zeros((n_resamples, 0), dtype=np.int64)


def bootstrap_ci(
    y_true: np.ndarray,
    probs: np.ndarray,
    *,
    n_resamples: int = 1000,
    stratified: bool = True,
    seed: int = 0,
    level: float = 0.95,
    metrics: list[str] | tuple[str, ...] | None = None,
) -> dict[str, tuple[float, float, float]]:
    """Percentile-bootstrap confidence intervals of the test metrics.

    All resamples are evaluated at once (confusion matrices by np.bincount, AUROC by ranks), so 1,000
    resamples of ~1,300 samples take well under a second; a per-resample scikit-learn loop would take minutes.

    Args:
        y_true: int labels [N].
        probs: float class probabilities [N, 3].
        n_resamples: number of bootstrap resamples.
        stratified: resample within each true class (class counts fixed, as in a fixed test set).
        seed: random seed.
        level: coverage of the interval (0.95 gives the 2.5th and 97.5th percentiles).
        metrics: names from METRIC_NAMES; None means all.

    Returns:
        {name: (point estimate on all data, lower, upper)}.
    """
    names = tuple(METRIC_NAMES if metrics is None else metrics)
    unknown = [m for m in names if m not in METRIC_NAMES]
    if unknown:
        raise CxrError(
            f"unknown metric(s) {', '.join(unknown)} for bootstrap; allowed: {', '.join(METRIC_NAMES)}."
        )
    if not 0.0 < level < 1.0:
        raise CxrError(f"bootstrap 'level' must be in (0, 1), got {level}.")
    y, p = _check(y_true, probs)
    point = classification_metrics(y, p)
    if len(y) == 0 or not np.isfinite(p).all():
        return {m: (point[m], float("nan"), float("nan")) for m in names}
    idx = bootstrap_indices(y, n_resamples, stratified=stratified, seed=seed)
    samples = _resampled_metrics(y, p, idx, names)
    q = 100.0 * np.array([(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN metric (a class absent): interval is NaN
        for m in names:
            lo, hi = np.nanpercentile(samples[m], q)
            out[m] = (point[m], float(lo), float(hi))
    return out


def distribution_summary(values: np.ndarray | list[float]) -> dict[str, float]:
    """Summary of a metric over repeated runs (e.g. 50 seeds); NaN runs are left out.

    Returns:
        dict with n (finite values used), mean, std (sample std, ddof=1), min, max and the
        p2_5 / p50 / p97_5 percentiles.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return {"n": 0, **dict.fromkeys(("mean", "std", "min", "max", "p2_5", "p50", "p97_5"), float("nan"))}
    p2_5, p50, p97_5 = np.percentile(v, [2.5, 50.0, 97.5])
    return {
        "n": int(len(v)),
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if len(v) > 1 else float("nan"),
        "min": float(v.min()),
        "max": float(v.max()),
        "p2_5": float(p2_5),
        "p50": float(p50),
        "p97_5": float(p97_5),
    }


# ---------------------------------------------------------------------------------------------------------


def _check(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(np.int64).ravel()
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != len(CLASSES) or p.shape[0] != len(y):
        raise ValueError(f"probs must be [N, {len(CLASSES)}] with N = len(y_true) = {len(y)}, got {p.shape}")
    if len(y) and (y.min() < 0 or y.max() >= len(CLASSES)):
        raise ValueError(f"labels must be in 0..{len(CLASSES) - 1}, got {np.unique(y)}")
    # float32 softmax rows miss sum == 1 by ~1e-7, which scikit-learn warns about: renormalise in float64
    with np.errstate(invalid="ignore", divide="ignore"):
        p = p / p.sum(axis=1, keepdims=True)
    return y, p


def _confidence_bins(conf: np.ndarray, n_bins: int) -> np.ndarray:
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.digitize(conf, edges[1:-1], right=True)  # bin i holds edges[i] < conf <= edges[i+1]


def _auroc_macro(y: np.ndarray, p: np.ndarray) -> float:
    """One-vs-rest AUROC averaged over the classes where it is defined (both positives and negatives present);
    equals roc_auc_score(multi_class='ovr', average='macro') when every class is present."""
    scores = [roc_auc_score(y == k, p[:, k]) for k in _LABELS if 0 < (y == k).sum() < len(y)]
    return float(np.mean(scores)) if scores else float("nan")


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _study_recalls(cm: np.ndarray) -> dict[str, np.ndarray]:
    """The study's recalls from confusion matrices [R, 3, 3] -> arrays [R]."""
    c, pn, n = COVID19, PNEUMONIA, NORMAL
    disease = [c, pn]
    return {
        "normal_recall": _ratio(cm[:, n, n], cm[:, n, :].sum(-1)),
        "covid_recall_vs_pneumonia": _ratio(cm[:, c, c], cm[:, c, c] + cm[:, c, pn]),
        "disease_sensitivity": _ratio(
            cm[:, disease][:, :, disease].sum((-1, -2)), cm[:, disease, :].sum((-1, -2))
        ),
    }


def _count_metrics(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Every count-based metric from confusion matrices [R, 3, 3] -> arrays [R] (same definitions as sklearn)."""
    tp = np.diagonal(cm, axis1=1, axis2=2).astype(np.float64)
    rows, cols = cm.sum(-1), cm.sum(-2)
    recall, precision, f1 = _ratio(tp, rows), _ratio(tp, cols), _ratio(2 * tp, rows + cols)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all classes undefined -> NaN
        macro_f1 = np.nanmean(f1, axis=1)
    out = {"acc": _ratio(tp.sum(-1), cm.sum((-1, -2))), "macro_f1": macro_f1}
    for k, c in enumerate(_NAMES):
        out[f"recall_{c}"], out[f"precision_{c}"] = recall[:, k], precision[:, k]
    return out | _study_recalls(cm)


def _resampled_metrics(
    y: np.ndarray, p: np.ndarray, idx: np.ndarray, names: tuple[str, ...]
) -> dict[str, np.ndarray]:
    """Each requested metric on every resample idx[r] at once -> {name: [R]}."""
    n_res, n = idx.shape
    k = len(CLASSES)
    pred = p.argmax(axis=1)
    yr = y[idx]
    rows = np.arange(n_res)[:, None]
    cm = np.bincount((rows * k * k + yr * k + pred[idx]).ravel(), minlength=n_res * k * k).reshape(
        n_res, k, k
    )
    out = _count_metrics(cm)
    if "ece" in names:
        n_bins = 15
        bins = _confidence_bins(p.max(axis=1), n_bins)[idx] + rows * n_bins
        correct = (pred == y).astype(np.float64)[idx]
        conf = p.max(axis=1)[idx]
        gap = np.bincount(bins.ravel(), correct.ravel(), minlength=n_res * n_bins) - np.bincount(
            bins.ravel(), conf.ravel(), minlength=n_res * n_bins
        )
        out["ece"] = np.abs(gap.reshape(n_res, n_bins)).sum(-1) / n
    if "nll" in names:
        eps = np.finfo(np.float64).eps  # scikit-learn's log_loss clipping
        per_sample = -np.log(np.clip(p[np.arange(len(y)), y], eps, 1 - eps))
        out["nll"] = per_sample[idx].mean(-1)
    if "auroc_macro" in names:
        out["auroc_macro"] = _auroc_macro_resampled(yr, p, idx)
    return {m: out[m] for m in names}


def _auroc_macro_resampled(yr: np.ndarray, p: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Mann-Whitney form of one-vs-rest AUROC (ties count 1/2, as roc_auc_score) for all resamples at once."""
    per_class = []
    for k in _LABELS:
        ranks = rankdata(p[:, k][idx], axis=1)  # average ranks for ties
        pos = yr == k
        n_pos = pos.sum(-1).astype(np.float64)
        n_neg = yr.shape[1] - n_pos
        u = (ranks * pos).sum(-1) - n_pos * (n_pos + 1) / 2
        per_class.append(_ratio(u, n_pos * n_neg))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.stack(per_class, axis=1), axis=1)
