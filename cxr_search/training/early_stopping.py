"""Keras' EarlyStopping on validation loss, keeping the best weights as they are saved (float16 where they fit)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from cxr_search.training.evaluation import Evaluation


@dataclass
class EarlyStopping:
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
            self.best_weights = {k: storable(v) for k, v in model.state_dict().items()}
            self.best_val_metrics = dict(val.metrics)
            return False
        self.wait += 1
        return self.wait >= self.patience

    def scalars(self) -> dict[str, Any]:  # noqa: D102
        """Everything but the weights (they live in their own file, see the checkpoint format)."""
        keys = ("best_loss", "best_epoch", "wait", "best_val_metrics")
        return {k: getattr(self, k) for k in keys}


def storable(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy of a weight as it is kept and saved: float32 as float16 where it fits, which halves every
    best-weights file (benchmarks/RESULTS.md, checkpoint bytes) and moves a probability by less than ~1e-3. A tensor with
    values beyond float16's range (a BatchNorm running variance early in training can pass 65504) stays float32.
    The test and validation figures of a run are computed with these weights, so every number describes the
    model that is saved."""
    out = tensor.detach().to("cpu", copy=True)
    if out.dtype == torch.float32 and out.numel() and bool(torch.isfinite(out).all()) \
            and float(out.abs().max()) < HALF_MAX:
        return out.half()
    return out


HALF_MAX = 60000.0  # float16's largest finite value is 65504
