"""The published study's figures (`reference/*.csv`) beside ours: which study row a trial matches."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from cxr_search.config import TrialConfig
from cxr_search.io import paths


def study_summary(name: str) -> dict[str, Any]:
    """One row of the study's `reference/study_summary.csv` (ensemble, best single, mean of 50 runs); {} if absent."""
    path = paths.reference_dir() / "study_summary.csv"
    df = pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=["result"])
    hit = df[df["result"] == name]
    return hit.iloc[0].to_dict() if len(hit) else {}


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
        freeze = r.get("freeze_fraction", TrialConfig.freeze_fraction)
        parts += [f"freeze={freeze:g}", str(r.get("head", "")), str(r.get("regularizer", ""))]
    return " ".join(p for p in parts if p)


def _study_tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    ref = paths.reference_dir()
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
        freeze = float(r.get("freeze_fraction", TrialConfig.freeze_fraction))
        for _, f in finetune.iterrows():
            same = (f["optimizer"] == r.get("optimizer") and float(f["freeze_fraction"]) == freeze
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
