"""The package's layers hold (import-linter contracts in pyproject.toml), and the check would catch a breach."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _lint_imports(cwd: Path, package_parent: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                           "lint_imports_command()"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_layer_contracts_hold():
    proc = _lint_imports(ROOT, ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "3 kept, 0 broken" in proc.stdout


def test_an_upward_import_breaks_the_layers_and_a_ray_import_below_tuning_is_caught(tmp_path):
    shutil.copytree(ROOT / "cxr_search", tmp_path / "cxr_search", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    loop = tmp_path / "cxr_search" / "training" / "loop.py"
    loop.write_text(loop.read_text() + "\nfrom cxr_search.tuning import stages  # noqa: E402,F401\n")
    results = tmp_path / "cxr_search" / "experiment" / "results.py"
    results.write_text(results.read_text() + "\nimport ray  # noqa: E402,F401\n")
    proc = _lint_imports(tmp_path, tmp_path)
    assert proc.returncode != 0
    assert "cxr_search.training.loop -> cxr_search.tuning.stages" in proc.stdout
    assert "cxr_search.experiment.results -> ray" in proc.stdout
    assert "BROKEN" in proc.stdout
