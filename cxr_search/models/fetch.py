"""Fetch and stage ImageNet weights once (`cxr-search weights fetch`): the only code that downloads weights.

`weights.py` (below the models) knows where staged weights live and what each backbone's source is; staging
needs the models themselves (weights are checked against our architecture before they are written), so it
lives here, above them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cxr_search.errors import CxrError
from cxr_search.io.paths import WEIGHTS_ENV, weights_dir
from cxr_search.models.weights import (
    SOURCE_FILE,
    WEIGHTS_FILE,
    ImagenetSource,
    Staged,
    imagenet_backbones,
    imagenet_source,
    staged_file,
)


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

    from cxr_search.models.registry import backbone_state

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


