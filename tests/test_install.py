"""A non-editable install runs from any folder: the wheel carries the search spaces and the study's tables."""

from __future__ import annotations

import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kwargs)
    assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_the_wheel_runs_a_smoke_search_from_an_empty_folder_outside_the_checkout(tmp_path):
    # Build the wheel without touching the network (the project's own setuptools), install it into a fresh venv
    # that borrows the already installed dependencies (a .pth line adds their folder, not their .pth files, so the
    # checkout's editable install is not on the path), and run the main command from an empty folder.
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
          str(tmp_path / "wheel"), str(ROOT)])
    wheel = next((tmp_path / "wheel").glob("cxr_search-*.whl"))
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    deps = next(Path(p) for p in site.getsitepackages() if Path(p).name == "site-packages")
    purelib = next(venv.glob("lib/python*/site-packages"))
    (purelib / "_cxr_search_deps.pth").write_text(f"{deps}\n")
    # Without the checkout on PYTHONPATH (a worktree run puts it there): pip would take the checkout's
    # cxr_search.egg-info, which the wheel build above leaves, for cxr-search already installed, and skip the wheel.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CXR_SEARCH_EXPERIMENTS")}
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], env=env)

    empty = tmp_path / "elsewhere"
    empty.mkdir()
    env["CXR_SEARCH_CACHE"] = str(tmp_path / "cache")
    where = _run([str(venv / "bin" / "python"), "-c", "import cxr_search; print(cxr_search.__file__)"], cwd=empty,
                 env=env).stdout.strip()
    assert Path(where).is_relative_to(venv), where  # the installed copy, not the checkout
    _run([str(venv / "bin" / "cxr-search"), "run", "inception", "--smoke", "--name", "wheel"], cwd=empty, env=env)
    exp = empty / "experiments" / "wheel"
    assert (exp / "summary.md").is_file() and (exp / "ensemble" / "ensemble.json").is_file()
    assert "study reported" in (exp / "summary.md").read_text() or "0.9756" in (exp / "summary.md").read_text()
