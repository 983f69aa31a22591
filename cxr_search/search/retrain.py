"""The retrain stage on Ray Tune: the search's top-K configurations x seeds as one grid, no ASHA.

Layout: `EXP/retrain/runs/NNN/` is one Tune run (one launch); `EXP/retrain/results.parquet`, `summary.csv`
and `distribution.png` gather every run. An interrupted run is resumed first (Tune restore); then only the
(configuration, seed) pairs without finished predictions are planned into a new run, so a finished seed is
never trained twice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from cxr_search import retrain
from cxr_search.config import TrialConfig
from cxr_search.data.prepare import PreparedData
from cxr_search.errors import CxrError
from cxr_search.search import tune as stage
from cxr_search.search.space import parse_space


class _PlannedValue:
    """Tune `sample_from` callable: one TrialConfig field of the grid point's planned run (picklable)."""

    def __init__(self, runs: dict[str, dict[str, Any]], key: str):
        self.runs, self.key = runs, key

    def __call__(self, config: dict[str, Any]) -> Any:  # Ray 2.60 passes the resolved config itself
        return self.runs[config["variant"]][self.key]


def param_space(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A Tune grid with one point per planned run: `variant` names it (a label the trainable drops), every
    TrialConfig field is looked up from it. One grid, not config x seed domains: configs differ in many keys."""
    from ray import tune

    names = {f"{retrain.config_key(r)}-seed{r['seed']}": r for r in runs}
    keys = sorted({k for r in runs for k in r})
    # Fill fields a run lacks with its TrialConfig default so every point resolves every key.
    full = {n: {k: r.get(k, TrialConfig.__dataclass_fields__[k].default) for k in keys} for n, r in names.items()}
    space: dict[str, Any] = {"variant": tune.grid_search(list(names))}
    for key in keys:
        space[key] = tune.sample_from(_PlannedValue(full, key))
    return space


def _spec(exp_dir: Path) -> Any:
    path = exp_dir / "search_space.yaml"
    if not path.is_file():
        raise CxrError(f"{path} not found: {exp_dir} is not an experiment folder (run a search into it first).")
    return parse_space(yaml.safe_load(path.read_text()) or {}, str(path))


def check_same_splits(exp_dir: Path, data: PreparedData) -> None:
    """Refuse data whose val/test labels differ from what the search's trials were evaluated on."""
    stored = sorted((exp_dir / "predictions").glob("*.npz"))
    if not stored:
        return
    with np.load(stored[0], allow_pickle=False) as z:
        same = (np.array_equal(z["val_labels"], data.val.labels) and np.array_equal(z["test_labels"], data.test.labels))
    if not same:
        raise CxrError(f"{exp_dir}: the data given are not the splits the search used (val/test labels differ); "
                       f"use the experiment's data folder, size and split seed (data_report.json).")


def _reporter() -> Any:
    from ray.tune import CLIReporter

    return CLIReporter(metric_columns={"epoch": "epoch", "val_loss": "val_loss", "val_acc": "val_acc"},
                       parameter_columns={"variant": "config-seed"}, max_report_frequency=30)


def run_retrain(exp_dir: str | Path, data: PreparedData, *, top_k: int, seeds: int | list[int],
                max_epochs: int | None = None, resources: Any = None, verbose: int = 1) -> pd.DataFrame:
    """Retrain the search's `top_k` configurations over `seeds` and summarise their spread.

    Args:
        exp_dir: the experiment folder (search results, search_space.yaml).
        data: the same prepared data as the search (same splits; checked against stored predictions).
        top_k: number of distinct configurations, best validation metric first.
        seeds: a count (`50` = seeds 0..49) or explicit seeds.
        max_epochs: override each configuration's epoch budget (early stopping still applies).
        resources: per-trial resources (`tune.TrialResources` or {"cpu": .., "gpu": ..}); None: the spec's.
        verbose: Tune verbosity.

    Returns:
        One row per configuration x seed with all metrics (also `EXP/retrain/results.parquet`).
    """
    exp_dir = Path(exp_dir)
    retrain_dir = exp_dir / "retrain"
    spec = _spec(exp_dir)
    check_same_splits(exp_dir, data)
    if top_k < 1:
        raise CxrError(f"--top must be >= 1, got {top_k}.")
    all_configs = retrain.top_configs(exp_dir, top_k=10**9)  # every distinct configuration, ranked
    chosen = all_configs[:top_k]
    seed_list = retrain.seed_list(seeds)
    stage.init_ray()
    if resources is None:
        resources = stage.TrialResources(spec.cpus_per_trial, spec.gpus_per_trial, stage.cluster_gpu_memory_gib())
    options = {"metric": spec.metric, "mode": spec.mode, "max_concurrent_trials": spec.max_concurrent_trials,
               "resources": resources, "checkpoint_every": spec.checkpoint_every,
               "max_failures": spec.max_failures, "verbose": verbose, "reporter": _reporter()}

    # 1. Finish any run a killed driver left behind (Tune restores it; its param_space is its own).
    for run in retrain.run_dirs(retrain_dir):
        if not (run / "trial_status.json").is_file():
            planned = json.loads((run / "plan.json").read_text())  # used only if Tune saved no state to restore
            stage.run_stage(run, param_space(planned), data, **options)
        stage.finalize(run, data)
    # 2. Plan what is still missing and run it as one new grid.
    runs = retrain.plan_runs(chosen, seed_list, retrain.finished_pairs(retrain_dir), max_epochs=max_epochs)
    if runs:
        run = retrain.next_run_dir(retrain_dir)
        run.mkdir(parents=True)
        (run / "plan.json").write_text(json.dumps(runs, indent=2))  # what this launch was asked to train
        stage.run_stage(run, param_space(runs), data, **options)
        stage.finalize(run, data)
    results = retrain.annotate(retrain.collect_runs(retrain_dir), all_configs, max_epochs=max_epochs)
    if results.empty:
        raise CxrError(f"{retrain_dir}: no retrain run finished; see the trial errors under {retrain_dir / 'runs'}.")
    retrain.write_outputs(retrain_dir, results)
    return results


def retrain_experiment(exp_dir: str | Path, *, top_k: int, seeds: int | list[int], max_epochs: int | None = None,
                       address: str | None = None) -> pd.DataFrame:
    """`cxr-search retrain EXP`: rebuild the experiment's data from `EXP/pipeline.json`, then `run_retrain`.

    Args:
        exp_dir: an experiment folder written by `cxr-search run`.
        top_k, seeds, max_epochs: as `run_retrain`.
        address: Ray cluster to run on (default: the one the experiment ran on, else a local Ray).
    """
    from cxr_search.search.pipeline import PIPELINE_FILE, prepare_data

    exp_dir = Path(exp_dir)
    plan_file = exp_dir / PIPELINE_FILE
    if not plan_file.is_file():
        raise CxrError(f"{exp_dir}: no {PIPELINE_FILE}; pass an experiment folder written by `cxr-search run`.")
    plan = json.loads(plan_file.read_text())
    data = prepare_data(plan)  # same folder, size and split seed as the search: same splits
    stage.init_ray(address=address or plan.get("address"), num_cpus=plan.get("num_cpus"))
    return run_retrain(exp_dir, data, top_k=top_k, seeds=seeds, max_epochs=max_epochs)
