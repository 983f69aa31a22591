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


@pytest.fixture(scope="session")
def smoke_experiments(tmp_path_factory, _private_cache_and_experiments) -> dict[str, Path]:
    """Two real smoke experiments made with the CLI, shared by the report, notebook and live-view tests.

    `search_only`: `cxr-search run inception --smoke --stages search` (4 InceptionV3 trials, ASHA, Optuna).
    `full`: a copy of it carried through the other stages with `cxr-search retrain` and `cxr-search ensemble`
    (what `run` does after the search), so the search runs once: about 2 minutes in all on a laptop CPU.
    """
    import shutil
    import subprocess
    import sys

    from cxr_search import experiment

    root = tmp_path_factory.mktemp("smoke")

    def cli(*args: str) -> None:
        proc = subprocess.run([sys.executable, "-m", "cxr_search.cli", *args], capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, f"cxr-search {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

    cli("run", "inception", "--smoke", "--stages", "search", "--name", "search_only", "--storage", str(root))
    search_only, full = root / "search_only", root / "full"
    shutil.copytree(search_only, full, ignore=shutil.ignore_patterns(".lock"))
    # the copy's table must name its own trial folders and predictions (results.parquet holds absolute paths)
    experiment.write_results(full, experiment.build_results(full, experiment.Experiment.open(full).objective))
    cli("retrain", str(full), "--top", "1", "--seeds", "2", "--max-epochs", "1")
    cli("ensemble", str(full), "--top", "3")
    return {"search_only": search_only, "full": full}
