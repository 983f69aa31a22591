"""The retrain stage on Ray Tune: the search's top-K configurations x seeds as one grid, no ASHA.

Each (configuration, seed) is one trial named `<config_key>-s<seed>` in `EXP/retrain/`, so a launch after a
kill continues the unfinished ones in their own folders and skips the finished ones; a later `retrain` with
more seeds trains only the missing seeds.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from cxr_search import experiment, interrupt, retrain, storage
from cxr_search.data.prepare import PreparedData
from cxr_search.errors import CxrError
from cxr_search.experiment import Experiment
from cxr_search.search import tune as stage


def run_retrain(exp: Experiment, data: PreparedData, *, top_k: int, seeds: int | list[int],
                max_epochs: int | None = None, resources: stage.TrialResources | None = None,
                console: Any = None) -> pd.DataFrame:
    """Retrain the search's `top_k` configurations over `seeds` and summarise their spread.

    Args:
        exp: the experiment (a finished search).
        data: the same prepared data as the search (same splits; checked against stored predictions).
        top_k: number of distinct configurations, best validation metric first.
        seeds: a count (`50` = seeds 0..49) or explicit seeds.
        max_epochs: epoch budget of the runs still to train (early stopping still applies).
        resources: per-trial resources (None: the space's).
        console: a rich Console for the trials' progress (None: quiet).

    Returns:
        One row per finished configuration x seed (`EXP/retrain/results.parquet`), with rank and source trial.
    """
    retrain_dir = exp.stage_dir("retrain")
    experiment.check_same_splits(exp.path, data)
    all_configs = retrain.top_configs(exp, top_k=10**9)  # every distinct configuration, ranked
    chosen = all_configs[:top_k]
    runs = retrain.plan_runs(chosen, retrain.seed_list(seeds), retrain.finished_pairs(exp), max_epochs=max_epochs)
    planned = {retrain.run_key(r): _started_config(retrain_dir, retrain.run_key(r), r) for r in runs}
    spec = exp.plan.space
    callbacks = ()
    if console is not None:
        from cxr_search.search.console import TrialConsole

        callbacks = (TrialConsole(console, objective=exp.objective, total=max(1, len(planned)), title="retrain",
                                  shown=("seed",)),)
    options = stage.stage_options(spec, resources=resources, callbacks=callbacks)
    stage.run_planned_stage(retrain_dir, planned, data, options)
    experiment.finalize(retrain_dir, data, exp.objective)
    results = retrain.annotate(retrain.finished_runs(exp), all_configs)
    if results.empty:
        raise CxrError(f"{retrain_dir}: no retrain run finished; see the trial errors in {retrain_dir}.")
    retrain.write_outputs(retrain_dir, results)
    return results


def _started_config(retrain_dir: Any, key: str, planned: dict[str, Any]) -> dict[str, Any]:
    """A pair already started under another epoch budget continues with the budget it started with."""
    started = retrain_dir / f"{experiment.TRIAL_PREFIX}{key}" / "config.json"
    if started.is_file():
        return {**planned, **{k: v for k, v in storage.read_json(started).items() if k == "max_epochs"}}
    return planned


def retrain_experiment(exp_dir: str, *, top_k: int, seeds: int | list[int], max_epochs: int | None = None,
                       address: str | None = None, console: Any = None) -> pd.DataFrame:
    """`cxr-search retrain EXP`: rebuild the experiment's data from its plan, then `run_retrain`.

    Args:
        exp_dir: an experiment folder written by `cxr-search run`.
        top_k, seeds, max_epochs: as `run_retrain`.
        address: Ray cluster to run on (default: the one the experiment ran on, else a local Ray).
    """
    exp = Experiment.open(exp_dir)
    if not exp.results("search").shape[0]:
        raise CxrError(f"{exp.path}: the search has no trials yet; run or resume it first "
                       f"(`cxr-search resume {exp.path}`).")
    retrain.seed_list(seeds)  # validate before any work
    with interrupt.naming(exp.path), experiment.exclusive(exp):
        stage.init_ray(address=address or exp.plan.address, num_cpus=exp.plan.num_cpus)
        for note in stage.check_trial_resources(exp.plan.space, address=address or exp.plan.address):
            (console.print if console is not None else print)(f"note: {note}")
        data = exp.plan.data.prepare()  # same folder, size and split seed as the search: same splits
        return run_retrain(exp, data, top_k=top_k, seeds=seeds, max_epochs=max_epochs, console=console)
