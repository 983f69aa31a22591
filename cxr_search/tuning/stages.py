"""One stage = one Tune run per launch: the Optuna search, planned trials (grid, random) and the retrain stage.

Crash consistency. Ray's own experiment snapshot is written every few seconds and copied to storage in the
background, while the Optuna journal, the trial folders and our event log are written as things happen: after a
kill the snapshot is the oldest of these records, and `Tuner.restore` would trust it (a trial that finished after
the snapshot would be resumed and report to a finished Optuna trial). So Ray's snapshot is never restored. Every
launch (`run`, `resume`) is a new Tune run over what our own records say is left:
- a trial is named by a stable key (Optuna's trial number, or its index in the planned grid, or config+seed for
  retraining), and its folder `trial_<key>` is its model folder: a later launch's trial with the same key continues
  in the same folder from its resume state;
- trials that ended (finished, stopped by ASHA, failed every retry) are never run or reported to again;
- the Optuna journal is reconciled with the folders and the event log before a launch (`searcher.reconcile_journal`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

from cxr_search import interrupt, retrain
from cxr_search.config import TrialConfig
from cxr_search.data.prepare import PreparedData
from cxr_search.errors import CxrError
from cxr_search.experiment.folder import Experiment
from cxr_search.experiment.plan import Objective
from cxr_search.experiment.results import check_same_splits, finalize
from cxr_search.experiment.trials import trial_dirs, trial_end, trial_events
from cxr_search.io import storage
from cxr_search.io.journal import journal_storage
from cxr_search.io.layout import JOURNAL_FILE, TRIAL_PREFIX
from cxr_search.space import ParamSpec, SearchSpec
from cxr_search.tuning.callbacks import PendingWatch, TrialEventLog
from cxr_search.tuning.resources import TrialResources, trial_resources
from cxr_search.tuning.searcher import TPE_STARTUP, ReplayingOptunaSearch, reconcile_journal
from cxr_search.tuning.trainable import KEY, train_trial


class _PlannedValue:
    """Tune `sample_from` callable: one field of a planned trial, looked up by its key (picklable)."""

    def __init__(self, runs: dict[str, dict[str, Any]], field_name: str):
        self.runs, self.field_name = runs, field_name

    def __call__(self, config: dict[str, Any]) -> Any:  # Ray 2.60 passes the resolved config itself
        return self.runs[config[KEY]][self.field_name]


def planned_param_space(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A Tune grid with one point per planned trial: `trial_key` names it, every other field is looked up.

    One grid over keys, not a product of domains: planned trials differ in many fields at once.
    """
    keys = sorted({k for r in runs.values() for k in r})
    defaults = {f: getattr(TrialConfig, f) for f in TrialConfig.__dataclass_fields__}
    full = {name: {k: r.get(k, defaults.get(k)) for k in keys} for name, r in runs.items()}
    space: dict[str, Any] = {KEY: tune.grid_search(list(runs))}
    for key in keys:
        space[key] = tune.sample_from(_PlannedValue(full, key))
    return space


def ended_keys(stage_dir: storage.Location) -> set[str]:
    """Keys of the stage's trials that ended (finished, stopped or failed), from the folders and the event log."""
    events = trial_events(stage_dir)
    return {t.trial_id for t in trial_dirs(stage_dir)
            if trial_end(t.path, events.get(t.trial_id)) is not None}


@dataclass
class StageOptions:
    """How a stage's trials run (from the space; retrain uses the same)."""

    objective: Objective
    resources: TrialResources
    scheduler: Any = None  # a Tune scheduler; None: FIFO
    max_concurrent_trials: int | None = None
    checkpoint_every: int = 1
    checkpoint_every_s: float | None = None
    max_failures: int = 2
    verbose: int = 0  # Tune's own output (0: none; the console callback speaks to people)
    callbacks: tuple[Any, ...] = ()  # more Tune callbacks (search/console.py's TrialConsole)
    reuse_actors: bool | None = None  # None: reuse trial processes only for CPU trials (a GPU trial's memory is


def run_optuna_stage(stage_dir: storage.Location, spec: SearchSpec, data: PreparedData, options: StageOptions,
                     study_name: str) -> int:
    """Run (or continue) an Optuna search in `stage_dir` until `spec.num_samples` trials have ended.

    Returns:
        The number of trials this launch ran (0 when the stage had already ended).
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its per-trial INFO lines are the console's job
    journal = stage_dir / JOURNAL_FILE
    space = optuna_space(spec)
    state = reconcile_journal(stage_dir, journal, study_name, options.objective, space)
    remaining = spec.num_samples - state.ended
    if remaining <= 0:
        return 0
    searcher = ReplayingOptunaSearch(
        space=space, metric=spec.metric, mode=spec.mode, study_name=study_name,
        # TPE's own seed changes per launch (fixed by the study's size: a resumed launch must not replay the
        # first one's draws); its random startup trials are drawn per trial number instead (see the class).
        sampler=optuna.samplers.TPESampler(seed=spec.seed + state.total, n_startup_trials=TPE_STARTUP),
        storage=journal_storage(journal), pending=state.pending, params=spec.params, seed=spec.seed,
        n_startup=TPE_STARTUP,
    )
    _fit(stage_dir, data, dict(spec.trial), searcher, remaining, options)  # fixed settings ride in the config
    return remaining


def optuna_space(spec: SearchSpec) -> dict[str, Any]:
    """The searched domains as Optuna distributions (fixed settings travel in the config, not the study)."""
    return OptunaSearch.convert_search_space({p.name: tune_domain(p) for p in spec.params})


def run_planned_stage(stage_dir: storage.Location, runs: dict[str, dict[str, Any]], data: PreparedData,
                      options: StageOptions) -> int:
    """Run (or continue) the planned trials `runs` (key -> config) in `stage_dir` that have not ended.

    Returns:
        The number of trials this launch ran.
    """
    todo = {k: v for k, v in runs.items() if k not in ended_keys(stage_dir)}
    if not todo:
        return 0
    fixed = {**planned_param_space(todo)}
    searcher = BasicVariantGenerator(max_concurrent=options.max_concurrent_trials or 0, random_state=0)
    _fit(stage_dir, data, fixed, searcher, 1, options, concurrency_in_searcher=True)
    return len(todo)


def _fit(stage_dir: storage.Location, data: PreparedData, param_space: dict[str, Any], searcher: Any, num_samples: int,
         options: StageOptions, concurrency_in_searcher: bool = False) -> None:
    from cxr_search.training.faults import faults_from_env

    stage_dir.mkdir(parents=True, exist_ok=True)
    trainable = tune.with_parameters(
        train_trial, data=data, stage=str(stage_dir), metric=options.objective.metric,
        mode=options.objective.mode, checkpoint_every=options.checkpoint_every,
        checkpoint_every_s=options.checkpoint_every_s, faults=faults_from_env(),
        resources=options.resources, max_failures=max(1, options.max_failures))
    tuner = tune.Tuner(
        tune.with_resources(trainable, options.resources),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=options.objective.metric, mode=options.objective.mode, search_alg=searcher,
            scheduler=options.scheduler or FIFOScheduler(), num_samples=num_samples,
            max_concurrent_trials=None if concurrency_in_searcher else options.max_concurrent_trials,
            reuse_actors=_reuse_actors(options),
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=stage_dir.name, storage_path=str(stage_dir.parent), verbose=options.verbose,
            callbacks=[TrialEventLog(stage_dir), PendingWatch(), *options.callbacks],
            failure_config=tune.FailureConfig(max_failures=max(1, options.max_failures)),
            # Checkpoints are our own model folders (see the module docstring); Ray keeps none.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
        ),
    )
    with interrupt.tune_run():
        tuner.fit()


def _reuse_actors(options: StageOptions) -> bool:
    """Reuse trial processes only for single-process CPU trials: a GPU trial's memory is freed for sure only when
    its process ends, and a data-parallel trial's process cannot be reset after its Ray Train run."""
    if options.reuse_actors is not None:
        return options.reuse_actors
    return not options.resources.uses_gpu and options.resources.workers == 1


def trial_dirname(trial: Any) -> str:
    """A trial's folder is named by its stable key (`trial_0003`), the same in every launch."""
    return f"{TRIAL_PREFIX}{trial.config[KEY]}"


def make_scheduler(spec: SearchSpec) -> Any:
    """ASHA on epochs (a trial's own `epoch`, so a resumed trial keeps its rung), or FIFO."""
    s = spec.scheduler
    if s.kind == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="epoch", max_t=s.max_t, grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor)


def tune_domain(p: ParamSpec) -> Any:
    """The Ray Tune domain of a searched setting."""
    if p.domain == "choice":
        return tune.choice(list(p.values))
    if p.domain == "grid":
        return tune.grid_search(list(p.values))
    if p.domain == "loguniform":
        return tune.loguniform(*p.values)
    if p.domain == "uniform":
        return tune.uniform(*p.values)
    if p.domain == "randint":
        return tune.randint(p.values[0], p.values[1] + 1)  # YAML bounds are inclusive
    return p.values[0]


def stage_options(spec: SearchSpec, *, scheduler: Any = None, resources: TrialResources | None = None,
                  callbacks: tuple[Any, ...] = ()) -> StageOptions:
    return StageOptions(
        objective=Objective(spec.metric, spec.mode), resources=resources or trial_resources(spec),
        scheduler=scheduler, max_concurrent_trials=spec.max_concurrent_trials,
        checkpoint_every=spec.checkpoint_every, checkpoint_every_s=spec.checkpoint_every_s,
        max_failures=spec.max_failures, callbacks=callbacks)


def run_retrain(exp: Experiment, data: PreparedData, *, top_k: int, seeds: int | list[int],
                max_epochs: int | None = None, resources: TrialResources | None = None,
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
    check_same_splits(exp.path, data)
    all_configs = retrain.top_configs(exp, top_k=10**9)  # every distinct configuration, ranked
    chosen = all_configs[:top_k]
    runs = retrain.plan_runs(chosen, retrain.seed_list(seeds), retrain.finished_pairs(exp), max_epochs=max_epochs)
    planned = {retrain.run_key(r): _started_config(retrain_dir, retrain.run_key(r), r) for r in runs}
    spec = exp.plan.space
    callbacks = ()
    if console is not None:
        from cxr_search.tuning.console import TrialConsole

        callbacks = (TrialConsole(console, objective=exp.objective, total=max(1, len(planned)), title="retrain",
                                  shown=("seed",)),)
    options = stage_options(spec, resources=resources, callbacks=callbacks)
    run_planned_stage(retrain_dir, planned, data, options)
    finalize(retrain_dir, data, exp.objective)
    results = retrain.annotate(retrain.finished_runs(exp), all_configs)
    if results.empty:
        raise CxrError(f"{retrain_dir}: no retrain run finished; see the trial errors in {retrain_dir}.")
    retrain.write_outputs(retrain_dir, results)
    return results


def _started_config(retrain_dir: Any, key: str, planned: dict[str, Any]) -> dict[str, Any]:
    """A pair already started under another epoch budget continues with the budget it started with."""
    started = retrain_dir / f"{TRIAL_PREFIX}{key}" / "config.json"
    if started.is_file():
        return {**planned, **{k: v for k, v in storage.read_json(started).items() if k == "max_epochs"}}
    return planned
