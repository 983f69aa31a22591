"""The model folder: one folder per training run (a search trial's folder, `cxr-search train --out`), written so
that a kill at any line leaves a resumable, consistent folder:

- `config.json`: the TrialConfig (written once, at the start)
- `best-eNNNN.pt`: best-validation weights of epoch NNNN, written when validation improves (before the epoch is
  reported), never overwritten; at most the one the resume state names and a newer one
- `resume.pt`: everything to continue exactly (model, optimizer, scheduler, RNGs, early stopping, history, the
  best file's name), replaced atomically by time/epoch; when the run ends it is replaced by a lean one (no model or
  optimizer state: a finished run keeps its best weights only)
- `history.jsonl`: one JSON line per epoch, appended after resume.pt and before the epoch is reported: the complete
  record even for epochs after the last resume state (a trial ASHA stopped)

Order per epoch: best file -> resume.pt (when due) -> history line -> report. A resume discards what came after
its resume.pt (best files of later epochs, later history lines), so every file agrees with the state. Everything
is saved with torch.save of tensors/dicts/lists/numbers only (loadable with weights_only=True)."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import torch

from cxr_search.config import TrialConfig
from cxr_search.data.preprocess import write_record
from cxr_search.errors import CxrError
from cxr_search.io import storage
from cxr_search.training.early_stopping import EarlyStopping
from cxr_search.training.runtime import model_from_config, rng_state, set_rng_state

RESUME_FILE = "resume.pt"


HISTORY_FILE = "history.jsonl"


CONFIG_FILE = "config.json"


FORMAT_VERSION = 2


_BEST_FILE = re.compile(r"^best-e(\d{4,})\.pt$")


_AUTO_CHECKPOINT_FACTOR = 9  # auto period = 9x the last write: writing costs at most ~10% of the run


def best_file_name(epoch: int) -> str:
    return f"best-e{epoch:04d}.pt"


def best_files(folder: str | Path) -> list[tuple[int, storage.Location]]:
    """The folder's best-weights files as (epoch, path), oldest first."""
    folder = storage.path(folder)
    if not storage.is_remote(folder) and not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _BEST_FILE.match(p.name))]
    return sorted(found)


def read_history(folder: str | Path) -> list[dict[str, Any]]:
    """The per-epoch metrics of a model folder (`history.jsonl`; a line cut by a kill is skipped)."""
    return storage.read_records(storage.path(folder) / HISTORY_FILE)


def read_resume_state(folder: str | Path | None, *, metadata_only: bool = False) -> dict[str, Any] | None:
    """The folder's resume state (None if it has none yet).

    Args:
        folder: a model folder.
        metadata_only: memory-map the file instead of reading the tensors (for `finished`, `history`, ...).

    Raises:
        CxrError: the file exists but is not a resume state of this version.
    """
    if folder is None:
        return None
    path = storage.path(folder) / RESUME_FILE
    if not path.is_file():
        return None
    try:
        state = _load_tensors(path, mmap=metadata_only)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise CxrError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e}); delete the folder "
                       f"{folder} to train it again.") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CxrError(f"{path}: checkpoint format {state.get('format_version') if isinstance(state, dict) else '?'} "
                       f"is not this version's ({FORMAT_VERSION}); retrain with this version of cxr-search.")
    return state


def _load_tensors(path: storage.Location, *, mmap: bool = False) -> Any:
    """A file this module wrote with torch.save: tensors, dicts, lists and numbers only (weights_only=True, never a
    pickle of arbitrary objects). `mmap` maps a local file instead of reading it (an object is read whole)."""
    if storage.is_remote(path):
        with storage.open_binary(path) as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


class CheckpointWriter:
    """Writes one run's model folder in the crash-safe order described above."""

    def __init__(self, folder: storage.Location, cfg: TrialConfig, num_classes: int, every_epochs: int,
                 every_s: float | None, preprocessing: dict[str, Any] | None = None):
        self.folder, self.cfg, self.num_classes = folder, cfg, num_classes
        self.preprocessing = preprocessing  # the data's recorded preprocessing: the folder alone serves `predict`
        self.every_epochs, self.every_s = max(1, int(every_epochs)), every_s
        self.last_epoch = 0  # epoch of the last resume state
        self.last_time = time.monotonic()
        self.write_cost = 0.0  # seconds the last resume state took to write (the automatic period's unit)
        self.best_written = 0  # epoch of the newest best file

    def start_fresh(self) -> None:
        """A new run: drop what an earlier attempt left before its first resume state."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for _, path in best_files(self.folder):
            path.unlink()
        storage.rewrite_records(self.folder / HISTORY_FILE, [])
        storage.atomic_write_text(self.folder / CONFIG_FILE, self.cfg.to_json())
        if self.preprocessing:
            write_record(self.folder, self.preprocessing)

    def resumed(self, epoch: int) -> None:
        self.last_epoch = epoch
        self.best_written = max((e for e, _ in best_files(self.folder)), default=0)

    def epoch_done(self, metrics: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler | None, early: EarlyStopping,
                   history: list[dict[str, Any]], stop_reason: str) -> None:
        epoch = int(metrics["epoch"])
        if early.best_epoch == epoch:
            self._write_best(epoch, early.best_weights)
        if stop_reason:
            self._write_state(_lean_state(self.num_classes, epoch, early, history, stop_reason, self.best_written))
            self._prune_best(keep=self.best_written)
        elif self._due(epoch):
            t0 = time.monotonic()
            state = {
                "format_version": FORMAT_VERSION, "num_classes": self.num_classes, "epoch": epoch,
                "finished": False, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else {}, "rng": rng_state(),
                "early_stopping": early.scalars(), "best_file": best_file_name(early.best_epoch)
                if early.best_epoch else "", "history": history, "stop_reason": stop_reason,
            }
            self._write_state(state)
            self._prune_best(keep=early.best_epoch)
            self.write_cost = time.monotonic() - t0
        storage.append_record(self.folder / HISTORY_FILE, metrics)

    def _due(self, epoch: int) -> bool:
        if epoch - self.last_epoch < self.every_epochs:
            return False
        period = self.every_s if self.every_s is not None else _AUTO_CHECKPOINT_FACTOR * self.write_cost
        return time.monotonic() - self.last_time >= period

    def _write_best(self, epoch: int, weights: dict[str, torch.Tensor] | None) -> None:
        best = {"format_version": FORMAT_VERSION, "num_classes": self.num_classes, "epoch": epoch, "model": weights}
        storage.atomic_write(self.folder / best_file_name(epoch), lambda tmp: torch.save(best, tmp))
        self.best_written = epoch

    def _write_state(self, state: dict[str, Any]) -> None:
        storage.atomic_write(self.folder / RESUME_FILE, lambda tmp: torch.save(state, tmp))
        self.last_epoch, self.last_time = int(state["epoch"]), time.monotonic()

    def _prune_best(self, keep: int) -> None:
        """Remove best files older than the one the new resume state names (newer ones are still needed)."""
        for epoch, path in best_files(self.folder):
            if epoch < keep:
                path.unlink(missing_ok=True)


def _lean_state(num_classes: int, epoch: int, early: EarlyStopping, history: list[dict[str, Any]],
                stop_reason: str, best_epoch_on_disk: int) -> dict[str, Any]:
    """The resume state of a run that ended: what a later call needs to report it, no weights or optimizer."""
    scalars = early.scalars()
    return {"format_version": FORMAT_VERSION, "num_classes": num_classes, "epoch": epoch, "finished": True,
            "early_stopping": scalars, "best_file": best_file_name(best_epoch_on_disk) if best_epoch_on_disk else "",
            "history": history, "stop_reason": stop_reason}


def restore_state(
    state: dict[str, Any],
    folder: storage.Location,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    early: EarlyStopping,
    tidy: bool = True,
) -> tuple[list[dict[str, Any]], str]:
    """Load a resume state into the live objects and the RNGs, and (`tidy`: the writing process) discard what came
    after it on disk.

    Returns:
        (history, stop_reason); a finished run returns its stop reason, so no epoch is trained again.
    """
    epoch = int(state["epoch"])
    for e, path in best_files(folder) if tidy else ():
        if e > epoch:  # written after this state by an attempt that died: its epochs will run again
            path.unlink(missing_ok=True)
    history = list(state["history"])
    if tidy and len(read_history(folder)) != len(history):
        storage.rewrite_records(folder / HISTORY_FILE, history)
    for key, value in state["early_stopping"].items():
        setattr(early, key, value)
    if state["best_file"]:
        best = _load_tensors(folder / state["best_file"])
        early.best_weights = best["model"]
    if state["finished"]:
        if early.best_weights is not None:
            model.load_state_dict(early.best_weights)
        return history, state["stop_reason"] or "stopped"  # "" = stopped by a scheduler, then sealed
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"]:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return history, state["stop_reason"]


def seal(folder: str | Path, stop_reason: str = "") -> None:
    """Make a run that ended without finishing by itself (a trial ASHA stopped) lean, like a finished one.

    Its history is `history.jsonl` (it may run past the last resume state); its best weights are the newest
    best file. Idempotent; a folder without a resume state or already lean is left as it is.
    """
    folder = storage.path(folder)
    state = read_resume_state(folder, metadata_only=True)
    if state is None or state["finished"]:
        return
    history = read_history(folder)
    last = int(history[-1]["epoch"]) if history else int(state["epoch"])
    bests = [(e, p) for e, p in best_files(folder) if e <= last]
    best_epoch = bests[-1][0] if bests else 0
    losses = {int(h["epoch"]): float(h["val_loss"]) for h in history if "val_loss" in h}
    scalars = dict(state["early_stopping"])
    scalars.update(best_epoch=best_epoch, best_loss=losses.get(best_epoch, scalars["best_loss"]))
    if best_epoch != int(state["early_stopping"]["best_epoch"]):
        scalars.update(best_val_metrics={})  # only known for the state's own best epoch
    lean = {"format_version": FORMAT_VERSION, "num_classes": state["num_classes"], "epoch": last, "finished": True,
            "early_stopping": scalars, "best_file": best_file_name(best_epoch) if best_epoch else "",
            "history": history, "stop_reason": stop_reason}
    storage.atomic_write(folder / RESUME_FILE, lambda tmp: torch.save(lean, tmp))
    for epoch, path in best_files(folder):
        if epoch != best_epoch:
            path.unlink(missing_ok=True)


def load_best_model(checkpoint_dir: str | Path) -> tuple[torch.nn.Module, TrialConfig]:
    """The best-validation model of a model folder, in eval mode on the CPU, and its trial config.

    Args:
        checkpoint_dir: a model folder written by ``fit`` (a trial folder, ``cxr-search train --out``).
    """
    folder = storage.path(checkpoint_dir)
    bests = best_files(folder)
    if not (folder / CONFIG_FILE).is_file() or not bests:
        raise CxrError(f"{folder}: no trained model here (needs {CONFIG_FILE} and best-e*.pt); pass a folder "
                       "written by `cxr-search train --out` or a search trial's folder.")
    cfg = TrialConfig.from_dict(storage.read_json(folder / CONFIG_FILE), source=str(folder / CONFIG_FILE))
    history = read_history(folder)
    last = int(history[-1]["epoch"]) if history else bests[-1][0]
    epoch, path = next(((e, p) for e, p in reversed(bests) if e <= last), bests[0])
    best = _load_tensors(path)
    # the file holds every weight: never reload pretrained ones (a hub name would fail offline)
    model = model_from_config(cfg.replace(pretrained="none"), num_classes=best["num_classes"])
    model.load_state_dict(best["model"])
    return model.eval(), cfg
