"""The experiment folder: create or open it, its plan, its stage folders, its lock, and the files written once
(the space as run, the data report, the environment).

Every file is written through `cxr_search.io.storage` (atomic replace, or an fsynced append), so a kill at any line
leaves a folder that `resume` continues. A stage is marked complete in pipeline.json only after its outputs exist.
The names of the files are in `cxr_search.io.layout`."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import platform
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from cxr_search import __version__
from cxr_search.errors import CxrError
from cxr_search.experiment.plan import Objective, Plan
from cxr_search.experiment.results import load_results, rank
from cxr_search.io import paths, storage
from cxr_search.io.journal import journal_storage
from cxr_search.io.layout import (
    DATA_REPORT_FILE,
    ENVIRONMENT_FILE,
    JOURNAL_FILE,
    PLAN_FILE,
    RETRAIN_DIR,
    SPACE_FILE,
)


class Experiment:
    """An experiment folder and its plan. `create` starts one, `open` checks and loads one."""

    def __init__(self, path: str | Path | storage.RemotePath, plan: Plan):
        self.path = storage.path(path).resolve()
        self.plan = plan

    @classmethod
    def create(cls, plan: Plan, root: str | Path | None = None) -> Experiment:
        """A new experiment folder `root/plan.name` holding `pipeline.json` (refuses an existing experiment)."""
        root = storage.path(root) if root is not None else paths.experiments_root()
        path = (root / plan.name).resolve()
        if (path / PLAN_FILE).exists():
            raise CxrError(f"experiment '{path}' already exists; continue it with `cxr-search resume {path}` "
                           f"or pick another --name.")
        path.mkdir(parents=True, exist_ok=True)
        exp = cls(path, plan)
        exp.save()
        return exp

    @classmethod
    def open(cls, path: str | Path | storage.RemotePath) -> Experiment:
        """Load an experiment folder; anything else is a one-line error and nothing in the folder changes."""
        path = storage.path(path)
        if not path.is_dir():
            raise CxrError(f"{path}: no such experiment folder; pass a folder written by `cxr-search run` "
                           f"(experiments live under {paths.experiments_root()} by default).")
        plan_file = path / PLAN_FILE
        if not plan_file.is_file():
            raise CxrError(f"{path}: not an experiment folder (no {PLAN_FILE}); pass a folder written by "
                           "`cxr-search run`.")
        try:
            raw = storage.read_json(plan_file)
        except (OSError, ValueError) as e:
            raise CxrError(f"{plan_file}: unreadable ({type(e).__name__}); the experiment's plan is damaged, "
                           "rerun it under a new --name.") from None
        return cls(path, Plan.from_dict(raw, str(plan_file)))

    # -- plan
    def save(self) -> None:
        storage.atomic_write_json(self.path / PLAN_FILE, self.plan.to_dict())

    def update(self, **changes: Any) -> None:
        """Change the saved plan (e.g. the cluster address given to `resume`)."""
        self.plan = self.plan.replace(**changes)
        self.save()

    def mark_complete(self, stage: str) -> None:
        """Record that a stage's outputs exist (call only after writing them)."""
        if stage not in self.plan.completed:
            self.update(completed=(*self.plan.completed, stage))

    def is_complete(self, stage: str) -> bool:
        return stage in self.plan.completed

    @property
    def objective(self) -> Objective:
        return self.plan.objective

    # -- files
    def stage_dir(self, stage: str) -> storage.Location:
        """Folder of a stage's trials: the search's are the experiment folder itself (Ray's layout)."""
        return self.path if stage == "search" else self.path / RETRAIN_DIR if stage == "retrain" else self.path / stage

    @property
    def journal(self) -> storage.Location:
        return self.path / JOURNAL_FILE

    def study(self) -> Any:
        """The search's Optuna study (`optuna.journal`, study name = the plan's name), as optuna-dashboard shows
        it, or None when the search used no Optuna searcher or has not started. Reading appends nothing."""
        if not self.journal.exists():
            return None  # opening a JournalFileBackend would create an empty journal
        import optuna

        try:
            return optuna.load_study(study_name=self.plan.name, storage=journal_storage(self.journal))
        except KeyError:  # a journal without this experiment's study
            return None

    def write_space_as_run(self) -> None:
        """`search_space.yaml`: the effective space for people to read (the plan in pipeline.json is what runs)."""
        import yaml

        raw = dict(self.plan.space.raw)
        header = f"# as run (budget {self.plan.budget}), from {self.plan.space.source}; pipeline.json holds the plan\n"
        storage.atomic_write_text(self.path / SPACE_FILE, header + yaml.safe_dump(raw, sort_keys=False))

    def write_data_report(self, report: dict[str, Any]) -> None:
        storage.atomic_write_json(self.path / DATA_REPORT_FILE, report)

    def data_report(self) -> dict[str, Any] | None:
        return storage.read_json_or_none(self.path / DATA_REPORT_FILE)

    def write_environment(self, env: dict[str, Any]) -> None:
        """`environment.json`, written once (the first launch's versions and devices)."""
        if not (self.path / ENVIRONMENT_FILE).is_file():
            storage.atomic_write_json(self.path / ENVIRONMENT_FILE, env)

    # -- tables
    def results(self, stage: str = "search") -> pd.DataFrame:
        """The stage's per-trial table (results.parquet if written, else built from the folders)."""
        return load_results(self.stage_dir(stage), self.objective)

    def ranked(self, stage: str = "search", *, finished_only: bool = True, distinct: bool = False) -> pd.DataFrame:
        """The stage's trials, best first by the objective (the one ranking; test figures are never consulted)."""
        return rank(self.results(stage), self.objective, finished_only=finished_only, distinct=distinct)


@contextlib.contextmanager
def exclusive(exp: Experiment) -> Iterator[None]:
    """Hold the experiment's lock while a command changes it: a second driver gets a one-line error.

    An OS file lock (flock), so it is released when the holder dies, however it dies.
    """
    import fcntl

    if storage.is_remote(exp.path):
        # Object stores have no lock: the lock is a local file named after the experiment's URI, so drivers on
        # this machine exclude each other; two machines must not drive one remote experiment (README).
        locks = paths.cache_root() / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        path = locks / hashlib.sha1(str(exp.path).encode()).hexdigest()[:16]
    else:
        path = exp.path / ".lock"
    handle = open(path, "a+")  # noqa: SIM115 - held for the whole block
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise CxrError(f"{exp.path} is in use by {holder}; wait for it to finish or stop it, then retry.") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"cxr-search pid {os.getpid()} on {platform.node()}")
        handle.flush()
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def environment(ray_resources: dict[str, float] | None = None, seeds: dict[str, int] | None = None) -> dict[str, Any]:
    """Versions, device and host facts for `environment.json` (what reproduces this run)."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    versions = {name: _dist_version(name) for name in ("torch", "timm", "ray", "optuna", "numpy")}
    return {"cxr_search": __version__, "python": platform.python_version(), "platform": platform.platform(),
            **versions, "cpu_count": os.cpu_count(), "gpu": gpu, "cuda": torch.version.cuda if gpu else None,
            "ray_resources": ray_resources or {}, "seeds": seeds or {},
            "started": dt.datetime.now().isoformat(timespec="seconds")}


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
