"""Where and how a model runs: device, bf16 autocast, the resident data path and the model input; seeding, RNG state
and backend settings.

Data path: each split's uint8 images go to the trial's device once; a batch is an index slice, converted to float,
augmented as one batched affine warp, normalised and (for 3-channel models) replicated, all on the device. Model
and batches are channels_last. The model runs in bf16 autocast on a GPU (with cuDNN autotuning) and on a CPU with
native bf16 (`TrialConfig.precision` "auto"), else in float32 (benchmarks/RESULTS.md has the measurements)."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cxr_search.config import TrialConfig
from cxr_search.data.augment import augment_batch
from cxr_search.data.prepare import SplitArrays
from cxr_search.errors import CxrError

# Fixed input normalisation: histogram-equalised pixels are near uniform on [0, 1] (mean 0.5, std 1/sqrt(12)).
PIXEL_MEAN = 0.5


PIXEL_STD = 0.289


def resolve_device(name: str) -> torch.device:
    """'auto' -> the GPU if one is visible, else the CPU; 'cuda' without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CxrError("device 'cuda' was requested but no CUDA GPU is visible; use device 'auto' or 'cpu'.")
    return torch.device(name)


def model_from_config(cfg: TrialConfig, num_classes: int = 3) -> torch.nn.Module:
    """The network a trial config describes (``models.create_model`` with the config's fields)."""
    from cxr_search.models.registry import create_model

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


def rng_state() -> dict[str, Any]:
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


def set_rng_state(state: dict[str, Any]) -> None:
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


@contextlib.contextmanager
def backend_settings(cfg: TrialConfig, device: torch.device) -> Iterator[None]:
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


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
