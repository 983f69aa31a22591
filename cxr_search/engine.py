"""Train one model on prepared arrays: fit, evaluate, checkpoints, predict. Plain PyTorch, no Ray.

The training loop is visible in ``fit``. Data path: each split's uint8 images go to the trial's device once;
a batch is an index slice, converted to float, augmented as one batched affine warp, normalised and (for
3-channel models) replicated, all on the device. Model and batches are channels_last (on a 2-core CPU it made
cnn3 1.5x faster, on a GPU ResNet34 1.7x). On a GPU the model runs in bf16 autocast with cuDNN autotuning; on
a CPU in float32.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cxr_search.config import TrialConfig
from cxr_search.data.augment import augment_batch
from cxr_search.data.balance import class_weights, oversample_indices
from cxr_search.data.prepare import PreparedData, SplitArrays
from cxr_search.data.preprocess import write_record
from cxr_search.errors import CxrError

# Fixed input normalisation: histogram-equalised pixels are near uniform on [0, 1] (mean 0.5, std 1/sqrt(12)).
PIXEL_MEAN = 0.5
PIXEL_STD = 0.289

STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
# The metrics of every epoch so far, readable without torch. Ray may drop result.json lines when it restarts
# a failed trial (it restores the file from the last storage sync), so this copy is the complete record.
HISTORY_FILE = "history.json"

ReportFn = Callable[[dict[str, Any], Callable[[Path], None]], None]


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

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager:
        # bf16 needs no loss scaling; on the CPU we stay in float32 (CPU autocast is slower there).
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.on_gpu else contextlib.nullcontext()

    @classmethod
    def for_model(cls, model: torch.nn.Module, cfg: TrialConfig, device: torch.device) -> Runtime:
        return cls(device, int(getattr(model, "min_input_size", 0) or 0), cfg.in_chans)


class DeviceSplit:
    """One split resident on the device as uint8 [N, 1, H, W] (copied once); batches are index slices."""

    def __init__(self, split: SplitArrays, device: torch.device):
        self.images = torch.from_numpy(np.ascontiguousarray(split.images)).to(device).unsqueeze(1)
        self.labels = torch.from_numpy(np.asarray(split.labels, dtype=np.int64)).to(device)
        self.labels_np = np.asarray(split.labels, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


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
    loss = ce.mean() + model.regularization_penalty(cfg.regularizer, cfg.reg_strength)
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
    """Keras EarlyStopping on val_loss (min_delta 0), also keeping the best weights and val probabilities."""

    patience: int
    best_loss: float = math.inf
    best_epoch: int = 0
    wait: int = 0  # epochs since the last improvement
    best_weights: dict[str, torch.Tensor] | None = None  # on the CPU
    best_val_probs: torch.Tensor | None = None
    best_val_metrics: dict[str, float] = field(default_factory=dict)

    def update(self, epoch: int, val: Evaluation, model: torch.nn.Module) -> bool:
        """Record one epoch's validation; True when training should stop."""
        if val.loss < self.best_loss:
            self.best_loss, self.best_epoch, self.wait = val.loss, epoch, 0
            self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            self.best_val_probs = torch.from_numpy(val.probs.copy())
            self.best_val_metrics = dict(val.metrics)
            return False
        self.wait += 1
        return self.wait >= self.patience

    def state_dict(self) -> dict[str, Any]:
        keys = ("best_loss", "best_epoch", "wait", "best_weights", "best_val_probs", "best_val_metrics")
        return {k: getattr(self, k) for k in keys}


def fit(
    cfg: TrialConfig,
    data: PreparedData,
    *,
    report: ReportFn | None = None,
    resume_from: str | Path | None = None,
    progress: bool = False,
) -> FitResult:
    """Train ``cfg.backbone`` on ``data.train``, early-stop on ``data.val``, test once on ``data.test``.

    Args:
        cfg: the trial config.
        data: prepared train/val/test arrays.
        report: called once per epoch as ``report(metrics, write_checkpoint)``; ``write_checkpoint(folder)``
            writes this epoch's checkpoint (``state.pt`` + ``config.json``) into ``folder``.
        resume_from: a checkpoint folder written by ``write_checkpoint``; training continues after its epoch.
        progress: show a rich progress bar (one line per run, updated each epoch).

    Returns:
        FitResult with per-epoch history and test metrics on the best-validation weights.
    """
    device = resolve_device(cfg.device)
    with _backend_settings(cfg, device):
        _seed_everything(cfg.seed)
        # resuming overwrites every weight, so pretrained weights are loaded only on a fresh start
        build_cfg = cfg.replace(pretrained="none") if resume_from is not None else cfg
        model = model_from_config(build_cfg, num_classes=len(data.classes))
        model = model.to(device, memory_format=torch.channels_last)
        rt = Runtime.for_model(model, cfg, device)
        optimizer = create_optimizer(model, cfg)
        scheduler = create_scheduler(optimizer, cfg)
        early = _EarlyStopping(cfg.patience)
        history: list[dict[str, Any]] = []
        stop_reason = ""
        if resume_from is not None:
            history, stop_reason = _restore(Path(resume_from), model, optimizer, scheduler, early)

        train, val = DeviceSplit(data.train, device), DeviceSplit(data.val, device)
        class_weight = None
        if cfg.balance == "class_weight":
            weights = class_weights(train.labels_np, len(data.classes))
            class_weight = torch.as_tensor(weights, dtype=torch.float32, device=device)

        with _progress_bar(progress, cfg) as bar:
            for epoch in range(len(history) + 1, cfg.max_epochs + 1):
                if stop_reason:
                    break
                if epoch == cfg.fail_at_epoch and resume_from is None:
                    raise RuntimeError(f"fault injected at epoch {epoch} (fail_at_epoch={cfg.fail_at_epoch})")
                lr = optimizer.param_groups[0]["lr"]
                t0 = time.perf_counter()
                train_loss, train_acc, n_seen = _train_epoch(
                    model, optimizer, train, epoch, rt, cfg, class_weight
                )
                train_s = time.perf_counter() - t0
                if scheduler is not None:
                    scheduler.step()
                ev = _evaluate_resident(model, val, rt, cfg)
                if early.update(epoch, ev, model):
                    stop_reason = "early_stopping"
                elif epoch == cfg.max_epochs:
                    stop_reason = "max_epochs"
                metrics = {
                    "epoch": epoch,
                    "train_loss": train_loss,
                    "train_acc": train_acc,
                    "val_loss": ev.loss,
                    "val_acc": ev.metrics["acc"],
                    "val_macro_f1": ev.metrics["macro_f1"],
                    "val_normal_recall": ev.metrics["normal_recall"],
                    "val_covid_recall_vs_pneumonia": ev.metrics["covid_recall_vs_pneumonia"],
                    "epoch_time_s": time.perf_counter() - t0,
                    "img_per_s": n_seen / max(train_s, 1e-9),
                    "stop_reason": stop_reason,
                    "lr": lr,
                }
                history.append(metrics)
                if report is not None:
                    report(
                        dict(metrics),
                        _checkpoint_writer(
                            cfg,
                            len(data.classes),
                            epoch,
                            model,
                            optimizer,
                            scheduler,
                            early,
                            history,
                            stop_reason,
                            data.preprocessing,
                        ),
                    )
                bar.advance(metrics)

        return _finish(cfg, data, model, rt, early, history, stop_reason)


def _train_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train: DeviceSplit,
    epoch: int,
    rt: Runtime,
    cfg: TrialConfig,
    class_weight: torch.Tensor | None,
) -> tuple[float, float, int]:
    """One pass over the (oversampled, shuffled) training set; returns (mean loss, accuracy, images seen)."""
    # The epoch's order depends only on (seed, epoch), so a resumed run sees the same batches.
    rng = np.random.default_rng([cfg.seed, epoch])
    if cfg.balance == "oversample":
        order = oversample_indices(train.labels_np, rng)  # shuffled
    else:
        order = rng.permutation(len(train))
    order = torch.from_numpy(order).to(rt.device)
    model.train()
    loss_sum = torch.zeros((), device=rt.device)
    correct = torch.zeros((), dtype=torch.long, device=rt.device)
    n_seen = 0
    for start in range(0, len(order), cfg.batch_size):
        idx = order[start : start + cfg.batch_size]
        if len(idx) < 2 and start > 0:
            break  # a trailing batch of one image cannot train BatchNorm
        x = model_input(train.images[idx], rt, cfg, augment=True)
        loss, n_correct = train_step(model, optimizer, x, train.labels[idx], rt, cfg, class_weight)
        loss_sum += loss * len(idx)
        correct += n_correct
        n_seen += len(idx)
    _synchronize(rt.device)
    return float(loss_sum) / max(n_seen, 1), float(correct) / max(n_seen, 1), n_seen


def _finish(
    cfg: TrialConfig,
    data: PreparedData,
    model: torch.nn.Module,
    rt: Runtime,
    early: _EarlyStopping,
    history: list[dict[str, Any]],
    stop_reason: str,
) -> FitResult:
    """Load the best-validation weights and compute the test metrics once."""
    if early.best_weights is not None:
        model.load_state_dict(early.best_weights)
    test = _evaluate_resident(model, DeviceSplit(data.test, rt.device), rt, cfg)
    val_probs = (
        early.best_val_probs.numpy() if early.best_val_probs is not None else np.zeros((0, 3), np.float32)
    )
    best_val = {**early.best_val_metrics, "loss": float(early.best_loss)}
    return FitResult(
        history, early.best_epoch, best_val, test.metrics, stop_reason or "max_epochs", val_probs, test.probs
    )


# ---------------------------------------------------------------- checkpoints


def _checkpoint_writer(
    cfg: TrialConfig,
    num_classes: int,
    epoch: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    early: _EarlyStopping,
    history: list[dict[str, Any]],
    stop_reason: str,
    preprocessing: dict[str, Any] | None = None,
) -> Callable[[Path], None]:
    """A function that writes this epoch's checkpoint into a folder when (and only if) it is called.

    ``preprocessing`` (``PreparedData.preprocessing``) goes beside the weights as ``preprocessing.json``, so the
    folder alone is enough for ``cxr-search predict``.
    """
    history, early_state = list(history), dict(early.state_dict())

    def write_checkpoint(folder: Path) -> None:
        state = {
            "format_version": 1,
            "num_classes": num_classes,
            "epoch": epoch,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else {},
            "rng": _rng_state(),
            "early_stopping": early_state,
            "history": history,
            "stop_reason": stop_reason,
        }
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_write(folder / STATE_FILE, lambda tmp: torch.save(state, tmp))
        _atomic_write(folder / CONFIG_FILE, lambda tmp: tmp.write_text(cfg.to_json()))
        _atomic_write(folder / HISTORY_FILE, lambda tmp: tmp.write_text(json.dumps(history)))
        if preprocessing:
            write_record(folder, preprocessing)

    return write_checkpoint


def _restore(
    folder: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    early: _EarlyStopping,
) -> tuple[list[dict[str, Any]], str]:
    """Load a checkpoint into the live objects and the RNGs; returns (history, stop_reason)."""
    if not (folder / STATE_FILE).is_file():
        raise CxrError(f"{folder}: no {STATE_FILE} to resume from; pass a folder written by a checkpoint.")
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"]:
        scheduler.load_state_dict(state["scheduler"])
    for key, value in state["early_stopping"].items():
        setattr(early, key, value)
    _set_rng_state(state["rng"])
    return list(state["history"]), state["stop_reason"]


def load_best_model(checkpoint_dir: str | Path) -> tuple[torch.nn.Module, TrialConfig]:
    """The best-validation model of a checkpoint folder, in eval mode on the CPU, and its trial config.

    Args:
        checkpoint_dir: folder with ``state.pt`` and ``config.json`` (from ``fit``'s report callback).
    """
    folder = Path(checkpoint_dir)
    for name in (STATE_FILE, CONFIG_FILE):
        if not (folder / name).is_file():
            raise CxrError(
                f"{folder}: no {name}; pass a checkpoint folder written by 'cxr-search train' or a search."
            )
    cfg = TrialConfig.from_dict(
        json.loads((folder / CONFIG_FILE).read_text()), source=str(folder / CONFIG_FILE)
    )
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    weights = state["early_stopping"]["best_weights"] or state["model"]
    # the checkpoint holds every weight: never reload pretrained ones (a hub name would fail offline)
    model = model_from_config(cfg.replace(pretrained="none"), num_classes=state["num_classes"])
    model.load_state_dict(weights)
    return model.eval(), cfg


def _atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one


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
