"""The Tune function trainable: one `training.loop.fit` into the trial's model folder, reporting every epoch (or a
Ray Train data-parallel run of it).

The data set is shipped once to the object store with `tune.with_parameters`; every trial reads the same uint8
arrays (never decodes images). Trials report validation metrics only; test metrics are computed by
`experiment.results.finalize` after a stage ends, from each trial's best-validation weights."""

from __future__ import annotations

from typing import Any

import ray
from ray import tune

from cxr_search.config import TrialConfig
from cxr_search.data.prepare import PreparedData
from cxr_search.errors import CxrError
from cxr_search.experiment.plan import Objective
from cxr_search.io import storage
from cxr_search.io.layout import TRIAL_PREFIX
from cxr_search.space import trial_fields
from cxr_search.tuning.resources import TrialResources

KEY = "trial_key"  # the config label naming a trial's folder (see the module docstring)


def train_trial(config: dict[str, Any], data: PreparedData, stage: str, metric: str, mode: str,
                checkpoint_every: int = 1, checkpoint_every_s: float | None = None,
                faults: tuple = (), resources: TrialResources | None = None, max_failures: int = 2) -> None:
    """Tune function trainable: one `training.loop.fit` into the trial's folder, reporting every epoch.

    A trial with `resources.workers` > 1 runs as a Ray Train `TorchTrainer` (DistributedDataParallel) of that
    many workers instead (`_fit_data_parallel`): the same training loop and model folder, reported to Tune from rank 0.

    Args:
        config: Tune's resolved trial config (TrialConfig fields plus labels such as `variant`, `trial_key`).
        data: the prepared arrays, shipped once by `tune.with_parameters`.
        stage: the stage folder; the trial's model folder is `stage/trial_<trial_key>`.
        metric, mode: the objective; every report carries the trial's best value so far as `best_<metric>`.
        checkpoint_every, checkpoint_every_s: how often resume states are written (`training.loop.fit`).
        faults: test-only fault injection (from `$CXR_SEARCH_FAULTS` in the driver).
        resources: the trial's resources (workers per trial, CPUs and GPUs per worker).
        max_failures: restarts of a data-parallel trial's worker group before the trial fails (then Tune retries).
    """
    from cxr_search.training.loop import fit
    from cxr_search.training.model_folder import CONFIG_FILE, read_resume_state

    cfg = TrialConfig.from_dict(trial_fields(config), source="Tune trial config")  # built once
    folder = storage.path(stage) / f"{TRIAL_PREFIX}{config[KEY]}"
    objective = Objective(metric, mode)
    saved = storage.read_json(folder / CONFIG_FILE) if (folder / CONFIG_FILE).is_file() else None
    if saved is not None and TrialConfig.from_dict(saved, source=str(folder)) != cfg:
        raise CxrError(f"{folder} holds a different configuration than trial {config[KEY]}; move it away.")

    def report(metrics: dict[str, Any], history: list[dict[str, Any]]) -> None:
        best = objective.best(h.get(metric) for h in history)
        tune.report({**metrics, objective.column: best})

    state = read_resume_state(folder, metadata_only=True)
    if state is not None and state["finished"] and state["history"]:
        # Ended in an earlier attempt that died before Tune heard of it: tell Tune its last epoch, train nothing.
        report(dict(state["history"][-1]), list(state["history"]))
        return
    if resources is not None and resources.workers > 1:
        _fit_data_parallel(cfg, data, folder, objective, resources, max_failures,
                           {"checkpoint_every": checkpoint_every, "checkpoint_every_s": checkpoint_every_s,
                            "faults": faults})
        return
    try:
        fit(cfg, data, on_epoch=report, checkpoint_dir=folder, checkpoint_every=checkpoint_every,
                   checkpoint_every_s=checkpoint_every_s, faults=faults)
    finally:
        _free_gpu_memory()


def _fit_data_parallel(cfg: TrialConfig, data: PreparedData, folder: storage.Location, objective: Objective,
                       resources: TrialResources, max_failures: int, fit_options: dict[str, Any]) -> None:
    """One trial as a Ray Train V2 `TorchTrainer` nested in this Tune function trainable (DESIGN.md, Ray facts).

    Each worker runs `training.loop.fit(..., data_parallel=True)` on its shard; rank 0 writes the model folder, and
    `TuneReportCallback` passes rank 0's reports to Tune, so ASHA and Optuna see the trial as any other. A worker
    that dies takes the group down; Train restarts it (`max_failures`) and every worker resumes from the model
    folder, as a retried single-process trial does. Train keeps no checkpoint of its own (the folder is the
    checkpoint); its run records go to `<trial folder>/ray_train`.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    bundle = resources.worker_bundle(cfg.backbone, cfg.batch_size)
    trainer = TorchTrainer(
        _data_parallel_worker,
        train_loop_config={"cfg": cfg.to_dict(), "data": ray.put(data), "folder": str(folder),
                           "objective": (objective.metric, objective.mode), **fit_options},
        scaling_config=ScalingConfig(num_workers=resources.workers, use_gpu="GPU" in bundle,
                                     resources_per_worker=bundle),
        run_config=RunConfig(name="ray_train", storage_path=str(folder), callbacks=[TuneReportCallback()],
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    trainer.fit()


def _data_parallel_worker(loop: dict[str, Any]) -> None:
    """One Ray Train worker of a data-parallel trial: `training.loop.fit` on its shard, reporting every epoch."""
    import ray.train
    import ray.train.torch
    import torch

    from cxr_search.training.loop import fit

    cfg = TrialConfig.from_dict(loop["cfg"], source="data-parallel trial config")
    objective = Objective(*loop["objective"])
    if cfg.device != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(ray.train.torch.get_device())  # this worker's GPU ("cuda" means the current one)

    def report(metrics: dict[str, Any], history: list[dict[str, Any]]) -> None:
        ray.train.report({**metrics, objective.column: objective.best(h.get(objective.metric) for h in history)})

    fit(cfg, ray.get(loop["data"]), on_epoch=report, checkpoint_dir=storage.path(loop["folder"]),
               checkpoint_every=loop["checkpoint_every"], checkpoint_every_s=loop["checkpoint_every_s"],
               faults=loop["faults"], data_parallel=True)


def _free_gpu_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
