"""Retraining the best configurations over many seeds: choosing them, planning the runs, summarising the spread.

Pure library (no Ray): `search/retrain.py` turns the plan into one Tune run. A configuration is identified by
`experiment.config_key` (its TrialConfig without seed, epoch budget or device), so a finished (configuration,
seed) pair is recognised whatever Tune named its trial and whatever budget a later `retrain` asks for, and is
never trained twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr_search.errors import CxrError
from cxr_search.experiment.folder import Experiment
from cxr_search.experiment.trials import config_fields, config_key
from cxr_search.io import storage

# Test metrics whose seed-to-seed spread is summarised (the study's 50-run table reports these).
SUMMARY_METRICS = ("acc", "macro_f1", "normal_recall", "covid_recall_vs_pneumonia")
MIN_SEEDS_FOR_INTERVAL = 3  # a t interval of the mean from fewer seeds says nothing (2 seeds: [0, 1])


def top_configs(exp: Experiment, top_k: int) -> list[dict[str, Any]]:
    """The search's `top_k` distinct configurations, best first by the objective: dicts with `config_key`,
    `source_trial_id`, `rank` and `config` (TrialConfig fields). Only trials with predictions count."""
    if top_k < 1:
        raise CxrError(f"--top must be >= 1, got {top_k}.")
    ranked = exp.ranked("search", finished_only=True, distinct=True)
    if ranked.empty:
        raise CxrError(f"{exp.path}: no finished search trials; run or resume the search first "
                       f"(`cxr-search resume {exp.path}`).")
    return [{"config_key": row["config_key"], "source_trial_id": str(row["trial_id"]), "rank": i + 1,
             "config": config_fields(row)} for i, row in enumerate(ranked.head(top_k).to_dict("records"))]


def seed_list(seeds: int | Iterable[int]) -> list[int]:
    """`--seeds 50` means seeds 0..49; an explicit list is taken as is (duplicates removed, order kept)."""
    if isinstance(seeds, int):
        if seeds < 1:
            raise CxrError(f"--seeds must be >= 1, got {seeds}.")
        return list(range(seeds))
    return list(dict.fromkeys(int(s) for s in seeds))


def run_key(config: dict[str, Any]) -> str:
    """The retrain trial's stable name: its configuration and seed (`<config_key>-s<seed>`)."""
    return f"{config_key(config)}-s{int(config_fields(config).get('seed', 0))}"


def finished_runs(exp: Experiment) -> pd.DataFrame:
    """Every finished (configuration, seed) of the retrain stage: its result rows whose predictions exist."""
    df = exp.ranked("retrain", finished_only=True)
    if df.empty:
        return df
    df = df.copy()
    df["seed"] = [int(config_fields(r).get("seed", 0)) for r in df.to_dict("records")]
    return df


def finished_pairs(exp: Experiment) -> set[tuple[str, int]]:
    """(config_key, seed) pairs that already have finished predictions in `EXP/retrain/`."""
    df = finished_runs(exp)
    return set() if df.empty else {(k, int(s)) for k, s in zip(df["config_key"], df["seed"], strict=True)}


def plan_runs(configs: Sequence[dict[str, Any]], seeds: Sequence[int], done: set[tuple[str, int]],
              *, max_epochs: int | None = None) -> list[dict[str, Any]]:
    """The TrialConfig dicts still to train: every configuration x seed not in `done`, in rank then seed order.

    Args:
        configs: from `top_configs`.
        seeds: from `seed_list`.
        done: from `finished_pairs`.
        max_epochs: the epoch budget of the runs still to train (not part of a configuration's identity: a
            seed finished under another budget counts as done).
    """
    runs = []
    for entry in configs:
        base = dict(entry["config"])
        if max_epochs is not None:
            base["max_epochs"] = int(max_epochs)
        key = config_key(base)
        for seed in seeds:
            if (key, int(seed)) not in done:
                runs.append({**base, "seed": int(seed)})
    return runs


def annotate(results: pd.DataFrame, configs: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Add each row's search `rank` and `source_trial_id` (from `top_configs`), sorted by rank then seed.

    Args:
        results: from `finished_runs` (has `config_key` and `seed`).
        configs: `top_configs` entries; pass all of them so rows of earlier, larger selections keep a rank.
    """
    by_key = {entry["config_key"]: entry for entry in configs}
    df = results.copy()
    if df.empty:
        return df
    df["rank"] = pd.array([by_key[k]["rank"] if k in by_key else None for k in df["config_key"]], dtype="Int64")
    df["source_trial_id"] = [by_key[k]["source_trial_id"] if k in by_key else "" for k in df["config_key"]]
    return df.sort_values(["rank", "config_key", "seed"], kind="stable", na_position="last").reset_index(drop=True)


def split_column(table: pd.DataFrame | Iterable[str], metric: str, split: str = "test") -> str | None:
    """Column of a split's metric (`test_acc`) in a results table or a row's keys, or None."""
    names = set(table.columns if isinstance(table, pd.DataFrame) else table)
    name = f"{split}_{metric}"
    return name if name in names else None


def summarize_seeds(results: pd.DataFrame, metrics: Sequence[str] = SUMMARY_METRICS) -> pd.DataFrame:
    """Distribution of each configuration's test metrics over seeds (mean, std, min, max, 2.5/50/97.5 pct).

    Args:
        results: annotated retrain results (`config_key`, `seed` and test metric columns).
        metrics: test metric names (without the `test_` prefix).

    Returns:
        One row per configuration and metric: `rank`, `config_key`, `source_trial_id`, `metric`, `n_seeds`,
        the statistics of `metrics.distribution_summary` and `mean_ci_low`/`mean_ci_high` (95% t interval).
    """
    from cxr_search.metrics import distribution_summary

    rows = []
    if results.empty:
        return pd.DataFrame(rows)
    for key, group in results.groupby("config_key", sort=False):
        for metric in metrics:
            column = split_column(group, metric)
            if column is None:
                continue
            values = group[column].dropna().to_numpy(dtype=np.float64)
            if len(values) == 0:
                continue
            rows.append({"rank": group["rank"].iloc[0], "config_key": key,
                         "source_trial_id": group["source_trial_id"].iloc[0], "metric": metric,
                         **{("n_seeds" if k == "n" else k): v for k, v in distribution_summary(values).items()},
                         **_mean_ci(values)})
    if not rows:  # e.g. every seed diverged: nothing to summarise, and the report says so
        return pd.DataFrame(rows)
    return pd.DataFrame(rows).sort_values(["rank", "config_key"], kind="stable").reset_index(drop=True)


def _mean_ci(values: np.ndarray, level: float = 0.95) -> dict[str, float]:
    """Student-t interval of the mean over seeds (how well the seeds pin down the expected score)."""
    from scipy import stats

    if len(values) < MIN_SEEDS_FOR_INTERVAL:
        return {"mean_ci_low": float("nan"), "mean_ci_high": float("nan")}  # not estimable: the report says so
    if np.ptp(values) == 0:  # every seed scored the same: the interval collapses (scipy would give NaN)
        return {"mean_ci_low": float(values[0]), "mean_ci_high": float(values[0])}
    lo, hi = stats.t.interval(level, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
    # The summarised metrics are rates: an interval past [0, 1] (few seeds) is clipped to what is possible.
    return {"mean_ci_low": float(max(lo, 0.0)), "mean_ci_high": float(min(hi, 1.0))}


def plot_seed_distribution(results: pd.DataFrame, path: str | Path,
                           metrics: Sequence[str] = SUMMARY_METRICS) -> Path:
    """Violin + points of each configuration's test metrics over seeds, one panel per metric (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [m for m in metrics if split_column(results, m) is not None]
    fig, axes = plt.subplots(1, max(len(present), 1), figsize=(3.2 * max(len(present), 1), 3.6), squeeze=False)
    groups = list(results.groupby("config_key", sort=False)) if not results.empty else []
    labels = [f"#{g['rank'].iloc[0]} {g['backbone'].iloc[0] if 'backbone' in g else ''} {k[:6]}" for k, g in groups]
    for ax, metric in zip(axes[0], present, strict=False):
        column = split_column(results, metric)
        data = [g[column].dropna().to_numpy(dtype=float) for _, g in groups]
        positions = list(range(1, len(data) + 1))
        if any(len(d) > 1 and np.ptp(d) > 0 for d in data):
            ax.violinplot([d if len(d) else [np.nan] for d in data], positions, showmedians=True)
        rng = np.random.default_rng(0)  # jitter only, for visibility of identical values
        for pos, d in zip(positions, data, strict=True):
            ax.scatter(pos + rng.uniform(-0.08, 0.08, len(d)), d, s=8, alpha=0.6, color="k")
        ax.set_xticks(positions, labels, rotation=30, ha="right", fontsize=7)
        ax.set_title(f"test {metric}", fontsize=9)
    fig.suptitle(f"seed-to-seed spread ({int(results['seed'].nunique()) if groups else 0} seeds)", fontsize=10)
    fig.tight_layout()
    storage.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return storage.path(path)


def write_outputs(retrain_dir: str | Path, results: pd.DataFrame) -> dict[str, Path]:
    """Write `summary.csv` and `distribution.png` into `EXP/retrain/` (the per-run table, `results.parquet`,
    is the stage's own, written by `experiment.finalize`)."""
    retrain_dir = storage.path(retrain_dir)
    retrain_dir.mkdir(parents=True, exist_ok=True)
    paths = {"summary": retrain_dir / "summary.csv", "figure": retrain_dir / "distribution.png"}
    summary = summarize_seeds(results)
    plot_seed_distribution(results, paths["figure"])
    storage.atomic_write(paths["summary"], lambda tmp: summary.to_csv(tmp, index=False))
    return paths
