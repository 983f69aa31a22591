"""`cxr-search run` / `resume`: data -> search -> finalize -> retrain -> ensemble -> summary, each stage resumable.

The plan of a run (space as run, data settings, stages, budget) is written to `EXP/pipeline.json` before Ray
starts, so `resume EXP` rebuilds the same data and continues where the driver stopped.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from cxr_search import paths
from cxr_search.errors import CxrError
from cxr_search.search import results
from cxr_search.search.space import SearchSpec, load_space, parse_space

STAGES = ("search", "retrain", "ensemble")
PIPELINE_FILE = "pipeline.json"
# The --smoke size: seconds per trial on a laptop CPU (80 px: inception_v3 needs >= 75).
SMOKE = {"n_images": 120, "size": 80, "num_samples": 4, "max_epochs": 2, "grace_period": 1,
         "max_concurrent_trials": 2, "top_k": 1, "seeds": 2, "retrain_max_epochs": 1}


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
) -> tuple[SearchSpec, dict[str, Any], list[str]]:
    """Load and validate the space and decide the budget (no Ray, no data yet).

    Without a GPU and without an explicit budget (--num-samples/--max-epochs), the file's `cpu_budget`
    section applies (small images, a small phantom set, few trials and epochs); --smoke is smaller still.

    Returns:
        (the effective spec, the plan dict written to pipeline.json, notes to print).
    """
    spec = load_space(space)
    raw = copy.deepcopy(spec.raw)
    notes: list[str] = []
    budget: dict[str, Any] = {}
    if smoke:
        budget = {**SMOKE, **{k: v for k, v in spec.cpu_budget.items() if k in ("params", "trial")}}
    elif not gpu_available and num_samples is None and max_epochs is None:
        budget = dict(spec.cpu_budget)
    # The study retrained its best configuration 50 times; a budget scales this down (and says so).
    top_k = top_k if top_k is not None else budget.get("top_k", 1)
    seeds = seeds if seeds is not None else budget.get("seeds", 50)
    if smoke:
        notes.append("smoke size: a few tiny trials to check the pipeline end to end (numbers mean nothing)")
    elif budget:
        notes.append(
            "no GPU found: CPU budget from the file's cpu_budget ("
            + ", ".join(f"{k}={budget[k]}" for k in ("n_images", "size", "num_samples", "max_epochs") if k in budget)
            + f"; retrain top {top_k} x {seeds} seeds, the study used 50; pretrained: {(budget.get('trial') or {}).get('pretrained', (raw.get('trial') or {}).get('pretrained', 'none'))}, the study fine-tuned ImageNet weights)"
            + "; pass --num-samples/--max-epochs (and --seeds) for a full search")
    _apply_budget(raw, budget, data_dir is None)
    if num_samples is not None:
        raw["num_samples"] = num_samples
    if max_epochs is not None:
        _set_epochs(raw, max_epochs)
    if seed is not None:
        raw.setdefault("searcher", {})
        raw["searcher"] = {**_as_mapping(raw["searcher"]), "seed": seed}
        raw.setdefault("trial", {})["seed"] = seed
    effective = parse_space(raw, spec.source)  # validate the overrides too, before Ray starts
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    plan = {
        "space": str(spec.source),
        "name": name or f"{spec.name}-{stamp}",
        "data_dir": str(data_dir) if data_dir is not None else None,
        "data": {"size": 128, "equalize": "hist", "val_fraction": 0.2, "seed": 0, "resplit": False,
                 "duplicate_policy": "drop", **effective.data, **({"resplit": True} if resplit else {})},
        "top_k": top_k,
        "seeds": seeds,
        "retrain_max_epochs": budget.get("retrain_max_epochs"),
        "budget": "smoke" if smoke else ("cpu" if budget else "full"),
        "completed": [],
    }
    return effective, plan, notes


def _as_mapping(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, dict) else {"type": value}


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


def prepare_data(plan: dict[str, Any], *, progress: bool = True) -> Any:
    """The plan's PreparedData (phantoms are generated once into the cache; decoding is cached too)."""
    from cxr_search.data import phantoms
    from cxr_search.data.prepare import prepare

    d = plan["data"]
    data_dir = plan["data_dir"]
    if data_dir is None:
        n = d.get("n_images", 6432)
        data_dir = phantoms.default_dataset(n_images=n, size=128 if d["size"] <= 128 else 256, seed=0)
    return prepare(data_dir, size=d["size"], equalize=d["equalize"], val_fraction=d["val_fraction"],
                   seed=d["seed"], resplit=d.get("resplit", False),
                   duplicate_policy=d.get("duplicate_policy", "drop"), progress=progress)


def environment(ray_resources: dict[str, float] | None = None) -> dict[str, Any]:
    """Versions, device and host facts for `environment.json` (what reproduces this run)."""
    import numpy
    import optuna
    import ray
    import timm
    import torch

    import cxr_search

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cxr_search": cxr_search.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "timm": timm.__version__, "ray": ray.__version__, "optuna": optuna.__version__,
        "numpy": numpy.__version__, "cpu_count": os.cpu_count(), "gpu": gpu,
        "cuda": torch.version.cuda if gpu else None, "ray_resources": ray_resources or {},
        "started": dt.datetime.now().isoformat(timespec="seconds"),
    }


def run_pipeline(
    space: str | Path,
    *,
    data_dir: str | Path | None = None,
    name: str | None = None,
    num_samples: int | None = None,
    max_epochs: int | None = None,
    smoke: bool = False,
    address: str | None = None,
    storage: str | None = None,
    gpus_per_trial: str | None = None,
    seed: int | None = None,
    stages: tuple[str, ...] = STAGES,
    top_k: int | None = None,
    seeds: int | None = None,
    num_cpus: int | None = None,
    resplit: bool = False,
    console: Console | None = None,
) -> Path:
    """Plan, then run every requested stage; returns the experiment folder.

    Args:
        space: search space name (`inception`) or YAML path.
        data_dir: data folder (Kaggle layout, flat class folders or CSV); None: the phantom set.
        name: experiment name (default `<space>-<timestamp>`).
        num_samples, max_epochs: explicit budget (disables the automatic CPU budget).
        smoke: the seconds-long size.
        address: Ray cluster (`auto`, `ray://host:10001`); None: a local Ray.
        storage: experiments root (a path, or `s3://...` for Ray's files on a cluster).
        gpus_per_trial: `auto` or a fraction, overriding the file's resources.gpu.
        seed: searcher and trial seed.
        stages: subset of `search`, `retrain`, `ensemble`.
        top_k, seeds: retrain/ensemble sizes.
        num_cpus: CPUs of the local Ray (None: all).
        resplit: pool the data's train and test and re-split train/val/test by patient.
        console: where to print.
    """
    console = console or Console()
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise CxrError(f"--stages: unknown stage '{bad[0]}'; allowed: {', '.join(STAGES)}.")
    import torch

    gpu = torch.cuda.is_available() or address is not None
    spec, plan, notes = plan_run(space, data_dir=data_dir, name=name, num_samples=num_samples, max_epochs=max_epochs,
                                 smoke=smoke, gpu_available=gpu, seed=seed, top_k=top_k, seeds=seeds,
                                 resplit=resplit)
    if gpus_per_trial is not None:
        spec = spec.replace(gpus_per_trial=_gpu_option(gpus_per_trial))
    plan.update(stages=list(stages), address=address, storage=storage, gpus_per_trial=spec.gpus_per_trial,
                num_cpus=num_cpus)
    exp_dir = _experiment_dir(storage, plan["name"])
    if (exp_dir / PIPELINE_FILE).exists():
        raise CxrError(f"experiment '{exp_dir}' already exists; continue it with `cxr-search resume {exp_dir}` "
                       f"or pick another --name.")
    exp_dir.mkdir(parents=True, exist_ok=True)
    raw = {k: v for k, v in spec.raw.items()}
    raw["resources"] = {"cpu": spec.cpus_per_trial, "gpu": spec.gpus_per_trial}
    (exp_dir / "search_space.yaml").write_text(f"# as run, from {spec.source}\n" + yaml.safe_dump(raw, sort_keys=False))
    _save_plan(exp_dir, plan)
    for note in notes:
        console.print(f"[yellow]note:[/] {note}")
    return _continue(exp_dir, plan, console)


def resume_pipeline(exp_dir: str | Path, *, console: Console | None = None, address: str | None = None) -> Path:
    """Continue an interrupted run: restore the search (keeping the Optuna searcher), then the later stages."""
    console = console or Console()
    exp_dir = Path(exp_dir)
    plan_file = exp_dir / PIPELINE_FILE
    if not plan_file.exists():
        raise CxrError(f"{exp_dir}: no {PIPELINE_FILE}; pass an experiment folder written by `cxr-search run`.")
    plan = json.loads(plan_file.read_text())
    if address is not None:
        plan["address"] = address
    console.print(f"resuming {exp_dir} (done: {', '.join(plan['completed']) or 'nothing yet'})")
    return _continue(exp_dir, plan, console)


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


def _experiment_dir(storage: str | None, name: str) -> Path:
    if storage and "://" in storage:
        # Ray's trial folders go to remote storage; our tables, predictions and journal stay local.
        return paths.experiments_root().resolve() / name
    return (Path(storage) if storage else paths.experiments_root()).resolve() / name


def _save_plan(exp_dir: Path, plan: dict[str, Any]) -> None:
    tmp = exp_dir / f"{PIPELINE_FILE}.tmp"
    tmp.write_text(json.dumps(plan, indent=2))
    tmp.replace(exp_dir / PIPELINE_FILE)


def _continue(exp_dir: Path, plan: dict[str, Any], console: Console) -> Path:
    from cxr_search.search import tune as stage

    spec = parse_space(yaml.safe_load((exp_dir / "search_space.yaml").read_text()), str(exp_dir / "search_space.yaml"))
    t0 = time.perf_counter()
    data = prepare_data(plan)
    (exp_dir / "data_report.json").write_text(json.dumps(data.report, indent=2, default=str))
    stage.init_ray(address=plan.get("address"), num_cpus=plan.get("num_cpus"))
    import ray

    env_file = exp_dir / "environment.json"
    if not env_file.exists():
        env = environment({k: float(v) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")})
        env.update(seeds={"searcher": spec.seed, "trial": spec.trial.get("seed", 0), "split": plan["data"]["seed"]})
        env_file.write_text(json.dumps(env, indent=2))
    resources = stage.TrialResources(spec.cpus_per_trial, spec.gpus_per_trial, stage.cluster_gpu_memory_gib())
    slots = int(ray.cluster_resources().get("CPU", 1) // max(spec.cpus_per_trial, 1e-9))
    if spec.scheduler.kind == "asha" and min(slots, spec.max_concurrent_trials or slots) < 2:
        console.print(f"[yellow]note:[/] one trial slot ({spec.cpus_per_trial:g} CPUs per trial): ASHA can only "
                      f"compare a trial with finished ones; lower resources.cpu to run trials side by side")
    remote = plan.get("storage") if plan.get("storage") and "://" in plan["storage"] else None

    if "search" in plan["stages"] and "search" not in plan["completed"]:
        console.rule(f"search: {spec.name} ({spec.searcher}, {spec.scheduler.kind}, {spec.num_samples} samples)")
        stage.run_stage(
            exp_dir, spec.param_space(), data, metric=spec.metric, mode=spec.mode,
            search_alg=stage.make_searcher(spec, exp_dir), scheduler=stage.make_scheduler(spec),
            num_samples=spec.num_samples, max_concurrent_trials=spec.max_concurrent_trials, resources=resources,
            checkpoint_every=spec.checkpoint_every, max_failures=spec.max_failures, storage=remote,
            reporter=_reporter(spec),
        )
        stage.finalize(exp_dir, data)
        _mark(exp_dir, plan, "search")
    elif not (exp_dir / results.RESULTS_FILE).exists() and results.trial_dirs(exp_dir):
        stage.finalize(exp_dir, data)

    if "retrain" in plan["stages"] and "retrain" not in plan["completed"]:
        from cxr_search.search.retrain import run_retrain

        console.rule(f"retrain: top {plan['top_k']} x {plan['seeds']} seeds")
        run_retrain(exp_dir, data, top_k=plan["top_k"], seeds=plan["seeds"],
                    max_epochs=plan.get("retrain_max_epochs"), resources=resources)
        _mark(exp_dir, plan, "retrain")

    if "ensemble" in plan["stages"] and "ensemble" not in plan["completed"]:
        from cxr_search.ensemble import build_ensemble

        # As in the study, the ensemble votes over the search's top distinct models (at least 3 members);
        # `cxr-search ensemble EXP --from retrain` builds a seed ensemble instead.
        members = max(3, plan["top_k"])
        console.rule(f"ensemble: top {members} search trials")
        build_ensemble(exp_dir, top_k=members, source="search")
        _mark(exp_dir, plan, "ensemble")

    from cxr_search import report

    path = report.write_summary(exp_dir)
    report.print_summary(exp_dir, console)
    console.print(f"summary: {path}")
    console.print(f"[bold]done in {time.perf_counter() - t0:.0f} s.[/] Experiment: {exp_dir}\n"
                  f"  results.parquet, predictions/, optuna.journal (optuna-dashboard {exp_dir / stage.JOURNAL}), "
                  f"trial folders trial_*/" + (", retrain/" if "retrain" in plan["completed"] else "")
                  + (", ensemble/" if "ensemble" in plan["completed"] else ""))
    return exp_dir


def _mark(exp_dir: Path, plan: dict[str, Any], stage_name: str) -> None:
    plan["completed"] = [*plan["completed"], stage_name]
    _save_plan(exp_dir, plan)


def _reporter(spec: SearchSpec) -> Any:
    from ray.tune import CLIReporter

    searched = [p.name for p in spec.params] + (["variant"] if spec.variants else [])
    return CLIReporter(
        metric_columns={"epoch": "epoch", "val_loss": "val_loss", "val_acc": "val_acc",
                        "val_macro_f1": "val_f1", "img_per_s": "img/s"},
        parameter_columns=searched[:6], max_report_frequency=15, sort_by_metric=True,
    )  # metric/mode come from TuneConfig


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return ""
    if isinstance(v, float):
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.4f}"
    return str(v)


def print_status(exp_dir: str | Path, console: Console) -> None:
    """A table of an experiment's trials read from its folder (no Ray; safe while a search is running)."""
    from rich.table import Table

    exp_dir = Path(exp_dir)
    if not exp_dir.is_dir():
        raise CxrError(f"experiment folder '{exp_dir}' not found.")
    plan_file = exp_dir / PIPELINE_FILE
    plan = json.loads(plan_file.read_text()) if plan_file.exists() else {}
    df = results.build(exp_dir)  # fresh from the folder, even if results.parquet is older
    metric, mode = results.stage_objective(exp_dir)
    console.print(f"{exp_dir}: {len(df)} trials; stages done: {', '.join(plan.get('completed', [])) or 'none'}; "
                  f"objective {metric} ({mode})")
    if df.empty:
        return
    counts = df["stop_reason"].replace("", "running").value_counts().to_dict()
    console.print("  " + ", ".join(f"{k}: {v}" for k, v in counts.items()))
    col = f"best_{metric}"
    if col in df:
        df = df.sort_values(col, ascending=(mode == "min"), na_position="last")
    searched = _searched_columns(exp_dir, df)
    table = Table()
    cols = ["trial_id", *searched, "epochs", "stop_reason", col, "best_val_acc", "test_acc", "wall_time_s"]
    cols = [c for c in cols if c in df]
    for c in cols:
        table.add_column(c, justify="left" if c in ("trial_id", *searched) else "right")
    for _, r in df.iterrows():
        table.add_row(*[_fmt(r[c]) if c != "stop_reason" else (r[c] or "running") for c in cols])
    console.print(table)


def _searched_columns(exp_dir: Path, df: Any) -> list[str]:
    spec_file = exp_dir / "search_space.yaml"
    if not spec_file.exists():
        return []
    raw = yaml.safe_load(spec_file.read_text()) or {}
    names = list((raw.get("params") or {}).keys()) + (["variant"] if raw.get("variants") else [])
    return [n for n in names if n in df][:6]
