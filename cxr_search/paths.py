"""Where things live on disk: the user cache (phantoms, array caches) and the repository's data files."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def cache_root() -> Path:
    """The cache folder: ``$CXR_SEARCH_CACHE`` if set, else the platform's user cache dir (``~/.cache/cxr-search``)."""
    env = os.environ.get("CXR_SEARCH_CACHE")
    root = Path(env) if env else Path(platformdirs.user_cache_dir("cxr-search", appauthor=False))
    root.mkdir(parents=True, exist_ok=True)
    return root


def experiments_root() -> Path:
    """Where experiments go without --storage/--out: ``$CXR_SEARCH_EXPERIMENTS`` or ``./experiments``."""
    return Path(os.environ.get("CXR_SEARCH_EXPERIMENTS", "experiments"))


def repo_root() -> Path:
    """The source checkout (the project is installed editable; search spaces live beside the package)."""
    return Path(__file__).resolve().parent.parent


def search_spaces_dir() -> Path:
    return repo_root() / "search_spaces"


def reference_dir() -> Path:
    """The study's reported figures (copied from the study's tables), printed as "study reported"."""
    return repo_root() / "reference"
