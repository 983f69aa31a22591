"""Static figures of an experiment (matplotlib), shared by the HTML report (`html_report`) and the notebooks in
`analysis/`. Each function takes what the library's loaders return and gives back a matplotlib Figure; nothing
here reads the experiment folder. Optuna's own figures come from `optuna.visualization`, not from here."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from cxr_search import CLASSES

# How a search trial ended (results.parquet `stop_reason`) -> marker at its last epoch.
END_MARKERS = {
    "asha": ("X", "tab:red", "stopped by ASHA"),
    "early_stopping": ("o", "black", "early stopping"),
    "max_epochs": ("s", "tab:green", "epoch budget reached"),
    "error": ("x", "tab:purple", "error"),
    "": (">", "tab:gray", "still running"),
}
RELIABILITY_BINS = 15  # the same equal-width bins as metrics.ece


def _pyplot() -> Any:
    # The caller picks the backend: a notebook keeps its inline one, the HTML report selects Agg.
    import matplotlib.pyplot as plt

    return plt


def learning_curves(histories: pd.DataFrame, results: pd.DataFrame, metric: str = "val_loss") -> Any:
    """Per-trial validation curves, each ending in a marker saying how the trial ended (ASHA's stops in red).

    Args:
        histories: `experiment.trials.trial_histories(results)` (trial_id, epoch, metrics).
        results: the stage's results table (`trial_id`, `stop_reason`).
        metric: the objective's metric, drawn in the left panel; validation accuracy on the right.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    reasons = results["stop_reason"].fillna("") if "stop_reason" in results else [""] * len(results)
    ends = dict(zip(results["trial_id"].astype(str), reasons, strict=True)) if len(results) else {}
    used: set[str] = set()
    panels = [m for m in (metric, "val_acc") if m in histories.columns] if len(histories) else []
    for ax, name in zip(axes, panels, strict=False):
        for trial_id, curve in histories.groupby("trial_id", sort=True):
            values = curve[name].astype(float)
            (line,) = ax.plot(curve["epoch"], values, lw=1, alpha=0.8)
            end = ends.get(str(trial_id), "")
            marker, color, label = END_MARKERS.get(end, END_MARKERS[""])
            ax.scatter(curve["epoch"].iloc[-1], values.iloc[-1], marker=marker, color=color, s=50, zorder=3,
                       label=None if end in used else label)
            used.add(end)
            ax.annotate(str(trial_id), (curve["epoch"].iloc[-1], values.iloc[-1]), fontsize=7,
                        xytext=(4, 0), textcoords="offset points", color=line.get_color())
        positive = histories[name].dropna()
        if name.endswith("loss") and len(positive) and (positive > 0).all() and positive.max() > 20 * positive.min():
            ax.set_yscale("log")  # a diverged trial's loss would flatten every other curve
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"validation {name.removeprefix('val_')}")
        ax.grid(alpha=0.3)
    if not panels:
        axes[0].text(0.5, 0.5, "no epoch finished yet", ha="center", transform=axes[0].transAxes)
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle("learning curves per trial (marker: how the trial ended)", fontsize=10)
    fig.tight_layout()
    return fig


def time_vs_accuracy(results: pd.DataFrame) -> Any:
    """Each trial's training time (sum of epoch times) against its validation and test accuracy."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for column, marker, label in (("best_val_acc", "o", "validation (best epoch)"),
                                  ("test_acc", "^", "test (best-validation weights)")):
        if column in results and "wall_time_s" in results:
            ax.scatter(results["wall_time_s"], results[column], marker=marker, label=label, alpha=0.8)
    for _, r in results.iterrows():
        if "wall_time_s" in r and "best_val_acc" in r:
            ax.annotate(str(r["trial_id"]), (r["wall_time_s"], r["best_val_acc"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xlabel("training time per trial (s, sum of epoch times)")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def accuracy_intervals(intervals: pd.DataFrame) -> Any:
    """Test accuracy with its 95% interval per model (`report.accuracy_intervals`), the study's figure beside."""
    plt = _pyplot()
    n = max(len(intervals), 1)
    fig, ax = plt.subplots(figsize=(7, 0.45 * n + 1.4))
    y = np.arange(len(intervals))
    labels = [f"{t} {m}" for t, m in zip(intervals["trial_id"], intervals["model"], strict=True)]
    acc = intervals["acc"].to_numpy(dtype=float)
    err = np.vstack([acc - intervals["acc_lo"].to_numpy(dtype=float), intervals["acc_hi"].to_numpy(dtype=float) - acc])
    ax.errorbar(acc, y, xerr=err, fmt="o", capsize=3, label="ours (95% bootstrap interval)")
    study = intervals["study_acc"].to_numpy(dtype=float)
    if np.isfinite(study).any():
        ax.scatter(study, y, marker="D", color="tab:red", label="study reported", zorder=3)
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_ylim(len(intervals) - 0.5, -1.5)  # best first, as in the tables; a free row on top for the legend
    low = np.nanmin(np.concatenate([intervals["acc_lo"].to_numpy(dtype=float), study]))
    ax.set_xlim(max(0.0, low - 0.05), 1.005)
    ax.set_xlabel("test accuracy")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8, loc="upper left", ncols=2)
    fig.tight_layout()
    return fig


def seed_distribution(runs: pd.DataFrame, summary: pd.DataFrame, study: Mapping[str, Any],
                      metrics: tuple[str, ...] = ("acc", "normal_recall", "covid_recall_vs_pneumonia")) -> Any:
    """Histogram of each retrained configuration's test metrics over seeds, with the 95% CI of the mean (band)
    and the study's 50-run mean (dashed).

    Args:
        runs: `retrain.finished_runs(exp)` (one row per seed, `config_key`, `test_<metric>`).
        summary: `report.seed_summary(exp)` (mean and mean_ci_low/high per configuration and metric).
        study: `report.study_summary("variant7_mean_of_50_runs")` ({} if absent).
        metrics: test metrics, one panel each.
    """
    plt = _pyplot()
    present = [m for m in metrics if f"test_{m}" in runs.columns and runs[f"test_{m}"].notna().any()]
    fig, axes = plt.subplots(1, max(len(present), 1), figsize=(3.8 * max(len(present), 1), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], present, strict=False):
        for key, group in runs.groupby("config_key", sort=False):
            values = group[f"test_{metric}"].dropna().to_numpy(dtype=float)
            if not len(values):
                continue
            # 12 bins over the seeds' range; one narrow bar when every seed scored the same
            bins = np.linspace(values.min(), values.max(), 13) if np.ptp(values) > 0 else \
                [values[0] - 0.004, values[0] + 0.004]
            ax.hist(values, bins=bins, alpha=0.6, label=f"{key[:6]} ({len(values)} seeds)")
            row = summary[(summary["config_key"] == key) & (summary["metric"] == metric)] if len(summary) else summary
            if len(row) and np.isfinite(row["mean_ci_low"].iloc[0]):
                ax.axvspan(row["mean_ci_low"].iloc[0], row["mean_ci_high"].iloc[0], alpha=0.15, color="tab:blue",
                           label="95% CI of the mean")
        study_key = "test_acc" if metric == "acc" else metric
        if study.get(study_key) is not None:
            ax.axvline(float(study[study_key]), ls="--", color="tab:red", label="study: mean of 50 runs")
        ax.set_title(f"test {metric}", fontsize=9)
        ax.set_xlabel(metric)
        ax.set_ylabel("seeds")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0][0].legend(fontsize=7)
    fig.suptitle("retrained seeds: distribution of test metrics", fontsize=10)
    fig.tight_layout()
    return fig


def reliability(labels: np.ndarray, probs: Mapping[str, np.ndarray]) -> Any:
    """Reliability diagram of the top-class confidence (15 equal-width bins, as `metrics.ece`), one curve per
    entry of `probs` (e.g. before and after temperature scaling); the diagonal is perfect calibration."""
    from sklearn.calibration import CalibrationDisplay

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    for name, p in probs.items():
        p = np.asarray(p, dtype=np.float64)
        correct = (p.argmax(1) == np.asarray(labels)).astype(int)
        CalibrationDisplay.from_predictions(correct, p.max(1), n_bins=RELIABILITY_BINS, strategy="uniform",
                                            name=name, ax=ax)
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy in bin")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def confusion_matrices(labels: np.ndarray, probs: Mapping[str, np.ndarray],
                       classes: tuple[str, ...] = CLASSES) -> Any:
    """One confusion matrix (counts) per model, side by side (e.g. each member and the ensemble)."""
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(probs), figsize=(3.4 * len(probs), 3.4), squeeze=False)
    for ax, (name, p) in zip(axes[0], probs.items(), strict=True):
        ConfusionMatrixDisplay.from_predictions(labels, np.asarray(p).argmax(1), labels=list(range(len(classes))),
                                                display_labels=list(classes), ax=ax, colorbar=False)
        ax.set_title(name, fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    return fig
