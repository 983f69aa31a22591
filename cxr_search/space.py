"""Search spaces as data: one loader turns `search_spaces/*.yaml` into a validated, frozen `SearchSpec`.

Everything a user can get wrong in a YAML file is caught here, before Ray starts, with a message that
names the file, the key and the fix. No Ray here: `search/tune.py` turns a spec into Tune domains.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cxr_search.config import CHOICES, TrialConfig
from cxr_search.errors import CxrError
from cxr_search.io.paths import search_spaces_dir
from cxr_search.metrics import VALIDATION_METRICS as VAL_METRICS

DOMAINS = ("choice", "loguniform", "uniform", "randint", "grid", "constant")
SEARCHERS = ("optuna", "random", "grid")
SCHEDULERS = ("asha", "fifo")
# Keys a search space may put in a trial's config that are labels, not TrialConfig fields.
LABEL_KEYS = ("variant", "trial_key")
RENAMED = {"seed_grid": "study"}  # shipped spaces that changed name: old -> new

TOP_KEYS = (
    "name", "description", "metric", "mode", "searcher", "scheduler", "num_samples", "max_concurrent_trials",
    "resources", "checkpoint_every", "checkpoint_every_s", "max_failures", "max_trials", "data", "trial", "params", "variants", "cpu_budget",
    "pipeline",
)
DATA_KEYS = ("size", "equalize", "val_fraction", "n_images", "seed", "resplit", "duplicate_policy")
CPU_BUDGET_KEYS = ("n_images", "size", "num_samples", "max_trials", "max_epochs", "grace_period",
                   "max_concurrent_trials",
                   "top_k", "seeds", "retrain_max_epochs", "params", "trial")

# The stages after the search, as a space may fix them (the command line and a CPU budget override them):
# retrain the top `top_k` configurations over `seeds` seeds, each for up to `retrain_max_epochs` (default: the
# trials' max_epochs), and let the top `ensemble_members` distinct search models vote.
PIPELINE_KEYS = ("top_k", "seeds", "retrain_max_epochs", "ensemble_members")

_TRIAL_FIELDS = {f.name: f for f in dataclasses.fields(TrialConfig)}


class _SpaceLoader(yaml.SafeLoader):
    """`yaml.safe_load` that reads `1e-3` as a number, as YAML 1.2 does (PyYAML follows YAML 1.1, where a float
    needs a dot: `1e-3` would be the string "1e-3", and that is how most people write a learning rate)."""


_SpaceLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


@dataclass(frozen=True)
class ParamSpec:
    """One searched trial setting: a TrialConfig field and its domain."""

    name: str
    domain: str  # one of DOMAINS
    values: tuple[Any, ...]  # choice/grid: the options; loguniform/uniform/randint: (low, high); constant: (v,)

    def sample(self, rng: np.random.Generator) -> Any:
        """One draw (random and grid searches plan their trials with this; grid values are enumerated instead)."""
        if self.domain in ("choice", "grid"):
            return self.values[int(rng.integers(len(self.values)))]
        if self.domain == "loguniform":
            lo, hi = np.log(self.values[0]), np.log(self.values[1])
            return float(np.exp(rng.uniform(lo, hi)))
        if self.domain == "uniform":
            return float(rng.uniform(*self.values))
        if self.domain == "randint":
            return int(rng.integers(self.values[0], self.values[1] + 1))  # YAML bounds are inclusive
        return self.values[0]


@dataclass(frozen=True)
class SchedulerSpec:
    """The scheduler a space names (defaults are `parse_space`'s: max_t = the trials' max_epochs, grace 3, rf 3)."""

    kind: str  # asha | fifo
    max_t: int  # epochs: a trial never runs longer
    grace_period: int  # epochs every trial gets before ASHA may stop it
    reduction_factor: int  # keep the top 1/reduction_factor at each rung


@dataclass(frozen=True)
class SearchSpec:
    """A validated search space file: what to search, how, on what data, with which per-trial resources."""

    name: str
    source: str  # file it was read from (named in error messages)
    metric: str
    mode: str
    searcher: str  # optuna (TPE) | random | grid
    seed: int  # searcher seed
    scheduler: SchedulerSpec
    num_samples: int
    max_concurrent_trials: int | None
    cpus_per_trial: float
    gpus_per_trial: str | float  # "auto" (a fraction from the backbone's measured peak memory) or a fixed one
    checkpoint_every: int  # epochs between resume states (the last epoch always writes one)
    max_failures: int
    data: dict[str, Any]
    trial: dict[str, Any]  # fixed TrialConfig fields
    params: tuple[ParamSpec, ...]
    variants: tuple[tuple[str, dict[str, Any]], ...] = ()  # named grid points (study.yaml)
    cpu_budget: dict[str, Any] = field(default_factory=dict)
    pipeline: dict[str, int] = field(default_factory=dict)  # PIPELINE_KEYS the file sets
    description: str = ""
    raw: dict[str, Any] = field(default_factory=dict, compare=False)  # the YAML as loaded, written back as run
    checkpoint_every_s: float | None = None  # also seconds between resume states; None: automatic (<= ~10% cost)
    workers_per_trial: int = 1  # > 1: each trial is a data-parallel Ray Train run (cpu/gpu are per worker)
    max_trials: int | None = None  # a grid/random search runs only the first N trials of its plan (budgets)

    def replace(self, **changes: Any) -> SearchSpec:
        return dataclasses.replace(self, **changes)

    def backbone_pairs(self) -> set[tuple[str, str]]:
        """Every (backbone, pretrained) a trial of this space can have (to check staged weights before a run)."""
        return self.combinations("backbone", "pretrained")

    def combinations(self, *names: str) -> set[tuple[Any, ...]]:
        """Every combination of the given TrialConfig fields a trial of this space can have (per variant; a
        searched range contributes its bounds)."""
        def values(point: dict[str, Any], name: str) -> list[Any]:
            if name in point:
                return [point[name]]
            searched = [p for p in self.params if p.name == name]
            if searched:
                return list(searched[0].values)
            return [self.trial.get(name, getattr(TrialConfig, name))]

        out: set[tuple[Any, ...]] = set()
        for point in [dict(settings) for _, settings in self.variants] or [{}]:
            out.update(itertools.product(*(values(point, name) for name in names)))
        return out

    def planned_trials(self) -> list[dict[str, Any]]:
        """Every trial of a grid or random search, as concrete configs (fixed settings, labels, sampled values).

        Order: variants x grid domains (in file order), the whole grid repeated `num_samples` times; random
        domains are drawn per trial from a generator seeded with the searcher seed, so the list is the same on
        every call (a resumed launch finds its trials in it). Repeats of a grid point get distinct seeds unless
        `seed` is searched. Written here rather than with Tune's variant generator because the plan must exist
        before Ray starts and be recomputable without it.
        """
        if self.searcher == "optuna":
            raise ValueError("an Optuna search draws its trials as it goes; it has no plan")
        rng = np.random.default_rng(self.seed)
        grid_params = [p for p in self.params if p.domain == "grid"]
        points: list[dict[str, Any]] = [{}]
        if self.variants:
            points = [{"variant": name, **settings} for name, settings in self.variants]
        for p in grid_params:
            points = [{**point, p.name: v} for point in points for v in p.values]
        distinct_seeds = self.num_samples > 1 and "seed" not in {p.name for p in self.params}
        out = []
        for _ in range(self.num_samples):
            for point in points:
                trial = {**self.trial, **point}
                for p in self.params:
                    if p.domain != "grid":
                        trial[p.name] = p.sample(rng)
                if distinct_seeds:
                    trial["seed"] = int(rng.integers(0, 2**31 - 1))
                out.append(trial)
        return out[: self.max_trials] if self.max_trials else out


def trial_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The TrialConfig part of a Tune trial config (drops labels such as `variant`)."""
    return {k: v for k, v in config.items() if k not in LABEL_KEYS}


def resolve(name_or_path: str | Path) -> Path:
    """Find a search space: a file path, or a name in `search_spaces/` (`inception` -> inception.yaml)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise CxrError(f"search space file '{p}' not found. Give a YAML path or one of: {', '.join(known())}.")
        return p
    candidate = search_spaces_dir() / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    if str(name_or_path) in RENAMED:
        raise CxrError(f"search space '{name_or_path}' is now called '{RENAMED[str(name_or_path)]}' "
                       f"(same grid, plus the 50-seed retrain and the ensemble): `cxr-search run {RENAMED[str(name_or_path)]}`.")
    hint = difflib.get_close_matches(str(name_or_path), known(), n=1)
    fix = f"Did you mean '{hint[0]}'?" if hint else f"Known: {', '.join(known())}, or a path to a .yaml file."
    raise CxrError(f"unknown search space '{name_or_path}'. {fix}")


def known() -> list[str]:
    """Names of the search spaces shipped in `search_spaces/`."""
    return sorted(p.stem for p in search_spaces_dir().glob("*.yaml"))


def load_space(name_or_path: str | Path) -> SearchSpec:
    """Read and validate a search space YAML.

    Args:
        name_or_path: a name in `search_spaces/` (e.g. `inception`) or a path to a YAML file.

    Returns:
        The frozen SearchSpec.

    Raises:
        CxrError: naming the file, the key and the fix for any typo, wrong type or impossible setting.
    """
    path = resolve(name_or_path)
    src = str(path)
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_SpaceLoader)  # noqa: S506 - a SafeLoader
    except UnicodeDecodeError:
        raise CxrError(f"{src}: not a text file; a search space is a YAML file (see search_spaces/).") from None
    except yaml.YAMLError as e:
        raise CxrError(f"{src}: not valid YAML ({' '.join(str(e).split())}).") from None
    if not isinstance(raw, dict):
        raise CxrError(f"{src}: expected a mapping of settings at the top level, got {type(raw).__name__}.")
    return parse_space(raw, src)


def parse_space(raw: dict[str, Any], src: str) -> SearchSpec:
    """Validate an already-loaded search space mapping; `src` is named in error messages."""
    _check_keys(raw, TOP_KEYS, src)
    metric = _get(raw, "metric", str, src, "val_loss")
    if metric not in VAL_METRICS:
        raise CxrError(
            f"{src}: metric '{metric}' is not a validation metric; allowed: {', '.join(VAL_METRICS)}"
            f"{_suggest(metric, VAL_METRICS)} (test metrics never drive the search)."
        )
    mode = _get(raw, "mode", str, src, VAL_METRICS[metric])
    if mode not in ("min", "max"):
        raise CxrError(f"{src}: mode '{mode}' must be 'min' or 'max'.")
    if mode != VAL_METRICS[metric]:
        raise CxrError(f"{src}: mode '{mode}' would optimise {metric} the wrong way; use mode: {VAL_METRICS[metric]}.")

    searcher_raw = raw.get("searcher", {"type": "optuna"})
    if isinstance(searcher_raw, str):
        searcher_raw = {"type": searcher_raw}
    _require_mapping(searcher_raw, "searcher", src)
    _check_keys(searcher_raw, ("type", "seed"), src, "searcher")
    searcher = _get(searcher_raw, "type", str, src, "optuna", "searcher")
    if searcher not in SEARCHERS:
        raise CxrError(f"{src}: searcher.type '{searcher}'; allowed: {', '.join(SEARCHERS)}{_suggest(searcher, SEARCHERS)}.")
    seed = _get(searcher_raw, "seed", int, src, 0, "searcher")

    sched_raw = raw.get("scheduler", {"type": "asha"})
    if isinstance(sched_raw, str):
        sched_raw = {"type": sched_raw}
    _require_mapping(sched_raw, "scheduler", src)
    _check_keys(sched_raw, ("type", "max_t", "grace_period", "reduction_factor"), src, "scheduler")
    kind = _get(sched_raw, "type", str, src, "asha", "scheduler")
    if kind not in SCHEDULERS:
        raise CxrError(f"{src}: scheduler.type '{kind}'; allowed: {', '.join(SCHEDULERS)}{_suggest(kind, SCHEDULERS)}.")

    trial = raw.get("trial", {}) or {}
    _require_mapping(trial, "trial", src)
    for key, value in trial.items():
        _check_trial_value(key, value, f"{src}: trial")
    max_epochs = trial.get("max_epochs", TrialConfig.max_epochs)
    scheduler = SchedulerSpec(
        kind=kind,
        max_t=_get(sched_raw, "max_t", int, src, max_epochs, "scheduler"),
        grace_period=_get(sched_raw, "grace_period", int, src, 3, "scheduler"),
        reduction_factor=_get(sched_raw, "reduction_factor", int, src, 3, "scheduler"),
    )
    if kind == "asha":
        if scheduler.grace_period < 1 or scheduler.grace_period > scheduler.max_t:
            raise CxrError(f"{src}: scheduler.grace_period must be in [1, max_t={scheduler.max_t}], got {scheduler.grace_period}.")
        if scheduler.reduction_factor < 2:
            raise CxrError(f"{src}: scheduler.reduction_factor must be >= 2, got {scheduler.reduction_factor}.")

    params_raw = raw.get("params", {}) or {}
    _require_mapping(params_raw, "params", src)
    params = tuple(_parse_param(name, dom, src) for name, dom in params_raw.items())
    both = sorted(set(trial) & {p.name for p in params})
    if both:
        raise CxrError(f"{src}: {', '.join(both)} is both fixed under 'trial' and searched under 'params'; keep one.")

    variants = _parse_variants(raw.get("variants"), src)
    if searcher == "optuna" and not params:
        raise CxrError(f"{src}: searcher optuna needs at least one setting under 'params' to search; "
                       "with nothing to search use searcher: random (num_samples repeats the fixed trial).")
    has_grid = any(p.domain == "grid" for p in params) or bool(variants)
    if searcher == "optuna" and has_grid:
        raise CxrError(f"{src}: grid domains and variants need searcher: grid (Optuna samples, it cannot enumerate a grid).")
    if searcher == "grid" and not has_grid:
        raise CxrError(f"{src}: searcher: grid needs 'variants' or at least one 'grid' domain under params.")

    resources = raw.get("resources", {}) or {}
    _require_mapping(resources, "resources", src)
    _check_keys(resources, ("cpu", "gpu", "workers"), src, "resources")
    cpus = _get(resources, "cpu", float, src, 1.0, "resources")
    workers = _get(resources, "workers", int, src, 1, "resources")
    if workers < 1:
        raise CxrError(f"{src}: resources.workers must be >= 1 (processes training one trial together), got {workers}.")
    gpus = resources.get("gpu", "auto")
    if not (gpus == "auto" or (isinstance(gpus, (int, float)) and not isinstance(gpus, bool) and 0 <= gpus)):
        raise CxrError(f"{src}: resources.gpu must be 'auto' or a number >= 0 (a fraction shares a GPU), got {gpus!r}.")

    data = raw.get("data", {}) or {}
    _require_mapping(data, "data", src)
    _check_keys(data, DATA_KEYS, src, "data")
    for key, kind_ in (("size", int), ("n_images", int), ("seed", int), ("val_fraction", float), ("equalize", str),
                       ("resplit", bool), ("duplicate_policy", str)):
        if key in data:
            data = {**data, key: _get(data, key, kind_, src, None, "data")}
    for key, allowed in (("equalize", ("hist", "clahe", "none")), ("duplicate_policy", ("drop", "keep"))):
        if key in data and data[key] not in allowed:
            raise CxrError(f"{src}: data.{key} is '{data[key]}'; allowed: {', '.join(allowed)}.")
    if "val_fraction" in data and not 0 < data["val_fraction"] < 1:
        raise CxrError(f"{src}: data.val_fraction must be in (0, 1), got {data['val_fraction']}.")

    budget = raw.get("cpu_budget", {}) or {}
    _require_mapping(budget, "cpu_budget", src)
    _check_keys(budget, CPU_BUDGET_KEYS, src, "cpu_budget")
    for key, value in (budget.get("trial") or {}).items():
        _check_trial_value(key, value, f"{src}: cpu_budget.trial")
    for name, dom in (budget.get("params") or {}).items():
        _parse_param(name, dom, f"{src}: cpu_budget")

    pipeline = raw.get("pipeline", {}) or {}
    _require_mapping(pipeline, "pipeline", src)
    _check_keys(pipeline, PIPELINE_KEYS, src, "pipeline")
    pipeline = {key: _get(pipeline, key, int, src, None, "pipeline") for key in pipeline if pipeline[key] is not None}
    for key, value in pipeline.items():
        if value < 1:
            raise CxrError(f"{src}: pipeline.{key} must be >= 1, got {value}.")

    num_samples = _get(raw, "num_samples", int, src, 1)
    max_conc = raw.get("max_concurrent_trials")
    if max_conc is not None:
        max_conc = _get(raw, "max_concurrent_trials", int, src, None)
    checkpoint_every = _get(raw, "checkpoint_every", int, src, 1)
    checkpoint_every_s = _get(raw, "checkpoint_every_s", float, src, None)
    max_trials = _get(raw, "max_trials", int, src, None)
    if max_trials is not None and (max_trials < 1 or searcher == "optuna"):
        raise CxrError(f"{src}: max_trials caps a grid or random search's plan and must be >= 1 "
                       f"(an Optuna search has num_samples), got {max_trials} with searcher {searcher}.")
    if checkpoint_every_s is not None and checkpoint_every_s < 0:
        raise CxrError(f"{src}: checkpoint_every_s must be >= 0 seconds (leave it out for automatic), "
                       f"got {checkpoint_every_s}.")
    max_failures = _get(raw, "max_failures", int, src, 2)
    for key, value, lo in (("num_samples", num_samples, 1), ("checkpoint_every", checkpoint_every, 1),
                           ("max_failures", max_failures, 1), ("max_concurrent_trials", max_conc or 1, 1)):
        if value < lo:
            raise CxrError(f"{src}: {key} must be >= {lo}, got {value}.")

    return SearchSpec(
        name=_get(raw, "name", str, src, Path(src).stem),
        source=src,
        metric=metric,
        mode=mode,
        searcher=searcher,
        seed=seed,
        scheduler=scheduler,
        num_samples=num_samples,
        max_concurrent_trials=max_conc,
        cpus_per_trial=cpus,
        gpus_per_trial=gpus if gpus == "auto" else float(gpus),
        workers_per_trial=workers,
        checkpoint_every=checkpoint_every,
        checkpoint_every_s=checkpoint_every_s,
        max_trials=max_trials,
        max_failures=max_failures,
        data=dict(data),
        trial=dict(trial),
        params=params,
        variants=variants,
        cpu_budget=dict(budget),
        pipeline=pipeline,
        description=str(raw.get("description", "")),
        raw=raw,
    )


def _parse_param(name: str, dom: Any, src: str) -> ParamSpec:
    where = f"{src}: params.{name}"
    if name not in _TRIAL_FIELDS:
        raise CxrError(f"{src}: params.{name} is not a trial setting{_suggest(name, _TRIAL_FIELDS)} "
                       f"(settings are the TrialConfig fields).")
    if not isinstance(dom, dict) or len(dom) != 1:
        raise CxrError(f"{where}: write one domain as a mapping, e.g. {{choice: [...]}} or {{loguniform: [1e-4, 1e-2]}}; "
                       f"domains: {', '.join(DOMAINS)}.")
    (domain, arg), = dom.items()
    if domain not in DOMAINS:
        raise CxrError(f"{where}: unknown domain '{domain}'; allowed: {', '.join(DOMAINS)}{_suggest(domain, DOMAINS)}.")
    if domain == "constant":
        _check_trial_value(name, arg, f"{src}: params")
        return ParamSpec(name, domain, (arg,))
    if not isinstance(arg, list) or not arg:
        raise CxrError(f"{where}.{domain} must be a non-empty list, got {arg!r}.")
    if domain in ("choice", "grid"):
        for value in arg:
            _check_trial_value(name, value, f"{src}: params")
        return ParamSpec(name, domain, tuple(arg))
    if len(arg) != 2:
        raise CxrError(f"{where}.{domain} must be [low, high], got {arg!r}.")
    kind = type(getattr(TrialConfig, name))
    want = int if domain == "randint" else float
    if kind not in (int, float) or (domain == "randint" and kind is not int):
        raise CxrError(f"{where}: '{domain}' needs a numeric ({want.__name__}) setting; '{name}' is {kind.__name__}.")
    lo, hi = (_number(v, want, where, domain) for v in arg)
    if not lo < hi:
        raise CxrError(f"{where}.{domain}: low must be < high, got [{lo}, {hi}].")
    if domain == "loguniform" and lo <= 0:
        raise CxrError(f"{where}.loguniform: bounds must be > 0, got [{lo}, {hi}].")
    for value in (lo, hi):
        _check_trial_value(name, value, f"{src}: params")
    return ParamSpec(name, domain, (lo, hi))


def _parse_variants(raw: Any, src: str) -> tuple[tuple[str, dict[str, Any]], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        raise CxrError(f"{src}: variants must be a list of mappings, each with a 'variant' name and trial settings.")
    out, seen = [], set()
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("variant"), (str, int)):
            raise CxrError(f"{src}: variants[{i}] needs a 'variant' name (e.g. variant: rmsprop_l2).")
        name = str(item["variant"])
        if name in seen:
            raise CxrError(f"{src}: variants[{i}]: duplicate variant name '{name}'.")
        seen.add(name)
        settings = {k: v for k, v in item.items() if k != "variant"}
        for key, value in settings.items():
            _check_trial_value(key, value, f"{src}: variants[{i}] ({name})")
        out.append((name, settings))
    return tuple(out)


def _check_trial_value(key: str, value: Any, where: str) -> None:
    """Check one TrialConfig field by building a config with it (the same validation the trainable uses)."""
    if key not in _TRIAL_FIELDS:
        raise CxrError(f"{where}: unknown setting '{key}'{_suggest(key, _TRIAL_FIELDS)} (settings are the TrialConfig fields).")
    if key in CHOICES and value not in CHOICES[key]:
        yaml_bool = " (YAML reads unquoted on/off/yes/no as true/false)" if isinstance(value, bool) else ""
        raise CxrError(f"{where}.{key}: '{value}' is not allowed{yaml_bool}; allowed: {', '.join(CHOICES[key])}"
                       f"{_suggest(str(value), CHOICES[key])}.")
    try:
        TrialConfig.from_dict({key: value}, source=where)
    except CxrError as e:
        msg = str(e)
        raise CxrError(msg if msg.startswith(where) else f"{where}: {msg}") from None


def _get(d: dict, key: str, kind: type, src: str, default: Any, section: str = "") -> Any:
    name = f"{section}.{key}" if section else key
    if key not in d or d[key] is None:
        return default
    value = d[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise CxrError(f"{src}: {name} must be {kind.__name__}, got {value!r} ({type(value).__name__}).")
    return value


def _number(value: Any, kind: type, where: str, domain: str) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CxrError(f"{where}.{domain}: {value!r} is not a number.")
    if kind is int:
        if float(value) != int(value):
            raise CxrError(f"{where}.{domain}: randint bounds must be integers, got {value}.")
        return int(value)
    return float(value)


def _check_keys(d: dict, allowed: tuple[str, ...] | Any, src: str, section: str = "") -> None:
    for key in d:
        if key not in allowed:
            where = f"{section}.{key}" if section else str(key)
            raise CxrError(f"{src}: unknown key '{where}'{_suggest(str(key), allowed)}; allowed: {', '.join(allowed)}.")


def _require_mapping(value: Any, key: str, src: str) -> None:
    if not isinstance(value, dict):
        raise CxrError(f"{src}: '{key}' must be a mapping (key: value lines), got {type(value).__name__}.")


def _suggest(word: str, options: Any) -> str:
    hint = difflib.get_close_matches(str(word), list(options), n=1)
    return f" (did you mean '{hint[0]}'?)" if hint else ""
