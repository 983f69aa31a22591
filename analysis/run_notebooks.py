"""Execute the analysis notebooks against one experiment, papermill-style, into an output folder.

    python analysis/run_notebooks.py EXP [--out DIR] [--timeout S] [NOTEBOOK ...]     (or: make notebooks EXP=...)

Each notebook has a cell tagged `parameters` holding `EXP = "..."`; the experiment path given here goes into a
cell tagged `injected-parameters` right after it (what papermill does), and the notebook runs top to bottom with
nbclient on a kernel of this very Python (the project's venv), never a user-wide `python3` kernelspec. The committed
notebooks stay without outputs; the executed copies go to DIR (default EXP/notebooks).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

HERE = Path(__file__).resolve().parent
NOTEBOOKS = ("search_results.ipynb", "seed_distribution.ipynb", "ensemble.ipynb")
KERNEL = "python3"


class ThisPythonKernels(KernelSpecManager):
    """ipykernel's own spec for the running interpreter, whatever kernelspecs the user has installed."""

    def get_kernel_spec(self, kernel_name: str) -> Any:
        from ipykernel.kernelspec import RESOURCES, get_kernel_dict

        return self.kernel_spec_class(resource_dir=RESOURCES, **get_kernel_dict())


def with_parameters(nb: nbformat.NotebookNode, **parameters: object) -> nbformat.NotebookNode:
    """The notebook with an `injected-parameters` cell after its `parameters` cell (papermill's convention)."""
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    if not tagged:
        raise SystemExit(f"{nb.metadata.get('path', 'notebook')}: no cell tagged 'parameters'")
    source = "\n".join(f"{name} = {value!r}" for name, value in parameters.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(tagged[0] + 1, cell)
    return nb


def execute(notebook: str | Path, exp: str | Path, out_dir: str | Path, *, timeout: int = 600) -> Path:
    """Run one notebook on experiment `exp`; the executed copy (outputs included) is written to `out_dir`.

    Raises:
        nbclient.exceptions.CellExecutionError: a cell failed (the partial copy is written first).
    """
    notebook, out_dir = Path(notebook), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    nb = with_parameters(nbformat.read(notebook, as_version=4), EXP=str(Path(exp).resolve()))
    out = out_dir / notebook.name
    with tempfile.TemporaryDirectory(prefix="cxr-kernel-") as sockets:
        client = NotebookClient(nb, timeout=timeout, kernel_name=KERNEL, kernel_manager_class=_kernel_manager(sockets),
                                resources={"metadata": {"path": str(out_dir)}})
        try:
            client.execute()
        finally:
            nbformat.write(nb, out)
    return out


def _kernel_manager(socket_dir: str) -> type:
    from jupyter_client.manager import AsyncKernelManager

    class ThisPythonKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs: object) -> None:
            # Unix sockets (absolute paths: kernel and client run in different folders) rather than TCP ports on
            # loopback: nothing listens on the network
            super().__init__(kernel_spec_manager=ThisPythonKernels(), transport="ipc",
                             ip=os.path.join(socket_dir, "kernel"), **kwargs)

    return ThisPythonKernelManager


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("exp", type=Path, help="experiment folder written by `cxr-search run`")
    parser.add_argument("notebooks", nargs="*", help=f"notebooks to run (default: {', '.join(NOTEBOOKS)})")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default EXP/notebooks)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    args = parser.parse_args(argv)
    if not (args.exp / "pipeline.json").is_file():
        print(f"error: {args.exp} is not an experiment folder (no pipeline.json); pass a folder written by "
              "`cxr-search run`.", file=sys.stderr)
        return 2
    out = args.out or args.exp / "notebooks"
    failed = 0
    for name in args.notebooks or NOTEBOOKS:
        path = Path(name) if Path(name).is_file() else HERE / name
        try:
            print(f"executed: {execute(path, args.exp, out, timeout=args.timeout)}")
        except CellExecutionError as e:
            failed += 1
            print(f"error: {path.name} failed (partial output in {out / path.name}):\n{e}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
