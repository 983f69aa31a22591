"""The plan of a run: the objective, the data, the effective search space and the stages after it, validated before
anything is written (`plan_run`) and saved as `pipeline.json` (`Plan.to_dict` / `Plan.from_dict`)."""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxr_search import __version__
from cxr_search.config import TrialConfig
from cxr_search.errors import CxrError
from cxr_search.experiment.budget import SMOKE, apply_budget, as_mapping, set_epochs
from cxr_search.io import storage
from cxr_search.models import weights
from cxr_search.space import SearchSpec, load_space, parse_space

EXPERIMENT_KIND = "cxr-search experiment"


FORMAT_VERSION = 2  # bump when the folder layout changes; resume refuses other versions with a clear message


STAGES = ("search", "retrain", "ensemble")


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
            "kind": EXPERIMENT_KIND, "format_version": FORMAT_VERSION, "cxr_search": __version__,
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
    apply_budget(raw, budget, data_dir is None)
    if num_samples is not None:
        raw["num_samples"] = num_samples
    if max_epochs is not None:
        set_epochs(raw, max_epochs)
    if seed is not None:
        raw["searcher"] = {**as_mapping(raw.get("searcher", {"type": "optuna"})), "seed": seed}
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
    """A note when images are smaller than a backbone accepts: the model input upsamples them (training.runtime.model_input)."""
    from cxr_search.models.registry import MIN_INPUT_SIZE

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


def _check_data_dir(data_dir: str | Path) -> str:
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise CxrError(f"--data {data_dir}: no such file or folder; give a folder of X-rays (Kaggle layout or "
                       "class folders) or a CSV manifest.")
    return str(root.resolve())


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


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"
