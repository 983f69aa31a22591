"""Apply a finished model or ensemble to new image files: `cxr-search predict`.

A model source is an experiment folder (its ``ensemble/ensemble.json``), an ``ensemble.json`` file (or its
folder) or one checkpoint folder. Files are decoded with the data layer's safe decoder and the recorded
preprocessing (:mod:`cxr_search.data.preprocess`) is replayed, so a file gets exactly the pixels its training
images got; every member runs batched on the device, the members' probabilities are averaged with the stored
weights and the stored temperature is applied (``ensemble.soft_vote`` / ``apply_temperature``, the functions
that produced the ensemble's own test figures). A file that cannot be used gets a reason, never stops the batch.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr_search import CLASSES
from cxr_search.data.preprocess import Preprocessing, locate
from cxr_search.errors import CxrError
from cxr_search.experiment.folder import Experiment
from cxr_search.io import storage
from cxr_search.io.layout import PLAN_FILE, RESULTS_FILE

ENSEMBLE_FILE = "ensemble.json"
CHUNK = 256  # files decoded per model pass: bounds memory, keeps the device busy
PROGRESS_ABOVE = 8  # files; fewer get no progress bar


@dataclass
class Member:
    """One loaded model of a predictor."""

    name: str  # trial id, or the checkpoint folder's name
    model: Any  # torch.nn.Module in eval mode
    cfg: Any  # its TrialConfig
    weight: float  # voting weight (normalised over the members)
    checkpoint_dir: Path


@dataclass
class Predictor:
    """Loaded members, their voting weights and temperature, and the preprocessing they were trained with."""

    source: Path  # what the user named
    kind: str  # "ensemble" | "checkpoint"
    members: list[Member]
    temperature: float
    classes: tuple[str, ...]
    preprocessing: Preprocessing
    device: str  # "cpu" | "cuda"

    def predict_arrays(self, images_uint8: np.ndarray) -> np.ndarray:
        """Probabilities of preprocessed uint8 [N, S, S] images: weighted soft vote, then the temperature.

        Returns:
            float64 [N, n_classes], rows summing to 1, columns in ``classes`` order.
        """
        from cxr_search.ensemble import apply_temperature, soft_vote
        from cxr_search.training.evaluation import predict_proba

        if len(images_uint8) == 0:
            return np.zeros((0, len(self.classes)))
        probs = [predict_proba(m.model, images_uint8, cfg=m.cfg, device=self.device) for m in self.members]
        return apply_temperature(soft_vote(probs, [m.weight for m in self.members]), self.temperature)

    def describe(self) -> str:
        """One line: what predicts (for logs and reports)."""
        names = ", ".join(f"{m.name} ({m.cfg.backbone}, w={m.weight:.3f})" for m in self.members)
        return (f"{self.kind} {self.source}: {names}; temperature {self.temperature:.3f}; "
                f"{self.preprocessing.size} px, equalize {self.preprocessing.equalize}")


def load(source: str | Path, *, device: str = "auto") -> Predictor:
    """Load a model source for prediction.

    Args:
        source: an experiment folder (uses ``ensemble/ensemble.json``), an ``ensemble.json`` file or the folder
            holding it, or a checkpoint folder (one model, weight 1, temperature 1).
        device: "auto" (the GPU if visible), "cpu" or "cuda".

    Raises:
        CxrError: the source is none of these, a member's checkpoint is missing, or no preprocessing is recorded.
    """
    from cxr_search.training.model_folder import load_best_model
    from cxr_search.training.runtime import resolve_device

    source = storage.path(source)
    dev = str(resolve_device(device))
    if not source.exists():
        raise CxrError(f"{source} does not exist; pass an experiment folder, an ensemble.json or a checkpoint folder.")
    ens_file = _ensemble_file(source)
    if ens_file is None:
        model, cfg = load_best_model(source)
        prep = locate(folders=[source], fallback=_plan_preprocessing(_experiment_of(source)), where=str(source))
        member = Member(source.name, model, cfg, 1.0, source)
        return Predictor(source, "checkpoint", [member], 1.0, CLASSES, prep, dev)
    try:
        description = json.loads(ens_file.read_text())
        entries, temperature = description["members"], float(description["temperature"])
        classes = tuple(description.get("classes") or CLASSES)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CxrError(f"{ens_file}: not a readable ensemble description ({type(e).__name__}: {e}); "
                       "rebuild it with `cxr-search ensemble EXP`.") from None
    if tuple(classes) != CLASSES:
        raise CxrError(f"{ens_file}: classes {classes} differ from this cxr-search's {CLASSES}; rebuild the ensemble.")
    exp_dir = ens_file.parent.parent
    members = []
    for entry in entries:
        folder = _member_folder(str(entry["checkpoint_dir"]), exp_dir, ens_file)
        model, cfg = load_best_model(folder)
        members.append(Member(str(entry["trial_id"]), model, cfg, float(entry["weight"]), folder))
    if not members:
        raise CxrError(f"{ens_file}: the ensemble has no members; rebuild it with `cxr-search ensemble EXP`.")
    prep = locate(ensemble=description, folders=[ens_file.parent, *(m.checkpoint_dir for m in members)],
                  fallback=_plan_preprocessing(exp_dir), where=str(ens_file))
    return Predictor(source, "ensemble", members, temperature, classes, prep, dev)


def _ensemble_file(source: Path) -> Path | None:
    """The ensemble.json a source names, or None for a checkpoint folder."""
    if source.is_file():
        if source.suffix.lower() == ".json":
            return source
        raise CxrError(f"{source} is a file; pass an experiment folder, an ensemble.json or a checkpoint folder.")
    for candidate in (source / ENSEMBLE_FILE, source / "ensemble" / ENSEMBLE_FILE):
        if candidate.is_file():
            return candidate
    if (source / PLAN_FILE).is_file() or (source / RESULTS_FILE).is_file():
        raise CxrError(f"{source} is an experiment without an ensemble; build one with `cxr-search ensemble "
                       f"{source}`, or pass one trial's checkpoint folder.")
    return None


def _experiment_of(folder: Path) -> Path | None:
    """The experiment folder holding a checkpoint folder (the nearest ancestor with pipeline.json), if any."""
    parent = folder.resolve()
    for _ in range(4):
        parent = parent.parent
        if (parent / PLAN_FILE).is_file():
            return parent
    return None


def _plan_preprocessing(exp_dir: Path | None) -> tuple[int, str] | None:
    """(size, equalize) of an experiment's plan: what its arrays were prepared with, if the folder has no record."""
    if exp_dir is None or not (exp_dir / PLAN_FILE).is_file():
        return None
    try:
        data = Experiment.open(exp_dir).plan.data
    except CxrError:
        return None
    return data.size, data.equalize


def _member_folder(path: str, exp_dir: Path, ens_file: Path) -> Path:
    """A member's checkpoint folder: absolute, or relative to the working directory or the experiments root."""
    raw = storage.path(path)
    candidates = [raw] if storage.is_remote(raw) or raw.is_absolute() else [raw, exp_dir.parent / raw, exp_dir / raw, exp_dir.parent.parent / raw]
    for c in candidates:
        if c.is_dir():
            return c
    raise CxrError(f"{ens_file}: member checkpoint {path} not found; was the experiment moved or its trial "
                   "folders deleted? Rebuild the ensemble with `cxr-search ensemble EXP`.")


# ---------------------------------------------------------------- files


def list_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files to predict: named files as given, folders walked recursively (sorted, hidden entries skipped).

    In folders, files with an image suffix (or none: DICOMs often have none) are taken; masks/ folders of phantom
    sets are skipped. A named path that does not exist is a user error.
    """
    from cxr_search.data.scan import IGNORED_DIRS, IGNORED_FILES, IMAGE_SUFFIXES

    out: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d.lower() not in IGNORED_DIRS)
                for name in sorted(files):
                    suffix = Path(name).suffix.lower()
                    if (name.startswith(".") or name.lower() in IGNORED_FILES
                            or (suffix and suffix not in IMAGE_SUFFIXES)):
                        continue
                    out.append(Path(root) / name)
        elif path.exists() or path.is_symlink():
            out.append(path)
        else:
            raise CxrError(f"{path} does not exist; pass image files or folders of images.")
    return out


def predict_files(predictor: Predictor, files: Sequence[str | Path], *, progress: bool = True) -> pd.DataFrame:
    """Predict every file; bad files get a reason instead of probabilities.

    Args:
        predictor: from :func:`load`.
        files: image files (see :func:`list_inputs`); PNG, JPEG, BMP, TIFF or DICOM by content.
        progress: show a progress bar (only for more than a few files).

    Returns:
        One row per file, in order: ``path``, ``predicted`` (class name, empty on error), ``p_<CLASS>`` for each
        class (NaN on error), ``error`` (empty when usable).
    """
    rows: list[dict[str, Any]] = []
    with progress_counter(progress and len(files) > PROGRESS_ABOVE, len(files), "predicting") as advance:
        for chunk in _chunks(list(files), CHUNK):
            images, good, reasons = decode_files(chunk, predictor.preprocessing)
            probs = predictor.predict_arrays(images)
            by_index = dict(zip(good, probs, strict=True))
            for i, path in enumerate(chunk):
                row: dict[str, Any] = {"path": str(path)}
                p = by_index.get(i)
                row["predicted"] = predictor.classes[int(np.argmax(p))] if p is not None else ""
                for k, c in enumerate(predictor.classes):
                    row[f"p_{c}"] = float(p[k]) if p is not None else float("nan")
                row["error"] = reasons.get(i, "")
                rows.append(row)
            advance(len(chunk))
    return pd.DataFrame(rows, columns=["path", "predicted", *(f"p_{c}" for c in predictor.classes), "error"])


def decode_files(files: Sequence[str | Path], preprocessing: Preprocessing
                 ) -> tuple[np.ndarray, list[int], dict[int, str]]:
    """Decode and preprocess files as the cache does (``integrity.examine_file``: same decoder, same checks).

    Returns:
        (uint8 [N_good, S, S] images, indices of the good files, {index of a bad file: reason}).
    """
    from cxr_search.data.integrity import examine_file

    images, good, reasons = [], [], {}
    for i, path in enumerate(files):
        facts = examine_file(str(path), preprocessing)
        if facts.ok:
            images.append(facts.image)
            good.append(i)
        else:
            reasons[i] = facts.reason
    size = preprocessing.size
    return (np.stack(images) if images else np.zeros((0, size, size), np.uint8)), good, reasons


def _chunks(items: list, n: int) -> Iterator[list]:
    for start in range(0, len(items), n):
        yield items[start : start + n]


@contextlib.contextmanager
def progress_counter(enabled: bool, total: int, what: str) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr; yields ``advance(n)`` (a no-op when disabled)."""
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(what, total=total)
        yield lambda n: bar.advance(task, n)


def write_predictions(table: pd.DataFrame, path: str | Path) -> Path:
    """Write the prediction table as CSV (probabilities with 6 decimals)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False, float_format="%.6f")
    return path
