"""Train one model: `fit`, with early stopping on validation loss and the test metrics of its best weights.

The training loop is visible in `fit`; the model folder it writes is `model_folder`'s format."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cxr_search.config import TrialConfig
from cxr_search.data.balance import class_weights, oversample_indices
from cxr_search.data.prepare import PreparedData
from cxr_search.io import storage
from cxr_search.metrics import VALIDATION_METRICS
from cxr_search.training.compiling import TrainingModel, compile_mode, planned_steps
from cxr_search.training.early_stopping import EarlyStopping
from cxr_search.training.evaluation import Evaluation, evaluate_resident
from cxr_search.training.faults import Fault, armed_faults
from cxr_search.training.model_folder import CheckpointWriter, read_resume_state, restore_state
from cxr_search.training.optim import create_optimizer, create_scheduler
from cxr_search.training.runtime import (
    DeviceSplit,
    Runtime,
    Shard,
    backend_settings,
    model_from_config,
    model_input,
    resolve_device,
    seed_everything,
    synchronize,
)

# on_epoch(metrics of the epoch, the whole history so far), called once per epoch after the epoch is on disk
EpochCallback = Callable[[dict[str, Any], list[dict[str, Any]]], None]


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    rt: Runtime,
    cfg: TrialConfig,
    class_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step; returns (loss, number correct) as device tensors (no host sync).

    Loss is Keras' training loss: mean (class-weighted) cross entropy plus the model's regularization penalty,
    so the same penalty value acts under every optimizer.
    """
    with rt.autocast():
        logits = model(x)
    ce = F.cross_entropy(logits.float(), y, reduction="none")
    if class_weight is not None:
        ce = ce * class_weight[y]  # Keras weights each sample's loss and averages over the batch
    net = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    loss = ce.mean() + net.regularization_penalty(cfg.regularizer, cfg.reg_strength)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), (logits.argmax(1) == y).sum()


@dataclass
class FitResult:
    """Outcome of one training run; test metrics use the best-validation weights."""

    history: list[dict[str, Any]]  # one metrics dict per epoch (the dicts passed to on_epoch)
    best_epoch: int  # 1-based epoch with the lowest val_loss
    best_val: dict[str, float]  # classification_metrics on val at best_epoch, plus "loss"
    test: dict[str, float]  # classification_metrics on test with the best-validation weights
    stop_reason: str  # "early_stopping" or "max_epochs"
    val_probs: np.ndarray  # float32 [N_val, n_classes] at best_epoch
    test_probs: np.ndarray  # float32 [N_test, n_classes]








def fit(
    cfg: TrialConfig,
    data: PreparedData,
    *,
    on_epoch: EpochCallback | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 1,
    checkpoint_every_s: float | None = None,
    faults: Sequence[Fault] = (),
    progress: bool = False,
    data_parallel: bool = False,
) -> FitResult:
    """Train ``cfg.backbone`` on ``data.train``, early-stop on ``data.val``, test once on ``data.test``.

    With a ``checkpoint_dir`` the run is crash-safe and resumable: the folder holds the model folder format
    (`cxr_search.training.model_folder`); if it already holds a run of this config, training continues
    after its last checkpoint (or, if that run finished, nothing is trained again).

    Args:
        cfg: the trial config.
        data: prepared train/val/test arrays.
        on_epoch: called once per epoch, after the epoch is on disk, as ``on_epoch(metrics, history)``.
        checkpoint_dir: the model folder to write (and resume from); None keeps everything in memory.
        checkpoint_every: epochs between resume checkpoints (the last epoch always writes one).
        checkpoint_every_s: also wait this many seconds between resume checkpoints; None = automatic
            (writing costs at most ~10% of the time: 9x the duration of the last write).
        faults: test-only fault injection (`faults_from_env`); never part of a user's config.
        progress: show a rich progress bar (one line per run, updated each epoch).
        data_parallel: one of the processes of a DistributedDataParallel run (torch.distributed initialised by
            the launcher, e.g. Ray Train): this process trains on its shard of the training set (`Shard`),
            gradients are averaged across processes, and only rank 0 writes the model folder; every rank
            evaluates, reports and returns the same figures.

    Returns:
        FitResult with per-epoch history and test metrics on the best-validation weights.
    """
    device = resolve_device(cfg.device)
    folder = storage.path(checkpoint_dir) if checkpoint_dir is not None else None
    shard = Shard.current() if data_parallel else None
    with backend_settings(cfg, device):
        seed_everything(cfg.seed)
        run = _start(cfg, data, device, folder, shard, checkpoint_every, checkpoint_every_s)
        with _progress_bar(progress, cfg) as bar:
            for epoch in range(len(run.history) + 1, cfg.max_epochs + 1):
                if run.stop_reason:
                    break
                fire = armed_faults(faults, cfg, epoch, folder) if run.lead else None
                metrics = _run_epoch(run, cfg, epoch, after_first_batch=fire)
                run.history.append(metrics)
                if run.writer is not None:
                    run.writer.epoch_done(metrics, run.model, run.optimizer, run.scheduler, run.early, run.history,
                                          run.stop_reason)
                if on_epoch is not None:
                    on_epoch(dict(metrics), list(run.history))
                bar.advance(metrics)
        return _finish(cfg, data, run.model, run.rt, run.early, run.history, run.stop_reason)


@dataclass
class _Run:
    """What one training run holds while it trains (`_start` builds it, from scratch or from its resume state)."""

    model: torch.nn.Module  # the network (evaluation and checkpoints use it as it is)
    trains: TrainingModel  # what the training steps call: the model, its DDP wrapper, or either compiled
    rt: Runtime
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    early: EarlyStopping
    writer: CheckpointWriter | None  # None: nothing on disk, or not the process that writes the model folder
    train: DeviceSplit
    val: DeviceSplit
    class_weight: torch.Tensor | None
    shard: Shard | None
    history: list[dict[str, Any]]
    stop_reason: str  # "" while it trains

    @property
    def lead(self) -> bool:
        """The process that writes the model folder (rank 0 of a data-parallel run)."""
        return self.shard is None or self.shard.rank == 0


def _start(cfg: TrialConfig, data: PreparedData, device: torch.device, folder: storage.Location | None,
           shard: Shard | None, checkpoint_every: int, checkpoint_every_s: float | None) -> _Run:
    """Build the model, optimizer and data on the device, and continue the folder's run if it holds one."""
    lead = shard is None or shard.rank == 0
    saved = read_resume_state(folder) if folder is not None else None
    # resuming overwrites every weight, so pretrained weights are loaded only on a fresh start
    build_cfg = cfg.replace(pretrained="none") if saved is not None else cfg
    model = model_from_config(build_cfg, num_classes=len(data.classes))
    model = model.to(device, memory_format=torch.channels_last)
    rt = Runtime.for_model(model, cfg, device)
    optimizer = create_optimizer(model, cfg)
    scheduler = create_scheduler(optimizer, cfg)
    early = EarlyStopping(cfg.patience)
    history: list[dict[str, Any]] = []
    stop_reason = ""
    writer = None
    if folder is not None and lead:
        writer = CheckpointWriter(folder, cfg, len(data.classes), checkpoint_every, checkpoint_every_s,
                                  getattr(data, "preprocessing", None))
    if folder is not None:
        if saved is None:
            if writer is not None:
                writer.start_fresh()
        else:
            history, stop_reason = restore_state(saved, folder, model, optimizer, scheduler, early, tidy=lead)
            if writer is not None:
                writer.resumed(len(history))
    net = model  # what trains: the model, or its DDP wrapper (which averages the gradients)
    if shard is not None:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda"
                                                        else None)  # starts from rank 0's weights
    train = DeviceSplit(data.train, device, shard)
    val = DeviceSplit(data.val, device)
    # data-parallel runs train eagerly: DDP's gradient hooks and CUDA graphs are a separate project
    trains = TrainingModel(net, compile_mode(cfg, device, planned_steps(len(train), cfg)) if shard is None else None)
    class_weight = None
    if cfg.balance == "class_weight":
        weights = class_weights(train.labels_np, len(data.classes))
        class_weight = torch.as_tensor(weights, dtype=torch.float32, device=device)
    return _Run(model, trains, rt, optimizer, scheduler, early, writer, train, val, class_weight, shard, history,
                stop_reason)


def _run_epoch(run: _Run, cfg: TrialConfig, epoch: int, after_first_batch: Callable[[], None] | None) -> dict[str, Any]:
    """Train one epoch, validate, decide whether to stop (`run.stop_reason`); returns the epoch's metrics."""
    lr = run.optimizer.param_groups[0]["lr"]
    t0 = time.perf_counter()
    train_loss, train_acc, n_seen = _train_epoch(run.trains, run.optimizer, run.train, epoch, run.rt, cfg,
                                                 run.class_weight, after_first_batch=after_first_batch)
    train_s = time.perf_counter() - t0
    if run.scheduler is not None:
        run.scheduler.step()
    ev = evaluate_resident(run.model, run.val, run.rt, cfg)
    if run.early.update(epoch, ev, run.model):
        run.stop_reason = "early_stopping"
    elif epoch == cfg.max_epochs:
        run.stop_reason = "max_epochs"
    if run.shard is not None:
        # Ranks evaluate the same weights, but GPU kernels may differ in the last bits: rank 0 decides when to
        # stop, or one process would wait forever for the others.
        run.stop_reason = _from_rank0(run.stop_reason)
    return {
        "epoch": epoch,
        "train_loss": train_loss,
        "train_acc": train_acc,
        **_validation_metrics(ev),
        "epoch_time_s": time.perf_counter() - t0,
        "img_per_s": n_seen / max(train_s, 1e-9),
        "stop_reason": run.stop_reason,
        "lr": lr,
    }


def _validation_metrics(ev: Evaluation) -> dict[str, float]:
    """The epoch's validation figures under the names of `metrics.VALIDATION_METRICS` (val_<metric>)."""
    return {name: ev.loss if name == "val_loss" else ev.metrics[name.removeprefix("val_")]
            for name in VALIDATION_METRICS}


def _train_epoch(
    model: TrainingModel,
    optimizer: torch.optim.Optimizer,
    train: DeviceSplit,
    epoch: int,
    rt: Runtime,
    cfg: TrialConfig,
    class_weight: torch.Tensor | None,
    after_first_batch: Callable[[], None] | None = None,
) -> tuple[float, float, int]:
    """One pass over the (oversampled, shuffled) training set; returns (mean loss, accuracy, images seen).

    Data-parallel (`train.shard`): the statistics are summed over every process."""
    model.eager.train()
    loss_sum = torch.zeros((), device=rt.device)
    correct = torch.zeros((), dtype=torch.long, device=rt.device)
    n_seen = 0
    for idx in _epoch_batches(train, cfg, epoch, rt.device):
        x = model_input(train.images[idx], rt, cfg, augment=True)
        loss, n_correct = model.step(train_step, optimizer, x, train.labels[idx], rt, cfg, class_weight)
        loss_sum += loss * len(idx)
        correct += n_correct
        n_seen += len(idx)
        if after_first_batch is not None:
            after_first_batch()  # test-only fault injection: fails the epoch in its middle
            after_first_batch = None
    if train.shard is not None:
        import torch.distributed as dist

        totals = torch.stack([loss_sum.double(), correct.double(), torch.tensor(float(n_seen), device=rt.device,
                                                                                dtype=torch.float64)])
        dist.all_reduce(totals)
        loss_sum, correct, n_seen = totals[0], totals[1], int(totals[2])
    synchronize(rt.device)
    return float(loss_sum) / max(n_seen, 1), float(correct) / max(n_seen, 1), n_seen


def _from_rank0(value: str) -> str:
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _epoch_batches(train: DeviceSplit, cfg: TrialConfig, epoch: int, device: torch.device) -> Iterator[torch.Tensor]:
    """The epoch's batches as index tensors into `train.images`.

    The order depends only on (seed, epoch), so a resumed run sees the same batches. A data-parallel process takes
    its own images (index % world == rank) from that order, batch_size // world per step, and every process takes
    the same number of steps (the smallest share decides; DDP needs every process in every step).
    """
    rng = np.random.default_rng([cfg.seed, epoch])
    if cfg.balance == "oversample":
        order = oversample_indices(train.labels_np, rng)  # shuffled
    else:
        order = rng.permutation(len(train))
    shard = train.shard
    if shard is None:
        order_t = torch.from_numpy(order).to(device)
        for start in range(0, len(order_t), cfg.batch_size):
            idx = order_t[start : start + cfg.batch_size]
            if len(idx) < 2 and start > 0:
                break  # a trailing batch of one image cannot train BatchNorm
            yield idx
        return
    per_step = max(2, cfg.batch_size // shard.world)  # >= 2: BatchNorm needs two images
    steps = min(int(np.sum(order % shard.world == r)) for r in range(shard.world)) // per_step
    mine = torch.from_numpy(order[order % shard.world == shard.rank] // shard.world).to(device)
    for step in range(max(steps, 1)):
        yield mine[step * per_step : (step + 1) * per_step]


def _finish(
    cfg: TrialConfig,
    data: PreparedData,
    model: torch.nn.Module,
    rt: Runtime,
    early: EarlyStopping,
    history: list[dict[str, Any]],
    stop_reason: str,
) -> FitResult:
    """Load the best-validation weights (as saved) and compute the test metrics once."""
    if early.best_weights is not None:
        model.load_state_dict(early.best_weights)
    test = evaluate_resident(model, DeviceSplit(data.test, rt.device), rt, cfg)
    val_probs = evaluate_resident(model, DeviceSplit(data.val, rt.device), rt, cfg).probs
    best_val = {**early.best_val_metrics, "loss": float(early.best_loss)}
    return FitResult(
        history, early.best_epoch, best_val, test.metrics, stop_reason or "max_epochs", val_probs, test.probs
    )


class _EpochBar:
    """A rich progress bar advanced once per epoch (no-op when progress is off)."""

    def __init__(self, progress: Any | None, task: Any | None):
        self.progress, self.task = progress, task

    def advance(self, m: dict[str, Any]) -> None:
        if self.progress is None:
            return
        text = (
            f"epoch {m['epoch']}  loss {m['train_loss']:.3f}  val_loss {m['val_loss']:.3f}  "
            f"val_acc {m['val_acc']:.3f}  {m['img_per_s']:.0f} img/s"
        )
        self.progress.update(self.task, completed=m["epoch"], description=text)


@contextlib.contextmanager
def _progress_bar(enabled: bool, cfg: TrialConfig) -> Iterator[_EpochBar]:
    if not enabled:
        yield _EpochBar(None, None)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns) as progress:
        yield _EpochBar(progress, progress.add_task(f"training {cfg.backbone}", total=cfg.max_epochs))
