"""The one typed, frozen trial configuration: built once from a Tune/YAML/CLI dict, validated with clear messages."""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass
from typing import Any

from cxr_search.errors import CxrError

BACKBONES = (
    "cnn3", "alexnet", "vgg16", "vgg19", "resnet34", "resnet50", "inception_v3", "xception", "densenet121",
)
HEADS = ("linear", "dense", "dense_dropout")
REGULARIZERS = ("none", "l1", "l2", "l1_l2")
OPTIMIZERS = ("sgd", "rmsprop", "adam", "adamw")
LR_SCHEDULES = ("constant", "cosine")
BALANCE = ("oversample", "class_weight", "none")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
COMPILES = ("auto", "always", "never")  # not on/off: YAML 1.1 reads those as booleans

# Allowed values for the string fields; checked by from_dict and by the search-space loader.
CHOICES: dict[str, tuple[str, ...]] = {
    "backbone": BACKBONES,
    "head": HEADS,
    "regularizer": REGULARIZERS,
    "optimizer": OPTIMIZERS,
    "lr_schedule": LR_SCHEDULES,
    "balance": BALANCE,
    "device": DEVICES,
    "precision": PRECISIONS,
    "compile": COMPILES,
}


@dataclass(frozen=True)
class TrialConfig:
    """Everything one training run needs. Defaults follow the study (DESIGN.md)."""

    # model
    backbone: str = "inception_v3"
    pretrained: str = "none"  # "none", "imagenet" (staged by `cxr-search weights fetch`), a timm/HF name, or a file/folder
    in_chans: int = 1  # 1 = grayscale input (first conv adapted); 3 = gray replicated to RGB
    freeze_fraction: float = 0.0  # fraction of backbone parameters frozen from the input side, in [0, 1]
    head: str = "linear"
    dense_units: int = 256  # width of the Dense layer of the dense heads
    dropout: float = 0.5  # dropout probability of the dense_dropout head
    regularizer: str = "none"
    reg_strength: float = 0.1  # Keras-style penalty factor on the head's weights (the study used 0.1)
    # optimisation
    optimizer: str = "rmsprop"
    lr: float = 1e-3
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 0.0  # decoupled (AdamW) or L2 (others) weight decay on all parameters
    lr_schedule: str = "constant"
    batch_size: int = 32
    max_epochs: int = 100
    patience: int = 10  # early stopping on validation loss, epochs without improvement
    # data
    augment: bool = True
    rotation_deg: float = 10.0  # max random rotation, degrees
    shear_deg: float = 10.0  # max random shear, degrees
    zoom: float = 0.1  # max random zoom, fraction (0.1 = 0.9x..1.1x)
    balance: str = "oversample"  # the study oversampled minority classes
    # run
    seed: int = 0
    deterministic: bool = False  # deterministic algorithms (CPU reproducibility tests)
    device: str = "auto"
    # auto: bf16 autocast on a GPU and on a CPU with native bf16 (AVX512-BF16/AMX, where it is the faster:
    # benchmarks/RESULTS.md), else float32; weights, optimizer state and the loss stay float32 either way
    precision: str = "auto"
    eval_batch_size: int = 256
    # auto: train under torch.compile with CUDA graphs on a GPU where the launch overhead it removes pays for the
    # compile (small batches, long trials: compiling.compile_mode); always (a CPU gets plain Inductor); never
    compile: str = "auto"

    def __post_init__(self) -> None:
        self._validate()

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "trial config") -> TrialConfig:
        """Build a config from a flat dict (Tune's param dict, YAML, CLI), rejecting unknown keys and bad values.

        Args:
            d: flat mapping of field name to value; missing fields take their defaults.
            source: where the dict came from, named in error messages (a file path, "--option", ...).
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key not in fields:
                hint = difflib.get_close_matches(key, fields, n=1)
                fix = f" Did you mean '{hint[0]}'?" if hint else f" Known keys: {', '.join(fields)}."
                raise CxrError(f"{source}: unknown key '{key}'.{fix}")
            kwargs[key] = _coerce(key, value, type(getattr(cls, key)), source)
        try:
            return cls(**kwargs)
        except CxrError as e:
            raise CxrError(f"{source}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> TrialConfig:
        return dataclasses.replace(self, **changes)

    def _validate(self) -> None:
        for key, allowed in CHOICES.items():
            value = getattr(self, key)
            if value not in allowed:
                hint = difflib.get_close_matches(str(value), allowed, n=1)
                fix = f" Did you mean '{hint[0]}'?" if hint else ""
                raise CxrError(f"'{key}' is '{value}'; allowed: {', '.join(allowed)}.{fix}")
        _check_range("freeze_fraction", self.freeze_fraction, 0.0, 1.0)
        _check_range("dropout", self.dropout, 0.0, 1.0, hi_open=True)
        _check_range("zoom", self.zoom, 0.0, 1.0, hi_open=True)
        for key in ("lr",):
            if not getattr(self, key) > 0:
                raise CxrError(f"'{key}' must be > 0, got {getattr(self, key)}.")
        for key in ("reg_strength", "weight_decay", "momentum", "rotation_deg", "shear_deg"):
            if getattr(self, key) < 0:
                raise CxrError(f"'{key}' must be >= 0, got {getattr(self, key)}.")
        for key in ("batch_size", "max_epochs", "dense_units", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise CxrError(f"'{key}' must be >= 1, got {getattr(self, key)}.")
        for key in ("patience", "seed"):
            if getattr(self, key) < 0:
                raise CxrError(f"'{key}' must be >= 0, got {getattr(self, key)}.")
        if self.in_chans not in (1, 3):
            raise CxrError(f"'in_chans' must be 1 or 3, got {self.in_chans}.")


def _check_range(key: str, value: float, lo: float, hi: float, hi_open: bool = False) -> None:
    ok = lo <= value < hi if hi_open else lo <= value <= hi
    if not ok:
        bracket = ")" if hi_open else "]"
        raise CxrError(f"'{key}' must be in [{lo}, {hi}{bracket}, got {value}.")


def _coerce(key: str, value: Any, kind: type, source: str) -> Any:
    """Accept what YAML/Tune/numpy hand us (numpy scalars, ints for floats) but refuse real type errors."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()  # numpy scalar from Tune/Optuna
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    raise CxrError(f"{source}: '{key}' must be {kind.__name__}, got {value!r} ({type(value).__name__}).")
