"""Where things live on disk: the user cache (phantoms, array caches, staged weights) and the repository's data files."""

from __future__ import annotations

import os
from pathlib import Path

# Points every run at a folder of staged ImageNet weights (`cxr-search weights fetch --to DIR`), e.g. on shared storage.
WEIGHTS_ENV = "CXR_SEARCH_WEIGHTS"


def cache_root() -> Path:
    """The cache folder: ``$CXR_SEARCH_CACHE`` if set, else the platform's user cache dir (``~/.cache/cxr-search``)."""
    env = os.environ.get("CXR_SEARCH_CACHE")
    if env:
        root = Path(env)
    else:
        import platformdirs  # here, not at the top: GPU hosts that run benchmarks with $CXR_SEARCH_CACHE lack it

        root = Path(platformdirs.user_cache_dir("cxr-search", appauthor=False))
    root.mkdir(parents=True, exist_ok=True)
    return root


def weights_dir() -> Path:
    """Staged pretrained weights: ``$CXR_SEARCH_WEIGHTS`` if set (a folder every node can read), else ``<cache>/weights``."""
    env = os.environ.get(WEIGHTS_ENV)
    return Path(env).expanduser() if env else cache_root() / "weights"


def experiments_root() -> Path:
    """Where experiments go without --storage/--out: ``$CXR_SEARCH_EXPERIMENTS`` or ``./experiments``."""
    return Path(os.environ.get("CXR_SEARCH_EXPERIMENTS", "experiments"))


def package_data() -> Path:
    """Data files shipped inside the package (in a checkout, links to the top-level folders that are the source)."""
    return Path(__file__).resolve().parents[1] / "_data"  # cxr_search/_data


def search_spaces_dir() -> Path:
    """The shipped search spaces (`search_spaces/*.yaml`)."""
    return package_data() / "search_spaces"


def reference_dir() -> Path:
    """The study's reported figures (copied from the study's tables), printed as "study reported"."""
    return package_data() / "reference"
