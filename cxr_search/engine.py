"""Train one model on prepared arrays: fit, evaluate, checkpoints, predict. Plain PyTorch, no Ray.

The training loop is visible in ``fit``. Data path: each split's uint8 images go to the trial's device once;
a batch is an index slice, converted to float, augmented as one batched affine warp, normalised and (for
3-channel models) replicated, all on the device. Model and batches are channels_last (on a 2-core CPU it made
cnn3 1.5x faster, on a GPU ResNet34 1.7x). The model runs in bf16 autocast on a GPU (with cuDNN autotuning) and
on a CPU with native bf16 (`TrialConfig.precision` "auto"; 1.3-2x per training step on the 2-core dev VM), else
in float32.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import re
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cxr_search import paths, storage
from cxr_search.config import TrialConfig
from cxr_search.data.augment import augment_batch
from cxr_search.data.balance import class_weights, oversample_indices
from cxr_search.data.prepare import PreparedData, SplitArrays
from cxr_search.data.preprocess import write_record
from cxr_search.errors import CxrError
from cxr_search.metrics import VALIDATION_METRICS

# Fixed input normalisation: histogram-equalised pixels are near uniform on [0, 1] (mean 0.5, std 1/sqrt(12)).
log = logging.getLogger(__name__)

PIXEL_MEAN = 0.5
PIXEL_STD = 0.289

# report(metrics of the epoch, the whole history so far), called once per epoch after the epoch is on disk
ReportFn = Callable[[dict[str, Any], list[dict[str, Any]]], None]


# ---------------------------------------------------------------- optimizers: described as data, one factory


@dataclass(frozen=True)
class OptimizerSpec:
    """How one optimizer is built from a TrialConfig (timm style: data, not an if-chain)."""

    cls: type[torch.optim.Optimizer]
    fixed: dict[str, Any] = field(default_factory=dict)  # constructor arguments that never vary per trial
    takes_momentum: bool = False  # whether cfg.momentum applies


# Keras' defaults where they differ from torch's (the study used Keras): RMSprop rho 0.9, epsilon 1e-7.
OPTIMIZER_SPECS: dict[str, OptimizerSpec] = {
    "sgd": OptimizerSpec(torch.optim.SGD, takes_momentum=True),
    "rmsprop": OptimizerSpec(torch.optim.RMSprop, {"alpha": 0.9, "eps": 1e-7}),
    "adam": OptimizerSpec(torch.optim.Adam, {"eps": 1e-7}),
    "adamw": OptimizerSpec(torch.optim.AdamW, {"eps": 1e-7}),
}


def optimizer_kwargs(cfg: TrialConfig) -> dict[str, Any]:
    """Constructor arguments of ``cfg.optimizer`` taken from the flat trial config."""
    spec = OPTIMIZER_SPECS[cfg.optimizer]
    kwargs = {"lr": cfg.lr, "weight_decay": cfg.weight_decay, **spec.fixed}
    if spec.takes_momentum:
        kwargs["momentum"] = cfg.momentum
    return kwargs


def create_optimizer(model: torch.nn.Module, cfg: TrialConfig) -> torch.optim.Optimizer:
    """Build ``cfg.optimizer`` over the model's trainable (not frozen) parameters.

    Args:
        model: the network; parameters with ``requires_grad=False`` are left out.
        cfg: trial config (optimizer, lr, momentum, weight_decay).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    return OPTIMIZER_SPECS[cfg.optimizer].cls(params, **optimizer_kwargs(cfg))


def create_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrialConfig
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Per-epoch schedule: None for 'constant'; for 'cosine', annealing to 0 over max_epochs."""
    if cfg.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.max_epochs)
    return None


# ---------------------------------------------------------------- device, model and data path


def resolve_device(name: str) -> torch.device:
    """'auto' -> the GPU if one is visible, else the CPU; 'cuda' without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CxrError("device 'cuda' was requested but no CUDA GPU is visible; use device 'auto' or 'cpu'.")
    return torch.device(name)


def model_from_config(cfg: TrialConfig, num_classes: int = 3) -> torch.nn.Module:
    """The network a trial config describes (``models.create_model`` with the config's fields)."""
    from cxr_search.models import create_model

    return create_model(
        cfg.backbone,
        num_classes=num_classes,
        in_chans=cfg.in_chans,
        pretrained=cfg.pretrained,
        freeze_fraction=cfg.freeze_fraction,
        head=cfg.head,
        dense_units=cfg.dense_units,
        dropout=cfg.dropout,
    )


@dataclass(frozen=True)
class Runtime:
    """Where and how a model runs: device, autocast precision and memory format."""

    device: torch.device
    min_input_size: int = 0  # images smaller than this (pixels) are upsampled on the device
    in_chans: int = 1
    bf16: bool = False  # run the model under bf16 autocast

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager:
        # bf16 needs no loss scaling; the loss is computed in float32 from the logits
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    @classmethod
    def for_model(cls, model: torch.nn.Module, cfg: TrialConfig, device: torch.device) -> Runtime:
        return cls(device, int(getattr(model, "min_input_size", 0) or 0), cfg.in_chans, use_bf16(cfg.precision, device))


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether a config's `precision` means bf16 autocast on this device (`auto`: where it is native and fast)."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return True
    # CPU bf16 without native instructions is emulated and several times slower than float32
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


@dataclass(frozen=True)
class Shard:
    """This process's part of a data-parallel run: it holds training images `rank::world` of the split."""

    rank: int
    world: int

    @classmethod
    def current(cls) -> Shard | None:
        """The shard of this process in the initialised torch.distributed group (None outside one)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return cls(dist.get_rank(), dist.get_world_size())
        return None


class DeviceSplit:
    """One split resident on the device as uint8 [N, 1, H, W] (copied once); batches are index slices.

    With a `shard`, only the shard's images are resident; `labels_np` keeps the whole split's labels, so every
    process draws the same epoch order (`_epoch_batches`)."""

    def __init__(self, split: SplitArrays, device: torch.device, shard: Shard | None = None):
        part = slice(shard.rank, None, shard.world) if shard is not None else slice(None)
        self.shard = shard
        self.images = torch.from_numpy(np.ascontiguousarray(split.images[part])).to(device).unsqueeze(1)
        self.labels = torch.from_numpy(np.asarray(split.labels[part], dtype=np.int64)).to(device)
        self.labels_np = np.asarray(split.labels, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.labels_np.shape[0])


def model_input(images_u8: torch.Tensor, rt: Runtime, cfg: TrialConfig, *, augment: bool) -> torch.Tensor:
    """uint8 [B, 1, H, W] on the device -> the float model input [B, in_chans, S, S].

    Args:
        images_u8: a batch of grayscale images already on the device.
        rt: runtime (device, minimum input size, channels).
        cfg: trial config (augmentation magnitudes).
        augment: apply the random rotation/shear/zoom (training batches only).
    """
    x = images_u8.float().div_(255.0)
    if augment and cfg.augment and (cfg.rotation_deg or cfg.shear_deg or cfg.zoom):
        x = augment_batch(x, rotation_deg=cfg.rotation_deg, shear_deg=cfg.shear_deg, zoom=cfg.zoom)
    if min(x.shape[-2:]) < rt.min_input_size:  # e.g. InceptionV3 needs >= 75 px; smoke runs use less
        x = F.interpolate(
            x, size=(rt.min_input_size, rt.min_input_size), mode="bilinear", align_corners=False
        )
    x = (x - PIXEL_MEAN) / PIXEL_STD
    if rt.in_chans == 3:
        x = x.expand(-1, 3, -1, -1)  # gray replicated to RGB for ImageNet-shaped stems
    return x.contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------- launch overhead (torch.compile, CUDA graphs)

# At the study's batch 32 a GPU training step is bound by kernel launches, not arithmetic (every backbone ran
# 0.8-1.6x the direct port there, 5.6-8.4x at batch 256: DESIGN.md). CUDA graphs (torch.compile's
# "reduce-overhead") replay a step's kernels as one launch, but compiling costs about a minute cold and seconds
# from the cache (Inductor's cache is shared by every trial process of a machine, `compile_cache_dir`).
# `compile: auto` compiles only where that is won back. On the 2-core dev VM a cold compile took 65-185 s
# (cnn3, resnet34; benchmarks/RESULTS.md), longer than a whole trial of the CPU budget, so a CPU never compiles on
# auto. On a GPU the two thresholds are an estimate that `benchmarks/gpu_suite.py` checks (its compile part).
COMPILE_MAX_BATCH = 64  # larger batches keep the GPU busy on their own: nothing left to win
# InceptionV3 at batch 32 on an H100 took 38 ms per step, all of it the launch-bound step (RESULTS.md): if CUDA
# graphs save ~30 ms of that, a ~60 s cold compile is back after 2,000 steps (about 12 epochs of the study's data)
COMPILE_MIN_STEPS = 2000
COMPILE_BACKEND = "inductor"  # tests use "aot_eager": the same graph capture without minutes of C++ compiling


def compile_mode(cfg: TrialConfig, device: torch.device, planned_steps: int) -> str | None:
    """The torch.compile mode a run trains under (None: eager), from `cfg.compile`.

    Args:
        cfg: the trial config (`compile`: auto | on | off; its batch size).
        device: where it trains.
        planned_steps: training steps of the whole run if it is not stopped early.
    """
    if cfg.compile == "never":
        return None
    if cfg.compile == "auto" and (device.type != "cuda" or cfg.batch_size > COMPILE_MAX_BATCH
                                  or planned_steps < COMPILE_MIN_STEPS):
        return None
    return "reduce-overhead" if device.type == "cuda" else "default"  # reduce-overhead = Inductor + CUDA graphs


def compile_cache_dir() -> Path:
    """Inductor's compile cache for every trial process of this machine (`$TORCHINDUCTOR_CACHE_DIR` if set)."""
    return Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or paths.cache_root() / "torch_compile")


class TrainingModel:
    """The model as the training steps call it: compiled when `compile_mode` says so, else the model itself.

    A model that fails to compile (an operator Inductor cannot lower, a missing compiler) trains eagerly: the
    first step is retried without compiling and the reason is logged once. Speed is optional, the trial is not.
    Evaluation and checkpoints always use the eager model (the same parameters): large evaluation batches are not
    launch-bound, and its state_dict keys stay those of the model.
    """

    def __init__(self, model: torch.nn.Module, mode: str | None):
        self.eager = model
        self.mode = mode
        self.compiled: torch.nn.Module | None = None
        self.proven = False  # a compiled step has run forward and backward
        if mode is not None:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache_dir())  # read by Inductor when it compiles
            options: dict[str, Any] = {"mode": mode} if COMPILE_BACKEND == "inductor" else {}
            self.compiled = torch.compile(model, backend=COMPILE_BACKEND, dynamic=False, **options)

    def step(self, step_fn: Callable[..., Any], *args: Any) -> Any:
        """`step_fn(model, *args)`: one training step on the compiled model, or on the eager one."""
        if self.compiled is None:
            return step_fn(self.eager, *args)
        if self.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # a new step: the last one's graph outputs may be reused
        if self.proven:
            return step_fn(self.compiled, *args)
        try:
            out = step_fn(self.compiled, *args)
        except Exception as e:  # noqa: BLE001 - any compile failure: train on without it (logged)
            log.warning("torch.compile failed (%s); this run trains without it (compile: never skips the attempt)",
                        " ".join(str(e).split())[:300])
            self.compiled = None
            return step_fn(self.eager, *args)
        self.proven = True
        return out


def planned_steps(n_train_images: int, cfg: TrialConfig) -> int:
    """Training steps of a run that is never stopped early (the oversampled epoch is estimated as 1.5x)."""
    per_epoch = n_train_images * (1.5 if cfg.balance == "oversample" else 1.0)
    return cfg.max_epochs * math.ceil(per_epoch / cfg.batch_size)


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


@torch.inference_mode()
def _logits(model: torch.nn.Module, images_u8: torch.Tensor, rt: Runtime, cfg: TrialConfig) -> torch.Tensor:
    """Eval-mode float32 logits of resident uint8 images, in chunks of cfg.eval_batch_size."""
    model.eval()
    out = []
    for start in range(0, images_u8.shape[0], cfg.eval_batch_size):
        x = model_input(images_u8[start : start + cfg.eval_batch_size], rt, cfg, augment=False)
        with rt.autocast():
            out.append(model(x).float())
    return torch.cat(out) if out else torch.empty(0, 3, device=rt.device)


@dataclass(frozen=True)
class Evaluation:
    """Loss (cross entropy + regularization penalty, as Keras reports val_loss), probabilities and metrics."""

    loss: float
    probs: np.ndarray  # float32 [N, n_classes]
    metrics: dict[str, float]


def _evaluate_resident(
    model: torch.nn.Module, split: DeviceSplit, rt: Runtime, cfg: TrialConfig
) -> Evaluation:
    from cxr_search.metrics import classification_metrics

    logits = _logits(model, split.images, rt, cfg)
    with torch.inference_mode():
        penalty = model.regularization_penalty(cfg.regularizer, cfg.reg_strength)
        loss = float(F.cross_entropy(logits, split.labels) + penalty)
        # metrics on float64 probabilities: float32 rows miss sum == 1 by ~1e-7, which scikit-learn warns about
        probs = torch.softmax(logits.double(), dim=1).cpu().numpy()
    return Evaluation(loss, probs.astype(np.float32), _plain(classification_metrics(split.labels_np, probs)))


def evaluate(
    model: torch.nn.Module, split: SplitArrays, *, cfg: TrialConfig, device: str | None = None
) -> Evaluation:
    """Evaluate a model on one split in eval mode (no augmentation).

    Args:
        model: network returned by ``models.create_model`` (moved to ``device``).
        split: images and labels.
        cfg: the model's trial config (input channels, regularizer, eval batch size).
        device: 'cpu', 'cuda' or 'auto'; ``cfg.device`` when None.
    """
    dev = resolve_device(device or cfg.device)
    model.to(dev, memory_format=torch.channels_last)
    return _evaluate_resident(model, DeviceSplit(split, dev), Runtime.for_model(model, cfg, dev), cfg)


def predict_proba(
    model: torch.nn.Module,
    images_uint8: np.ndarray,
    *,
    cfg: TrialConfig,
    batch_size: int | None = None,
    device: str | None = None,
) -> np.ndarray:
    """Class probabilities for preprocessed images (ensembles, ``cxr-search predict``).

    Args:
        model: network in the config's shape (e.g. from ``load_best_model``).
        images_uint8: uint8 [N, H, W], preprocessed like the training data (same size and equalisation).
        cfg: the model's trial config.
        batch_size: images per forward pass; ``cfg.eval_batch_size`` when None.
        device: 'cpu', 'cuda' or 'auto'; ``cfg.device`` when None.

    Returns:
        float32 [N, n_classes], rows summing to 1, columns in CLASSES order.
    """
    if batch_size is not None:
        cfg = cfg.replace(eval_batch_size=batch_size)
    dev = resolve_device(device or cfg.device)
    model.to(dev, memory_format=torch.channels_last)
    images = torch.from_numpy(np.ascontiguousarray(images_uint8)).to(dev).unsqueeze(1)
    logits = _logits(model, images, Runtime.for_model(model, cfg, dev), cfg)
    return torch.softmax(logits, dim=1).cpu().numpy().astype(np.float32)


# ---------------------------------------------------------------- fit


@dataclass
class FitResult:
    """Outcome of one training run; test metrics use the best-validation weights."""

    history: list[dict[str, Any]]  # one metrics dict per epoch (the dicts passed to report)
    best_epoch: int  # 1-based epoch with the lowest val_loss
    best_val: dict[str, float]  # classification_metrics on val at best_epoch, plus "loss"
    test: dict[str, float]  # classification_metrics on test with the best-validation weights
    stop_reason: str  # "early_stopping" or "max_epochs"
    val_probs: np.ndarray  # float32 [N_val, n_classes] at best_epoch
    test_probs: np.ndarray  # float32 [N_test, n_classes]


@dataclass
class _EarlyStopping:
    """Keras EarlyStopping on val_loss (min_delta 0), also keeping the best weights (as they are saved)."""

    patience: int
    best_loss: float = math.inf
    best_epoch: int = 0
    wait: int = 0  # epochs since the last improvement
    best_weights: dict[str, torch.Tensor] | None = None  # on the CPU
    best_val_metrics: dict[str, float] = field(default_factory=dict)

    def update(self, epoch: int, val: Evaluation, model: torch.nn.Module) -> bool:
        """Record one epoch's validation; True when training should stop."""
        if val.loss < self.best_loss:
            self.best_loss, self.best_epoch, self.wait = val.loss, epoch, 0
            self.best_weights = {k: _storable(v) for k, v in model.state_dict().items()}
            self.best_val_metrics = dict(val.metrics)
            return False
        self.wait += 1
        return self.wait >= self.patience

    def scalars(self) -> dict[str, Any]:  # noqa: D102
        """Everything but the weights (they live in their own file, see the checkpoint format)."""
        keys = ("best_loss", "best_epoch", "wait", "best_val_metrics")
        return {k: getattr(self, k) for k in keys}


def _storable(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy of a weight as it is kept and saved: float32 as float16 where it fits, which halves every
    best-weights file (InceptionV3: 87 -> 44 MB) and moves a probability by less than ~1e-3. A tensor with
    values beyond float16's range (a BatchNorm running variance early in training can pass 65504) stays float32.
    The test and validation figures of a run are computed with these weights, so every number describes the
    model that is saved."""
    out = tensor.detach().to("cpu", copy=True)
    if out.dtype == torch.float32 and out.numel() and bool(torch.isfinite(out).all()) \
            and float(out.abs().max()) < _HALF_MAX:
        return out.half()
    return out


_HALF_MAX = 60000.0  # float16's largest finite value is 65504


def fit(
    cfg: TrialConfig,
    data: PreparedData,
    *,
    report: ReportFn | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 1,
    checkpoint_every_s: float | None = None,
    faults: Sequence[Fault] = (),
    progress: bool = False,
    data_parallel: bool = False,
) -> FitResult:
    """Train ``cfg.backbone`` on ``data.train``, early-stop on ``data.val``, test once on ``data.test``.

    With a ``checkpoint_dir`` the run is crash-safe and resumable: the folder holds the model folder format
    (module docstring of the checkpoint section); if it already holds a run of this config, training continues
    after its last checkpoint (or, if that run finished, nothing is trained again).

    Args:
        cfg: the trial config.
        data: prepared train/val/test arrays.
        report: called once per epoch, after the epoch is on disk, as ``report(metrics, history)``.
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
    lead = shard is None or shard.rank == 0  # the process that writes the model folder
    with _backend_settings(cfg, device):
        _seed_everything(cfg.seed)
        saved = read_resume_state(folder) if folder is not None else None
        # resuming overwrites every weight, so pretrained weights are loaded only on a fresh start
        build_cfg = cfg.replace(pretrained="none") if saved is not None else cfg
        model = model_from_config(build_cfg, num_classes=len(data.classes))
        model = model.to(device, memory_format=torch.channels_last)
        rt = Runtime.for_model(model, cfg, device)
        optimizer = create_optimizer(model, cfg)
        scheduler = create_scheduler(optimizer, cfg)
        early = _EarlyStopping(cfg.patience)
        history: list[dict[str, Any]] = []
        stop_reason = ""
        writer = None
        if folder is not None and lead:
            writer = _CheckpointWriter(folder, cfg, len(data.classes), checkpoint_every, checkpoint_every_s,
                                       getattr(data, "preprocessing", None))
        if folder is not None:
            if saved is None:
                if writer is not None:
                    writer.start_fresh()
            else:
                history, stop_reason = _restore(saved, folder, model, optimizer, scheduler, early, tidy=lead)
                if writer is not None:
                    writer.resumed(len(history))
        net = model  # what trains: the model, or its DDP wrapper (which averages the gradients)
        if shard is not None:
            net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda"
                                                            else None)  # starts from rank 0's weights

        train = DeviceSplit(data.train, device, shard)
        val = DeviceSplit(data.val, device)
        # data-parallel runs train eagerly: DDP's gradient hooks and CUDA graphs are a separate project
        trains = TrainingModel(net, compile_mode(cfg, device, planned_steps(len(train), cfg)) if shard is None
                                else None)
        class_weight = None
        if cfg.balance == "class_weight":
            weights = class_weights(train.labels_np, len(data.classes))
            class_weight = torch.as_tensor(weights, dtype=torch.float32, device=device)

        with _progress_bar(progress, cfg) as bar:
            for epoch in range(len(history) + 1, cfg.max_epochs + 1):
                if stop_reason:
                    break
                lr = optimizer.param_groups[0]["lr"]
                t0 = time.perf_counter()
                fire = _armed_faults(faults, cfg, epoch, folder) if lead else None
                train_loss, train_acc, n_seen = _train_epoch(
                    trains, optimizer, train, epoch, rt, cfg, class_weight, after_first_batch=fire
                )
                train_s = time.perf_counter() - t0
                if scheduler is not None:
                    scheduler.step()
                ev = _evaluate_resident(model, val, rt, cfg)
                if early.update(epoch, ev, model):
                    stop_reason = "early_stopping"
                elif epoch == cfg.max_epochs:
                    stop_reason = "max_epochs"
                if shard is not None:
                    # Ranks evaluate the same weights, but GPU kernels may differ in the last bits: rank 0
                    # decides when to stop, or one process would wait forever for the others.
                    stop_reason = _from_rank0(stop_reason)
                metrics = {
                    "epoch": epoch,
                    "train_loss": train_loss,
                    "train_acc": train_acc,
                    **_validation_metrics(ev),
                    "epoch_time_s": time.perf_counter() - t0,
                    "img_per_s": n_seen / max(train_s, 1e-9),
                    "stop_reason": stop_reason,
                    "lr": lr,
                }
                history.append(metrics)
                if writer is not None:
                    writer.epoch_done(metrics, model, optimizer, scheduler, early, history, stop_reason)
                if report is not None:
                    report(dict(metrics), list(history))
                bar.advance(metrics)

        return _finish(cfg, data, model, rt, early, history, stop_reason)


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
    _synchronize(rt.device)
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
    early: _EarlyStopping,
    history: list[dict[str, Any]],
    stop_reason: str,
) -> FitResult:
    """Load the best-validation weights (as saved) and compute the test metrics once."""
    if early.best_weights is not None:
        model.load_state_dict(early.best_weights)
    test = _evaluate_resident(model, DeviceSplit(data.test, rt.device), rt, cfg)
    val_probs = _evaluate_resident(model, DeviceSplit(data.val, rt.device), rt, cfg).probs
    best_val = {**early.best_val_metrics, "loss": float(early.best_loss)}
    return FitResult(
        history, early.best_epoch, best_val, test.metrics, stop_reason or "max_epochs", val_probs, test.probs
    )


# ---------------------------------------------------------------- the model folder (checkpoints)
#
# One folder per training run (a search trial's folder, `cxr-search train --out`), written so that a kill at
# any line leaves a resumable, consistent folder:
#   config.json        the TrialConfig (written once, at the start)
#   best-eNNNN.pt      best-validation weights of epoch NNNN, written when validation improves (before the
#                      epoch is reported), never overwritten; at most the one the resume state names and a newer one
#   resume.pt          everything to continue exactly (model, optimizer, scheduler, RNGs, early stopping,
#                      history, the best file's name), replaced atomically by time/epoch; when the run ends it is
#                      replaced by a lean one (no model or optimizer state: a finished run keeps its best weights only)
#   history.jsonl      one JSON line per epoch, appended after resume.pt and before the epoch is reported: the
#                      complete record even for epochs after the last resume state (a trial ASHA stopped)
# Order per epoch: best file -> resume.pt (when due) -> history line -> report. A resume discards what came
# after its resume.pt (best files of later epochs, later history lines), so every file agrees with the state.
# Everything is saved with torch.save of tensors/dicts/lists/numbers only (loadable with weights_only=True).

RESUME_FILE = "resume.pt"
HISTORY_FILE = "history.jsonl"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 2
_BEST_FILE = re.compile(r"^best-e(\d{4,})\.pt$")
_AUTO_CHECKPOINT_FACTOR = 9  # auto period = 9x the last write: writing costs at most ~10% of the run


def best_file_name(epoch: int) -> str:
    return f"best-e{epoch:04d}.pt"


def best_files(folder: str | Path) -> list[tuple[int, storage.Location]]:
    """The folder's best-weights files as (epoch, path), oldest first."""
    folder = storage.path(folder)
    if not storage.is_remote(folder) and not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _BEST_FILE.match(p.name))]
    return sorted(found)


def read_history(folder: str | Path) -> list[dict[str, Any]]:
    """The per-epoch metrics of a model folder (`history.jsonl`; a line cut by a kill is skipped)."""
    return storage.read_records(storage.path(folder) / HISTORY_FILE)


def read_resume_state(folder: str | Path | None, *, metadata_only: bool = False) -> dict[str, Any] | None:
    """The folder's resume state (None if it has none yet).

    Args:
        folder: a model folder.
        metadata_only: memory-map the file instead of reading the tensors (for `finished`, `history`, ...).

    Raises:
        CxrError: the file exists but is not a resume state of this version.
    """
    if folder is None:
        return None
    path = storage.path(folder) / RESUME_FILE
    if not path.is_file():
        return None
    try:
        state = _load_tensors(path, mmap=metadata_only)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise CxrError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e}); delete the folder "
                       f"{folder} to train it again.") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CxrError(f"{path}: checkpoint format {state.get('format_version') if isinstance(state, dict) else '?'} "
                       f"is not this version's ({FORMAT_VERSION}); retrain with this version of cxr-search.")
    return state


def _load_tensors(path: storage.Location, *, mmap: bool = False) -> Any:
    """A file this module wrote with torch.save: tensors, dicts, lists and numbers only (weights_only=True, never a
    pickle of arbitrary objects). `mmap` maps a local file instead of reading it (an object is read whole)."""
    if storage.is_remote(path):
        with storage.open_binary(path) as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


class _CheckpointWriter:
    """Writes one run's model folder in the crash-safe order described above."""

    def __init__(self, folder: storage.Location, cfg: TrialConfig, num_classes: int, every_epochs: int,
                 every_s: float | None, preprocessing: dict[str, Any] | None = None):
        self.folder, self.cfg, self.num_classes = folder, cfg, num_classes
        self.preprocessing = preprocessing  # the data's recorded preprocessing: the folder alone serves `predict`
        self.every_epochs, self.every_s = max(1, int(every_epochs)), every_s
        self.last_epoch = 0  # epoch of the last resume state
        self.last_time = time.monotonic()
        self.write_cost = 0.0  # seconds the last resume state took to write (the automatic period's unit)
        self.best_written = 0  # epoch of the newest best file

    def start_fresh(self) -> None:
        """A new run: drop what an earlier attempt left before its first resume state."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for _, path in best_files(self.folder):
            path.unlink()
        storage.rewrite_records(self.folder / HISTORY_FILE, [])
        storage.atomic_write_text(self.folder / CONFIG_FILE, self.cfg.to_json())
        if self.preprocessing:
            write_record(self.folder, self.preprocessing)

    def resumed(self, epoch: int) -> None:
        self.last_epoch = epoch
        self.best_written = max((e for e, _ in best_files(self.folder)), default=0)

    def epoch_done(self, metrics: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler | None, early: _EarlyStopping,
                   history: list[dict[str, Any]], stop_reason: str) -> None:
        epoch = int(metrics["epoch"])
        if early.best_epoch == epoch:
            self._write_best(epoch, early.best_weights)
        if stop_reason:
            self._write_state(_lean_state(self.num_classes, epoch, early, history, stop_reason, self.best_written))
            self._prune_best(keep=self.best_written)
        elif self._due(epoch):
            t0 = time.monotonic()
            state = {
                "format_version": FORMAT_VERSION, "num_classes": self.num_classes, "epoch": epoch,
                "finished": False, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else {}, "rng": _rng_state(),
                "early_stopping": early.scalars(), "best_file": best_file_name(early.best_epoch)
                if early.best_epoch else "", "history": history, "stop_reason": stop_reason,
            }
            self._write_state(state)
            self._prune_best(keep=early.best_epoch)
            self.write_cost = time.monotonic() - t0
        storage.append_record(self.folder / HISTORY_FILE, metrics)

    def _due(self, epoch: int) -> bool:
        if epoch - self.last_epoch < self.every_epochs:
            return False
        period = self.every_s if self.every_s is not None else _AUTO_CHECKPOINT_FACTOR * self.write_cost
        return time.monotonic() - self.last_time >= period

    def _write_best(self, epoch: int, weights: dict[str, torch.Tensor] | None) -> None:
        best = {"format_version": FORMAT_VERSION, "num_classes": self.num_classes, "epoch": epoch, "model": weights}
        storage.atomic_write(self.folder / best_file_name(epoch), lambda tmp: torch.save(best, tmp))
        self.best_written = epoch

    def _write_state(self, state: dict[str, Any]) -> None:
        storage.atomic_write(self.folder / RESUME_FILE, lambda tmp: torch.save(state, tmp))
        self.last_epoch, self.last_time = int(state["epoch"]), time.monotonic()

    def _prune_best(self, keep: int) -> None:
        """Remove best files older than the one the new resume state names (newer ones are still needed)."""
        for epoch, path in best_files(self.folder):
            if epoch < keep:
                path.unlink(missing_ok=True)


def _lean_state(num_classes: int, epoch: int, early: _EarlyStopping, history: list[dict[str, Any]],
                stop_reason: str, best_epoch_on_disk: int) -> dict[str, Any]:
    """The resume state of a run that ended: what a later call needs to report it, no weights or optimizer."""
    scalars = early.scalars()
    return {"format_version": FORMAT_VERSION, "num_classes": num_classes, "epoch": epoch, "finished": True,
            "early_stopping": scalars, "best_file": best_file_name(best_epoch_on_disk) if best_epoch_on_disk else "",
            "history": history, "stop_reason": stop_reason}


def _restore(
    state: dict[str, Any],
    folder: storage.Location,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    early: _EarlyStopping,
    tidy: bool = True,
) -> tuple[list[dict[str, Any]], str]:
    """Load a resume state into the live objects and the RNGs, and (`tidy`: the writing process) discard what came
    after it on disk.

    Returns:
        (history, stop_reason); a finished run returns its stop reason, so no epoch is trained again.
    """
    epoch = int(state["epoch"])
    for e, path in best_files(folder) if tidy else ():
        if e > epoch:  # written after this state by an attempt that died: its epochs will run again
            path.unlink(missing_ok=True)
    history = list(state["history"])
    if tidy and len(read_history(folder)) != len(history):
        storage.rewrite_records(folder / HISTORY_FILE, history)
    for key, value in state["early_stopping"].items():
        setattr(early, key, value)
    if state["best_file"]:
        best = _load_tensors(folder / state["best_file"])
        early.best_weights = best["model"]
    if state["finished"]:
        if early.best_weights is not None:
            model.load_state_dict(early.best_weights)
        return history, state["stop_reason"] or "stopped"  # "" = stopped by a scheduler, then sealed
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"]:
        scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return history, state["stop_reason"]


def seal(folder: str | Path, stop_reason: str = "") -> None:
    """Make a run that ended without finishing by itself (a trial ASHA stopped) lean, like a finished one.

    Its history is `history.jsonl` (it may run past the last resume state); its best weights are the newest
    best file. Idempotent; a folder without a resume state or already lean is left as it is.
    """
    folder = storage.path(folder)
    state = read_resume_state(folder, metadata_only=True)
    if state is None or state["finished"]:
        return
    history = read_history(folder)
    last = int(history[-1]["epoch"]) if history else int(state["epoch"])
    bests = [(e, p) for e, p in best_files(folder) if e <= last]
    best_epoch = bests[-1][0] if bests else 0
    losses = {int(h["epoch"]): float(h["val_loss"]) for h in history if "val_loss" in h}
    scalars = dict(state["early_stopping"])
    scalars.update(best_epoch=best_epoch, best_loss=losses.get(best_epoch, scalars["best_loss"]))
    if best_epoch != int(state["early_stopping"]["best_epoch"]):
        scalars.update(best_val_metrics={})  # only known for the state's own best epoch
    lean = {"format_version": FORMAT_VERSION, "num_classes": state["num_classes"], "epoch": last, "finished": True,
            "early_stopping": scalars, "best_file": best_file_name(best_epoch) if best_epoch else "",
            "history": history, "stop_reason": stop_reason}
    storage.atomic_write(folder / RESUME_FILE, lambda tmp: torch.save(lean, tmp))
    for epoch, path in best_files(folder):
        if epoch != best_epoch:
            path.unlink(missing_ok=True)


def load_best_model(checkpoint_dir: str | Path) -> tuple[torch.nn.Module, TrialConfig]:
    """The best-validation model of a model folder, in eval mode on the CPU, and its trial config.

    Args:
        checkpoint_dir: a model folder written by ``fit`` (a trial folder, ``cxr-search train --out``).
    """
    folder = storage.path(checkpoint_dir)
    bests = best_files(folder)
    if not (folder / CONFIG_FILE).is_file() or not bests:
        raise CxrError(f"{folder}: no trained model here (needs {CONFIG_FILE} and best-e*.pt); pass a folder "
                       "written by `cxr-search train --out` or a search trial's folder.")
    cfg = TrialConfig.from_dict(storage.read_json(folder / CONFIG_FILE), source=str(folder / CONFIG_FILE))
    history = read_history(folder)
    last = int(history[-1]["epoch"]) if history else bests[-1][0]
    epoch, path = next(((e, p) for e, p in reversed(bests) if e <= last), bests[0])
    best = _load_tensors(path)
    # the file holds every weight: never reload pretrained ones (a hub name would fail offline)
    model = model_from_config(cfg.replace(pretrained="none"), num_classes=best["num_classes"])
    model.load_state_dict(best["model"])
    return model.eval(), cfg


# ---------------------------------------------------------------- test-only fault injection


@dataclass(frozen=True)
class Fault:
    """A fault a test asks for through ``$CXR_SEARCH_FAULTS`` (never through a config a user writes).

    kind: ``raise`` (an exception), ``kill`` (SIGKILL of the training process) or ``stall`` (sleep ``seconds``),
    fired after the first training batch of ``epoch``; ``always`` fires on every attempt, otherwise once per
    model folder (a marker file remembers it); ``match`` limits it to configs with these field values.
    """

    kind: str
    epoch: int
    always: bool = False
    seconds: float = 60.0
    match: tuple[tuple[str, Any], ...] = ()

    def applies(self, cfg: TrialConfig, epoch: int) -> bool:
        return epoch == self.epoch and all(getattr(cfg, k, None) == v for k, v in self.match)


FAULTS_ENV = "CXR_SEARCH_FAULTS"


def faults_from_env(value: str | None = None) -> tuple[Fault, ...]:
    """Parse ``$CXR_SEARCH_FAULTS``: a JSON object or list, e.g. ``{"kind": "raise", "epoch": 2}``."""
    text = os.environ.get(FAULTS_ENV, "") if value is None else value
    if not text.strip():
        return ()
    raw = json.loads(text)
    items = raw if isinstance(raw, list) else [raw]
    out = []
    for item in items:
        if item.get("kind") not in ("raise", "kill", "stall"):
            raise ValueError(f"{FAULTS_ENV}: kind must be raise, kill or stall, got {item.get('kind')!r}")
        out.append(Fault(item["kind"], int(item["epoch"]), bool(item.get("always", False)),
                         float(item.get("seconds", 60.0)), tuple(sorted((item.get("match") or {}).items()))))
    return tuple(out)


def _armed_faults(faults: Sequence[Fault], cfg: TrialConfig, epoch: int,
                  folder: storage.Location | None) -> Callable[[], None] | None:
    chosen = [f for f in faults if f.applies(cfg, epoch)]
    if not chosen:
        return None

    def fire() -> None:
        for fault in chosen:
            marker = folder / f".fault-{fault.kind}-e{fault.epoch:04d}" if folder is not None else None
            if marker is not None and marker.exists() and not fault.always:
                continue
            if marker is not None:
                marker.touch()
            if fault.kind == "raise":
                raise RuntimeError(f"fault injected at epoch {epoch} ({FAULTS_ENV})")
            if fault.kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(fault.seconds)

    return fire


def _rng_state() -> dict[str, Any]:
    """Every RNG the run draws from, as tensors/lists/numbers (loadable with weights_only=True)."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": [version, list(py_state), gauss_next],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    npy = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            npy["keys"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        )
    )
    version, py_state, gauss_next = state["python"]
    random.setstate((version, tuple(py_state), gauss_next))


# ---------------------------------------------------------------- run environment


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


@contextlib.contextmanager
def _backend_settings(cfg: TrialConfig, device: torch.device) -> Iterator[None]:
    """Deterministic algorithms when asked, else cuDNN autotuning on a GPU; restores the old settings."""
    cudnn = torch.backends.cudnn
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        cudnn.deterministic,
        cudnn.benchmark,
    )
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for reproducible GEMMs
        # warn_only: some CUDA backward kernels (adaptive pooling) have no deterministic version
        torch.use_deterministic_algorithms(True, warn_only=True)
        cudnn.deterministic, cudnn.benchmark = True, False
    elif device.type == "cuda":
        cudnn.benchmark = True  # without autotuning VGG in bf16/channels_last ran 2x slower (DESIGN.md)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        cudnn.deterministic, cudnn.benchmark = saved[2], saved[3]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _plain(metrics: dict[str, Any]) -> dict[str, float]:
    """numpy scalars -> Python floats, so metrics are JSON-able and checkpoint-safe."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, np.integer, np.floating))}


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
