"""Ray Tune wiring: the function trainable around `engine.fit`, Optuna + ASHA, stages, restore and finalize.

The data set is shipped once to the object store with `tune.with_parameters`; every trial reads the same
uint8 arrays (never decodes images). Trials report validation metrics only; test metrics are computed by
`finalize` after a stage ends, from each trial's best-validation weights, and never feed the search.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

from cxr_search.config import TrialConfig
from cxr_search.data.prepare import PreparedData
from cxr_search.search import results
from cxr_search.search.space import SearchSpec, trial_fields

log = logging.getLogger(__name__)

# GPU memory one training trial's process holds, GiB: measured on an H100 (torch 2.11, engine defaults: bf16,
# channels_last, whole data set resident; 128 px, batch 32 and 64, the larger, CUDA context included, rounded
# up to 0.5). Activations grow with pixels: scale by (size / 128)^2 for larger images.
# Bookkeeping only: Ray uses the fraction to decide how many trials share a GPU, it does not enforce it.
GPU_PEAK_GIB: dict[str, float] = {
    "cnn3": 2.0, "alexnet": 1.5, "vgg16": 3.0, "vgg19": 3.5, "resnet34": 2.0,
    "resnet50": 2.5, "inception_v3": 2.5, "xception": 3.5, "densenet121": 2.5,
}
TRIAL_GPU_SHARE_MAX = 4  # never pack more than 4 trials on a GPU: throughput gains stop (DESIGN.md: 1.18x at 4)
JOURNAL = "optuna.journal"


def gpu_fraction(backbone: str, gpu_memory_gib: float) -> float:
    """GPU fraction for one trial of `backbone`: its peak memory share, at least 1/TRIAL_GPU_SHARE_MAX, at most 1."""
    share = GPU_PEAK_GIB.get(backbone, 8.0) * 1.5 / max(gpu_memory_gib, 1.0)  # 1.5: allocator/cuDNN slack
    return round(min(1.0, max(1.0 / TRIAL_GPU_SHARE_MAX, share)), 3)


class TrialResources:
    """Per-trial resource request (a picklable callable for `tune.with_resources`)."""

    def __init__(self, cpus: float, gpus: str | float, gpu_memory_gib: float = 0.0):
        self.cpus, self.gpus, self.gpu_memory_gib = cpus, gpus, gpu_memory_gib

    def __call__(self, config: dict[str, Any]) -> tune.PlacementGroupFactory:
        if self.gpus == "auto":
            backbone = config.get("backbone", TrialConfig.backbone)
            gpus = gpu_fraction(backbone, self.gpu_memory_gib) if self.gpu_memory_gib > 0 else 0.0
        else:
            gpus = float(self.gpus)
        bundle = {"CPU": self.cpus}
        if gpus > 0:
            bundle["GPU"] = gpus
        return tune.PlacementGroupFactory([bundle])


def train_trial(config: dict[str, Any], data: PreparedData, checkpoint_every: int = 1) -> None:
    """Tune function trainable: one `engine.fit`, reporting every epoch, checkpointing every k epochs.

    Args:
        config: Tune's resolved trial config (TrialConfig fields plus labels such as `variant`).
        data: the prepared arrays, shipped once by `tune.with_parameters`.
        checkpoint_every: epochs between checkpoints; the last epoch always writes one.
    """
    from cxr_search import engine

    cfg = TrialConfig.from_dict(trial_fields(config), source="Tune trial config")  # built once

    def report(metrics: dict[str, Any], write_checkpoint) -> None:
        metrics = {k: v for k, v in metrics.items() if not k.startswith("test")}  # test never reaches Tune
        if metrics.get("stop_reason") or int(metrics["epoch"]) % checkpoint_every == 0:
            with tempfile.TemporaryDirectory(prefix="cxr-ckpt-") as d:
                write_checkpoint(Path(d))
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
        else:
            tune.report(metrics)

    checkpoint = tune.get_checkpoint()
    try:
        if checkpoint is None:
            engine.fit(cfg, data, report=report)
        else:
            with checkpoint.as_directory() as d:
                engine.fit(cfg, data, report=report, resume_from=Path(d))
    finally:
        _free_gpu_memory()


def _free_gpu_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class PruneAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that records trials stopped by ASHA as PRUNED (Ray's records them as COMPLETE).

    Ray calls `on_trial_complete` with the last result for both finished and scheduler-stopped trials. The
    trainable's `stop_reason` tells them apart: empty means the trial did not end on its own. A PRUNED trial
    keeps its last value as an intermediate value, which TPE uses. On restore, trials the journal holds as
    RUNNING but the searcher never told (asked after the driver's last snapshot) are marked FAIL.
    """

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        known = trial_id in self._ot_trials and trial_id not in self._completed_trials
        if known and not error and result is not None and self.metric in result:
            self._report_step(trial_id, result)  # Tune skips on_trial_result for the result that stops a trial
            if result.get("stop_reason", "") == "":
                from optuna.trial import TrialState

                self._ot_study.tell(self._ot_trials[trial_id], None, state=TrialState.PRUNED)
                self._completed_trials.add(trial_id)
                return
        super().on_trial_complete(trial_id, result=result, error=error)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._ot_trials and trial_id not in self._completed_trials:
            self._report_step(trial_id, result)

    def _report_step(self, trial_id: str, result: dict) -> None:
        # Steps are the trial's own epochs (not Tune's iterations), so epochs repeated after a retry are not new.
        ot_trial = self._ot_trials[trial_id]
        step = int(result.get("epoch", result["training_iteration"]))
        if step not in ot_trial.storage.get_trial(ot_trial._trial_id).intermediate_values:
            ot_trial.report(float(result[self.metric]), step)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        from optuna.trial import TrialState

        known = {t._trial_id for t in self._ot_trials.values()}
        for frozen in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if frozen._trial_id not in known:
                self._ot_study.tell(frozen.number, None, state=TrialState.FAIL)


def optuna_storage(stage_dir: Path) -> Any:
    """Optuna journal file in the experiment (open it with `optuna-dashboard <exp>/optuna.journal`)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(stage_dir / JOURNAL)))


def make_searcher(spec: SearchSpec, stage_dir: Path) -> Any:
    """The search algorithm a spec names: seeded Optuna TPE (journal in the experiment), random, or grid."""
    if spec.searcher == "optuna":
        import optuna

        return PruneAwareOptunaSearch(
            metric=spec.metric, mode=spec.mode, study_name=stage_dir.name,
            sampler=optuna.samplers.TPESampler(seed=spec.seed), storage=optuna_storage(stage_dir),
        )
    return BasicVariantGenerator(random_state=spec.seed)


def make_scheduler(spec: SearchSpec) -> Any:
    """ASHA on epochs (a trial's own `epoch`, so a retried trial keeps its rung), or FIFO."""
    s = spec.scheduler
    if s.kind == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="epoch", max_t=s.max_t, grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor)


def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
             quiet: bool = True) -> None:
    """Start a local Ray (dashboard off, bound to 127.0.0.1 if on) or join a cluster (`auto`, `ray://host:10001`)."""
    if ray.is_initialized():
        return
    # Save the experiment state every 2 s, not Tune's 10 s, so a killed driver loses little on resume.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if address:
        ray.init(address=address, log_to_driver=not quiet)
    else:
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, dashboard_host="127.0.0.1",
                 log_to_driver=not quiet, configure_logging=True, logging_level=logging.WARNING)


def cluster_gpu_memory_gib() -> float:
    """Memory of one GPU of this machine, GiB (0 without a GPU); used for `gpu: auto` bookkeeping."""
    if ray.cluster_resources().get("GPU", 0) <= 0:
        return 0.0
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / 2**30
    return 80.0  # a cluster whose driver has no GPU: assume an 80 GiB card


def run_stage(
    stage_dir: Path,
    param_space: dict[str, Any],
    data: PreparedData,
    *,
    metric: str = "val_loss",
    mode: str = "min",
    search_alg: Any = None,
    scheduler: Any = None,
    num_samples: int = 1,
    max_concurrent_trials: int | None = None,
    resources: TrialResources | dict[str, float] | None = None,
    checkpoint_every: int = 1,
    max_failures: int = 2,
    storage: str | None = None,
    reporter: Any = None,
    verbose: int = 1,
    reuse_actors: bool | None = None,
) -> tune.ResultGrid:
    """Run one Tune stage (search or retrain) into `stage_dir`, or continue it if it was interrupted.

    Args:
        stage_dir: the stage's experiment folder (`storage/name`); Ray writes its trial folders here.
        param_space: Tune param_space (TrialConfig fields, domains, grid searches, labels).
        data: prepared arrays, put in the object store once.
        metric, mode: validation metric the searcher and scheduler optimise.
        search_alg: a Tune searcher (None: Tune's grid/random variant generator).
        scheduler: a Tune scheduler (None: FIFO).
        num_samples: samples (per grid point).
        max_concurrent_trials: trial slots; ASHA needs >= 2 to compare trials while they run.
        resources: per-trial resources (TrialResources or a dict such as {"cpu": 1}).
        checkpoint_every: epochs between checkpoints.
        max_failures: retries of a crashed trial, each from its last checkpoint.
        storage: a remote `storage_path` (s3://...) for Ray's files; None: `stage_dir.parent`.
        reporter: a Tune CLIReporter for the live table (None: Tune's default output).
        verbose: Tune verbosity (0 silent, 1 status table).
        reuse_actors: keep trial processes between trials (None: only for CPU trials; GPU trials get a
            fresh process each so a stopped trial's GPU memory is really freed).
    """
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    resources = _resources(resources)
    trainable = _trainable(data, resources, checkpoint_every)
    storage_path = storage or str(stage_dir.parent.resolve())
    experiment = f"{storage_path.rstrip('/')}/{stage_dir.name}"
    if reporter is not None:
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # CLIReporter is only honoured by Tune's classic output
    if tune.Tuner.can_restore(experiment):
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=metric, mode=mode, search_alg=search_alg, scheduler=scheduler or FIFOScheduler(),
                num_samples=num_samples, max_concurrent_trials=max_concurrent_trials,
                reuse_actors=reuse_actors if reuse_actors is not None else not trainable_uses_gpu(resources),
                trial_dirname_creator=trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=stage_dir.name, storage_path=storage_path, verbose=verbose, progress_reporter=reporter,
                failure_config=tune.FailureConfig(max_failures=max(1, max_failures)),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            ),
        )
    grid = tuner.fit()
    _write_trial_status(stage_dir, grid)
    return grid


def trial_dirname(trial: Any) -> str:
    """Short trial folder names (`trial_<id>`): the config is in params.json, not in the path."""
    return f"trial_{trial.trial_id}"


def trainable_uses_gpu(resources: TrialResources) -> bool:
    return resources.gpus == "auto" and resources.gpu_memory_gib > 0 or (
        resources.gpus != "auto" and float(resources.gpus) > 0)


def _resources(resources: Any) -> TrialResources:
    if resources is None:
        resources = {"cpu": 1}
    if isinstance(resources, dict):
        resources = TrialResources(resources.get("cpu", 1), resources.get("gpu", 0))
    return resources


def _trainable(data: PreparedData, resources: TrialResources, checkpoint_every: int) -> Any:
    fn = tune.with_parameters(train_trial, data=data, checkpoint_every=checkpoint_every)
    return tune.with_resources(fn, resources)


def _write_trial_status(stage_dir: Path, grid: tune.ResultGrid) -> None:
    """Record each trial's final Tune status (results.py reads it without Ray)."""
    status = {}
    for r in grid:
        trial_id = (r.metrics or {}).get("trial_id") or Path(r.path).name
        status[trial_id] = {"status": "error" if r.error else "terminated", "path": Path(r.path).name,
                            "error": str(r.error).splitlines()[0][:300] if r.error else ""}
    (stage_dir / "trial_status.json").write_text(json.dumps(status, indent=2))


def finalize(stage_dir: Path, data: PreparedData, *, device: str | None = None) -> Any:
    """Predict val and test with every trial's best-validation weights; write predictions and results.parquet.

    For each trial folder the latest checkpoint is loaded with `engine.load_best_model` (best validation
    weights), its val and test probabilities go to `predictions/<trial_id>.npz` and its metrics to
    `predictions/<trial_id>.json`. Test metrics are computed here, after the stage, and never feed a search.
    Trials already finalized from the same checkpoint are skipped, so finalize can be rerun.

    Args:
        stage_dir: a stage folder written by `run_stage`.
        data: the same prepared data the stage trained on.
        device: torch device for prediction (None: CUDA if available, else CPU).

    Returns:
        The tidy per-trial DataFrame (also written to `stage_dir/results.parquet`).
    """
    import numpy as np

    from cxr_search import engine
    from cxr_search.metrics import classification_metrics

    stage_dir = Path(stage_dir)
    out = stage_dir / "predictions"
    out.mkdir(exist_ok=True)
    for trial in results.trial_dirs(stage_dir):
        ckpt = results.latest_checkpoint(trial.path)
        if ckpt is None:
            continue
        done = out / f"{trial.trial_id}.json"
        if done.exists() and json.loads(done.read_text()).get("checkpoint") == ckpt.name:
            continue
        model, cfg = engine.load_best_model(ckpt)
        val_probs = engine.predict_proba(model, data.val.images, cfg=cfg, device=device)
        test_probs = engine.predict_proba(model, data.test.images, cfg=cfg, device=device)
        np.savez_compressed(
            out / f"{trial.trial_id}.npz", val_labels=data.val.labels, val_probs=val_probs,
            test_labels=data.test.labels, test_probs=test_probs, classes=np.array(data.classes),
        )
        metrics = {"checkpoint": ckpt.name,
                   "val": _jsonable(classification_metrics(data.val.labels, val_probs)),
                   "test": _jsonable(classification_metrics(data.test.labels, test_probs))}
        done.write_text(json.dumps(metrics, indent=2))
        del model
        _free_gpu_memory()
    df = results.build(stage_dir)
    results.write(df, stage_dir)
    return df


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (float(v) if isinstance(v, (int, float)) or hasattr(v, "item") else v) for k, v in d.items()}
