"""`cxr-search status EXP`: the trial table of an experiment, read from its folder (no Ray; works while it runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cxr_search.experiment.folder import Experiment
from cxr_search.report.summary import fmt, is_missing


def print_status(exp_dir: str | Path, console: Any) -> None:
    """A table of an experiment's trials read from its folder (no Ray; safe while a search is running)."""
    from rich.table import Table

    from cxr_search.experiment.results import build_results

    exp = Experiment.open(exp_dir)
    df = build_results(exp.path, exp.objective)  # fresh from the folder, even if results.parquet is older
    objective = exp.objective
    console.print(f"{exp.path}: {len(df)} of {exp.plan.space.num_samples} search trials; stages done: "
                  f"{', '.join(exp.plan.completed) or 'none'}; objective {objective.metric} ({objective.mode})")
    if df.empty:
        return
    counts = df["stop_reason"].replace("", "running").value_counts().to_dict()
    console.print("  " + ", ".join(f"{k}: {v}" for k, v in counts.items()))
    col = objective.column
    if col in df:
        df = df.sort_values(col, ascending=(objective.mode == "min"), na_position="last")
    spec = exp.plan.space
    searched = [n for n in [p.name for p in spec.params] + (["variant"] if spec.variants else []) if n in df][:6]
    table = Table()
    cols = ["trial_id", *searched, "epochs", "stop_reason", col, "best_val_acc", "test_acc", "wall_time_s"]
    cols = [c for c in cols if c in df]
    for c in cols:
        table.add_column(c, justify="left" if c in ("trial_id", *searched) else "right")
    for _, r in df.iterrows():
        table.add_row(*[_cell(r[c]) if c != "stop_reason" else (r[c] or "running") for c in cols])
    console.print(table)


def _cell(v: Any) -> str:
    if isinstance(v, (float, np.floating)) and not is_missing(v) and abs(v) >= 100:
        return fmt(v, 0)
    return fmt(v)
