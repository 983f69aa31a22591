"""ImageNet weights for the study's backbones: where each comes from, staging them once, finding them offline.

`pretrained: imagenet` never downloads during a run. `cxr-search weights fetch` downloads each backbone's ImageNet
weights once (timm's copies; torchvision's for AlexNet), checks that they fit our architecture, keeps the backbone
part only (RGB stem, no classifier) and stages them as ``<weights dir>/<tag>/model.safetensors`` beside a
``source.json``. Every trial on every node reads that folder: ``$CXR_SEARCH_WEIGHTS`` (a shared folder on a
cluster) or ``<cache>/weights``. Runs check it before any trial starts (`require_available`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr_search.config import BACKBONES
from cxr_search.errors import CxrError
from cxr_search.paths import WEIGHTS_ENV, weights_dir

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


def stage(
    backbone: str, state: Mapping[str, Any], *, root: str | Path | None = None, origin: str = "local"
) -> Path:
    """Stage an ImageNet state dict for `backbone` (what `fetch` does after downloading).

    The state is loaded into our RGB backbone first (so weights that do not fit fail here, not in a trial);
    the backbone's own state dict is written, classifier dropped, atomically: a reader never sees half a file.

    Args:
        backbone: registry name, one with ImageNet weights.
        state: a state dict in timm's, torchvision's or our own layout (classifiers are ignored).
        root: weights folder (default: `paths.weights_dir()`).
        origin: where the weights came from, recorded in source.json.

    Returns:
        The staged weights file.
    """
    import torch
    from safetensors.torch import save_file

    from cxr_search.models import backbone_state

    source = imagenet_source(backbone)
    final = staged_file(backbone, root)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in backbone_state(backbone, state, origin).items()}
    final.parent.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{source.tag}-", dir=final.parent.parent))
    try:
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"backbone": backbone, "tag": source.tag})
        record = {
            "backbone": backbone, "tag": source.tag, "library": source.library, "origin": origin,
            "tensors": len(tensors), "parameters": int(sum(t.numel() for t in tensors.values() if t.is_floating_point())),
            "bytes": (tmp / WEIGHTS_FILE).stat().st_size, "sha256": _sha256(tmp / WEIGHTS_FILE),
            "staged": dt.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
        }
        (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2))
        if final.parent.exists():
            shutil.rmtree(final.parent)
        tmp.rename(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Staged:
    """One backbone's entry in a weights folder."""

    backbone: str
    tag: str  # "" for a backbone without ImageNet weights
    path: Path | None
    status: str  # "staged", "missing", "fetched" (just now) or "none" (no ImageNet weights exist)
    megabytes: float = 0.0


def fetch(
    backbones: Iterable[str] | None = None, *, root: str | Path | None = None, force: bool = False,
    progress: bool = True,
) -> list[Staged]:
    """Download ImageNet weights once and stage them (needs internet; the only place that downloads).

    Args:
        backbones: which ones (default: every backbone with ImageNet weights); cnn3 is an error.
        root: folder to stage into (default: `paths.weights_dir()`), e.g. shared storage for a cluster.
        force: download again even where weights are already staged.
        progress: show download progress bars.

    Returns:
        One entry per backbone, status "fetched" or "staged" (already there, not downloaded).
    """
    names = list(backbones) if backbones is not None else imagenet_backbones()
    sources = {b: imagenet_source(b) for b in names}  # every name checked before the first download
    root = Path(root if root is not None else weights_dir()).expanduser()
    out = []
    for backbone, source in sources.items():
        path = staged_file(backbone, root)
        status = "staged"
        if force or not path.is_file():
            root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix=".download-", dir=root) as download_dir:
                state, origin = _download(source, Path(download_dir), progress)
                stage(backbone, state, root=root, origin=origin)
            status = "fetched"
        out.append(Staged(backbone, source.tag, path, status, path.stat().st_size / 2**20))
    return out


def _download(source: ImagenetSource, download_dir: Path, progress: bool) -> tuple[dict[str, Any], str]:
    """The upstream state dict of `source` and its origin (hub repo or URL); the one network access."""
    try:
        if source.library == "torchvision":
            import torch
            import torchvision

            url = torchvision.models.get_weight(source.torchvision_weights).url
            state = torch.hub.load_state_dict_from_url(
                url, model_dir=str(download_dir), progress=progress, check_hash=True, weights_only=True
            )
            return state, url
        import timm

        cfg = timm.models.get_pretrained_cfg(source.tag)
        origin = (f"hf-hub:{cfg.hf_hub_id}" if cfg.hf_hub_id else cfg.url) if cfg else ""
        if not origin:  # timm would silently build random weights for a tag with nowhere to load from
            raise RuntimeError(f"timm lists no download location for {source.tag}")
        model = timm.create_model(source.tag, pretrained=True, cache_dir=download_dir)
        return model.state_dict(), origin
    except Exception as e:  # noqa: BLE001 - Hub, HTTP and hash failures come as many types; one fix for all
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CxrError(
            f"could not download ImageNet weights {source.tag} ({type(e).__name__}: {first}); "
            "`cxr-search weights fetch` needs internet: run it on a machine that has it, copy the folder it "
            f"fills to this machine's {weights_dir()} (or set {WEIGHTS_ENV} to it), or use pretrained: none."
        ) from None


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
