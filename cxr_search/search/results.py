"""Experiment folder -> one tidy row per trial (no Ray import: `status` and notebooks read folders only).

Sources per trial folder (Ray's layout): `params.json` (the config), `result.json` (one JSON line per epoch),
`error.txt`, `checkpoint_*/`; ours: `predictions/<trial_id>.json` (metrics of the best-validation weights,
written by `tune.finalize`) and `trial_status.json` (Tune's final status of each trial).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from cxr_search.paths import reference_dir

VAL_KEYS = ("val_loss", "val_acc", "val_macro_f1", "val_normal_recall", "val_covid_recall_vs_pneumonia")
TEST_KEYS = ("acc", "macro_f1", "auroc_macro", "normal_recall", "covid_recall_vs_pneumonia", "disease_sensitivity",
             "ece", "nll")
RESULTS_FILE = "results.parquet"
_TRIAL_ID = re.compile(r"^trial_(.+)$")  # folder names from tune.trial_dirname


@dataclass(frozen=True)
class TrialDir:
    trial_id: str
    path: Path


def trial_dirs(stage_dir: Path) -> list[TrialDir]:
    """Ray's trial folders of one stage, in trial order."""
    out = []
    for p in sorted(Path(stage_dir).iterdir()):
        if p.is_dir() and (p / "params.json").exists():
            m = _TRIAL_ID.search(p.name)
            out.append(TrialDir(m.group(1) if m else p.name, p))
    return sorted(out, key=lambda t: t.trial_id)


def latest_checkpoint(trial_path: Path) -> Path | None:
    """The newest `checkpoint_NNNNNN` folder of a trial (None if it never checkpointed)."""
    ckpts = sorted(p for p in Path(trial_path).glob("checkpoint_*") if p.is_dir() and not p.name.endswith(".tmp"))
    return ckpts[-1] if ckpts else None


def read_history(trial_path: Path) -> pd.DataFrame:
    """Per-epoch results of a trial; an epoch reported twice (retried after a crash) keeps its last report.

    Tune's `result.json` can lose the lines before a restart (Ray restores it from the last storage sync when it
    retries a failed trial), so epochs missing there are taken from the latest checkpoint's `history.json`,
    the engine's own complete record.
    """
    rows = _checkpoint_history(trial_path)
    result = Path(trial_path) / "result.json"
    if result.exists():
        for line in result.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut short by a killed driver
    df = pd.DataFrame(rows)
    if "epoch" in df:
        df = df.drop_duplicates("epoch", keep="last").sort_values("epoch").reset_index(drop=True)
    return df


def _checkpoint_history(trial_path: Path) -> list[dict[str, Any]]:
    ckpt = latest_checkpoint(trial_path)
    history = ckpt / "history.json" if ckpt else None
    if history is None or not history.exists():
        return []
    try:
        return [row for row in json.loads(history.read_text()) if isinstance(row, dict)]
    except json.JSONDecodeError:
        return []


def stage_objective(stage_dir: Path) -> tuple[str, str]:
    """(metric, mode) the stage was searched with, from its `search_space.yaml` (default val_loss/min)."""
    spec = Path(stage_dir) / "search_space.yaml"
    if spec.exists():
        raw = yaml.safe_load(spec.read_text()) or {}
        metric = raw.get("metric", "val_loss")
        return metric, raw.get("mode", "min" if metric == "val_loss" else "max")
    return "val_loss", "min"


def build(stage_dir: Path, metric: str | None = None, mode: str | None = None) -> pd.DataFrame:
    """One row per trial: config, status, stop reason, best and last validation metrics, test metrics, timing.

    Args:
        stage_dir: an experiment (or stage) folder.
        metric, mode: validation metric defining each trial's best epoch (default: the stage's own).
    """
    stage_dir = Path(stage_dir)
    if metric is None or mode is None:
        metric, mode = stage_objective(stage_dir)
    status_file = stage_dir / "trial_status.json"
    statuses = json.loads(status_file.read_text()) if status_file.exists() else {}
    rows = [_trial_row(t, stage_dir, metric, mode, statuses.get(t.trial_id)) for t in trial_dirs(stage_dir)]
    return pd.DataFrame(rows)


def _trial_row(trial: TrialDir, stage_dir: Path, metric: str, mode: str, status: dict | None) -> dict[str, Any]:
    config = json.loads((trial.path / "params.json").read_text())
    hist = read_history(trial.path)
    row: dict[str, Any] = {"trial_id": trial.trial_id, **config}
    last_reason = str(hist["stop_reason"].iloc[-1]) if "stop_reason" in hist and len(hist) else ""
    if last_reason in ("nan", "None"):
        last_reason = ""
    state = status["status"] if status else ("error" if (trial.path / "error.txt").exists() else "running")
    if last_reason:
        stop = last_reason
    elif state == "error":
        stop = "error"
    elif state == "terminated":
        stop = "asha"  # ended without a reason of its own: the scheduler stopped it
    else:
        stop = ""
    row.update(status=state if not last_reason else "terminated", stop_reason=stop, epochs=0)
    if len(hist) and metric in hist:
        best = hist[metric].idxmin() if mode == "min" else hist[metric].idxmax()
        row["epochs"] = int(hist["epoch"].max())
        row["best_epoch"] = int(hist.loc[best, "epoch"])
        for key in VAL_KEYS:
            if key in hist:
                row[f"best_{key}"] = float(hist.loc[best, key])
                row[f"last_{key}"] = float(hist[key].iloc[-1])
        if "train_acc" in hist:
            row["train_acc"] = float(hist.loc[best, "train_acc"])
            row["train_val_gap"] = row["train_acc"] - float(hist.loc[best, "val_acc"])
        row["wall_time_s"] = float(hist["time_total_s"].iloc[-1]) if "time_total_s" in hist else math.nan
        row["img_per_s"] = float(hist["img_per_s"].mean()) if "img_per_s" in hist else math.nan
    pred = stage_dir / "predictions" / f"{trial.trial_id}.json"
    if pred.exists():
        test = json.loads(pred.read_text()).get("test", {})
        for key in TEST_KEYS:
            if key in test:
                row[f"test_{key}"] = test[key]
    ckpt = latest_checkpoint(trial.path)
    row["checkpoint"] = str(ckpt) if ckpt else ""
    row["trial_dir"] = str(trial.path)
    return row


def write(df: pd.DataFrame, stage_dir: Path) -> Path:
    """Write `results.parquet` atomically (a reader never sees half a file)."""
    path = Path(stage_dir) / RESULTS_FILE
    tmp = path.with_suffix(".parquet.tmp")
    df.to_parquet(tmp, index=False)
    tmp.replace(path)
    return path


def load(stage_dir: Path) -> pd.DataFrame:
    """The stage's results: `results.parquet` if written, else built from the folder (e.g. while running)."""
    path = Path(stage_dir) / RESULTS_FILE
    return pd.read_parquet(path) if path.exists() else build(stage_dir)


def best_trial(df: pd.DataFrame, metric: str, mode: str) -> pd.Series:
    """The trial with the best validation `metric` (test columns are never consulted)."""
    col = f"best_{metric}"
    ranked = df.dropna(subset=[col])
    idx = ranked[col].idxmin() if mode == "min" else ranked[col].idxmax()
    return ranked.loc[idx]


def study_table(df: pd.DataFrame) -> pd.DataFrame:
    """Our trials in the study's table format, with the study's reported figures where a variant/backbone matches.

    Columns: model, train_acc, val_acc, test_acc, normal_recall, covid_recall_vs_pneumonia, train_val_gap,
    time_s, then `study_<col>` for the study's numbers (empty where nothing matches).
    """
    finetune, backbones = _study_tables()
    out = []
    for _, r in df.iterrows():
        ref = _match_study(r, finetune, backbones)
        label = str(r["variant"]) if "variant" in r and isinstance(r.get("variant"), str) else _label(r)
        row = {
            "model": label,
            "train_acc": r.get("train_acc"), "val_acc": r.get("best_val_acc"), "test_acc": r.get("test_acc"),
            "normal_recall": r.get("test_normal_recall"),
            "covid_recall_vs_pneumonia": r.get("test_covid_recall_vs_pneumonia"),
            "train_val_gap": r.get("train_val_gap"), "time_s": r.get("wall_time_s"),
            "stop_reason": r.get("stop_reason"),
        }
        for key in ("test_acc", "normal_recall", "covid_recall_vs_pneumonia"):
            row[f"study_{key}"] = ref.get(key) if ref is not None else None
        out.append(row)
    return pd.DataFrame(out)


def _label(r: pd.Series) -> str:
    parts = [str(r.get("backbone", "")), str(r.get("optimizer", ""))]
    if r.get("backbone") == "inception_v3":
        parts += [f"freeze={r.get('freeze_fraction', 0):g}", str(r.get("head", "")), str(r.get("regularizer", ""))]
    return " ".join(p for p in parts if p)


def _study_tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    ref = reference_dir()
    finetune = pd.read_csv(ref / "study_inception_finetuning.csv", dtype={"variant": str})
    backbones = pd.read_csv(ref / "study_backbones.csv")
    return finetune, backbones


def _match_study(r: pd.Series, finetune: pd.DataFrame, backbones: pd.DataFrame) -> pd.Series | None:
    variant = r.get("variant") if isinstance(r.get("variant"), str) else None
    if variant is not None:
        name = variant.removeprefix("variant_")
        hit = finetune[finetune["variant"] == name]
        if len(hit):
            return hit.iloc[0]
        if variant.startswith("backbone_"):
            return _backbone_row(variant.removeprefix("backbone_"), backbones)
        return None
    if r.get("backbone") == "inception_v3":
        for _, f in finetune.iterrows():
            same = (f["optimizer"] == r.get("optimizer") and float(f["freeze_fraction"]) == float(r.get("freeze_fraction", -1))
                    and f["head"] == r.get("head") and f["regularizer"] == r.get("regularizer"))
            if same and f["regularizer"] != "none":
                same = math.isclose(float(f["reg_strength"]), float(r.get("reg_strength", 0)), rel_tol=1e-6)
            if same:
                return f
        return None
    return _backbone_row(str(r.get("backbone", "")), backbones)


def _backbone_row(backbone: str, backbones: pd.DataFrame) -> pd.Series | None:
    model = "densenet" if backbone == "densenet121" else backbone  # the study's "DenseNet50" is our densenet121
    hit = backbones[backbones["model"] == model]
    return hit.iloc[0] if len(hit) else None
