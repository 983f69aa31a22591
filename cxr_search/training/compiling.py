"""Launch overhead: whether a run trains under `torch.compile` (CUDA graphs), and the model the training steps call."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cxr_search.config import TrialConfig
from cxr_search.io import paths

log = logging.getLogger(__name__)


# At the study's batch 32 a GPU training step is bound by kernel launches, not arithmetic (benchmarks/RESULTS.md,
# the GPU throughput tables). CUDA graphs (torch.compile's "reduce-overhead") replay a step's kernels as one
# launch, but compiling costs about a minute cold and seconds from the cache (Inductor's cache is shared by every
# trial process of a machine, `compile_cache_dir`). `compile: auto` compiles only where that is won back: never on
# a CPU, where a cold compile outlasts a whole trial of the CPU budget and the compiled step was not reliably
# faster (RESULTS.md, "Compiled vs eager"); on a GPU by the two thresholds below, estimates that
# `benchmarks/gpu_suite.py` checks (its compile part).
COMPILE_MAX_BATCH = 64  # larger batches keep the GPU busy on their own: nothing left to win
# Steps a run needs to win a cold compile back: the time CUDA graphs save per launch-bound step (RESULTS.md, the
# H100 step times) against about a minute of compiling; about 12 epochs of the study's data at batch 32.
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
