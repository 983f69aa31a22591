"""One model without Ray (`cxr-search train`): prepare the data, fit into a model folder, report the study's columns.

The model folder is training.model_folder's (best weights, resume state, history), plus `result.json` (the run's figures)
and `data_report.json` (the data's integrity report and warnings, as `run` saves in an experiment).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr_search.config import TrialConfig
from cxr_search.errors import CxrError
from cxr_search.io import paths, storage
from cxr_search.training.loop import FitResult, fit
from cxr_search.training.model_folder import CONFIG_FILE
from cxr_search.training.runtime import model_from_config, resolve_device

SMOKE_SIZE = 64  # px: --smoke trains on a tiny phantom set at this size
SMOKE_EPOCHS = 2
SMOKE_PHANTOMS = 300
RESULT_FILE = "result.json"
DATA_REPORT_FILE = "data_report.json"


@dataclass
class TrainRun:
    """What `train_model` did: the fit, where it was saved, how long it took, and the data warnings."""

    cfg: TrialConfig
    result: FitResult
    out: Path
    seconds: float
    warnings: list[str]

    def study_columns(self) -> dict[str, float]:
        """The study's columns: train/val accuracy at the best epoch, test figures, train-val gap, time."""
        best = self.result.history[self.result.best_epoch - 1]
        return {"train acc": best["train_acc"], "val acc": best["val_acc"], "test acc": self.result.test["acc"],
                "normal": self.result.test["normal_recall"],
                "covid": self.result.test["covid_recall_vs_pneumonia"],
                "gap": best["train_acc"] - best["val_acc"], "time s": self.seconds}


def check(cfg: TrialConfig) -> None:
    """Refuse, in one line and before any data work, what cannot run: a device that is not there, pretrained
    weights that are not staged or cannot be read (a local file is loaded into the model once, here)."""
    from cxr_search.models import weights

    resolve_device(cfg.device)
    weights.require_available([(cfg.backbone, cfg.pretrained)])
    if cfg.pretrained not in ("none", weights.IMAGENET):
        model_from_config(cfg)


def notes(cfg: TrialConfig, size: int) -> list[str]:
    """What the user should know before training this configuration at this image size."""
    from cxr_search.experiment.plan import frozen_random_note, input_size_note

    out = []
    note = input_size_note({cfg.backbone}, size, "--size")
    if note:
        out.append(note)
    if cfg.freeze_fraction > 0 and cfg.pretrained == "none":
        out.append(frozen_random_note(cfg.freeze_fraction, "--freeze-fraction", "add --pretrained imagenet"))
    return out


def train_model(cfg: TrialConfig, *, data_dir: str | Path | None = None, size: int = 128, resplit: bool = False,
                out: str | Path | None = None, smoke: bool = False, progress: bool = True) -> TrainRun:
    """Train one configuration on a data folder (default: the phantom set) and save its model folder.

    Args:
        cfg: the trial config.
        data_dir: data folder or CSV manifest; None: the default phantom set (a small one with `smoke`).
        size: image side in pixels.
        resplit: pool train and test and re-split by patient.
        out: the model folder (default `<experiments root>/train-<backbone>-<time>`); an existing one is resumed
            if it holds the same configuration.
        smoke: a tiny phantom set (the seconds-long size).
        progress: progress bars.
    """
    from cxr_search.data import phantoms
    from cxr_search.data.prepare import prepare

    check(cfg)
    if data_dir is None and smoke:
        data_dir = phantoms.default_dataset(n_images=SMOKE_PHANTOMS, size=96)  # generated once into the cache
    out = Path(out) if out is not None else paths.experiments_root() / f"train-{cfg.backbone}-{time.strftime('%Y%m%d-%H%M%S')}"
    saved = out / CONFIG_FILE
    if saved.is_file() and TrialConfig.from_dict(storage.read_json(saved), source=str(saved)) != cfg:
        raise CxrError(f"--out {out} holds a model trained with another configuration; pick another --out.")
    prepared = prepare(data_dir, size=size, resplit=resplit, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    storage.atomic_write_json(out / DATA_REPORT_FILE, prepared.report)
    start = time.perf_counter()
    result = fit(cfg, prepared, checkpoint_dir=out, progress=progress)
    elapsed = time.perf_counter() - start
    storage.atomic_write_json(out / RESULT_FILE, {
        "history": result.history, "best_epoch": result.best_epoch, "best_val": result.best_val,
        "test": result.test, "stop_reason": result.stop_reason, "time_s": elapsed})
    return TrainRun(cfg, result, out, elapsed, list(prepared.report.get("warnings", [])))


def print_run(run: TrainRun, console: Any) -> None:
    """The study's table for one run, its data warnings, and where it was saved."""
    from rich.table import Table

    from cxr_search.report.summary import fmt

    r = run.result
    for warning in run.warnings:
        console.print(f"[yellow]data warning:[/] {warning}")
    table = Table(title=f"{run.cfg.backbone}: best epoch {r.best_epoch} of {len(r.history)} ({r.stop_reason})",
                  caption="recalls on test; covid = covid_recall_vs_pneumonia; gap = train acc - val acc")
    columns = run.study_columns()
    for name in columns:
        table.add_column(name, justify="right")
    table.add_row(*(fmt(v, 0) if k == "time s" else fmt(v) for k, v in columns.items()))
    console.print(table)
    console.print(f"model folder: {run.out} (best-e*.pt, config.json, history.jsonl, {RESULT_FILE}, "
                  f"{DATA_REPORT_FILE})")
