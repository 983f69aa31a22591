"""Soft-voting ensembles of finished models, temperature scaling on validation, honest test statistics.

Members are read from the predictions each finished trial left behind (`<stage>/predictions/<trial>.npz`
with `val_labels`, `val_probs`, `test_labels`, `test_probs`, `classes`): no retraining, no Ray.
Everything that is *fitted* (member choice, weights, temperature) uses validation data only; test data
is only ever evaluated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

from cxr_search.errors import CxrError
from cxr_search.experiment.folder import Experiment
from cxr_search.experiment.results import predictions_path, read_predictions
from cxr_search.io import storage
from cxr_search.io.layout import ENSEMBLE_DIR
from cxr_search.metrics import bootstrap_ci, bootstrap_indices, classification_metrics, confusion, ece, nll

# Probabilities are clipped here before taking logs: a member that is certain (p = 0) must not make NLL infinite.
_PROB_FLOOR = 1e-12
# Temperature search range: T in [0.1, 10]. Wider ranges let a validation set the ensemble separates perfectly
# drive T to ~0 (NLL -> 0 on validation, overconfident on test).
_LOG_T_BOUNDS = (math.log(0.1), math.log(10.0))


@dataclass(frozen=True)
class Member:
    """One finished model's stored predictions (best-validation weights)."""

    trial_id: str
    checkpoint_dir: str  # the model folder of these predictions ("" if unknown): what `predict` loads
    val_labels: np.ndarray  # int64 [Nv]
    val_probs: np.ndarray  # float [Nv, C]
    test_labels: np.ndarray  # int64 [Nt]
    test_probs: np.ndarray  # float [Nt, C]
    classes: tuple[str, ...]


def soft_vote(member_probs: Sequence[np.ndarray], weights: Sequence[float] | None = None) -> np.ndarray:
    """Soft voting: the (weighted) mean of the members' class probabilities.

    Args:
        member_probs: one [N, C] probability array per member, same rows and class order.
        weights: one non-negative weight per member (normalised here); None means equal weights.

    Returns:
        float64 [N, C]; each row sums to 1 if every member's rows do.
    """
    if len(member_probs) == 0:
        raise CxrError("soft voting needs at least one member; is the experiment's predictions/ folder empty?")
    stacked = np.stack([np.asarray(p, dtype=np.float64) for p in member_probs])  # [M, N, C]
    w = np.ones(len(member_probs)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(member_probs),) or np.any(w < 0) or not w.sum() > 0:
        raise CxrError(f"ensemble weights must be {len(member_probs)} non-negative numbers with a positive sum, got {w}.")
    return np.tensordot(w / w.sum(), stacked, axes=1)


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Rescale probabilities by a temperature: softmax(log p / T). T > 1 softens, T < 1 sharpens; argmax unchanged."""
    logp = np.log(np.clip(np.asarray(probs, dtype=np.float64), _PROB_FLOOR, 1.0))
    return softmax(logp / temperature, axis=1)


def fit_temperature(val_probs: np.ndarray, val_labels: np.ndarray) -> float:
    """One temperature minimising validation NLL (Guo et al. 2017), searched on log T so T stays positive.

    Args:
        val_probs: [N, C] validation probabilities of the (ensembled) model.
        val_labels: [N] validation labels. Test data must never be passed here.

    Returns:
        The fitted temperature T > 0 (1.0 means already calibrated).
    """
    labels = np.asarray(val_labels, dtype=np.int64)
    logp = np.log(np.clip(np.asarray(val_probs, dtype=np.float64), _PROB_FLOOR, 1.0))
    if len(labels) == 0 or not np.isfinite(logp).all():
        raise CxrError("temperature scaling needs finite validation probabilities; the validation split is empty or broken.")

    def val_nll(log_t: float) -> float:
        return float(-log_softmax(logp / math.exp(log_t), axis=1)[np.arange(len(labels)), labels].mean())

    found = minimize_scalar(val_nll, bounds=_LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-5})
    # Never return a temperature that is worse than doing nothing (flat or noisy objectives).
    return float(math.exp(found.x)) if found.fun < val_nll(0.0) else 1.0


def load_member(npz_path: str | Path, *, trial_id: str | None = None, checkpoint_dir: str = "") -> Member:
    """One finished model's stored predictions (`predictions/<trial>.npz`, read by the experiment module)."""

    z = read_predictions(npz_path)
    from cxr_search.io import storage

    return Member(trial_id=trial_id or storage.path(npz_path).stem, checkpoint_dir=checkpoint_dir,
                  val_labels=z["val_labels"].astype(np.int64), val_probs=z["val_probs"].astype(np.float64),
                  test_labels=z["test_labels"].astype(np.int64), test_probs=z["test_probs"].astype(np.float64),
                  classes=tuple(str(c) for c in z["classes"]))


def check_compatible(members: Sequence[Member]) -> None:
    """Members must share class order and the very same val/test samples (labels equal row by row)."""
    first = members[0]
    for m in members[1:]:
        if m.classes != first.classes:
            raise CxrError(f"trial {m.trial_id} has classes {m.classes}, trial {first.trial_id} has {first.classes}; "
                           "members of one ensemble must share the class order.")
        for split in ("val", "test"):
            a, b = getattr(first, f"{split}_labels"), getattr(m, f"{split}_labels")
            if a.shape != b.shape or not np.array_equal(a, b):
                raise CxrError(f"trials {first.trial_id} and {m.trial_id} were evaluated on different {split} sets; "
                               "ensemble only models trained on the same data splits (same experiment).")


def member_weights(members: Sequence[Member], mode: str) -> np.ndarray:
    """Voting weights: `uniform`, or `val` = proportional to each member's validation accuracy (validation only)."""
    if mode == "uniform":
        w = np.ones(len(members))
    elif mode == "val":
        w = np.array([float((m.val_probs.argmax(1) == m.val_labels).mean()) for m in members])
        if not w.sum() > 0:
            w = np.ones(len(members))
    else:
        raise CxrError(f"--weights is '{mode}'; allowed: uniform, val.")
    return w / w.sum()


def evaluate(members: Sequence[Member], weights: np.ndarray, *, calibrate: bool = True,
             n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Soft-vote the members, fit a temperature on validation, and evaluate everything on test.

    Args:
        members: compatible members (see `check_compatible`), best first by the experiment's objective.
        weights: one weight per member (from `member_weights`).
        calibrate: fit and apply temperature scaling (validation NLL).
        n_resamples: bootstrap resamples for the test confidence intervals (stratified by class).
        seed: bootstrap seed.

    Returns:
        JSON-able dict: `temperature`, `metrics` (ensemble, calibrated if asked: {name: [point, lo, hi]}),
        `metrics_uncalibrated`, `ece_before`, `ece_after`, `val_nll_before`, `val_nll_after`,
        `member_metrics` (test metrics of each member), `best_single` (trial id and metrics with CIs), `confusion_matrix`,
        `acc_gain_vs_best_single` ([point, lo, hi], paired bootstrap).
    """
    check_compatible(members)
    y_val, y_test = members[0].val_labels, members[0].test_labels
    val_probs = soft_vote([m.val_probs for m in members], weights)
    test_probs_raw = soft_vote([m.test_probs for m in members], weights)
    temperature = fit_temperature(val_probs, y_val) if calibrate else 1.0
    test_probs = apply_temperature(test_probs_raw, temperature)

    ci = bootstrap_ci(y_test, test_probs, n_resamples=n_resamples, stratified=True, seed=seed)
    member_metrics = {m.trial_id: classification_metrics(m.test_labels, m.test_probs) for m in members}
    # The best single model is the first member: members come ranked by the experiment's objective (validation
    # only, never test), the same ranking that chose them.
    best = members[0]
    best_ci = bootstrap_ci(y_test, best.test_probs, n_resamples=n_resamples, stratified=True, seed=seed)
    uncal = classification_metrics(y_test, test_probs_raw)
    return {
        "temperature": temperature,
        "calibration_warnings": calibration_warnings(temperature, float(uncal["ece"]), float(ece(test_probs, y_test)),
                                                     calibrate),
        "metrics": {k: [float(x) for x in v] for k, v in ci.items()},
        "metrics_uncalibrated": {k: float(v) for k, v in uncal.items()},
        "ece_before": float(uncal["ece"]),
        "ece_after": float(ece(test_probs, y_test)),
        "val_nll_before": nll(y_val, val_probs),
        "val_nll_after": nll(y_val, apply_temperature(val_probs, temperature)),
        "member_metrics": {tid: {k: float(v) for k, v in mm.items()} for tid, mm in member_metrics.items()},
        "best_single": {"trial_id": best.trial_id,
                        "metrics": {k: [float(x) for x in v] for k, v in best_ci.items()}},
        "acc_gain_vs_best_single": paired_acc_gain(y_test, test_probs, best.test_probs,
                                                   n_resamples=n_resamples, seed=seed),
        "confusion_matrix": confusion(y_test, test_probs.argmax(1)).tolist(),
    }


def calibration_warnings(temperature: float, ece_before: float, ece_after: float, calibrated: bool) -> list[str]:
    """What a reader must know about the temperature: it hit the end of its range (the validation set is too
    small or too easy to pin it down), or it made the test calibration worse."""
    out = []
    if calibrated and min(abs(math.log(temperature) - b) for b in _LOG_T_BOUNDS) < 1e-3:
        out.append(f"the temperature hit the end of its search range (T = {temperature:.3f}): the validation set "
                   "cannot pin it down (too few images, or separated perfectly); calibrated probabilities are not "
                   "to be trusted")
    if calibrated and ece_after > ece_before:
        out.append(f"temperature scaling made the test calibration worse (ECE {ece_before:.4f} -> {ece_after:.4f}); "
                   "use the uncalibrated probabilities (`ensemble --no-calibrate`)")
    return out


def paired_acc_gain(y: np.ndarray, probs_a: np.ndarray, probs_b: np.ndarray, *, n_resamples: int = 1000,
                    seed: int = 0, level: float = 0.95) -> list[float]:
    """Accuracy of A minus accuracy of B on the same test images, with a paired stratified bootstrap CI.

    Pairing (scoring both models on each resample of the images) gives a much tighter interval than
    comparing two separate intervals.

    Returns:
        [point, lower, upper].
    """
    y = np.asarray(y)
    diff = (probs_a.argmax(1) == y).astype(np.float64) - (probs_b.argmax(1) == y)
    gains = diff[bootstrap_indices(y, n_resamples, stratified=True, seed=seed)].mean(axis=1)
    lo, hi = np.quantile(gains, [(1.0 - level) / 2, (1.0 + level) / 2])
    return [float(diff.mean()), float(lo), float(hi)]


def plot_confusion(matrix: np.ndarray, classes: Sequence[str], path: Path, title: str) -> Path:
    """Write the confusion matrix as a PNG (matplotlib Agg, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(4.5, 4))
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=list(classes)).plot(ax=ax, colorbar=False)
    ax.set_title(title)
    fig.tight_layout()
    from cxr_search.io import storage

    storage.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path


def metrics_table(result: dict[str, Any]) -> pd.DataFrame:
    """Long table `model, metric, value, ci_low, ci_high` comparing ensemble, best single model and members."""
    rows = []
    for name, (point, lo, hi) in result["metrics"].items():
        rows.append({"model": "ensemble", "metric": name, "value": point, "ci_low": lo, "ci_high": hi})
    for name, value in result["metrics_uncalibrated"].items():
        rows.append({"model": "ensemble_uncalibrated", "metric": name, "value": value,
                     "ci_low": math.nan, "ci_high": math.nan})
    best = result["best_single"]
    for name, (point, lo, hi) in best["metrics"].items():
        rows.append({"model": f"best_single:{best['trial_id']}", "metric": name, "value": point,
                     "ci_low": lo, "ci_high": hi})
    for tid, mm in result["member_metrics"].items():
        for name, value in mm.items():
            rows.append({"model": f"member:{tid}", "metric": name, "value": value,
                         "ci_low": math.nan, "ci_high": math.nan})
    gain = result["acc_gain_vs_best_single"]
    rows.append({"model": "ensemble_minus_best_single", "metric": "acc", "value": gain[0],
                 "ci_low": gain[1], "ci_high": gain[2]})
    return pd.DataFrame(rows)


def build_ensemble(exp_dir: str | Path, *, top_k: int, source: str = "search", weights: str = "uniform",
                   calibrate: bool = True, n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Build, evaluate and save a soft-voting ensemble of the experiment's best finished models.

    Members are ranked by the experiment's objective (validation only). From the search, each configuration
    counts once (the top `top_k` distinct configurations, as the study voted over different models); from the
    retrain stage, the members are the seeds of the best retrained configuration (a seed ensemble). Writes
    `EXP/ensemble/ensemble.json` (what `predict` loads), `metrics.csv` and `confusion_matrix.png`.

    Args:
        exp_dir: the experiment folder.
        top_k: number of members.
        source: `search` (distinct configurations) or `retrain` (seeds of the top retrained configuration).
        weights: `uniform` or `val` (proportional to validation accuracy).
        calibrate: fit one temperature on validation NLL and apply it.
        n_resamples: bootstrap resamples for test confidence intervals.
        seed: bootstrap seed.

    Returns:
        The ensemble description as saved in ensemble.json.
    """
    from cxr_search.experiment.folder import Experiment
    from cxr_search.io import storage

    exp = Experiment.open(exp_dir)
    if source not in ("search", "retrain"):
        raise CxrError(f"--from is '{source}'; allowed: search, retrain.")
    if top_k < 1:
        raise CxrError(f"--top must be >= 1, got {top_k}.")
    ranked = exp.ranked(source, finished_only=True, distinct=source == "search")
    if ranked.empty:
        hint = f"run `cxr-search retrain {exp.path}` first" if source == "retrain" else "run or resume the search"
        raise CxrError(f"{exp.stage_dir(source)}: no finished trials with predictions; {hint}.")
    if source == "retrain":  # a seed ensemble: the seeds of the best configuration only
        ranked = ranked[ranked["config_key"] == ranked["config_key"].iloc[0]]
    chosen = ranked.head(top_k)
    members = [load_member(r["predictions_path"], trial_id=str(r["trial_id"]),
                           checkpoint_dir=str(storage.path(r["trial_dir"]).resolve())) for r in chosen.to_dict("records")]
    w = member_weights(members, weights)
    result = evaluate(members, w, calibrate=calibrate, n_resamples=n_resamples, seed=seed)

    out = exp.path / "ensemble"
    out.mkdir(parents=True, exist_ok=True)
    classes = list(members[0].classes)
    plot_confusion(np.array(result["confusion_matrix"]), classes, out / "confusion_matrix.png",
                   f"soft-voting ensemble of {len(members)} (test)")
    table = metrics_table(result)
    storage.atomic_write(out / "metrics.csv", lambda tmp: table.to_csv(tmp, index=False))
    description = {
        "source": source,
        "weighting": weights,
        "calibrated": calibrate,
        "classes": classes,
        "temperature": result.pop("temperature"),
        "members": [{"trial_id": m.trial_id, "checkpoint_dir": m.checkpoint_dir, "weight": float(wi),
                     "val_acc": float((m.val_probs.argmax(1) == m.val_labels).mean()),
                     exp.objective.column: float(r[exp.objective.column])}
                    for m, wi, r in zip(members, w, chosen.to_dict("records"), strict=True)],
        "ranking_metric": exp.objective.metric,
        "ranking_mode": exp.objective.mode,
        "n_test": int(len(members[0].test_labels)),
        "n_val": int(len(members[0].val_labels)),
        "bootstrap": {"n_resamples": n_resamples, "stratified": True, "level": 0.95, "seed": seed},
        "preprocessing": _members_preprocessing(exp, members),
        **result,
    }
    storage.atomic_write_json(out / "ensemble.json", description)  # last: its presence means the stage is whole
    return description


def _members_preprocessing(exp: Any, members: Sequence[Member]) -> dict[str, Any] | None:
    """The members' recorded preprocessing (what `predict` replays); else the experiment plan's data settings."""
    from cxr_search.data.preprocess import locate

    found = locate(folders=[m.checkpoint_dir for m in members if m.checkpoint_dir],
                   fallback=(exp.plan.data.size, exp.plan.data.equalize), where=str(exp.path), required=False)
    return found.to_dict() if found is not None else None


def read_ensemble(exp_dir: str | Path) -> dict[str, Any] | None:
    """`EXP/ensemble/ensemble.json` (written last by the ensemble stage), or None when the stage has not run."""
    path = storage.path(exp_dir) / ENSEMBLE_DIR / "ensemble.json"
    return storage.read_json(path) if path.is_file() else None


@dataclass(frozen=True)
class EnsemblePredictions:
    """The saved ensemble replayed on its members' stored predictions (nothing is refitted)."""

    description: dict[str, Any]  # ensemble.json
    members: list[Any]  # ensemble.Member, in ensemble.json's order (best first)
    weights: np.ndarray  # [M], the saved voting weights
    temperature: float
    val_labels: np.ndarray
    test_labels: np.ndarray
    val_probs: np.ndarray  # soft vote before temperature scaling
    test_probs_uncalibrated: np.ndarray
    test_probs: np.ndarray  # after temperature scaling: what the ensemble predicts


def ensemble_predictions(exp_dir: str | Path) -> EnsemblePredictions | None:
    """The ensemble's members and its validation/test probabilities before and after temperature scaling,
    rebuilt from `ensemble.json` and each member's `predictions/<trial>.npz`; None when the stage has not run."""
    from cxr_search import ensemble

    exp = Experiment.open(exp_dir)
    desc = read_ensemble(exp.path)
    if desc is None:
        return None
    stage = exp.stage_dir(desc["source"])
    members = [ensemble.load_member(predictions_path(stage, m["trial_id"]), trial_id=m["trial_id"],
                                    checkpoint_dir=m["checkpoint_dir"]) for m in desc["members"]]
    weights = np.array([m["weight"] for m in desc["members"]], dtype=np.float64)
    raw_test = ensemble.soft_vote([m.test_probs for m in members], weights)
    return EnsemblePredictions(
        description=desc, members=members, weights=weights, temperature=float(desc["temperature"]),
        val_labels=members[0].val_labels, test_labels=members[0].test_labels,
        val_probs=ensemble.soft_vote([m.val_probs for m in members], weights),
        test_probs_uncalibrated=raw_test, test_probs=ensemble.apply_temperature(raw_test, desc["temperature"]))


def member_comparison(ens: EnsemblePredictions, n_resamples: int = 1000) -> pd.DataFrame:
    """Each member against the ensemble on the same test images: accuracies and the ensemble's accuracy gain
    with a paired stratified bootstrap interval (`ensemble.paired_acc_gain`).

    Returns:
        Columns `trial_id`, `weight`, `member_acc`, `ensemble_acc`, `gain`, `gain_lo`, `gain_hi`.
    """
    from cxr_search.ensemble import paired_acc_gain

    y = ens.test_labels
    ensemble_acc = float((ens.test_probs.argmax(1) == y).mean())
    rows = []
    for member, weight in zip(ens.members, ens.weights, strict=True):
        gain, lo, hi = paired_acc_gain(y, ens.test_probs, member.test_probs, n_resamples=n_resamples)
        rows.append({"trial_id": member.trial_id, "weight": float(weight),
                     "member_acc": float((member.test_probs.argmax(1) == y).mean()), "ensemble_acc": ensemble_acc,
                     "gain": gain, "gain_lo": lo, "gain_hi": hi})
    return pd.DataFrame(rows)
