"""The nine backbones of the study behind one factory: `create_model(name, ...)` -> `CxrModel` (timm style).

Every backbone ends in a pooled feature vector; the classifier head, the Keras-style head regularizer,
partial freezing and the loading of pretrained weights (the staged ImageNet weights of `weights.py` and local
files, both offline, or the Hugging Face Hub for an explicit timm tag) are shared by all of them.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from cxr_search.config import BACKBONES, HEADS, REGULARIZERS
from cxr_search.errors import CxrError
from cxr_search.models import weights

# Smallest square input (pixels) each backbone accepts: below it a feature map shrinks to nothing.
# Found by probing forward passes (tests/test_models.py checks each model runs at exactly this size).
MIN_INPUT_SIZE: dict[str, int] = {
    "cnn3": 8,
    "alexnet": 63,
    "vgg16": 32,
    "vgg19": 32,
    "resnet34": 1,
    "resnet50": 1,
    "inception_v3": 75,
    "xception": 7,
    "densenet121": 29,
}

# timm architecture whose pretrained weights fit each backbone (None: no timm weights exist for it).
TIMM_ARCH: dict[str, str | None] = {
    "cnn3": None,
    "alexnet": None,
    "vgg16": "vgg16",  # timm's VGG `features.*` keys equal ours; its `pre_logits`/`head` are dropped
    "vgg19": "vgg19",
    "resnet34": "resnet34",
    "resnet50": "resnet50",
    "inception_v3": "inception_v3",
    "xception": "legacy_xception",
    "densenet121": "densenet121",
}

# Keys of a classifier in a saved model (ours, timm's or torchvision's); dropped when loading a backbone.
_CLASSIFIER_PREFIXES = ("head.", "fc.", "classifier.", "last_linear.", "AuxLogits.", "pre_logits.")
_WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


class CxrModel(nn.Module):
    """A backbone producing a pooled feature vector, followed by a classifier head.

    Attributes:
        name: registry name of the backbone.
        backbone: module mapping [N, C, H, W] images to [N, num_features] pooled features.
        head: module mapping features to [N, num_classes] logits.
        in_chans: number of input channels the model expects.
        min_input_size: smallest square input size in pixels the backbone accepts.
    """

    def __init__(self, name: str, backbone: nn.Module, num_features: int, head: nn.Module, in_chans: int):
        super().__init__()
        self.name = name
        self.backbone = backbone
        self.head = head
        self.num_features = num_features
        self.in_chans = in_chans
        self.min_input_size = MIN_INPUT_SIZE[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_chans or min(x.shape[-2:]) < self.min_input_size:
            raise CxrError(
                f"backbone '{self.name}' expects {self.in_chans}-channel images of at least "
                f"{self.min_input_size}x{self.min_input_size} px, got shape {tuple(x.shape)}; "
                "change the image size (--size) or 'in_chans'."
            )
        return self.head(self.backbone(x))

    def head_weights(self) -> list[torch.Tensor]:
        """The head's weight matrices (not biases): what the Keras-style regularizer penalizes."""
        return [m.weight for m in self.head.modules() if isinstance(m, nn.Linear)]

    def trainable_parameter_count(self) -> int:
        """Number of scalar parameters the optimizer will update (frozen ones excluded)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def regularization_penalty(self, kind: str, strength: float) -> torch.Tensor:
        """The penalty Keras adds to the loss for a regularizer on the head's Dense layers.

        Keras semantics exactly: l1 = strength * sum(|w|), l2 = strength * sum(w**2) (no 1/2 factor),
        l1_l2 = both with the same strength; summed over the head's weight matrices, biases excluded.

        Args:
            kind: one of "none", "l1", "l2", "l1_l2".
            strength: penalty factor (the study used 0.1).
        """
        if kind not in REGULARIZERS:
            raise CxrError(f"regularizer '{kind}' is unknown; allowed: {', '.join(REGULARIZERS)}.")
        weights = self.head_weights()
        penalty = torch.zeros((), device=weights[0].device, dtype=weights[0].dtype)
        if kind in ("l1", "l1_l2"):
            penalty = penalty + strength * sum(w.abs().sum() for w in weights)
        if kind in ("l2", "l1_l2"):
            penalty = penalty + strength * sum(w.pow(2).sum() for w in weights)
        return penalty

    def train(self, mode: bool = True) -> CxrModel:
        """Set train/eval mode, keeping frozen BatchNorm layers in eval (as Keras does for frozen layers)."""
        super().train(mode)
        if mode:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and _is_frozen(m):
                    m.eval()
        return self


def create_model(
    name: str,
    *,
    num_classes: int = 3,
    in_chans: int = 1,
    pretrained: str = "none",
    freeze_fraction: float = 0.0,
    head: str = "linear",
    dense_units: int = 256,
    dropout: float = 0.5,
) -> CxrModel:
    """Build one of the study's backbones with a classifier head.

    Args:
        name: backbone, one of `config.BACKBONES`. `densenet121` stands in for the study's "DenseNet50"
            (no such standard model exists); `cnn3` is the study's 3-conv-layer CNN.
        num_classes: number of output logits.
        in_chans: 1 for grayscale input (first conv adapted) or 3.
        pretrained: "none"; "imagenet": the backbone's ImageNet weights staged by `cxr-search weights fetch`
            (offline, never downloaded here; cnn3 has none); a local weights file (.pth/.pt/.bin state dict,
            .safetensors) or a folder holding `model.safetensors` or `pytorch_model.bin` (offline); or a timm
            pretrained tag ("tv_in1k" or "resnet34.tv_in1k") or "hf-hub:<repo>" (needs the Hugging Face Hub).
            The first conv is adapted to `in_chans` (RGB kernels summed for grayscale) and any classifier is
            dropped.
        freeze_fraction: fraction of the backbone's parameters frozen, from the input side, in [0, 1]
            (0 trains everything, 1 trains only the head).
        head: "linear" (one Linear), "dense" (Linear(dense_units)+ReLU+Linear) or "dense_dropout"
            (Linear+ReLU+Dropout+Linear).
        dense_units: width of the hidden layer of the dense heads.
        dropout: dropout probability of the dense_dropout head.
    """
    if name not in _REGISTRY:
        hint = difflib.get_close_matches(name, _REGISTRY, n=1)
        fix = f" Did you mean '{hint[0]}'?" if hint else ""
        raise CxrError(f"backbone '{name}' is unknown; allowed: {', '.join(_REGISTRY)}.{fix}")
    if in_chans not in (1, 3):
        raise CxrError(f"'in_chans' must be 1 or 3, got {in_chans}.")
    if not 0.0 <= freeze_fraction <= 1.0:
        raise CxrError(f"'freeze_fraction' must be in [0, 1], got {freeze_fraction}.")
    backbone, num_features = _REGISTRY[name](in_chans)
    if pretrained != "none":
        state, source = _pretrained_state_dict(name, pretrained)
        _load_backbone_weights(backbone, state, source, name)
    _freeze_from_input(backbone, freeze_fraction)
    model = CxrModel(
        name,
        backbone,
        num_features,
        _make_head(head, num_features, num_classes, dense_units, dropout),
        in_chans,
    )
    return model.train()


# ---------------------------------------------------------------------------------------------------------
# Registry: name -> builder(in_chans) -> (backbone giving pooled [N, F] features, F). Order = config.BACKBONES.

_REGISTRY: dict[str, Callable[[int], tuple[nn.Module, int]]] = {}


def _register(name: str) -> Callable:
    def wrap(fn: Callable[[int], tuple[nn.Module, int]]) -> Callable[[int], tuple[nn.Module, int]]:
        _REGISTRY[name] = fn
        return fn

    return wrap


class _PooledFeatures(nn.Module):
    """A convolutional feature extractor followed by a pooling to a fixed grid and flattening."""

    def __init__(self, features: nn.Sequential, pool_size: int = 1):
        super().__init__()
        self.features = features  # attribute name matches torchvision/timm keys so their weights load
        self.pool = nn.AdaptiveAvgPool2d(pool_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


@_register("cnn3")
def _cnn3(in_chans: int) -> tuple[nn.Module, int]:
    # The study's small CNN: three conv(3x3)+ReLU+maxpool(2) blocks. The Keras model flattened the last map;
    # pooling it to a fixed 4x4 grid first keeps the coarse layout and makes the model size-agnostic.
    layers: list[nn.Module] = []
    for c_in, c_out in ((in_chans, 32), (32, 64), (64, 128)):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
    return _PooledFeatures(nn.Sequential(*layers), pool_size=4), 128 * 4 * 4


@_register("alexnet")
def _alexnet(in_chans: int) -> tuple[nn.Module, int]:
    import torchvision

    # torchvision's layer layout (so its weights load); global average pool instead of its 9216-wide classifier.
    features = torchvision.models.alexnet(weights=None).features
    _replace_first_conv(features, in_chans)
    return _PooledFeatures(features), 256


def _vgg(cfg: str, in_chans: int) -> tuple[nn.Module, int]:
    from torchvision.models import vgg

    # make_layers builds only the conv part: constructing the full torchvision model would also allocate the
    # 120M-parameter classifier just to throw it away. Keras VGG(include_top=False, 'avg').
    features = vgg.make_layers(vgg.cfgs[cfg])
    for m in features.modules():
        if isinstance(m, nn.Conv2d):  # torchvision's VGG initialization
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    _replace_first_conv(features, in_chans)
    return _PooledFeatures(features), 512


@_register("vgg16")
def _vgg16(in_chans: int) -> tuple[nn.Module, int]:
    return _vgg("D", in_chans)


@_register("vgg19")
def _vgg19(in_chans: int) -> tuple[nn.Module, int]:
    return _vgg("E", in_chans)


def _timm_backbone(arch: str, in_chans: int) -> tuple[nn.Module, int]:
    import timm

    model = timm.create_model(arch, pretrained=False, num_classes=0, in_chans=in_chans)  # 0: pooled features
    return model, model.num_features


@_register("resnet34")
def _resnet34(in_chans: int) -> tuple[nn.Module, int]:
    return _timm_backbone("resnet34", in_chans)


@_register("resnet50")
def _resnet50(in_chans: int) -> tuple[nn.Module, int]:
    return _timm_backbone("resnet50", in_chans)


@_register("inception_v3")
def _inception_v3(in_chans: int) -> tuple[nn.Module, int]:
    return _timm_backbone("inception_v3", in_chans)  # timm's default has no auxiliary logits


@_register("xception")
def _xception(in_chans: int) -> tuple[nn.Module, int]:
    return _timm_backbone("legacy_xception", in_chans)  # the original (Keras) Xception


@_register("densenet121")
def _densenet121(in_chans: int) -> tuple[nn.Module, int]:
    return _timm_backbone("densenet121", in_chans)  # stands in for the study's "DenseNet50"


assert tuple(_REGISTRY) == BACKBONES, "registry must list config.BACKBONES in order"


def _replace_first_conv(features: nn.Sequential, in_chans: int) -> None:
    conv = features[0]
    if conv.in_channels != in_chans:
        features[0] = nn.Conv2d(in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding)


# ---------------------------------------------------------------------------------------------------------
# Head, freezing


def _make_head(kind: str, num_features: int, num_classes: int, dense_units: int, dropout: float) -> nn.Module:
    if kind == "linear":
        return nn.Linear(num_features, num_classes)
    if kind == "dense":
        return nn.Sequential(
            nn.Linear(num_features, dense_units), nn.ReLU(), nn.Linear(dense_units, num_classes)
        )
    if kind == "dense_dropout":
        return nn.Sequential(
            nn.Linear(num_features, dense_units),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(dense_units, num_classes),
        )
    raise CxrError(f"head '{kind}' is unknown; allowed: {', '.join(HEADS)}.")


def _is_frozen(module: nn.Module) -> bool:
    params = list(module.parameters())
    return bool(params) and not any(p.requires_grad for p in params)


def _freeze_from_input(backbone: nn.Module, fraction: float) -> None:
    """Freeze whole layers, in registration order (= from the input side), until `fraction` of the
    backbone's parameters (by count) are frozen; a layer is never half frozen."""
    layers = [m for m in backbone.modules() if any(True for _ in m.parameters(recurse=False))]
    total = sum(p.numel() for p in backbone.parameters())
    frozen = 0
    for layer in layers:
        if frozen >= fraction * total:
            break
        for p in layer.parameters(recurse=False):
            p.requires_grad_(False)
            frozen += p.numel()


# ---------------------------------------------------------------------------------------------------------
# Pretrained weights


def backbone_state(name: str, state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The backbone part of a pretrained state dict, checked against our RGB architecture (what gets staged).

    Args:
        name: backbone registry name.
        state: state dict in timm's, torchvision's or our own layout; classifiers are dropped.
        source: where `state` came from, named in the error if it does not fit.
    """
    if name not in _REGISTRY:
        raise CxrError(f"backbone '{name}' is unknown; allowed: {', '.join(_REGISTRY)}.")
    backbone, _ = _REGISTRY[name](3)  # ImageNet weights have an RGB stem; a grayscale model adapts it on load
    _load_backbone_weights(backbone, dict(state), source, name)
    return backbone.state_dict()


def _pretrained_state_dict(name: str, pretrained: str) -> tuple[dict[str, torch.Tensor], str]:
    """Resolve `pretrained` to a state dict and a description of its source (for error messages)."""
    if pretrained == weights.IMAGENET:
        path = weights.imagenet_file(name)  # one-line error if cnn3 or not staged; never downloads
        return _local_state_dict(path), f"ImageNet weights {path}"
    path = Path(pretrained).expanduser()
    looks_local = (
        path.exists() or os.sep in pretrained or "/" in pretrained or pretrained.endswith(_WEIGHT_SUFFIXES)
    )
    if pretrained.startswith("hf-hub:") or not looks_local:
        return _hub_state_dict(name, pretrained), pretrained
    return _local_state_dict(path), str(path)


def _local_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from timm.models import load_state_dict

    if path.is_dir():
        candidates = [path / "model.safetensors", path / "pytorch_model.bin"]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise CxrError(
                f"pretrained weights folder {path} holds neither model.safetensors nor pytorch_model.bin; "
                "point 'pretrained' at the weights file itself or at a folder downloaded from the Hub."
            )
        path = found[0]
    if not path.is_file():
        raise CxrError(
            f"pretrained weights file {path} does not exist; give the path of a .pth/.pt/.safetensors file "
            "or of a folder with model.safetensors, or use pretrained='none'."
        )
    try:
        # timm's loader: safetensors, or torch.load(weights_only=True); unwraps 'state_dict'/'model' keys.
        state = load_state_dict(str(path), use_ema=False, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user-fixable problem
        raise CxrError(f"cannot read pretrained weights {path} ({type(e).__name__}: {e}): not a PyTorch state dict "
                       "(.pth/.pt/.bin) or .safetensors file; give such a file, or use pretrained 'none'.") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CxrError(f"pretrained weights {path} is not a state dict (a mapping of names to tensors).")
    return state


def _hub_state_dict(name: str, pretrained: str) -> dict[str, torch.Tensor]:
    import timm

    arch = TIMM_ARCH[name]
    if pretrained.startswith("hf-hub:"):
        full_name = pretrained
    else:
        if arch is None:
            raise CxrError(
                f"no timm pretrained weights exist for '{name}', and '{pretrained}' is not an existing file; "
                "give a local weights file (.pth/.pt/.safetensors) or use pretrained='none'."
            )
        full_name = pretrained if pretrained.startswith(arch + ".") else f"{arch}.{pretrained}"
        known = timm.list_pretrained(arch + ".*")
        if full_name not in known:
            raise CxrError(
                f"pretrained '{pretrained}' is neither an existing weights file nor a timm tag for '{name}'; "
                f"known tags: {', '.join(k.split('.', 1)[1] for k in known) or 'none'}; or 'hf-hub:<repo>'."
            )
    try:
        model = timm.create_model(full_name, pretrained=True, num_classes=0)
    except Exception as e:  # noqa: BLE001 - network/Hub failures come as many types; all need the same fix
        if full_name.startswith("hf-hub:"):
            repo = full_name.removeprefix("hf-hub:")
        else:
            repo = getattr(timm.models.get_pretrained_cfg(full_name), "hf_hub_id", None) or "<repo>"
        raise CxrError(
            f"could not fetch pretrained weights '{full_name}' from the Hugging Face Hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Where the Hub is not "
            f"reachable, download the weights once elsewhere (`hf download {repo} --local-dir DIR`) and "
            "pass DIR (or DIR/model.safetensors) as 'pretrained'."
        ) from None
    return model.state_dict()


def _load_backbone_weights(
    backbone: nn.Module, state: dict[str, torch.Tensor], source: str, name: str
) -> None:
    """Load `state` into `backbone`: strip our own 'backbone.' prefix, drop classifiers, adapt the first conv."""
    state = {k.removeprefix("backbone."): v for k, v in state.items()}
    target = backbone.state_dict()
    state = {k: v for k, v in state.items() if k in target or not k.startswith(_CLASSIFIER_PREFIXES)}
    first_conv = next(n for n, m in backbone.named_modules() if isinstance(m, nn.Conv2d)) + ".weight"
    if first_conv in state and state[first_conv].ndim == 4:
        w, want = state[first_conv], target[first_conv].shape[1]
        if (w.shape[1], want) == (3, 1):
            from timm.models import adapt_input_conv

            # Sum the RGB kernels: a gray image (R = G = B) then gives the same response as in RGB.
            state[first_conv] = adapt_input_conv(1, w)
        elif (w.shape[1], want) == (1, 3):
            state[first_conv] = w.repeat(1, 3, 1, 1) / 3  # same response to a gray image replicated to RGB
    # Older checkpoints lack BatchNorm's step counter; it does not affect the forward pass.
    missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in target]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}"
        for k in state
        if k in target and state[k].shape != target[k].shape
    ]
    if missing or unexpected or wrong_shape:
        problems = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                problems.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise CxrError(
            f"pretrained weights {source} do not fit backbone '{name}': {'; '.join(problems)}. "
            "Were they saved from a different architecture? Use weights of the same backbone."
        )
    backbone.load_state_dict(state, strict=False)  # only num_batches_tracked may be absent (checked above)
