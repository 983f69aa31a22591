"""The per-image preprocessing that builds the cached arrays, as a recorded albumentations pipeline.

One owner of the concept: ``Preprocessing.build(size, equalize)`` makes the pipeline the cache applies to every
decoded 8-bit grayscale image (:mod:`cxr_search.data.decode`): resize the whole image to ``size x size``
ignoring its aspect ratio (as the study's Keras resize did; ``cv2.INTER_AREA`` when any side shrinks, which
averages pixels, else ``cv2.INTER_LINEAR``), then equalize the histogram (``"hist"``, the study's choice), apply
CLAHE (``"clahe"``, clip limit 2, 8x8 tiles) or leave it (``"none"``).

The record (``Preprocessing.to_dict()``) is albumentations' own serialisation (``A.to_dict``, replayed with
``A.from_dict``) plus what albumentations cannot express: the decoder that comes before it and the settings it
was built from. ``write_record``/``read_record`` are the one writer and the one reader of
``preprocessing.json`` (a checkpoint folder, an ensemble folder); ``locate`` finds the record of a model.
Training augmentation is not part of this: it stays the batched on-device warp (``data/augment.py``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxr_search.errors import CxrError

# albumentations asks PyPI for a newer version on import (a 2 s network call); nothing may be fetched at run
# time. Set here, at import, so decoding processes that unpickle a Preprocessing inherit it too.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

PREPROCESSING_FILE = "preprocessing.json"
RECORD_FORMAT = 1  # bump when the record's own fields change (not albumentations')
EQUALIZE = ("hist", "clahe", "none")
CLAHE_CLIP_LIMIT = 2.0
CLAHE_TILES = (8, 8)
# What produces the pipeline's input; the pipeline itself never sees colour or 16-bit data.
DECODER = "cxr_search.data.decode: uint8 grayscale (16-bit and DICOM scaled from their value range)"


@dataclass(frozen=True)
class Preprocessing:
    """A recorded preprocessing: callable on a uint8 [H, W] image, picklable (runs in decoding processes)."""

    size: int  # output side, pixels
    equalize: str  # "hist" | "clahe" | "none"
    albumentations: dict[str, Any] = field(hash=False)  # A.to_dict(pipeline): the transform that is replayed

    @classmethod
    def build(cls, size: int, equalize: str) -> Preprocessing:
        """The pipeline for these settings (validated)."""
        if equalize not in EQUALIZE:
            raise CxrError(f"equalize={equalize!r} is not one of {', '.join(EQUALIZE)}")
        if isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= 2048:
            raise CxrError(f"size={size!r} must be an integer number of pixels between 8 and 2048")
        import cv2

        with _without_torch_helpers():
            import albumentations as A
        steps = [A.Resize(size, size, interpolation=cv2.INTER_LINEAR, area_for_downscale="image", p=1.0)]
        if equalize == "hist":
            steps.append(A.Equalize(mode="cv", by_channels=True, p=1.0))
        elif equalize == "clahe":
            steps.append(A.CLAHE(clip_limit=(CLAHE_CLIP_LIMIT, CLAHE_CLIP_LIMIT), tile_grid_size=CLAHE_TILES, p=1.0))
        return cls(size, equalize, _jsonable(A.to_dict(A.Compose(steps))))

    @classmethod
    def from_dict(cls, record: dict[str, Any], *, source: str = "preprocessing record") -> Preprocessing:
        """Read a record written by :meth:`to_dict`; the albumentations part is replayed as stored."""
        try:
            fmt = int(record.get("format", 0))
            size, equalize, pipeline = int(record["size"]), str(record["equalize"]), dict(record["albumentations"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CxrError(f"{source}: not a preprocessing record ({type(e).__name__}: {e}); "
                           "rerun the training or ensemble step that wrote it.") from None
        if fmt > RECORD_FORMAT:
            raise CxrError(f"{source}: preprocessing record format {fmt} is newer than this cxr-search "
                           f"understands ({RECORD_FORMAT}); upgrade cxr-search.")
        return cls(size, equalize, pipeline)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able record: settings, the decoder before the pipeline, and A.to_dict of the pipeline."""
        return {"format": RECORD_FORMAT, "size": self.size, "equalize": self.equalize, "decoder": DECODER,
                "albumentations": self.albumentations}

    def __call__(self, gray: np.ndarray) -> np.ndarray:
        """uint8 [H, W] -> uint8 [size, size]."""
        out = _pipeline(json.dumps(self.albumentations, sort_keys=True))(image=np.ascontiguousarray(gray))["image"]
        if out.shape != (self.size, self.size) or out.dtype != np.uint8:
            raise CxrError(f"the recorded preprocessing produced {out.dtype} {out.shape}, expected uint8 "
                           f"({self.size}, {self.size}); the record does not match its size setting.")
        return out


@functools.lru_cache(maxsize=8)
def _pipeline(serialised: str) -> Any:
    """The albumentations pipeline of a record, built once per process (validation costs ~1 ms)."""
    with _without_torch_helpers():
        import albumentations

        return albumentations.from_dict(json.loads(serialised))


@contextlib.contextmanager
def _without_torch_helpers() -> Iterator[None]:
    """Keep albumentations from importing its optional torch helpers in a process that has not loaded torch.

    Its ``__init__`` and ``from_dict`` import ``albumentations.pytorch`` (ToTensorV2), which imports torch:
    ~2 of the ~3 s each spawned decoding process spent on albumentations (measured on 2 cores). The records
    here never use those helpers; a missing module is what albumentations expects when torch is absent
    (it catches the ImportError). The block is lifted on exit, so a later ``import albumentations.pytorch``
    works as usual.
    """
    if "torch" in sys.modules or "albumentations.pytorch" in sys.modules:
        yield
        return
    sys.modules["albumentations.pytorch"] = None  # makes that one import raise ImportError
    try:
        yield
    finally:
        if sys.modules.get("albumentations.pytorch", False) is None:
            del sys.modules["albumentations.pytorch"]


def _jsonable(obj: Any) -> Any:
    """Tuples -> lists, so a record compares equal to itself after a JSON round trip."""
    return json.loads(json.dumps(obj))


def write_record(folder: str | Path, record: dict[str, Any]) -> Path:
    """Write ``folder/preprocessing.json`` atomically (the one writer of that file)."""
    from cxr_search.io import storage

    return storage.atomic_write_json(storage.path(folder) / PREPROCESSING_FILE, record)


def read_record(folder: str | Path) -> dict[str, Any] | None:
    """The record in ``folder/preprocessing.json`` (the one reader of that file), or None when absent."""
    from cxr_search.io import storage

    path = storage.path(folder) / PREPROCESSING_FILE
    if not path.is_file():
        return None
    try:
        return storage.read_json(path)
    except (OSError, ValueError) as e:
        raise CxrError(f"{path}: unreadable ({e}); delete it and rerun the step that wrote it.") from None


def locate(*, ensemble: dict[str, Any] | None = None, folders: Sequence[str | Path] = (),
           fallback: tuple[int, str] | None = None, where: str = "", required: bool = True) -> Preprocessing | None:
    """The preprocessing a model was trained with, from the first place that records it.

    Order: the ``preprocessing`` entry of an ensemble description, ``preprocessing.json`` in each of ``folders``
    (an ensemble folder, checkpoint folders; all that have one must agree), then ``fallback``: the (size,
    equalize) of the experiment's plan, which the caller reads through the experiment module.

    Args:
        ensemble: the content of ensemble.json, if the model is an ensemble.
        folders: folders that may hold ``preprocessing.json``.
        fallback: (size, equalize) from the experiment's plan, if known.
        where: what the user named, for the error message.
        required: raise when nothing records it (else return None).

    Raises:
        CxrError: no record anywhere (when required), or members recorded with different preprocessing.
    """
    if ensemble is not None and ensemble.get("preprocessing"):
        return Preprocessing.from_dict(ensemble["preprocessing"], source=f"{where} (ensemble.json)")
    found = [(Path(f), r) for f in folders if (r := read_record(f)) is not None]
    if found:
        first = Preprocessing.from_dict(found[0][1], source=str(found[0][0] / PREPROCESSING_FILE))
        for folder, record in found[1:]:
            other = Preprocessing.from_dict(record, source=str(folder / PREPROCESSING_FILE))
            if other.to_dict() != first.to_dict():
                raise CxrError(f"{found[0][0]} and {folder} were trained with different preprocessing "
                               f"({first.size} px {first.equalize} vs {other.size} px {other.equalize}); "
                               "an ensemble needs members trained on the same arrays.")
        return first
    if fallback is not None:
        return Preprocessing.build(int(fallback[0]), str(fallback[1]))
    if not required:
        return None
    raise CxrError(f"{where}: no recorded preprocessing ({PREPROCESSING_FILE} in the checkpoint folder, "
                   "'preprocessing' in ensemble.json, or the experiment's pipeline.json); the model was saved by "
                   "an older cxr-search: retrain it, or rebuild the ensemble with `cxr-search ensemble EXP`.")


