"""The analysis notebooks: committed without outputs, parameterised by one experiment path, and executed top to
bottom (nbclient, a kernel of this Python) against a real smoke experiment and a search-only one."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import nbformat
import pytest

ANALYSIS = Path(__file__).resolve().parents[1] / "analysis"
NOTEBOOKS = sorted(ANALYSIS.glob("*.ipynb"))


def _runner():
    spec = importlib.util.spec_from_file_location("run_notebooks", ANALYSIS / "run_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_notebook_is_committed_without_outputs_and_has_one_parameters_cell():
    assert {p.name for p in NOTEBOOKS} == set(_runner().NOTEBOOKS)
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        dirty = [i for i, c in enumerate(code) if c.outputs or c.execution_count is not None]
        assert not dirty, f"{path.name}: code cells {dirty} hold outputs; clear them before committing"
        params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
        assert len(params) == 1 and params[0].source.startswith("EXP = "), path.name
        assert nb.metadata.kernelspec.name == "python3"


def test_reading_goes_through_the_library_not_the_files():
    """Notebooks open the experiment with the library's loaders only (one owner per file format)."""
    for path in NOTEBOOKS:
        text = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
        for raw in ("read_parquet", "read_csv", "json.load", "np.load", "JournalStorage", "optuna.load_study"):
            assert raw not in text, f"{path.name} reads files itself ({raw}); use a cxr_search loader"
        assert not re.search(r"(?<![\w.])open\(", text), f"{path.name} opens files itself"


@pytest.mark.slow
@pytest.mark.parametrize("which", ["full", "search_only"])
@pytest.mark.parametrize("notebook", [p.name for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(smoke_experiments, notebook, which, tmp_path):
    exp = smoke_experiments[which]
    out = _runner().execute(ANALYSIS / notebook, exp, tmp_path)  # raises CellExecutionError on any failing cell
    nb = nbformat.read(out, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "every cell ran"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    injected = next(c for c in code if "injected-parameters" in c.metadata.get("tags", []))
    assert str(exp.resolve()) in injected.source
    text = "\n".join(o.get("text", "") for c in code for o in c.outputs if o.output_type == "stream")
    images = sum("image/png" in o.get("data", {}) for c in code for o in c.outputs)
    if notebook == "search_results.ipynb":
        assert images >= 3  # intervals, time against accuracy, learning curves
        plotly = sum("application/vnd.plotly.v1+json" in o.get("data", {}) for c in code for o in c.outputs)
        assert plotly == 2 or "completed trials" in text  # Optuna's importances and parallel coordinates
    elif which == "search_only":
        assert "has not run" in text and images == 0
    else:
        assert images >= (1 if notebook == "seed_distribution.ipynb" else 2)
