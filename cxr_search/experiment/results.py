"""A stage's results: the per-trial table (`results.parquet`), the one ranking of trials, and each finished
trial's val/test predictions (`predictions/<id>.npz|json`, computed once by `finalize` after the stage; test
metrics never feed a search)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr_search import CLASSES
from cxr_search.config import TrialConfig
from cxr_search.errors import CxrError
from cxr_search.experiment.plan import Objective
from cxr_search.experiment.trials import (
    TrialDir,
    config_key,
    trial_dirs,
    trial_end,
    trial_events,
    trial_history,
)
from cxr_search.io import storage
from cxr_search.io.layout import DATA_REPORT_FILE, PREDICTIONS_DIR, RESULTS_FILE
from cxr_search.metrics import VALIDATION_METRICS

TEST_KEYS = ("acc", "macro_f1", "auroc_macro", "normal_recall", "covid_recall_vs_pneumonia", "disease_sensitivity",
             "ece", "nll")


def _trial_row(trial: TrialDir, objective: Objective, event: dict[str, Any] | None,
               predictions: storage.Location) -> dict[str, Any]:
    config = storage.read_json_or_none(trial.path / "config.json") or {}
    params = storage.read_json_or_none(trial.path / "params.json") or {}
    labels = {k: v for k, v in params.items() if k not in TrialConfig.__dataclass_fields__}
    row: dict[str, Any] = {"trial_id": trial.trial_id, **{**params, **config}, **labels}
    if config or params:
        row["config_key"] = config_key({**params, **config})
    hist = trial_history(trial.path)
    ended = trial_end(trial.path, event)
    last_reason = str(hist["stop_reason"].iloc[-1]) if "stop_reason" in hist and len(hist) else ""
    if ended == "finished":
        status, stop = "terminated", last_reason
    elif ended == "stopped":
        status, stop = "terminated", "asha"  # ended without a reason of its own: the scheduler stopped it
    elif ended == "error":
        status, stop = "error", "error"
    else:
        status, stop = "running", ""
    row.update(status=status, stop_reason=stop, epochs=0, error=str((event or {}).get("error", "")) if
               ended == "error" else "")
    if len(hist) and objective.metric in hist:
        values = hist[objective.metric].astype(float)
        best = values.idxmin() if objective.mode == "min" else values.idxmax()
        row["epochs"] = int(hist["epoch"].max())
        row["best_epoch"] = int(hist.loc[best, "epoch"])
        for key in VALIDATION_METRICS:
            if key in hist:
                row[f"best_{key}"] = float(hist.loc[best, key])
                row[f"last_{key}"] = float(hist[key].iloc[-1])
        if "train_acc" in hist:
            row["train_acc"] = float(hist.loc[best, "train_acc"])
            row["train_val_gap"] = row["train_acc"] - float(hist.loc[best, "val_acc"])
        row["wall_time_s"] = float(hist["epoch_time_s"].sum()) if "epoch_time_s" in hist else np.nan
        row["img_per_s"] = float(hist["img_per_s"].mean()) if "img_per_s" in hist else np.nan
    pred = storage.read_json_or_none(predictions / f"{trial.trial_id}.json")
    if pred:
        for key in TEST_KEYS:
            if key in pred.get("test", {}):
                row[f"test_{key}"] = pred["test"][key]
    row["predictions_path"] = str(predictions / f"{trial.trial_id}.npz") if pred else ""
    row["trial_dir"] = str(trial.path)
    return row


def build_results(stage_dir: str | Path, objective: Objective) -> pd.DataFrame:
    """One row per trial: config, status, stop reason, best and last validation metrics, test metrics, timing.

    Args:
        stage_dir: a stage folder (the experiment for the search, a retrain run).
        objective: the metric defining each trial's best epoch.
    """
    stage_dir = storage.path(stage_dir)
    events = trial_events(stage_dir)
    rows = [_trial_row(t, objective, events.get(t.trial_id), stage_dir / PREDICTIONS_DIR)
            for t in trial_dirs(stage_dir)]
    return pd.DataFrame(rows)


def write_results(stage_dir: str | Path, df: pd.DataFrame) -> storage.Location:
    """Write the stage's `results.parquet` atomically."""
    return storage.atomic_write(storage.path(stage_dir) / RESULTS_FILE, lambda tmp: df.to_parquet(tmp, index=False))


def load_results(stage_dir: str | Path, objective: Objective) -> pd.DataFrame:
    """The stage's table: `results.parquet` if written, else built from the folders (e.g. while running)."""
    path = storage.path(stage_dir) / RESULTS_FILE
    if not path.is_file():
        return build_results(stage_dir, objective)
    with storage.open_binary(path) as f:
        return pd.read_parquet(f)


def rank(df: pd.DataFrame, objective: Objective, *, finished_only: bool = True,
         distinct: bool = False) -> pd.DataFrame:
    """Trials best first by the objective's column (ties keep table order; test columns are never consulted).

    Args:
        df: a results table.
        objective: the metric and mode.
        finished_only: keep only trials whose predictions exist (what ensembles and retraining can use).
        distinct: keep each configuration (`config_key`) once, its best trial.
    """
    if df.empty or objective.column not in df.columns:
        out = df.iloc[0:0].copy()
        out.attrs.update(metric=objective.metric, mode=objective.mode)
        return out
    df = df.copy()
    df["trial_id"] = df["trial_id"].astype(str)
    if finished_only and "predictions_path" in df:
        df = df[[bool(p) and storage.path(p).is_file() for p in df["predictions_path"].fillna("")]]
    df = df.dropna(subset=[objective.column])
    df = df.sort_values(objective.column, ascending=objective.mode == "min", kind="stable").reset_index(drop=True)
    if distinct and "config_key" in df:
        df = df.drop_duplicates("config_key", keep="first").reset_index(drop=True)
    df.attrs.update(metric=objective.metric, mode=objective.mode)
    return df


def predictions_path(stage_dir: str | Path, trial_id: str) -> storage.Location:
    return storage.path(stage_dir) / PREDICTIONS_DIR / f"{trial_id}.npz"


def write_predictions(stage_dir: str | Path, trial_id: str, *, val_labels: np.ndarray, val_probs: np.ndarray,
                      test_labels: np.ndarray, test_probs: np.ndarray, metrics: dict[str, Any],
                      model_file: str) -> storage.Location:
    """Store one model's val/test probabilities (`.npz`, arrays only) and metrics (`.json`), atomically.

    The `.json` is written last and names the weights file it came from, so its presence means the pair is whole.
    """
    path = predictions_path(stage_dir, trial_id)

    def write_npz(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, val_labels=val_labels, val_probs=val_probs, test_labels=test_labels,
                                test_probs=test_probs, classes=np.array(CLASSES))

    storage.atomic_write(path, write_npz)
    storage.atomic_write_json(path.with_suffix(".json"), {"model_file": model_file, **metrics})
    return path


def read_predictions(path: str | Path) -> dict[str, np.ndarray]:
    """A predictions file (`val_labels`, `val_probs`, `test_labels`, `test_probs`, `classes`); no pickle."""
    try:
        with storage.open_binary(path) as f, np.load(f, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise CxrError(f"{path}: not a readable predictions file ({e}); rerun the stage that wrote it.") from None
    missing = {"val_labels", "val_probs", "test_labels", "test_probs"} - set(out)
    if missing:
        raise CxrError(f"{path}: predictions file lacks {', '.join(sorted(missing))}; rerun the stage that wrote it.")
    out.setdefault("classes", np.array(CLASSES))
    return out


def finalize(stage_dir: str | Path, data: Any, objective: Objective, *, device: str | None = None) -> pd.DataFrame:
    """Predict val and test with each ended trial's best-validation weights; write predictions and results.parquet.

    Trials stopped by the scheduler are sealed first (lean, best weights only). Test metrics are computed here,
    after the stage, and never feed a search. A trial already predicted from the same weights file is skipped,
    so finalize can be rerun after a kill at any line.

    Args:
        stage_dir: a stage folder written by `search.tune.run_stage`.
        data: the same PreparedData the stage trained on.
        objective: the stage's objective.
        device: torch device for prediction (None: CUDA if available, else CPU).

    Returns:
        The results table (also written to `stage_dir/results.parquet`).
    """
    from cxr_search.metrics import classification_metrics
    from cxr_search.training.evaluation import predict_proba
    from cxr_search.training.model_folder import best_files, load_best_model, seal

    stage_dir = storage.path(stage_dir)
    events = trial_events(stage_dir)
    for trial in trial_dirs(stage_dir):
        ended = trial_end(trial.path, events.get(trial.trial_id))
        if ended not in ("finished", "stopped"):
            continue
        if ended == "stopped":
            seal(trial.path)
        bests = best_files(trial.path)
        if not bests:
            continue
        model_file = bests[-1][1].name
        done = storage.read_json_or_none(predictions_path(stage_dir, trial.trial_id).with_suffix(".json"))
        if done is not None and done.get("model_file") == model_file:
            continue
        model, cfg = load_best_model(trial.path)
        val_probs = predict_proba(model, data.val.images, cfg=cfg, device=device)
        test_probs = predict_proba(model, data.test.images, cfg=cfg, device=device)
        metrics = {"val": _plain(classification_metrics(data.val.labels, val_probs)),
                   "test": _plain(classification_metrics(data.test.labels, test_probs))}
        write_predictions(stage_dir, trial.trial_id, val_labels=data.val.labels, val_probs=val_probs,
                          test_labels=data.test.labels, test_probs=test_probs, metrics=metrics, model_file=model_file)
        del model
    df = build_results(stage_dir, objective)
    write_results(stage_dir, df)
    return df


def _plain(d: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in d.items()}


def check_same_splits(stage_dir: str | Path, data: Any) -> None:
    """Refuse data whose val/test labels differ from what the stage's trials were evaluated on."""
    stored = sorted((storage.path(stage_dir) / PREDICTIONS_DIR).glob("*.npz"))
    if not stored:
        return
    z = read_predictions(stored[0])
    if not (np.array_equal(z["val_labels"], data.val.labels) and np.array_equal(z["test_labels"], data.test.labels)):
        raise CxrError(f"{stage_dir}: the data given are not the splits the search used (val/test labels differ); "
                       f"use the experiment's data folder, size and split seed ({DATA_REPORT_FILE}).")
