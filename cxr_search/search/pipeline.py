"""`cxr-search run` / `resume`: data -> search -> retrain -> ensemble -> summary, each stage resumable.

The whole plan is built and validated first (`experiment.plan_run`), then Ray is started or reached and the
trials' resources are checked against its nodes (`tune.check_trial_resources`); only then is the experiment
folder created, with `pipeline.json`. Each stage is marked complete in the
plan only after its outputs exist, so `resume EXP` after a kill, Ctrl-C or SIGTERM continues the first
unfinished stage.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console

from cxr_search import experiment, interrupt, paths, report
from cxr_search.errors import CxrError
from cxr_search.experiment import Experiment, Plan

# Ray is imported only once the plan is valid (a typo in a space must not wait for Ray to load): the functions
# below import `cxr_search.search.tune` where they need it.


def run_pipeline(space: str | Path, *, console: Console | None = None, **options: Any) -> Path:
    """Plan, then run every requested stage; returns the experiment folder.

    Args:
        space: search space name (`inception`) or YAML path.
        console: where to print.
        options: the run's options, as `experiment.plan_run` takes them (data_dir, name, num_samples,
            max_epochs, smoke, seed, top_k, seeds, resplit, stages, gpus_per_trial, address, storage, num_cpus);
            whether a GPU is there is found out here.
    """
    import torch

    console = console or Console()
    options.setdefault("gpu_available", torch.cuda.is_available() or options.get("address") is not None)
    plan = experiment.plan_run(space, **options)
    for note in plan.notes:  # before Ray starts: what the plan changed or cannot learn
        console.print(f"[yellow]note:[/] {note}")
    from cxr_search.search import tune as stage

    root = Path(plan.storage) if plan.storage else paths.experiments_root()
    if (root / plan.name / experiment.PLAN_FILE).exists():
        raise CxrError(f"experiment '{(root / plan.name).resolve()}' already exists; continue it with "
                       f"`cxr-search resume {(root / plan.name).resolve()}` or pick another --name.")
    stage.init_ray(address=plan.address, num_cpus=plan.num_cpus)  # a wrong --address fails before any file
    notes = stage.check_trial_resources(plan.space, address=plan.address)  # trials that could never start
    exp = Experiment.create(plan, root)
    exp.write_space_as_run()
    for note in notes:
        console.print(f"[yellow]note:[/] {note}")
    with interrupt.naming(exp.path), experiment.exclusive(exp):
        return _continue(exp, console)


def resume_pipeline(exp_dir: str | Path, *, console: Console | None = None, address: str | None = None) -> Path:
    """Continue a run that was killed or stopped: the first unfinished stage goes on where it was."""
    from cxr_search.search import tune as stage

    console = console or Console()
    exp = Experiment.open(exp_dir)
    experiment.weights.require_available(exp.plan.space.backbone_pairs())  # e.g. resumed on another machine
    with interrupt.naming(exp.path), experiment.exclusive(exp):
        stage.init_ray(address=address or exp.plan.address, num_cpus=exp.plan.num_cpus)
        for note in stage.check_trial_resources(exp.plan.space, address=address or exp.plan.address):
            console.print(f"[yellow]note:[/] {note}")
        if address is not None and address != exp.plan.address:
            exp.update(address=address)
        console.print(f"resuming {exp.path} (done: {', '.join(exp.plan.completed) or 'nothing yet'})")
        return _continue(exp, console)


def _continue(exp: Experiment, console: Console) -> Path:
    from cxr_search.ensemble import build_ensemble
    from cxr_search.search import tune as stage

    plan = exp.plan
    t0 = time.perf_counter()
    data = plan.data.prepare()
    exp.write_data_report(data.report)
    stage.init_ray(address=plan.address, num_cpus=plan.num_cpus)
    import ray

    exp.write_environment(experiment.environment(
        {k: float(v) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")},
        seeds={"searcher": plan.space.seed, "trial": int(plan.space.trial.get("seed", 0)), "split": plan.data.seed}))

    if "search" in plan.stages and not exp.is_complete("search"):
        run_search(exp, data, console)
        experiment.finalize(exp.path, data, exp.objective)
        exp.mark_complete("search")

    if "retrain" in plan.stages and not exp.is_complete("retrain"):
        from cxr_search.search.retrain import run_retrain

        console.rule(f"retrain: top {plan.top_k} x {plan.seeds} seeds")
        run_retrain(exp, data, top_k=plan.top_k, seeds=plan.seeds, max_epochs=plan.retrain_max_epochs,
                    reporter=_reporter(plan, retrain=True))
        exp.mark_complete("retrain")

    if "ensemble" in plan.stages and not exp.is_complete("ensemble"):
        # As in the study, the ensemble votes over the search's top distinct models (at least 3 members);
        # `cxr-search ensemble EXP --from retrain` builds a seed ensemble instead.
        console.rule(f"ensemble: top {plan.ensemble_members} distinct search configurations")
        build_ensemble(exp.path, top_k=plan.ensemble_members, source="search")
        exp.mark_complete("ensemble")

    path = report.write_summary(exp.path)
    report.print_summary(exp.path, console)
    console.print(f"summary: {path}")
    console.print(f"[bold]done in {time.perf_counter() - t0:.0f} s.[/] Experiment: {exp.path}\n"
                  f"  results.parquet, predictions/, optuna.journal (optuna-dashboard {exp.journal}), "
                  f"trial folders trial_*/" + (", retrain/" if exp.is_complete("retrain") else "")
                  + (", ensemble/" if exp.is_complete("ensemble") else ""))
    return exp.path


def run_search(exp: Experiment, data: Any, console: Console, *, verbose: int = 1) -> int:
    """Run (or continue) the search stage's Tune run; returns how many trials this launch ran."""
    from cxr_search.search import tune as stage

    spec = exp.plan.space
    console.rule(f"search: {spec.name} ({spec.searcher}, {spec.scheduler.kind}, {spec.num_samples} samples)")
    options = stage.stage_options(spec, scheduler=stage.make_scheduler(spec), verbose=verbose,
                                  reporter=_reporter(exp.plan))
    if spec.searcher == "optuna":
        return stage.run_optuna_stage(exp.path, spec, data, options, study_name=exp.plan.name)
    runs = {stage.trial_key(i): trial for i, trial in enumerate(spec.planned_trials())}
    return stage.run_planned_stage(exp.path, runs, data, options)


def _reporter(plan: Plan, retrain: bool = False) -> Any:
    from ray.tune import CLIReporter

    from cxr_search.search import tune as stage

    spec = plan.space
    if retrain:
        return CLIReporter(metric_columns={"epoch": "epoch", "val_loss": "val_loss", "val_acc": "val_acc"},
                           parameter_columns={stage.KEY: "config-seed"}, max_report_frequency=30)
    searched = [p.name for p in spec.params] + (["variant"] if spec.variants else [])
    return CLIReporter(
        metric_columns={"epoch": "epoch", "val_loss": "val_loss", "val_acc": "val_acc",
                        "val_macro_f1": "val_f1", "img_per_s": "img/s"},
        parameter_columns=searched[:6], max_report_frequency=15, sort_by_metric=True,
    )  # metric/mode come from TuneConfig
