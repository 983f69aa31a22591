"""Shared fixtures: small phantom data sets generated once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cxr_search.data import phantoms


@pytest.fixture(scope="session", autouse=True)
def _private_cache_and_experiments(tmp_path_factory):
    """No test reads or writes the user's cache (~/.cache/cxr-search) or ./experiments."""
    root = tmp_path_factory.mktemp("user")
    saved = {k: os.environ.get(k) for k in ("CXR_SEARCH_CACHE", "CXR_SEARCH_EXPERIMENTS")}
    os.environ["CXR_SEARCH_CACHE"] = str(root / "cache")
    os.environ["CXR_SEARCH_EXPERIMENTS"] = str(root / "experiments")
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def tiny_phantoms(tmp_path_factory) -> Path:
    """120 clean phantoms around 64 px (seed 0) in the Kaggle layout, with masks and ``manifest.csv``."""
    out = tmp_path_factory.mktemp("phantoms") / "tiny"
    phantoms.generate(out, n_images=120, size=64, seed=0, progress=False)
    return out


@pytest.fixture(scope="session")
def phantoms_with_injections(tmp_path_factory) -> Path:
    """120 phantoms around 64 px (seed 1) plus injected duplicates, confounder and corrupt files.

    ``manifest.csv`` marks each injected file (``injected`` column); ``phantoms.json`` holds the counts.
    """
    out = tmp_path_factory.mktemp("phantoms") / "injected"
    phantoms.generate(out, n_images=120, size=64, seed=1, inject=phantoms.INJECTIONS, progress=False)
    return out
