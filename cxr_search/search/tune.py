"""Ray Tune wiring: the function trainable around `engine.fit`, Optuna + ASHA, one Tune run per launch.

The data set is shipped once to the object store with `tune.with_parameters`; every trial reads the same
uint8 arrays (never decodes images). Trials report validation metrics only; test metrics are computed by
`experiment.finalize` after a stage ends, from each trial's best-validation weights, and never feed the search.

Crash consistency. Ray's own experiment snapshot is written every few seconds and copied to storage in the
background, while the Optuna journal, the trial folders and our event log are written as things happen: after a
kill the snapshot is the oldest of these records, and `Tuner.restore` would trust it (a trial that finished after
the snapshot would be resumed and report to a finished Optuna trial). So this module never restores Ray's
snapshot. Every launch (`run`, `resume`) is a new Tune run over what our own records say is left:
- a trial is named by a stable key (Optuna's trial number, or its index in the planned grid, or config+seed
  for retraining), and its folder `trial_<key>` is its model folder: a later launch's trial with the same key
  continues in the same folder from its resume state (`engine.fit(checkpoint_dir=...)`);
- trials that ended (finished, stopped by ASHA, failed every retry) are never run or reported to again;
- the Optuna journal is reconciled with the folders and the event log before a launch (`reconcile_journal`):
  a cut tail is repaired, trials that ended without the journal hearing of it are told, and trials the journal
  holds as RUNNING are handed out again, with their parameters, to the launch's first trials.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

from cxr_search import experiment, interrupt, storage
from cxr_search.config import TrialConfig
from cxr_search.data.prepare import PreparedData
from cxr_search.errors import CxrError
from cxr_search.experiment import Objective
from cxr_search.space import LABEL_KEYS, ParamSpec, SearchSpec, trial_fields

log = logging.getLogger(__name__)

# GPU memory one training trial's process holds, GiB: measured on an H100 (torch 2.11, engine defaults: bf16,
# channels_last, whole data set resident; 128 px, batch 32 and 64, the larger, CUDA context included, rounded
# up to 0.5). Beyond the context, activations grow with the batch and the pixels: `gpu_peak_gib` scales that
# part by batch / 64 (from 64 up) and (size / 128)^2, which over-counts weights and optimizer state (safe side).
# Bookkeeping only: Ray uses the fraction to decide how many trials share a GPU, it does not enforce it.
GPU_PEAK_GIB: dict[str, float] = {
    "cnn3": 2.0, "alexnet": 1.5, "vgg16": 3.0, "vgg19": 3.5, "resnet34": 2.0,
    "resnet50": 2.5, "inception_v3": 2.5, "xception": 3.5, "densenet121": 2.5,
}
GPU_CONTEXT_GIB = 0.5  # CUDA context and cuDNN/cuBLAS handles: held before the first tensor, whatever the model
TRIAL_GPU_SHARE_MAX = 4  # never pack more than 4 trials on a GPU: throughput gains stop (DESIGN.md: 1.18x at 4)
KEY = "trial_key"  # the config label naming a trial's folder (see the module docstring)
TPE_STARTUP = 10  # TPE's random startup trials (Optuna's default), drawn per trial number here
DRIVER_CPUS = 0.1  # a data-parallel trial's own process waits on its Ray Train run: a slice of a CPU
ADDRESS_TIMEOUT_S = 10.0  # a cluster's GCS port must accept a TCP connection within this, seconds
PENDING_NOTE_S = 180.0  # a trial waiting this long for resources gets a printed reason (PendingWatch), seconds


# ---------------------------------------------------------------- resources


def gpu_peak_gib(backbone: str, batch_size: int = 32, image_size: int = 128) -> float:
    """Estimated peak GPU memory of one trial, GiB (GPU_PEAK_GIB scaled to its batch and image size)."""
    measured = GPU_PEAK_GIB.get(backbone, 8.0)
    grow = max(1.0, batch_size / 64) * (image_size / 128) ** 2
    return GPU_CONTEXT_GIB + (measured - GPU_CONTEXT_GIB) * grow


def gpu_fraction(backbone: str, gpu_memory_gib: float, batch_size: int = 32, image_size: int = 128) -> float:
    """GPU fraction for one trial: its peak memory share, at least 1/TRIAL_GPU_SHARE_MAX, at most 1."""
    share = gpu_peak_gib(backbone, batch_size, image_size) * 1.5 / max(gpu_memory_gib, 1.0)  # 1.5: allocator slack
    return round(min(1.0, max(1.0 / TRIAL_GPU_SHARE_MAX, share)), 3)


class TrialResources:
    """Per-trial resource request (a picklable callable for `tune.with_resources`).

    With `workers` > 1 the trial's own process only drives a Ray Train run (`DRIVER_CPUS`); Train reserves
    `cpus`/`gpus` for each of its workers itself.
    """

    def __init__(self, cpus: float, gpus: str | float, gpu_memory_gib: float = 0.0, workers: int = 1,
                 image_size: int = 128):
        self.cpus, self.gpus, self.gpu_memory_gib, self.workers = cpus, gpus, gpu_memory_gib, workers
        self.image_size = image_size

    def __call__(self, config: dict[str, Any]) -> tune.PlacementGroupFactory:
        if self.workers > 1:
            return tune.PlacementGroupFactory([{"CPU": DRIVER_CPUS}])
        return tune.PlacementGroupFactory([self.worker_bundle(config.get("backbone", TrialConfig.backbone),
                                                              config.get("batch_size", TrialConfig.batch_size))])

    def worker_bundle(self, backbone: str, batch_size: int = TrialConfig.batch_size) -> dict[str, float]:
        """What one training process of a trial holds: CPUs, and GPUs if any."""
        bundle = {"CPU": self.cpus}
        gpus = self.gpus_for(backbone, batch_size)
        if gpus > 0:
            bundle["GPU"] = gpus
        return bundle

    def gpus_for(self, backbone: str, batch_size: int = TrialConfig.batch_size) -> float:
        if self.gpus == "auto":
            return (gpu_fraction(backbone, self.gpu_memory_gib, batch_size, self.image_size)
                    if self.gpu_memory_gib > 0 else 0.0)
        return float(self.gpus)

    @property
    def uses_gpu(self) -> bool:
        return self.gpus_for(TrialConfig.backbone) > 0


def trial_resources(spec: SearchSpec) -> TrialResources:
    return TrialResources(spec.cpus_per_trial, spec.gpus_per_trial, cluster_gpu_memory_gib(), spec.workers_per_trial,
                          int(spec.data.get("size", 128)))


def check_trial_resources(spec: SearchSpec, *, address: str | None) -> list[str]:
    """Refuse, before any trial or file, a plan whose trials this Ray can never run; returns notes to print.

    A trial is one placement-group bundle, so it must fit on one node: a request larger than every node (more
    CPUs than the machine has, a GPU where there is none) would leave every trial PENDING forever. On a cluster
    that may autoscale (`ray up` with workers to add) such a request is allowed and only noted: a new node may
    fit it, and `PendingWatch` says why trials wait.

    Args:
        spec: the effective space (per-trial `resources`; `gpu: auto` resolves per backbone).
        address: the cluster address (None: the local Ray this process started, which never grows).

    Raises:
        CxrError: one line naming the resource, what the largest node has and the fix.
    """
    nodes = [{k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes() if n.get("Alive")]
    largest = {key: max((n.get(key, 0.0) for n in nodes), default=0.0) for key in ("CPU", "GPU")}
    resources = trial_resources(spec)
    where = "this machine's Ray" if address is None else f"the cluster at {address}"
    notes = []
    for backbone, batch_size in sorted(spec.combinations("backbone", "batch_size")):
        want = {"CPU": float(spec.cpus_per_trial), "GPU": resources.gpus_for(backbone, batch_size)}
        if any(all(n.get(k, 0.0) >= v for k, v in want.items()) for n in nodes):
            continue
        if address is not None and _may_autoscale():
            notes.append(f"no node of {where} fits a {backbone} trial ({_fmt(want)}) yet: its trials wait for the "
                         "autoscaler to add one (`ray status` on the head shows it).")
            continue
        if want["GPU"] > 0 and largest["GPU"] == 0:
            raise CxrError(f"each {backbone} trial asks for {want['GPU']:g} GPU (--gpus-per-trial or resources.gpu "
                           f"in {spec.source}) but {where} has no GPU, so no trial could ever start; use "
                           "--gpus-per-trial 0, or gpu: auto (a GPU share only where there is one).")
        short = [k for k in ("CPU", "GPU") if want[k] > largest[k]]
        if not short:  # each fits somewhere, not both on one node
            most = max(n.get("CPU", 0.0) for n in nodes if n.get("GPU", 0.0) >= want["GPU"])
            raise CxrError(f"each {backbone} trial asks for {want['CPU']:g} CPUs and {want['GPU']:g} GPU on one node "
                           f"(resources in {spec.source}) but the nodes of {where} with that GPU share have at most "
                           f"{most:g} CPUs, so no trial could ever start; set resources.cpu to {most:g} or less.")
        key = short[0]
        option = "resources.cpu" if key == "CPU" else "--gpus-per-trial or resources.gpu"
        raise CxrError(f"each {backbone} trial asks for {want[key]:g} {key}s ({option} in {spec.source}) but the "
                       f"largest node of {where} has {largest[key]:g}, so no trial could ever start; ask for "
                       f"{largest[key]:g} or less" + ("." if address else ", or run on a cluster with --address."))
    slots = sum(int(n.get("CPU", 0.0) // max(spec.cpus_per_trial, 1e-9)) for n in nodes)
    if spec.scheduler.kind == "asha" and 0 < min(slots, spec.max_concurrent_trials or slots) < 2 and not notes:
        notes.append(f"one trial at a time ({largest['CPU']:g} CPUs, resources.cpu {spec.cpus_per_trial:g} per "
                     "trial): ASHA can only compare a trial with finished ones; lower resources.cpu to run trials "
                     "side by side.")
    return notes


def _fmt(resources: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in resources.items() if v > 0)


def _may_autoscale() -> bool:
    """Whether the connected cluster may add nodes: its autoscaler config says so, or (as Tune itself guesses)
    it was started by the cluster launcher; when neither can be read, assume it may (never refuse a valid run)."""
    if Path("~/ray_bootstrap_config.yaml").expanduser().exists():  # `ray up` writes it on the head node
        return True
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - a private API (Ray Client has no GCS access): unknown, so may
        return True
    if config is None:  # no autoscaler config reported (Ray's v1 autoscaler, a hand-started cluster): unknown
        return True
    return any(g.max_count == -1 or g.max_count > g.min_count for g in config.node_group_configs)


# ---------------------------------------------------------------- the trainable


def train_trial(config: dict[str, Any], data: PreparedData, stage: str, metric: str, mode: str,
                checkpoint_every: int = 1, checkpoint_every_s: float | None = None,
                faults: tuple = (), resources: TrialResources | None = None, max_failures: int = 2) -> None:
    """Tune function trainable: one `engine.fit` into the trial's folder, reporting every epoch.

    A trial with `resources.workers` > 1 runs as a Ray Train `TorchTrainer` (DistributedDataParallel) of that
    many workers instead (`_fit_data_parallel`): the same engine loop and model folder, reported to Tune from rank 0.

    Args:
        config: Tune's resolved trial config (TrialConfig fields plus labels such as `variant`, `trial_key`).
        data: the prepared arrays, shipped once by `tune.with_parameters`.
        stage: the stage folder; the trial's model folder is `stage/trial_<trial_key>`.
        metric, mode: the objective; every report carries the trial's best value so far as `best_<metric>`.
        checkpoint_every, checkpoint_every_s: how often resume states are written (`engine.fit`).
        faults: test-only fault injection (from `$CXR_SEARCH_FAULTS` in the driver).
        resources: the trial's resources (workers per trial, CPUs and GPUs per worker).
        max_failures: restarts of a data-parallel trial's worker group before the trial fails (then Tune retries).
    """
    from cxr_search import engine

    cfg = TrialConfig.from_dict(trial_fields(config), source="Tune trial config")  # built once
    folder = storage.path(stage) / f"{experiment.TRIAL_PREFIX}{config[KEY]}"
    objective = Objective(metric, mode)
    saved = storage.read_json(folder / engine.CONFIG_FILE) if (folder / engine.CONFIG_FILE).is_file() else None
    if saved is not None and TrialConfig.from_dict(saved, source=str(folder)) != cfg:
        raise CxrError(f"{folder} holds a different configuration than trial {config[KEY]}; move it away.")

    def report(metrics: dict[str, Any], history: list[dict[str, Any]]) -> None:
        best = objective.best(h.get(metric) for h in history)
        tune.report({**metrics, objective.column: best})

    state = engine.read_resume_state(folder, metadata_only=True)
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
        engine.fit(cfg, data, report=report, checkpoint_dir=folder, checkpoint_every=checkpoint_every,
                   checkpoint_every_s=checkpoint_every_s, faults=faults)
    finally:
        _free_gpu_memory()


def _fit_data_parallel(cfg: TrialConfig, data: PreparedData, folder: storage.Location, objective: Objective,
                       resources: TrialResources, max_failures: int, fit_options: dict[str, Any]) -> None:
    """One trial as a Ray Train V2 `TorchTrainer` nested in this Tune function trainable (DESIGN.md, Ray facts).

    Each worker runs `engine.fit(..., data_parallel=True)` on its shard; rank 0 writes the model folder, and
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
    """One Ray Train worker of a data-parallel trial: `engine.fit` on its shard, reporting every epoch."""
    import ray.train
    import ray.train.torch
    import torch

    from cxr_search import engine

    cfg = TrialConfig.from_dict(loop["cfg"], source="data-parallel trial config")
    objective = Objective(*loop["objective"])
    if cfg.device != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(ray.train.torch.get_device())  # this worker's GPU ("cuda" means the current one)

    def report(metrics: dict[str, Any], history: list[dict[str, Any]]) -> None:
        ray.train.report({**metrics, objective.column: objective.best(h.get(objective.metric) for h in history)})

    engine.fit(cfg, ray.get(loop["data"]), report=report, checkpoint_dir=storage.path(loop["folder"]),
               checkpoint_every=loop["checkpoint_every"], checkpoint_every_s=loop["checkpoint_every_s"],
               faults=loop["faults"], data_parallel=True)


def _free_gpu_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- the event log (driver side)


class TrialEventLog(tune.Callback):
    """Records each trial's start, end and errors in the stage's `trials.jsonl` the moment Tune learns of them.

    Trials a stopped run leaves behind (Ctrl-C, SIGTERM) get no event: they did not end, `resume` continues them.
    """

    def __init__(self, stage_dir: storage.Location):
        self.stage_dir = storage.path(stage_dir)

    def _record(self, trial: Any, event: str, **info: Any) -> None:
        experiment.record_trial_event(self.stage_dir, str(trial.config[KEY]), event,
                                      tune_trial_id=trial.trial_id, **info)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._record(trial, "start")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._record(trial, "retry", error=_first_error_line(trial))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        self._record(trial, "complete", epoch=last.get("epoch"), stop_reason=last.get("stop_reason", ""))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._record(trial, "error", error=_first_error_line(trial))


class PendingWatch(tune.Callback):
    """Says why trials wait: when one has been PENDING for `after_s` while no trial runs, or while no node fits it
    (a cluster waiting for its autoscaler), print its request and the free resources; again every `after_s`."""

    def __init__(self, after_s: float = PENDING_NOTE_S, clock: Any = time.monotonic, say: Any = None):
        self.after_s, self.clock, self.say = after_s, clock, say or _print_now
        self._since: dict[str, float] = {}
        self._last = -math.inf

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        now = self.clock()
        pending = [t for t in trials if t.status == "PENDING"]
        self._since = {t.trial_id: self._since.get(t.trial_id, now) for t in pending}
        if not pending or now - self._last < self.after_s:
            return
        oldest = min(pending, key=lambda t: self._since[t.trial_id])
        waited = now - self._since[oldest.trial_id]
        if waited < self.after_s:
            return
        want = {k: float(v) for k, v in oldest.placement_group_factory.required_resources.items() if v}
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        fits = any(all(n.get(k, 0) >= v for k, v in want.items()) for n in nodes)
        running = sum(t.status == "RUNNING" for t in trials)
        if fits and running:
            return  # an ordinary queue: it starts when a running trial ends
        free = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
        why = ("no node has that much: waiting for the autoscaler to add one (`ray status` on the head shows "
               "pending and failed nodes)" if not fits else "no trial is running: nodes are busy with other work "
               "or still starting (`ray status`)")
        self.say(f"note: trial {oldest.config.get(KEY, oldest.trial_id)} has waited {waited / 60:.0f} min for "
                 f"{_fmt(want)}; free now: {_fmt(free) or 'nothing'}; {why}.")
        self._last = now


def _print_now(text: str) -> None:
    print(text, flush=True)


def _first_error_line(trial: Any) -> str:
    path = getattr(trial, "error_file", None) or ""
    try:
        text = storage.path(path).read_text() if path else ""
    except OSError:
        text = ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "trial failed"


# ---------------------------------------------------------------- Optuna


class ReplayingOptunaSearch(OptunaSearch):
    """OptunaSearch that names trials by Optuna's trial number and continues a study across launches.

    - `suggest` first hands out the Optuna trials a previous launch left RUNNING (`pending`), with their own
      parameters, then asks new ones; the config's `trial_key` is the Optuna number (the trial's folder).
    - TPE's first `n_startup` trials are random draws; here trial number n draws from a generator seeded with
      (seed, n) and is enqueued before it is asked, so an interrupted and resumed search, or one whose trials
      finish in another order, starts with exactly the trials of an uninterrupted one. Later trials are TPE's.
    - Steps are the trial's own epochs (`epoch`, not Tune's iteration), so epochs repeated after a retry or in a
      later launch are not reported twice; a trial the journal holds as finished is never reported to or told.
    - A finished trial is told its best validation value (`best_<metric>`, what results.parquet and the ranking
      use), not its last epoch's; a trial ASHA stopped (no `stop_reason` of its own) is told PRUNED.
    """

    def __init__(self, *args: Any, pending: tuple[int, ...] = (), params: tuple[ParamSpec, ...] = (),
                 seed: int = 0, n_startup: int = 0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._pending = list(pending)
        self._params, self._draw_seed, self._n_startup = params, seed, n_startup

    def suggest(self, trial_id: str) -> dict | None:
        import numpy as np
        import optuna
        from optuna.trial import TrialState

        if trial_id not in self._ot_trials and self._pending:
            number = self._pending.pop(0)
            frozen = self._ot_study.get_trials(deepcopy=False)[number]
            self._ot_trials[trial_id] = optuna.Trial(self._ot_study, frozen._trial_id)
        elif trial_id not in self._ot_trials and self._ot_study is not None:
            trials = self._ot_study.get_trials(deepcopy=False)
            number = len(trials)
            waiting = any(t.state == TrialState.WAITING for t in trials)  # enqueued by a launch that died
            if number < self._n_startup and not waiting:
                rng = np.random.default_rng([self._draw_seed, number])
                self._ot_study.enqueue_trial({p.name: p.sample(rng) for p in self._params})
        config = super().suggest(trial_id)
        if config is not None:
            config[KEY] = trial_key(self._ot_trials[trial_id].number)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self._open(trial_id):
            self._report_step(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        from optuna.trial import TrialState

        if not self._open(trial_id):
            self._completed_trials.add(trial_id)
            return
        ot_trial = self._ot_trials[trial_id]
        if error or not result or self.metric not in result:
            state, value = (TrialState.FAIL if error else TrialState.PRUNED), None
        else:
            self._report_step(trial_id, result)  # Tune skips on_trial_result for the result that stops a trial
            finished = bool(result.get("stop_reason"))
            state = TrialState.COMPLETE if finished else TrialState.PRUNED
            value = float(result.get(f"best_{self.metric}", result[self.metric])) if finished else None
        if value is not None and not math.isfinite(value):
            state, value = TrialState.FAIL, None  # a diverged trial: Optuna cannot rank NaN
        self._ot_study.tell(ot_trial, value, state=state)
        self._completed_trials.add(trial_id)

    def _open(self, trial_id: str) -> bool:
        """Whether the trial may still be reported to: known, and not finished in the journal (read fresh)."""
        if trial_id not in self._ot_trials or trial_id in self._completed_trials:
            return False
        ot_trial = self._ot_trials[trial_id]
        return not ot_trial.storage.get_trial(ot_trial._trial_id).state.is_finished()

    def _report_step(self, trial_id: str, result: dict) -> None:
        ot_trial = self._ot_trials[trial_id]
        step = int(result.get("epoch", result["training_iteration"]))
        if step not in ot_trial.storage.get_trial(ot_trial._trial_id).intermediate_values:
            ot_trial.report(float(result[self.metric]), step)


def trial_key(number: int) -> str:
    return f"{number:04d}"


optuna_storage = experiment.journal_storage


def repair_journal(journal: storage.Location) -> bytes:
    """Cut a journal tail a killed driver left mid-append (it would corrupt the next append); a stale lock
    file of the dead driver is removed too; on an object store the parts are compacted into one (nothing is ever
    cut there). Call only when no other process writes the journal."""
    if storage.is_remote(journal):
        from cxr_search.journal import ObjectStoreJournal

        ObjectStoreJournal(journal).compact()
        return b""
    cut = storage.repair_tail(journal)
    if cut:
        storage.atomic_write(journal.with_name(journal.name + ".cut"), lambda tmp: tmp.write_bytes(cut))
        log.warning("%s: removed an incomplete last record (%d bytes, kept in %s.cut)", journal, len(cut), journal.name)
    for lock in (journal.with_name(journal.name + ".lock"),):
        if lock.is_symlink() or lock.exists():
            lock.unlink()
    return cut


@dataclass(frozen=True)
class JournalState:
    ended: int  # trials that ended (COMPLETE, PRUNED, FAIL)
    pending: tuple[int, ...]  # RUNNING trials to hand out again, by number
    total: int  # every trial in the study


def reconcile_journal(stage_dir: storage.Location, journal: storage.Location, study_name: str, objective: Objective,
                      space: dict[str, Any] | None = None) -> JournalState:
    """Bring the Optuna journal and the event log in line with the trial folders before a launch.

    For each trial the journal holds as RUNNING: if its folder finished, it is told COMPLETE with its best value;
    if the event log says the scheduler stopped it, PRUNED; if it failed every retry, FAIL (missing epochs are
    reported first, from the folder's history). Trials still unfinished stay RUNNING and are handed out again.
    Trials the journal ended but the event log never heard of are added to the log. A RUNNING trial whose
    parameters were cut short by the kill (Optuna writes them one record at a time) gets the rest from its
    enqueued values, or from the sampler, before it is handed out (`space`: the Optuna distributions).
    """
    import optuna
    from optuna.trial import TrialState

    if not (journal.is_dir() if storage.is_remote(journal) else journal.is_file()):
        return JournalState(0, (), 0)
    repair_journal(journal)
    study = optuna.load_study(study_name=study_name, storage=optuna_storage(journal))
    events = experiment.trial_events(stage_dir)
    pending = []
    for frozen in study.get_trials(deepcopy=False):
        key = trial_key(frozen.number)
        folder = stage_dir / f"{experiment.TRIAL_PREFIX}{key}"
        event = events.get(key)
        if frozen.state.is_finished():
            if (event is None or event.get("event") not in ("complete", "error")) and folder.is_dir():
                kind = "error" if frozen.state == TrialState.FAIL else "complete"
                experiment.record_trial_event(stage_dir, key, kind, reconciled="from optuna.journal")
            continue
        end = experiment.trial_end(folder, event) if folder.is_dir() else None
        if end is None:
            if space and set(space) - set(frozen.params):
                _complete_params(optuna.Trial(study, frozen._trial_id), space)
            pending.append(frozen.number)
            continue
        history = experiment.read_history(folder)
        trial = optuna.Trial(study, frozen._trial_id)
        if objective.metric in history:
            for epoch, value in zip(history["epoch"], history[objective.metric], strict=True):
                if int(epoch) not in frozen.intermediate_values and math.isfinite(float(value)):
                    trial.report(float(value), int(epoch))
        if end == "finished":
            best = objective.best(history[objective.metric]) if objective.metric in history else float("nan")
            if math.isfinite(best):
                study.tell(trial, best, state=TrialState.COMPLETE)
            else:
                study.tell(trial, None, state=TrialState.FAIL)
        else:
            study.tell(trial, None, state=TrialState.PRUNED if end == "stopped" else TrialState.FAIL)
    trials = study.get_trials(deepcopy=False)
    ended = sum(t.state.is_finished() for t in trials)
    return JournalState(ended, tuple(pending), len(trials))


def _complete_params(trial: Any, space: dict[str, Any]) -> None:
    """Give a trial the parameters it lacks, through Optuna's own suggest API (an enqueued value wins)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    for name, dist in space.items():
        if name in trial.params:
            continue
        if isinstance(dist, CategoricalDistribution):
            trial.suggest_categorical(name, dist.choices)
        elif isinstance(dist, FloatDistribution):
            trial.suggest_float(name, dist.low, dist.high, log=dist.log, step=dist.step)
        elif isinstance(dist, IntDistribution):
            trial.suggest_int(name, dist.low, dist.high, log=dist.log, step=dist.step)


# ---------------------------------------------------------------- planned trials (grid, random, retrain)


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
    events = experiment.trial_events(stage_dir)
    return {t.trial_id for t in experiment.trial_dirs(stage_dir)
            if experiment.trial_end(t.path, events.get(t.trial_id)) is not None}


# ---------------------------------------------------------------- one stage = one Tune run per launch


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
    # freed for sure only when its process ends; benchmarks/gpu_suite.py measures what a reused one would keep)


def run_optuna_stage(stage_dir: storage.Location, spec: SearchSpec, data: PreparedData, options: StageOptions,
                     study_name: str) -> int:
    """Run (or continue) an Optuna search in `stage_dir` until `spec.num_samples` trials have ended.

    Returns:
        The number of trials this launch ran (0 when the stage had already ended).
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its per-trial INFO lines are the console's job
    journal = stage_dir / experiment.JOURNAL_FILE
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
        storage=optuna_storage(journal), pending=state.pending, params=spec.params, seed=spec.seed,
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
    from cxr_search import engine

    stage_dir.mkdir(parents=True, exist_ok=True)
    trainable = tune.with_parameters(
        train_trial, data=data, stage=str(stage_dir), metric=options.objective.metric,
        mode=options.objective.mode, checkpoint_every=options.checkpoint_every,
        checkpoint_every_s=options.checkpoint_every_s, faults=engine.faults_from_env(),
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
    return f"{experiment.TRIAL_PREFIX}{trial.config[KEY]}"


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


# ---------------------------------------------------------------- Ray itself


def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
             quiet: bool = True) -> None:
    """Start a private local Ray or join a cluster (`auto`, `HOST:PORT`, `ray://host:10001`).

    The local Ray listens on 127.0.0.1 only (every port: GCS, raylets, workers, agents; no dashboard) and uses
    Ray's token authentication (on by default for a new local Ray since 2.52; the token is ~/.ray/auth_token).
    An address on 127.0.0.1 joins a Ray whose nodes were started on loopback (`ray start --node-ip-address
    127.0.0.1`, as tests/test_cluster.py does), keeping the driver on loopback too.
    """
    if ray.is_initialized():
        return
    # Our SIGINT/SIGTERM handler asks Tune to stop (SIGUSR1) and remembers which signal it was.
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    # Tune's classic output: silent at verbose 0 (the new one prints a configuration box and paths regardless);
    # search/console.py speaks to people instead
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if address is None or _on_loopback(address):
        _keep_loopback()
    if address:
        check_address(address)
        try:
            ray.init(address=address, log_to_driver=not quiet)
        except ConnectionError as e:
            raise CxrError(f"--address {address}: no Ray cluster answered ({' '.join(str(e).split())[:200]}); "
                           "start one with `ray up cluster.yaml` (or `ray start --head`), or leave --address out "
                           "to run on this machine.") from None
    else:
        # ERROR: Ray's warnings at start-up (e.g. that token authentication is on) are not the user's business
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, dashboard_host="127.0.0.1",
                 log_to_driver=not quiet, configure_logging=True, logging_level=logging.ERROR if quiet else logging.INFO)
    interrupt.reinstall()


def _on_loopback(address: str) -> bool:
    host = address.removeprefix("ray://").rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


def _keep_loopback() -> None:
    """Make Ray keep 127.0.0.1 as this machine's node address, so that every server binds to loopback only.

    Ray 2.60 binds its gRPC servers to 0.0.0.0 unless the node IP is exactly 127.0.0.1, and on Linux it replaces
    127.0.0.1 by the routed IP (`services.resolve_ip_for_localhost`) unless multi-machine clusters are switched
    off, which its `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` does (DESIGN.md, Ray facts). The variable is read when
    Ray is imported, so the already imported constant is set too; the variable reaches the processes Ray starts.
    """
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def check_address(address: str) -> None:
    """Refuse at once a cluster address `ray.init` would fail on only after minutes, or with a traceback: a
    host:port nothing listens on (Ray retries its GCS for minutes), `auto` finding a Ray process that does not
    answer (a stale one from another session), `ray://` without Ray Client installed."""
    import socket

    from ray._private.utils import get_ray_client_dependency_error

    if address.startswith("ray://"):
        if get_ray_client_dependency_error() is not None:
            raise CxrError(f"--address {address}: Ray Client is not installed here (pip install "
                           f"'ray[client]=={ray.__version__}'); or run the command on the cluster's head node with "
                           "--address auto.")
        return
    target = address
    if address == "auto":
        try:  # Ray's own lookup: $RAY_ADDRESS, the latest `ray start`, else any local GCS process it finds
            from ray._private.services import canonicalize_bootstrap_address

            target = canonicalize_bootstrap_address(address) or ""
        except Exception:  # noqa: BLE001 - no cluster found: `init_ray` turns Ray's own error into one line
            return
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return  # another form: Ray resolves it
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=ADDRESS_TIMEOUT_S).close()
    except OSError as e:
        found = f" (found {target})" if target != address else ""
        raise CxrError(f"--address {address}{found}: nothing answers there ({e.strerror or e}); give the head "
                       "node's address as `ray status` prints it (host:6379), stop a stale local Ray with `ray "
                       "stop`, or leave --address out to run on this machine.") from None


def cluster_gpu_memory_gib() -> float:
    """Memory of one GPU of this machine, GiB (0 without a GPU); used for `gpu: auto` bookkeeping."""
    if not ray.is_initialized() or ray.cluster_resources().get("GPU", 0) <= 0:
        return 0.0
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / 2**30
    return 80.0  # a cluster whose driver has no GPU: assume an 80 GiB card


def labels_of(config: dict[str, Any]) -> dict[str, Any]:
    """The label part of a trial config (`variant`, `trial_key`)."""
    return {k: v for k, v in config.items() if k in LABEL_KEYS}
