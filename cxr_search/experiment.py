"""The one owner of the experiment folder: its plan, its files, its tables and its ranking. No Ray here.

```
EXP/                        = <storage>/<name>
  pipeline.json             the plan (Plan.to_dict): the validated space as run, data, budget, stages, completed
                            stages, format marker; written before anything else, read by resume/retrain/status
  search_space.yaml         the space as run, for people to read (never read back)
  data_report.json          integrity report of the data used; environment.json: versions, devices, seeds
  optuna.journal            Optuna's study (optuna-dashboard opens it); ASHA-stopped trials are PRUNED
  trials.jsonl              the driver's record of trial events (start, complete, error), appended as they happen
  trial_<id>/               one model folder per trial (engine: config.json, best-eNNNN.pt, resume.pt,
                            history.jsonl) plus Ray's own files (params.json, result.json, progress.csv, ...)
  predictions/<id>.npz|json val/test probabilities and metrics of each finished trial's best weights
  results.parquet           one row per trial (`build_results`), written after the stage
  retrain/runs/NNN/         one Tune run per `retrain` launch, laid out like the search (trials, predictions,
                            results); retrain/results.parquet, summary.csv, distribution.png gather them
  ensemble/                 ensemble.json, metrics.csv, confusion_matrix.png
  summary.md                the report
```

Every file is written through `cxr_search.storage` (atomic replace, or an fsynced append), so a kill at any line
leaves a folder that `resume` continues. A stage is marked complete in pipeline.json only after its outputs exist.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as dt
import hashlib
import json
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr_search import CLASSES, paths, storage, weights
from cxr_search.config import TrialConfig
from cxr_search.errors import CxrError
from cxr_search.metrics import VALIDATION_METRICS
from cxr_search.space import SearchSpec, load_space, parse_space

EXPERIMENT_KIND = "cxr-search experiment"
FORMAT_VERSION = 2  # bump when the folder layout changes; resume refuses other versions with a clear message
PLAN_FILE = "pipeline.json"
SPACE_FILE = "search_space.yaml"
DATA_REPORT_FILE = "data_report.json"
ENVIRONMENT_FILE = "environment.json"
RESULTS_FILE = "results.parquet"
EVENTS_FILE = "trials.jsonl"  # not .json: Ray Tune copies .json files of a running experiment back and forth
JOURNAL_FILE = "optuna.journal"
PREDICTIONS_DIR = "predictions"
RETRAIN_DIR = "retrain"
ENSEMBLE_DIR = "ensemble"
SUMMARY_FILE = "summary.md"
TRIAL_PREFIX = "trial_"
STAGES = ("search", "retrain", "ensemble")
TEST_KEYS = ("acc", "macro_f1", "auroc_macro", "normal_recall", "covid_recall_vs_pneumonia", "disease_sensitivity",
             "ece", "nll")
# Fields that do not change what a configuration learns: left out of its identity, so a seed or an epoch
# budget given to `retrain` does not make the same configuration a new one.
NOT_IDENTITY = ("seed", "device", "eval_batch_size", "deterministic", "max_epochs", "compile")
# The --smoke size: seconds per trial on a laptop CPU (80 px: inception_v3 needs >= 75).
SMOKE = {"n_images": 120, "size": 80, "num_samples": 4, "max_epochs": 2, "grace_period": 1,
         "max_concurrent_trials": 2, "top_k": 1, "seeds": 2, "retrain_max_epochs": 1}


# ---------------------------------------------------------------- the objective


@dataclass(frozen=True)
class Objective:
    """The validation metric a search optimises: what Optuna is told, what ranks trials, what picks models."""

    metric: str = "val_loss"
    mode: str = "min"

    @property
    def column(self) -> str:
        """The results column holding each trial's best value (`best_val_loss`)."""
        return f"best_{self.metric}"

    def best(self, values: Any) -> float:
        """The best of a trial's per-epoch values (NaN if none)."""
        arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
        arr = arr[np.isfinite(arr)]
        if not len(arr):
            return float("nan")
        return float(arr.min() if self.mode == "min" else arr.max())

    def describe(self) -> str:
        return f"validation {self.metric} ({'lower' if self.mode == 'min' else 'higher'} is better)"


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True)
class DataConfig:
    """The data a run trains on: the folder (None = the generated phantom set) and how it is prepared."""

    data_dir: str | None = None  # absolute path; None: the default phantom set, generated once into the cache
    n_images: int = 6432  # phantom set size (the Kaggle set has 6,432 images)
    size: int = 128  # image side in pixels
    equalize: str = "hist"  # hist | clahe | none
    val_fraction: float = 0.2
    seed: int = 0  # split seed
    resplit: bool = False
    duplicate_policy: str = "drop"

    def prepare(self, *, progress: bool = True) -> Any:
        """The PreparedData this config describes (phantoms and decoded arrays are cached)."""
        from cxr_search.data import phantoms
        from cxr_search.data.prepare import prepare

        root = self.data_dir
        if root is None:
            root = phantoms.default_dataset(n_images=self.n_images, size=128 if self.size <= 128 else 256, seed=0)
        return prepare(root, size=self.size, equalize=self.equalize, val_fraction=self.val_fraction,
                       seed=self.seed, resplit=self.resplit, duplicate_policy=self.duplicate_policy,
                       progress=progress)


@dataclass(frozen=True)
class Plan:
    """Everything a run will do, validated before anything is written; saved as `pipeline.json`."""

    name: str
    space: SearchSpec  # the effective space (budget and command-line overrides applied)
    data: DataConfig
    stages: tuple[str, ...] = STAGES
    top_k: int = 1  # configurations retrained over seeds
    seeds: int = 50  # seeds per retrained configuration (the study: 50)
    retrain_max_epochs: int | None = None  # None: the configuration's own budget
    ensemble_members: int = 3  # distinct configurations voting (the study: the top 3)
    budget: str = "full"  # full | cpu | smoke | explicit
    notes: tuple[str, ...] = ()  # what the budget changed, printed at the start
    address: str | None = None  # Ray cluster address; None: a local Ray
    storage: str | None = None  # the experiments root given with --storage
    num_cpus: int | None = None  # CPUs of the local Ray (None: all)
    completed: tuple[str, ...] = ()

    @property
    def objective(self) -> Objective:
        return Objective(self.space.metric, self.space.mode)

    def replace(self, **changes: Any) -> Plan:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": EXPERIMENT_KIND, "format_version": FORMAT_VERSION, "cxr_search": _version(),
            "name": self.name, "space": {"source": self.space.source, "settings": self.space.raw},
            "data": dataclasses.asdict(self.data), "stages": list(self.stages), "top_k": self.top_k,
            "seeds": self.seeds, "retrain_max_epochs": self.retrain_max_epochs,
            "ensemble_members": self.ensemble_members, "budget": self.budget, "notes": list(self.notes),
            "address": self.address, "storage": self.storage, "num_cpus": self.num_cpus,
            "completed": list(self.completed),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str) -> Plan:
        """Rebuild a saved plan (the space is validated again, as when it was first planned)."""
        if not isinstance(d, dict) or d.get("kind") != EXPERIMENT_KIND:
            raise CxrError(f"{source}: not a cxr-search experiment plan; pass a folder written by `cxr-search run`.")
        if d.get("format_version") != FORMAT_VERSION:
            raise CxrError(f"{source}: written by cxr-search {d.get('cxr_search', '?')} (experiment format "
                           f"{d.get('format_version')}); this version reads format {FORMAT_VERSION}: rerun the "
                           "experiment under a new --name.")
        try:
            space = parse_space(copy.deepcopy(d["space"]["settings"]), f"{source}: space")
            space = space.replace(source=d["space"]["source"])
            return cls(
                name=d["name"], space=space, data=DataConfig(**d["data"]), stages=tuple(d["stages"]),
                top_k=int(d["top_k"]), seeds=int(d["seeds"]), retrain_max_epochs=d["retrain_max_epochs"],
                ensemble_members=int(d["ensemble_members"]), budget=d["budget"], notes=tuple(d["notes"]),
                address=d["address"], storage=d["storage"], num_cpus=d["num_cpus"],
                completed=tuple(d["completed"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CxrError(f"{source}: incomplete or damaged plan ({type(e).__name__}: {e}); rerun the experiment "
                           "under a new --name.") from None


def plan_run(
    space: str | Path,
    *,
    data_dir: str | Path | None = None,
    name: str | None = None,
    num_samples: int | None = None,
    max_epochs: int | None = None,
    smoke: bool = False,
    gpu_available: bool = False,
    seed: int | None = None,
    top_k: int | None = None,
    seeds: int | None = None,
    resplit: bool = False,
    stages: tuple[str, ...] = STAGES,
    gpus_per_trial: str | None = None,
    address: str | None = None,
    storage: str | Path | None = None,
    num_cpus: int | None = None,
    full: bool = False,
) -> Plan:
    """Load and validate the space, decide the budget and check every option: the whole plan, nothing written.

    Without a GPU the file's `cpu_budget` section applies (small images, a small phantom set, few trials and
    epochs) unless `full`; --smoke is smaller still; command-line options override either. The plan's notes say
    every budget setting and where it came from (the space file, the CPU budget / smoke size, the command line).

    Raises:
        CxrError: a bad space, option or data folder, naming it and the fix.
    """
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        raise CxrError(f"--stages: unknown stage '{bad[0] if bad else ''}'; allowed: {', '.join(STAGES)} "
                       "(comma-separated, e.g. search,retrain).")
    if "search" not in stages:
        raise CxrError("--stages must include search for a new experiment; to retrain or ensemble a finished "
                       "one use `cxr-search retrain EXP` or `cxr-search ensemble EXP`.")
    for option, value in (("--seeds", seeds), ("--top-k", top_k), ("--num-samples", num_samples),
                          ("--max-epochs", max_epochs)):
        if value is not None and value < 1:
            raise CxrError(f"{option} must be >= 1, got {value}.")
    if data_dir is not None:
        data_dir = _check_data_dir(data_dir)
    spec = load_space(space)
    raw = copy.deepcopy(spec.raw)
    notes: list[str] = []
    budget: dict[str, Any] = {}
    if smoke:
        budget = {**SMOKE, **{k: v for k, v in spec.cpu_budget.items() if k in ("params", "trial")}}
        if spec.searcher != "optuna":  # a few points of the grid, once each, not the whole grid four times
            budget.update(num_samples=1, max_trials=SMOKE["num_samples"])
    elif not gpu_available and not full:
        budget = dict(spec.cpu_budget)
    budget_name = "smoke size" if smoke else "CPU budget"
    # The study retrained its best configuration 50 times; a space's `pipeline` may say otherwise, a budget scales
    # it down (and says so), the command line decides last.
    stages_after = {"top_k": 1, "seeds": 50, **spec.pipeline,
                    **{k: v for k, v in budget.items() if k in ("top_k", "seeds", "retrain_max_epochs")}}
    top_k = top_k if top_k is not None else stages_after["top_k"]
    seeds = seeds if seeds is not None else stages_after["seeds"]
    retrain_max_epochs = max_epochs if max_epochs is not None else stages_after.get("retrain_max_epochs")
    if smoke:
        notes.append("smoke size: a few tiny trials to check the pipeline end to end (numbers mean nothing)")
    elif budget:
        pretrained = (budget.get("trial") or {}).get("pretrained", (raw.get("trial") or {}).get("pretrained", "none"))
        notes.append(f"no GPU found: the space's CPU budget applies (pretrained: {pretrained}; the study fine-tuned "
                     "ImageNet weights and retrained 50 seeds); --full runs the space as written")
    _apply_budget(raw, budget, data_dir is None)
    if num_samples is not None:
        raw["num_samples"] = num_samples
    if max_epochs is not None:
        _set_epochs(raw, max_epochs)
    if seed is not None:
        raw["searcher"] = {**_as_mapping(raw.get("searcher", {"type": "optuna"})), "seed": seed}
        raw.setdefault("trial", {})["seed"] = seed
    if gpus_per_trial is not None:
        raw["resources"] = {**(raw.get("resources") or {}), "gpu": _gpu_option(gpus_per_trial)}
    effective = parse_space(raw, spec.source)  # validate the overrides too, before anything runs
    weights.require_available(effective.backbone_pairs())  # staged ImageNet weights, or one line naming the fix
    data = {k: v for k, v in effective.data.items() if k in DataConfig.__dataclass_fields__}
    if resplit:
        data["resplit"] = True
    size = int(data.get("size", DataConfig.size))
    if size < 1:
        raise CxrError(f"{spec.source}: data.size must be >= 1 pixel, got {size}.")
    notes += space_notes(effective, size)
    budget_kind = "smoke" if smoke else ("cpu" if budget else ("explicit" if num_samples or max_epochs else "full"))
    cli = {"num_samples": num_samples, "max_epochs": max_epochs,
           "top_k": top_k if top_k != stages_after["top_k"] else None,
           "seeds": seeds if seeds != stages_after["seeds"] else None}
    notes.append(_budget_line(effective, data, data_dir, int(top_k), int(seeds), retrain_max_epochs,
                              budget, budget_name, cli))
    return Plan(
        name=name or f"{spec.name}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}",
        space=effective, data=DataConfig(data_dir=data_dir, **data), stages=tuple(stages), top_k=int(top_k),
        seeds=int(seeds), retrain_max_epochs=retrain_max_epochs,
        ensemble_members=spec.pipeline.get("ensemble_members", max(3, int(top_k))), budget=budget_kind, notes=tuple(notes), address=address,
        storage=_storage_root(storage) if storage is not None else None, num_cpus=num_cpus,
    )


def _storage_root(where: str | Path) -> str:
    """The --storage root as saved in the plan: an absolute local path, or the URI as given (checked to open)."""
    if storage.is_remote(str(where)):
        try:
            root = storage.path(str(where))  # a URI no filesystem opens is a one-line error before anything runs
        except CxrError as e:
            raise CxrError(f"--storage {e}") from None
        top = root
        while top.parent != top and top.parent.fs_path not in ("", "/"):
            top = top.parent  # the bucket (s3://bucket/prefix), or the first folder
        try:
            reachable = top.exists()
        except OSError as e:
            raise CxrError(f"--storage {where}: cannot reach it ({' '.join(str(e).split())[:200]}); check the "
                           "credentials and endpoint in the environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, "
                           "...).") from None
        if not reachable:
            raise CxrError(f"--storage {where}: {top} does not exist; create the bucket first (or give another).")
        return str(where)
    return str(Path(where).expanduser().resolve())


def space_notes(spec: SearchSpec, size: int) -> list[str]:
    """What a run of this space changes or cannot learn, said before it starts (no silent substitutions)."""
    out = []
    note = input_size_note({b for (b,) in spec.combinations("backbone")}, size, "data.size")
    if note:
        out.append(note)
    frozen = [f for _, pretrained, f in spec.combinations("backbone", "pretrained", "freeze_fraction")
              if pretrained == "none" and float(f) > 0]
    if frozen:
        out.append(frozen_random_note(max(float(f) for f in frozen), "freeze_fraction up to",
                                      "set pretrained: imagenet (staged by `cxr-search weights fetch`) or "
                                      "freeze_fraction: 0"))
    return out


def input_size_note(backbones: set[str], size: int, option: str) -> str | None:
    """A note when images are smaller than a backbone accepts: the model input upsamples them (engine.model_input)."""
    from cxr_search.models import MIN_INPUT_SIZE

    small = sorted(b for b in backbones if size < MIN_INPUT_SIZE.get(b, 0))
    if not small:
        return None
    need = max(MIN_INPUT_SIZE[b] for b in small)
    return (f"{option} {size}: {', '.join(small)} needs at least {need} px, so images are upsampled to {need} px "
            f"in the model input (no detail is added and compute is spent); use {option} {need} or more.")


def frozen_random_note(fraction: float, option: str, fix: str) -> str:
    """The note for a frozen backbone without pretrained weights: its random layers never learn."""
    return (f"{option} {fraction:g} without pretrained weights freezes random layers that will never learn (the "
            f"study froze ImageNet weights); {fix}.")


def _budget_line(spec: SearchSpec, data: dict[str, Any], data_dir: str | None, top_k: int, seeds: int,
                 retrain_epochs: int | None, budget: dict[str, Any], budget_name: str,
                 cli: dict[str, Any]) -> str:
    """One line with every budget setting of a run and where it came from."""
    def source(key: str) -> str:
        if cli.get(key) is not None:
            return "command line"
        return budget_name if key in budget else "space file"

    epochs = spec.trial.get("max_epochs", TrialConfig.max_epochs)
    images = f"{data.get('n_images', DataConfig.n_images):,} phantoms" if data_dir is None else "the data folder"
    slots = spec.max_concurrent_trials or "all"
    if spec.searcher == "optuna":
        trials = f"{spec.num_samples} Optuna trials ({source('num_samples')})"
    else:
        trials = f"{len(spec.planned_trials())} planned trials ({source('max_trials' if spec.max_trials else 'num_samples')})"
    parts = [trials,
             f"up to {_count(epochs, 'epoch')} per trial ({source('max_epochs')})",
             f"{images} at {data.get('size', DataConfig.size)} px ({source('size')})",
             f"{slots} trials at a time of {spec.cpus_per_trial:g} CPU ({source('max_concurrent_trials')})",
             f"retrain top {top_k} x {seeds} seeds ({source('seeds')})"
             + (f" of up to {_count(retrain_epochs, 'epoch')}" if retrain_epochs else "")]
    narrowed = sorted(set(budget.get("params") or {}) | set(budget.get("trial") or {}))
    if narrowed:
        parts.append(f"{budget_name} narrows {', '.join(narrowed)}")
    return "budget: " + "; ".join(parts)


# Training images per second of one CPU thread at 80 px, batch 32, bf16 autocast, per backbone: measured on the
# 2-core dev VM (AMD EPYC with AVX512-BF16), most while other jobs ran, so rough (inception_v3: 72-77 measured
# idle, two trials at once); `estimate_seconds` scales them.
CPU_IMG_PER_S_80PX = {"cnn3": 230.0, "alexnet": 330.0, "vgg16": 10.0, "vgg19": 7.0, "resnet34": 44.0,
                      "resnet50": 11.0, "inception_v3": 70.0, "xception": 35.0, "densenet121": 34.0}
_EVAL_COST = 0.35  # an evaluated image costs about a third of a trained one (no backward pass)
_TRIAL_START_S = 10.0  # process, model build, first batch


def estimate_seconds(plan: Plan, cpus: float) -> float:
    """A rough upper bound of a plan's wall time on CPUs only (every trial runs its full epoch budget).

    Args:
        plan: the plan.
        cpus: CPUs of the local Ray.
    """
    spec = plan.space
    if plan.data.data_dir is None:
        n_images = plan.data.n_images
    else:
        root = Path(plan.data.data_dir)
        n_images = sum(1 for p in root.rglob("*") if p.is_file()) if root.is_dir() else 1000
    n_train = n_images * (1 - 0.2) * (1 - plan.data.val_fraction)
    n_val = n_images * 0.8 * plan.data.val_fraction
    threads = max(1.0, spec.cpus_per_trial)
    slots = max(1, min(spec.max_concurrent_trials or 10**6, int(cpus // threads) or 1))
    scale = (80 / plan.data.size) ** 2 * threads ** 0.8  # pixels; a second thread adds ~75%

    def trial_seconds(config: dict[str, Any]) -> float:
        cfg = {**spec.trial, **config}
        rate = CPU_IMG_PER_S_80PX.get(cfg.get("backbone", TrialConfig.backbone), 20.0) * scale
        per_epoch = n_train * (2.0 if cfg.get("balance", TrialConfig.balance) == "oversample" else 1.0)
        epochs = int(cfg.get("max_epochs", TrialConfig.max_epochs))
        return _TRIAL_START_S + epochs * (per_epoch + _EVAL_COST * n_val) / rate

    if spec.searcher == "optuna":
        search = [trial_seconds({}) for _ in range(spec.num_samples)]
    else:
        search = [trial_seconds(t) for t in spec.planned_trials()]
    retrain_cfg = {"max_epochs": plan.retrain_max_epochs} if plan.retrain_max_epochs else {}
    retrain = [trial_seconds(retrain_cfg)] * (plan.top_k * plan.seeds) if "retrain" in plan.stages else []
    return 60.0 + sum(search) / slots + sum(retrain) / slots


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _check_data_dir(data_dir: str | Path) -> str:
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise CxrError(f"--data {data_dir}: no such file or folder; give a folder of X-rays (Kaggle layout or "
                       "class folders) or a CSV manifest.")
    return str(root.resolve())


def _as_mapping(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, dict) else {"type": value}


def _gpu_option(value: str) -> str | float:
    if value == "auto":
        return value
    try:
        frac = float(value)
    except ValueError:
        raise CxrError(f"--gpus-per-trial must be 'auto' or a number such as 0.25, got '{value}'.") from None
    if frac < 0:
        raise CxrError(f"--gpus-per-trial must be >= 0, got {frac}.")
    return frac


def _set_epochs(raw: dict[str, Any], max_epochs: int) -> None:
    raw.setdefault("trial", {})["max_epochs"] = max_epochs
    sched = _as_mapping(raw.get("scheduler", {"type": "asha"}))
    if sched.get("type", "asha") == "asha":
        sched["max_t"] = max_epochs
        sched["grace_period"] = min(int(sched.get("grace_period", 1)), max_epochs)
    raw["scheduler"] = sched


def _apply_budget(raw: dict[str, Any], budget: dict[str, Any], phantoms: bool) -> None:
    if not budget:
        return
    raw.pop("cpu_budget", None)
    data = dict(raw.get("data") or {})
    if "size" in budget:
        data["size"] = budget["size"]
    if "n_images" in budget and phantoms:
        data["n_images"] = budget["n_images"]
    raw["data"] = data
    if "num_samples" in budget:
        raw["num_samples"] = budget["num_samples"]
    if "max_trials" in budget:
        raw["max_trials"] = budget["max_trials"]
    if "max_concurrent_trials" in budget:
        raw["max_concurrent_trials"] = budget["max_concurrent_trials"]
    # A laptop has few cores: one per trial, so two trials run side by side and ASHA can compare them.
    raw["resources"] = {**(raw.get("resources") or {}), "cpu": 1}
    if "max_epochs" in budget:
        _set_epochs(raw, budget["max_epochs"])
    if "grace_period" in budget:
        raw["scheduler"] = {**_as_mapping(raw.get("scheduler", "asha")), "grace_period": budget["grace_period"]}
        if raw["scheduler"].get("type", "asha") == "fifo":
            raw["scheduler"].pop("grace_period")
    trial = {**(raw.get("trial") or {}), **(budget.get("trial") or {})}
    params = {k: v for k, v in (raw.get("params") or {}).items() if k not in (budget.get("trial") or {})}
    for key, domain in (budget.get("params") or {}).items():
        params[key] = domain
        trial.pop(key, None)
    raw["trial"], raw["params"] = trial, params
    if not params:
        raw.pop("params")


# ---------------------------------------------------------------- the folder


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
        return _read_json_or_none(self.path / DATA_REPORT_FILE)

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


def journal_storage(journal: storage.Location) -> Any:
    """The Optuna storage of an experiment's journal: a local file (what `optuna-dashboard EXP/optuna.journal`
    opens), or on an object store a folder of whole parts (`journal.py`)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if storage.is_remote(journal):
        from cxr_search.journal import ObjectStoreJournal

        return JournalStorage(ObjectStoreJournal(journal))
    return JournalStorage(JournalFileBackend(str(journal)))


def _read_json_or_none(path: storage.Location) -> Any:
    try:
        return storage.read_json(path)
    except (OSError, ValueError):
        return None


def environment(ray_resources: dict[str, float] | None = None, seeds: dict[str, int] | None = None) -> dict[str, Any]:
    """Versions, device and host facts for `environment.json` (what reproduces this run)."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    versions = {name: _dist_version(name) for name in ("torch", "timm", "ray", "optuna", "numpy")}
    return {"cxr_search": _version(), "python": platform.python_version(), "platform": platform.platform(),
            **versions, "cpu_count": os.cpu_count(), "gpu": gpu, "cuda": torch.version.cuda if gpu else None,
            "ray_resources": ray_resources or {}, "seeds": seeds or {},
            "started": dt.datetime.now().isoformat(timespec="seconds")}


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _version() -> str:
    import cxr_search

    return cxr_search.__version__


# ---------------------------------------------------------------- configurations


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


def run_fingerprint(config: dict[str, Any]) -> str:
    """Identity of one training run: every TrialConfig field, seed and budget included (adopting lost trials)."""
    full = TrialConfig.from_dict(config_fields(config), source="config").to_dict()
    return hashlib.sha1(json.dumps(full, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- trial folders and events


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


def read_history(trial_dir: str | Path) -> pd.DataFrame:
    """A trial's per-epoch metrics (the model folder's `history.jsonl`: complete even after Ray restarts)."""
    from cxr_search import engine

    df = pd.DataFrame(engine.read_history(trial_dir))
    if "epoch" in df:
        df = df.drop_duplicates("epoch", keep="last").sort_values("epoch").reset_index(drop=True)
    return df


def read_histories(results: pd.DataFrame) -> pd.DataFrame:
    """Every trial's per-epoch metrics in one long table (`trial_id` first, then `read_history`'s columns), for
    the trials of a results table (`Experiment.results`); trials without a history are left out."""
    frames = []
    for trial_id, trial_dir in zip(results.get("trial_id", []), results.get("trial_dir", []), strict=True):
        hist = read_history(trial_dir)
        if len(hist):
            frames.append(hist.assign(trial_id=str(trial_id)))
    if not frames:
        return pd.DataFrame(columns=["trial_id", "epoch"])
    df = pd.concat(frames, ignore_index=True)
    return df[["trial_id", *[c for c in df.columns if c != "trial_id"]]]


def trial_end(trial_dir: str | Path, event: dict[str, Any] | None) -> str | None:
    """How a trial ended: `finished` (by itself: early stopping or max epochs), `stopped` (by the scheduler),
    `error` (every retry failed) or None (not ended, or ended with nothing to keep)."""
    from cxr_search import engine

    history = engine.read_history(trial_dir)
    if history and history[-1].get("stop_reason"):
        return "finished"
    if event is not None and event.get("event") == "error":
        return "error"
    if event is not None and event.get("event") == "complete" and history:
        return "stopped"
    return None


def _trial_row(trial: TrialDir, objective: Objective, event: dict[str, Any] | None,
               predictions: storage.Location) -> dict[str, Any]:
    config = _read_json_or_none(trial.path / "config.json") or {}
    params = _read_json_or_none(trial.path / "params.json") or {}
    labels = {k: v for k, v in params.items() if k not in TrialConfig.__dataclass_fields__}
    row: dict[str, Any] = {"trial_id": trial.trial_id, **{**params, **config}, **labels}
    if config or params:
        row["config_key"] = config_key({**params, **config})
    hist = read_history(trial.path)
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
    pred = _read_json_or_none(predictions / f"{trial.trial_id}.json")
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


# ---------------------------------------------------------------- predictions


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
    from cxr_search import engine
    from cxr_search.metrics import classification_metrics

    stage_dir = storage.path(stage_dir)
    events = trial_events(stage_dir)
    for trial in trial_dirs(stage_dir):
        ended = trial_end(trial.path, events.get(trial.trial_id))
        if ended not in ("finished", "stopped"):
            continue
        if ended == "stopped":
            engine.seal(trial.path)
        bests = engine.best_files(trial.path)
        if not bests:
            continue
        model_file = bests[-1][1].name
        done = _read_json_or_none(predictions_path(stage_dir, trial.trial_id).with_suffix(".json"))
        if done is not None and done.get("model_file") == model_file:
            continue
        model, cfg = engine.load_best_model(trial.path)
        val_probs = engine.predict_proba(model, data.val.images, cfg=cfg, device=device)
        test_probs = engine.predict_proba(model, data.test.images, cfg=cfg, device=device)
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


@dataclass
class StageProgress:
    """Counts of a stage's trials by how they ended (for status lines and interrupted-stage checks)."""

    total: int = 0
    ended: dict[str, int] = field(default_factory=dict)

    @property
    def unfinished(self) -> int:
        return self.total - sum(self.ended.values())


def stage_progress(stage_dir: str | Path) -> StageProgress:
    events = trial_events(stage_dir)
    progress = StageProgress()
    for trial in trial_dirs(stage_dir):
        progress.total += 1
        end = trial_end(trial.path, events.get(trial.trial_id))
        if end is not None:
            progress.ended[end] = progress.ended.get(end, 0) + 1
    return progress
