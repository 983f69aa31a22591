"""Shared fixtures (small phantom data sets generated once per test session) and how the suite is spread over
pytest-xdist workers (pyproject.toml: `-n auto --dist loadfile`)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
from xdist.scheduler import LoadFileScheduling

from cxr_search.data import phantoms

# Files that share a session fixture too costly to build once per worker (`smoke_experiments`, about 1 minute):
# the scheduler hands them to one worker together. (xdist's own `xdist_group` marks cannot do it under pytest 9.2:
# xdist 3.8 tags the node ids through `item._nodeid`, which pytest 9.2 no longer reads.)
SHARED_FIXTURE_FILES = {
    "smoke_experiments": ("tests/test_html_report.py", "tests/test_live_views.py", "tests/test_notebooks.py"),
}
# Handed out first, roughly longest first (under two workers on the 2-core VM, `--durations=0`: the crash harness
# about 280 s, test_search_tune 270, cli_errors 190, the smoke group 150, remote storage 120, install 100, the rest
# under 90 each): a long file handed out last would leave the other worker idle at the end. The two workers ended
# within 40 s of each other. The rest follows in collection order.
LONGEST_FIRST = (
    "tests/test_crash_consistency.py", "tests/test_search_tune.py", "smoke_experiments", "tests/test_cli_errors.py",
    "tests/test_remote_storage.py", "tests/test_engine.py", "tests/test_explain.py", "tests/test_ddp.py",
    "tests/test_models.py", "tests/test_install.py", "tests/test_gpu_suite.py", "tests/test_retrain.py",
    "tests/test_cluster.py", "tests/test_security.py",
)
_GROUP_OF = {path: group for group, paths in SHARED_FIXTURE_FILES.items() for path in paths}


def _scope(nodeid: str) -> str:
    """The unit one worker runs: a test file, or the group of files that share a costly session fixture."""
    path = nodeid.split("::", 1)[0]
    return _GROUP_OF.get(path, path)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: two workers for a run of the whole suite (alone it leaves a core idle while it waits on Ray
    start-ups and subprocesses; two keep both cores of the 2-core VM busy, a third would only queue), none for named
    files or test ids, so their prints, `-s` and `--pdb` work as without xdist."""
    whole_suite = all(Path(arg).is_dir() for arg in config.args)  # no argument: `testpaths`, a folder
    return min(2, os.cpu_count() or 1) if whole_suite else 0


class _FileOrGroupScheduling(LoadFileScheduling):
    """xdist's `loadfile` (a file's tests on one worker, so its module fixtures are built once), with the files of
    `SHARED_FIXTURE_FILES` on one worker together."""

    def _split_scope(self, nodeid: str) -> str:
        return _scope(nodeid)


def pytest_xdist_make_scheduler(config: pytest.Config, log) -> LoadFileScheduling | None:
    return _FileOrGroupScheduling(config, log) if config.getvalue("dist") == "loadfile" else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Longest files first (xdist hands out files in collection order), and a warning for a file that uses a shared
    session fixture without being listed in `SHARED_FIXTURE_FILES` (it would build the fixture on a second worker)."""
    for group, paths in SHARED_FIXTURE_FILES.items():
        unlisted = sorted({item.nodeid.split("::", 1)[0] for item in items
                           if group in getattr(item, "fixturenames", ())} - set(paths))
        if unlisted:
            warnings.warn(f"{', '.join(unlisted)} use {group}: add them to SHARED_FIXTURE_FILES in tests/conftest.py "
                          "so that one worker builds it", stacklevel=1)
    rank = {scope: i for i, scope in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(_scope(item.nodeid), len(rank)))  # stable: a file keeps its order


@pytest.fixture(scope="module", autouse=True)
def _environment_per_file():
    """Each test file starts from the session's environment variables, whatever ran before it on this worker.

    Files run in another order under xdist than alone, and an in-process search leaves variables behind (Ray's
    `RAY_AUTH_MODE`, `init_ray`'s `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, which makes `ray start` refuse the second
    node of tests/test_cluster.py).
    """
    saved = dict(os.environ)
    yield
    for key in set(os.environ) - set(saved):
        del os.environ[key]
    os.environ.update(saved)


def pytest_configure(config: pytest.Config) -> None:
    """Make Ray's default token (~/.ray/auth_token) before any worker starts a local Ray.

    Each new local Ray writes one when the file is missing; two workers starting theirs at once on a fresh machine
    would each write their own, and one Ray would then hold a token its processes no longer read.
    """
    token = Path.home() / ".ray" / "auth_token"
    if not hasattr(config, "workerinput") and not token.exists():
        from ray._private.authentication.authentication_token_setup import generate_and_save_token

        generate_and_save_token()


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

    from cxr_search.experiment.folder import Experiment
    from cxr_search.experiment.results import build_results, write_results

    root = tmp_path_factory.mktemp("smoke")

    def cli(*args: str) -> None:
        proc = subprocess.run([sys.executable, "-m", "cxr_search.cli", *args], capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, f"cxr-search {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

    cli("run", "inception", "--smoke", "--stages", "search", "--name", "search_only", "--storage", str(root))
    search_only, full = root / "search_only", root / "full"
    shutil.copytree(search_only, full, ignore=shutil.ignore_patterns(".lock"))
    # the copy's table must name its own trial folders and predictions (results.parquet holds absolute paths)
    write_results(full, build_results(full, Experiment.open(full).objective))
    cli("retrain", str(full), "--top", "1", "--seeds", "2", "--max-epochs", "1")
    cli("ensemble", str(full), "--top", "3")
    return {"search_only": search_only, "full": full}
