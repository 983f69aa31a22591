"""The shape of the code, counted the same way before and after a refactoring.

    python benchmarks/code_shape.py [--json]

Counts: the longest function and the largest module of `cxr_search/` (lines), functions over 80 lines, modules over
600 lines, `ray._private` imports, uses of dependencies' private attributes (an attribute `x._name` read in a module
that imports Ray or Optuna, where `_name` is defined nowhere in our package: Ray's or Optuna's own, which the next
release may rename), and test modules that import another test module.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cxr_search"
TESTS = ROOT / "tests"
LONG_FUNCTION = 80
LARGE_MODULE = 600


def _modules(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "_data" not in p.parts)


def _functions(tree: ast.AST) -> list[tuple[str, int]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            out.append((node.name, node.end_lineno - node.lineno + 1))
    return out


def _own_names(trees: dict[Path, ast.AST]) -> set[str]:
    names: set[str] = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
    return names


def _imports(tree: ast.AST) -> list[str]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append(node.module)
    return out


def measure() -> dict[str, object]:
    trees = {p: ast.parse(p.read_text(), str(p)) for p in _modules(PACKAGE)}
    own = _own_names(trees)
    functions = [(f"{p.relative_to(ROOT)}:{name}", n) for p, t in trees.items() for name, n in _functions(t)]
    sizes = [(str(p.relative_to(ROOT)), len(p.read_text().splitlines())) for p in trees]
    ray_private, foreign_private = [], []
    for p, tree in trees.items():
        imports = _imports(tree)
        ray_private += [f"{p.relative_to(ROOT)}: {m}" for m in imports if m.startswith("ray._private")]
        if not any(m.split(".")[0] in ("ray", "optuna") for m in imports):
            continue
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and node.attr not in own
            ):
                foreign_private.append(f"{p.relative_to(ROOT)}:{node.lineno} .{node.attr}")
    test_names = {p.stem for p in TESTS.rglob("test_*.py")}
    cross_tests = []
    for p in sorted(TESTS.rglob("*.py")):
        for m in _imports(ast.parse(p.read_text())):
            if m.split(".")[-1] in test_names or m.startswith("tests.test_"):
                cross_tests.append(f"{p.relative_to(ROOT)} imports {m}")
    functions.sort(key=lambda x: -x[1])
    sizes.sort(key=lambda x: -x[1])
    return {
        "longest_function": functions[0],
        "functions_over_80": [f for f in functions if f[1] > LONG_FUNCTION],
        "largest_module": sizes[0],
        "modules_over_600": [s for s in sizes if s[1] > LARGE_MODULE],
        "ray_private_imports": ray_private,
        "foreign_private_attributes": foreign_private,
        "test_files_importing_tests": cross_tests,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the whole measurement as JSON")
    args = parser.parse_args()
    m = measure()
    if args.json:
        print(json.dumps(m, indent=1))
        return 0
    print(f"longest function            {m['longest_function'][1]:5d} lines  {m['longest_function'][0]}")
    print(f"functions over {LONG_FUNCTION} lines      {len(m['functions_over_80']):5d}")
    print(f"largest module              {m['largest_module'][1]:5d} lines  {m['largest_module'][0]}")
    print(f"modules over {LARGE_MODULE} lines       {len(m['modules_over_600']):5d}")
    print(f"ray._private imports        {len(m['ray_private_imports']):5d}")
    print(f"Ray/Optuna private attrs    {len(m['foreign_private_attributes']):5d}")
    print(f"test files importing tests  {len(m['test_files_importing_tests']):5d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
