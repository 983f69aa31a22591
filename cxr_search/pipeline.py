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

import pandas as pd
from rich.console import Console

from cxr_search import interrupt, retrain
from cxr_search.errors import CxrError
from cxr_search.experiment.budget import estimate_seconds
from cxr_search.experiment.folder import Experiment, environment, exclusive
from cxr_search.experiment.plan import Plan, plan_run
from cxr_search.experiment.results import finalize
from cxr_search.io import paths, storage
from cxr_search.io.layout import PLAN_FILE, SUMMARY_FILE
from cxr_search.report.summary import print_summary, write_summary

# Ray is imported only once the plan is valid (a typo in a space must not wait for Ray to load): the functions
# below import `cxr_search.tuning` where they need it.


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
    plan = plan_run(space, **options)
    for note in plan.notes:  # before Ray starts: what the plan changed or cannot learn
        console.print(f"[yellow]note:[/] {note}")
    from cxr_search.tuning.cluster import init_ray
    from cxr_search.tuning.resources import check_trial_resources

    root = storage.path(plan.storage) if plan.storage else paths.experiments_root()
    if (root / plan.name / PLAN_FILE).exists():
        raise CxrError(f"experiment '{(root / plan.name).resolve()}' already exists; continue it with "
                       f"`cxr-search resume {(root / plan.name).resolve()}` or pick another --name.")
    init_ray(address=plan.address, num_cpus=plan.num_cpus)  # a wrong --address fails before any file
    notes = check_trial_resources(plan.space, address=plan.address)  # trials that could never start
    exp = Experiment.create(plan, root)
    exp.write_space_as_run()
    for note in notes:
        console.print(f"[yellow]note:[/] {note}")
    _print_estimate(plan, console)
    with interrupt.naming(exp.path), exclusive(exp):
        return _continue(exp, console)


def resume_pipeline(exp_dir: str | Path, *, console: Console | None = None, address: str | None = None) -> Path:
    """Continue a run that was killed or stopped: the first unfinished stage goes on where it was."""
    from cxr_search.models import weights
    from cxr_search.tuning.cluster import init_ray
    from cxr_search.tuning.resources import check_trial_resources

    console = console or Console()
    exp = Experiment.open(exp_dir)
    weights.require_available(exp.plan.space.backbone_pairs())  # e.g. resumed on another machine
    with interrupt.naming(exp.path), exclusive(exp):
        init_ray(address=address or exp.plan.address, num_cpus=exp.plan.num_cpus)
        for note in check_trial_resources(exp.plan.space, address=address or exp.plan.address):
            console.print(f"[yellow]note:[/] {note}")
        if address is not None and address != exp.plan.address:
            exp.update(address=address)
        console.print(f"resuming {exp.path} (done: {', '.join(exp.plan.completed) or 'nothing yet'})")
        return _continue(exp, console)


def _continue(exp: Experiment, console: Console) -> Path:
    from cxr_search.ensemble import build_ensemble
    from cxr_search.tuning.cluster import init_ray

    plan = exp.plan
    t0 = time.perf_counter()
    data = plan.data.prepare()
    exp.write_data_report(data.report)
    init_ray(address=plan.address, num_cpus=plan.num_cpus)
    import ray

    exp.write_environment(environment(
        {k: float(v) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")},
        seeds={"searcher": plan.space.seed, "trial": int(plan.space.trial.get("seed", 0)), "split": plan.data.seed}))

    if "search" in plan.stages and not exp.is_complete("search"):
        run_search(exp, data, console)
        finalize(exp.path, data, exp.objective)
        exp.mark_complete("search")

    if "retrain" in plan.stages and not exp.is_complete("retrain"):
        from cxr_search.tuning.stages import run_retrain

        console.rule(f"retrain: top {plan.top_k} x {plan.seeds} seeds")
        run_retrain(exp, data, top_k=plan.top_k, seeds=plan.seeds, max_epochs=plan.retrain_max_epochs,
                    console=console)
        exp.mark_complete("retrain")

    if "ensemble" in plan.stages and not exp.is_complete("ensemble"):
        # As in the study, the ensemble votes over the search's top distinct models (at least 3 members);
        # `cxr-search ensemble EXP --from retrain` builds a seed ensemble instead.
        console.rule(f"ensemble: top {plan.ensemble_members} distinct search configurations")
        build_ensemble(exp.path, top_k=plan.ensemble_members, source="search")
        exp.mark_complete("ensemble")

    write_summary(exp.path)
    print_summary(exp.path, console)
    console.print(f"[bold]done in {time.perf_counter() - t0:.0f} s.[/] Where to look next:")
    for line in next_steps(exp):
        console.print(f"  {line}", highlight=False, soft_wrap=True)
    return exp.path


def next_steps(exp: Experiment) -> list[str]:
    """The commands that show what this experiment holds, its path filled in (only for what exists)."""
    p = exp.path
    steps = [f"summary:    {p / SUMMARY_FILE}",
             f"report:     cxr-search report {p}   (one HTML file, opens offline)",
             f"notebooks:  make notebooks EXP={p}",
             f"trials:     cxr-search status {p}"]
    if exp.is_complete("ensemble"):
        steps += [f"predict:    cxr-search predict {p} IMAGES_OR_FOLDERS... --out predictions.csv",
                  f"explain:    cxr-search explain {p} IMAGES... --method gradcam   |   cxr-search explain {p} --evaluate"]
    if exp.journal.is_file():
        steps.append(f"Optuna:     optuna-dashboard {exp.journal}")
    steps.append(f"curves:     tensorboard --logdir {p}")
    return steps


def run_search(exp: Experiment, data: Any, console: Console) -> int:
    """Run (or continue) the search stage's Tune run; returns how many trials this launch ran."""
    from cxr_search.tuning.console import TrialConsole, asha_milestones
    from cxr_search.tuning.searcher import trial_key
    from cxr_search.tuning.stages import make_scheduler, run_optuna_stage, run_planned_stage, stage_options

    spec = exp.plan.space
    console.rule(f"search: {spec.name} ({spec.searcher}, {spec.scheduler.kind}, {spec.num_samples} samples)")
    s = spec.scheduler
    shown = tuple(p.name for p in spec.params) + (("variant",) if spec.variants else ())
    runs = {} if spec.searcher == "optuna" else \
        {trial_key(i): trial for i, trial in enumerate(spec.planned_trials())}
    live = TrialConsole(console, objective=exp.objective, total=spec.num_samples if not runs else len(runs),
                        shown=shown[:5], title="search",
                        milestones=asha_milestones(s.max_t, s.grace_period, s.reduction_factor) if s.kind == "asha"
                        else ())
    options = stage_options(spec, scheduler=make_scheduler(spec), callbacks=(live,))
    if spec.searcher == "optuna":
        return run_optuna_stage(exp.path, spec, data, options, study_name=exp.plan.name)
    return run_planned_stage(exp.path, runs, data, options)


def _print_estimate(plan: Plan, console: Console) -> None:
    """Without a GPU, how long the plan may take here; a loud warning when that is hours."""
    import ray

    resources = ray.cluster_resources()
    if resources.get("GPU", 0) > 0:
        return
    seconds = estimate_seconds(plan, resources.get("CPU", 1))
    text = f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} hours"
    console.print(f"[yellow]note:[/] estimated time on this machine ({resources.get('CPU', 1):g} CPUs, no GPU): "
                  f"at most ~{text} (every trial running its full epoch budget)")
    if seconds > 2 * 3600:
        console.print(f"[bold red]warning:[/] this plan needs about {text} here; for minutes use the CPU budget "
                      "(leave out --full / --num-samples / --max-epochs) or --smoke, or run it on a GPU.")


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
    from cxr_search.tuning.cluster import init_ray
    from cxr_search.tuning.resources import check_trial_resources
    from cxr_search.tuning.stages import run_retrain

    with interrupt.naming(exp.path), exclusive(exp):
        init_ray(address=address or exp.plan.address, num_cpus=exp.plan.num_cpus)
        for note in check_trial_resources(exp.plan.space, address=address or exp.plan.address):
            (console.print if console is not None else print)(f"note: {note}")
        data = exp.plan.data.prepare()  # same folder, size and split seed as the search: same splits
        return run_retrain(exp, data, top_k=top_k, seeds=seeds, max_epochs=max_epochs, console=console)
