"""Shared fixtures: small phantom data sets generated once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from cxr_search.data import phantoms


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
