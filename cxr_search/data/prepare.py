"""The one entry point trainers use: a folder of X-rays (or the default phantoms) -> split uint8 arrays."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cxr_search import CLASSES


@dataclass(frozen=True)
class SplitArrays:
    """One split, preprocessed: grayscale uint8 images and their labels (index into CLASSES)."""

    images: np.ndarray  # uint8 [N, H, W]
    labels: np.ndarray  # int64 [N]
    patient_ids: np.ndarray  # str [N]
    paths: np.ndarray  # str [N], source file of each image

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, idx: np.ndarray) -> SplitArrays:
        return SplitArrays(self.images[idx], self.labels[idx], self.patient_ids[idx], self.paths[idx])


@dataclass(frozen=True)
class PreparedData:
    """Train/val/test arrays plus what is needed to reproduce and report them. Picklable (Ray ships it)."""

    train: SplitArrays
    val: SplitArrays
    test: SplitArrays
    image_size: int
    classes: tuple[str, ...] = CLASSES
    cache_key: str = ""
    split_seed: int = 0
    report: dict[str, Any] = field(default_factory=dict)  # JSON-able integrity summary, incl. "warnings"
