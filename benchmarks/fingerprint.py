"""A fingerprint of what an experiment learned, to show that a refactoring changed no behaviour.

    python benchmarks/fingerprint.py EXP_DIR [--out fingerprint.json]
    python benchmarks/fingerprint.py --compare before.json after.json

It hashes, per trial folder (search and retrain): the trial's config, each epoch of its history without the
wall-clock columns, and the arrays of its predictions file; and the ensemble's record without paths or times. CPU training is
deterministic here, so two runs of `cxr-search run inception --smoke --seed 0` by two versions of the code that
behave the same give equal fingerprints, except that ASHA may stop a trial an epoch earlier in one run (its
decisions depend on which trial reports first): the comparison accepts a history that is a prefix of the other, and
says so. Any other difference names the file that differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

# Columns that measure the machine, not the model.
WALL_CLOCK = {"epoch_time_s", "img_per_s", "time_s", "time_total_s", "duration_s", "created", "timestamp"}
ENSEMBLE_VOLATILE = {"created", "path", "folder", "exp_dir", "cxr_search", "checkpoint_dir", "time_s"}


def _digest(obj: object) -> str:
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _history(path: Path) -> list[str]:
    """One digest per epoch: ASHA's stops depend on which trial reports first, so runs may differ in length."""
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line.replace("NaN", "null"))
            rows.append(_digest({k: v for k, v in row.items() if k not in WALL_CLOCK and k != "stop_reason"}))
    return rows


def _same(a: object, b: object) -> bool:
    """Equal, or two histories of which one continues the other (a trial ASHA stopped earlier in one run)."""
    if isinstance(a, list) and isinstance(b, list):
        n = min(len(a), len(b))
        return n > 0 and a[:n] == b[:n]
    return a == b


def _arrays(path: Path) -> str:
    with np.load(path, allow_pickle=False) as z:
        return _digest(
            {k: hashlib.sha256(np.ascontiguousarray(z[k]).tobytes()).hexdigest() for k in sorted(z.files)}
        )


def _strip(obj: object) -> object:
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in ENSEMBLE_VOLATILE}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def fingerprint(exp: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    for hist in sorted(exp.rglob("history.jsonl")):
        folder = hist.parent
        rel = str(folder.relative_to(exp))
        out[f"{rel}/history"] = _history(hist)
        config = json.loads((folder / "config.json").read_text())
        out[f"{rel}/config"] = _digest(config)
    for npz in sorted(exp.rglob("predictions/*.npz")):
        out[str(npz.relative_to(exp))] = _arrays(npz)
    ensemble = exp / "ensemble" / "ensemble.json"
    if ensemble.exists():
        out["ensemble/ensemble.json"] = _digest(_strip(json.loads(ensemble.read_text())))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exp", nargs="?", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        before, after = (json.loads(p.read_text()) for p in args.compare)
        differ = sorted(k for k in before.keys() | after.keys() if not _same(before.get(k), after.get(k)))
        for key in differ:
            print(f"differs: {key}  {before.get(key)} -> {after.get(key)}")
        cut = sorted(k for k in before.keys() & after.keys() if k not in differ and before[k] != after[k])
        for key in cut:
            print(f"same epochs, one run stopped earlier (ASHA's timing): {key}")
        print(f"{len(before)} entries before, {len(after)} after, {len(differ)} differ")
        return 1 if differ else 0
    if args.exp is None:
        parser.error("give EXP_DIR or --compare BEFORE AFTER")
    text = json.dumps(fingerprint(args.exp), indent=1, sort_keys=True)
    if args.out:
        args.out.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
