"""A stage's trials: their folders (`trial_<key>`), the driver's event log (`trials.jsonl`), how each ended, their
histories, and the identity of a configuration (`config_key`)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr_search.config import TrialConfig
from cxr_search.io import storage
from cxr_search.io.layout import EVENTS_FILE, TRIAL_PREFIX

# Fields that do not change what a configuration learns: left out of its identity, so a seed or an epoch
# budget given to `retrain` does not make the same configuration a new one.
NOT_IDENTITY = ("seed", "device", "eval_batch_size", "deterministic", "max_epochs", "compile")


def config_fields(row: dict[str, Any]) -> dict[str, Any]:
    """TrialConfig fields of a results row or a Tune config (labels, metrics and NaN/None dropped)."""
    fields = set(TrialConfig.__dataclass_fields__)
    out = {}
    for key, value in row.items():
        name = key.removeprefix("config/")
        if name in fields and value is not None and not (isinstance(value, float) and np.isnan(value)):
            out[name] = value.item() if hasattr(value, "item") else value
    return out


def config_key(config: dict[str, Any]) -> str:
    """Stable 10-hex-digit identity of what a configuration learns (ignores `NOT_IDENTITY`: seed, budget, device)."""
    full = TrialConfig.from_dict(config_fields(config), source="config").to_dict()
    for name in NOT_IDENTITY:
        full.pop(name, None)
    return hashlib.sha1(json.dumps(full, sort_keys=True).encode()).hexdigest()[:10]


@dataclass(frozen=True)
class TrialDir:
    trial_id: str
    path: storage.Location


def trial_dirs(stage_dir: str | Path) -> list[TrialDir]:
    """The stage's trial folders (`trial_<id>` with a config), by trial id. Orphans set aside are not listed."""
    stage_dir = storage.path(stage_dir)
    if not stage_dir.is_dir():
        return []
    out = []
    for p in stage_dir.iterdir():
        if p.is_dir() and p.name.startswith(TRIAL_PREFIX) and ((p / "config.json").is_file()
                                                                or (p / "params.json").is_file()):
            out.append(TrialDir(p.name.removeprefix(TRIAL_PREFIX), p))
    return sorted(out, key=lambda t: t.trial_id)


def record_trial_event(stage_dir: str | Path, trial_id: str, event: str, **info: Any) -> None:
    """Append one trial event (`start`, `complete`, `error`) to the stage's `trials.jsonl`, fsynced."""
    storage.append_record(storage.path(stage_dir) / EVENTS_FILE,
                          {"trial_id": trial_id, "event": event, "time": dt.datetime.now().isoformat(), **info})


def trial_events(stage_dir: str | Path) -> dict[str, dict[str, Any]]:
    """The last recorded event of each trial (a later `complete` replaces an `error` that was retried)."""
    last: dict[str, dict[str, Any]] = {}
    for record in storage.read_records(storage.path(stage_dir) / EVENTS_FILE):
        if "trial_id" in record:
            last[str(record["trial_id"])] = record
    return last


def trial_history(trial_dir: str | Path) -> pd.DataFrame:
    """A trial's per-epoch metrics (the model folder's `history.jsonl`: complete even after Ray restarts)."""
    from cxr_search.training import model_folder

    df = pd.DataFrame(model_folder.read_history(trial_dir))
    if "epoch" in df:
        df = df.drop_duplicates("epoch", keep="last").sort_values("epoch").reset_index(drop=True)
    return df


def trial_histories(results: pd.DataFrame) -> pd.DataFrame:
    """Every trial's per-epoch metrics in one long table (`trial_id` first, then `trial_history`'s columns), for
    the trials of a results table (`Experiment.results`); trials without a history are left out."""
    frames = []
    for trial_id, trial_dir in zip(results.get("trial_id", []), results.get("trial_dir", []), strict=True):
        hist = trial_history(trial_dir)
        if len(hist):
            frames.append(hist.assign(trial_id=str(trial_id)))
    if not frames:
        return pd.DataFrame(columns=["trial_id", "epoch"])
    df = pd.concat(frames, ignore_index=True)
    return df[["trial_id", *[c for c in df.columns if c != "trial_id"]]]


def trial_end(trial_dir: str | Path, event: dict[str, Any] | None) -> str | None:
    """How a trial ended: `finished` (by itself: early stopping or max epochs), `stopped` (by the scheduler),
    `error` (every retry failed) or None (not ended, or ended with nothing to keep)."""
    from cxr_search.training import model_folder

    history = model_folder.read_history(trial_dir)
    if history and history[-1].get("stop_reason"):
        return "finished"
    if event is not None and event.get("event") == "error":
        return "error"
    if event is not None and event.get("event") == "complete" and history:
        return "stopped"
    return None
