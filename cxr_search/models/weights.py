"""ImageNet weights for the study's backbones: where each comes from, staging them once, finding them offline.

`pretrained: imagenet` never downloads during a run. `cxr-search weights fetch` downloads each backbone's ImageNet
weights once (timm's copies; torchvision's for AlexNet), checks that they fit our architecture, keeps the backbone
part only (RGB stem, no classifier) and stages them as ``<weights dir>/<tag>/model.safetensors`` beside a
``source.json``. Every trial on every node reads that folder: ``$CXR_SEARCH_WEIGHTS`` (a shared folder on a
cluster) or ``<cache>/weights``. Runs check it before any trial starts (`require_available`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cxr_search.config import BACKBONES
from cxr_search.errors import CxrError
from cxr_search.io.paths import WEIGHTS_ENV, weights_dir

IMAGENET = "imagenet"  # the `pretrained` value that means "this backbone's staged ImageNet weights"
WEIGHTS_FILE = "model.safetensors"
SOURCE_FILE = "source.json"


@dataclass(frozen=True)
class ImagenetSource:
    """Where one backbone's ImageNet weights come from."""

    tag: str  # timm-style "<architecture>.<pretrained tag>"; also the staged folder's name
    library: str  # "timm" (its Hugging Face / release copies) or "torchvision"
    torchvision_weights: str = ""  # torchvision weights enum, e.g. "AlexNet_Weights.IMAGENET1K_V1"


# Per backbone, the ImageNet weights closest to the Keras applications the study fine-tuned: Google's TensorFlow
# weights for InceptionV3 and Xception (the ones Keras ships), the classic torchvision weights for the others.
IMAGENET_SOURCES: dict[str, ImagenetSource | None] = {
    "cnn3": None,  # the study's own 3-conv CNN, trained from scratch
    "alexnet": ImagenetSource("alexnet.tv_in1k", "torchvision", "AlexNet_Weights.IMAGENET1K_V1"),
    "vgg16": ImagenetSource("vgg16.tv_in1k", "timm"),
    "vgg19": ImagenetSource("vgg19.tv_in1k", "timm"),
    "resnet34": ImagenetSource("resnet34.tv_in1k", "timm"),
    "resnet50": ImagenetSource("resnet50.tv_in1k", "timm"),
    "inception_v3": ImagenetSource("inception_v3.tf_in1k", "timm"),
    "xception": ImagenetSource("legacy_xception.tf_in1k", "timm"),
    "densenet121": ImagenetSource("densenet121.tv_in1k", "timm"),  # stands in for the study's "DenseNet50"
}
assert tuple(IMAGENET_SOURCES) == BACKBONES, "IMAGENET_SOURCES must list config.BACKBONES in order"


def imagenet_backbones() -> list[str]:
    """The backbones that have ImageNet weights (all but cnn3), in config.BACKBONES order."""
    return [b for b, s in IMAGENET_SOURCES.items() if s is not None]


def imagenet_source(backbone: str) -> ImagenetSource:
    """The ImageNet source of `backbone`; a CxrError for cnn3 (none exist) or an unknown name."""
    if backbone not in IMAGENET_SOURCES:
        raise CxrError(f"backbone '{backbone}' is unknown; allowed: {', '.join(BACKBONES)}.")
    source = IMAGENET_SOURCES[backbone]
    if source is None:
        raise CxrError(
            f"pretrained 'imagenet': '{backbone}' has no ImageNet weights (the study trained its 3-conv CNN "
            f"from scratch); set pretrained: none for {backbone}."
        )
    return source


def staged_file(backbone: str, root: str | Path | None = None) -> Path:
    """Where `backbone`'s staged ImageNet weights live (whether or not they are there yet)."""
    return Path(root if root is not None else weights_dir()) / imagenet_source(backbone).tag / WEIGHTS_FILE


def imagenet_file(backbone: str) -> Path:
    """The staged ImageNet weights of `backbone` (what `create_model(pretrained="imagenet")` loads).

    Raises:
        CxrError: one line naming the fix when the backbone has none or they are not staged; never downloads.
    """
    require_available([(backbone, IMAGENET)])
    return staged_file(backbone)


def require_available(backbones_and_pretrained: Iterable[tuple[str, str]]) -> None:
    """Check, before any trial starts, that every `pretrained: imagenet` backbone has its weights staged.

    Other `pretrained` values ("none", files, timm tags) are left to the model factory.

    Args:
        backbones_and_pretrained: (backbone, pretrained) pairs a run can produce, e.g. every grid point.

    Raises:
        CxrError: one line naming the backbones and the fix (fetch, copy or point CXR_SEARCH_WEIGHTS at the
            folder, or pretrained: none). Nothing is downloaded.
    """
    wanted = sorted({b for b, p in backbones_and_pretrained if p == IMAGENET}, key=_backbone_order)
    for backbone in wanted:
        imagenet_source(backbone)  # cnn3 / unknown names: their own one-line error
    root = weights_dir()
    missing = [b for b in wanted if not staged_file(b, root).is_file()]
    if missing:
        names = ",".join(missing)
        where = f"${WEIGHTS_ENV}={root}" if os.environ.get(WEIGHTS_ENV) else str(root)
        raise CxrError(
            f"pretrained 'imagenet': weights for {', '.join(missing)} are not staged in {where} and runs never "
            f"download them. Run `cxr-search weights fetch --backbones {names} --to DIR` on a machine with "
            f"internet, then copy DIR's contents to {root} (or set {WEIGHTS_ENV}=DIR where DIR is shared), "
            "or set pretrained: none."
        )


def _backbone_order(backbone: str) -> int:
    return BACKBONES.index(backbone) if backbone in BACKBONES else len(BACKBONES)


@dataclass(frozen=True)
class Staged:
    """One backbone's entry in a weights folder."""

    backbone: str
    tag: str  # "" for a backbone without ImageNet weights
    path: Path | None
    status: str  # "staged", "missing", "fetched" (just now) or "none" (no ImageNet weights exist)
    megabytes: float = 0.0


def list_staged(root: str | Path | None = None) -> list[Staged]:
    """Every backbone's status in a weights folder (default: `paths.weights_dir()`); reads no weights."""
    root = Path(root if root is not None else weights_dir()).expanduser()
    out = []
    for backbone, source in IMAGENET_SOURCES.items():
        if source is None:
            out.append(Staged(backbone, "", None, "none"))
            continue
        path = staged_file(backbone, root)
        if path.is_file():
            out.append(Staged(backbone, source.tag, path, "staged", path.stat().st_size / 2**20))
        else:
            out.append(Staged(backbone, source.tag, path, "missing"))
    return out
