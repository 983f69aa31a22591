"""Optimizers and learning-rate schedules, described as data and built by one factory (timm style)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from cxr_search.config import TrialConfig


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
