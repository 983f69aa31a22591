"""Evaluate a model on a split, and class probabilities of preprocessed images."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cxr_search.config import TrialConfig
from cxr_search.data.prepare import SplitArrays
from cxr_search.training.runtime import DeviceSplit, Runtime, model_input, resolve_device


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


def evaluate_resident(
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
    return evaluate_resident(model, DeviceSplit(split, dev), Runtime.for_model(model, cfg, dev), cfg)


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


def _plain(metrics: dict[str, Any]) -> dict[str, float]:
    """numpy scalars -> Python floats, so metrics are JSON-able and checkpoint-safe."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, np.integer, np.floating))}
