"""Retraining the best configurations over many seeds: choosing them, planning the runs, summarising the spread.

Pure library (no Ray): `search/retrain.py` turns the plan into one Tune run. A configuration is identified by
`config_key` (a hash of its TrialConfig without the seed), so a finished (configuration, seed) pair is
recognised whatever Tune named its trial, and is never trained twice.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr_search.config import TrialConfig
from cxr_search.errors import CxrError

# Test metrics whose seed-to-seed spread is summarised (the study's 50-run table reports these).
SUMMARY_METRICS = ("acc", "macro_f1", "normal_recall", "covid_recall_vs_pneumonia")
# Fields that do not change what is learned, left out of the configuration's identity.
_NOT_IDENTITY = ("seed", "device", "eval_batch_size", "fail_at_epoch")


def config_key(config: dict[str, Any]) -> str:
    """Stable 10-hex-digit identity of a configuration, ignoring its seed (and device/eval batch size)."""
    full = TrialConfig.from_dict(_config_fields(config), source="config").to_dict()
    for name in _NOT_IDENTITY:
        full.pop(name, None)
    return hashlib.sha1(json.dumps(full, sort_keys=True).encode()).hexdigest()[:10]


def _config_fields(row: dict[str, Any]) -> dict[str, Any]:
    """TrialConfig fields from a results row, with or without Tune's `config/` prefix; NaN/None dropped."""
    fields = set(TrialConfig.__dataclass_fields__)
    out = {}
    for key, value in row.items():
        name = key.removeprefix("config/")
        if name in fields and value is not None and not (isinstance(value, float) and np.isnan(value)):
            out[name] = value
    return out


def ranking_metric(exp_dir: str | Path) -> tuple[str, str]:
    """The search's validation metric and mode (`max`/`min`) from `EXP/search_space.yaml`."""
    from cxr_search.search.results import stage_objective  # Ray-free

    return stage_objective(Path(exp_dir))


def load_results(stage_dir: str | Path) -> pd.DataFrame:
    """The stage's tidy results (`results.parquet`), or an empty table if the stage has not run."""
    path = Path(stage_dir) / "results.parquet"
    return pd.read_parquet(path) if path.is_file() else pd.DataFrame()


def _metric_column(df: pd.DataFrame, metric: str) -> str:
    for name in (f"best_{metric}", metric):  # results.py: the value at each trial's best epoch
        if name in df.columns:
            return name
    raise CxrError(f"results table has no column for the ranking metric '{metric}' (columns: {', '.join(df.columns)}); "
                   "check 'metric' in search_space.yaml.")


def rank_trials(exp_dir: str | Path, stage_dir: str | Path | None = None, *,
                finished_only: bool = True) -> pd.DataFrame:
    """The stage's trials, best first by the search's validation metric (never test).

    Args:
        exp_dir: experiment folder (its search_space.yaml names the metric and mode).
        stage_dir: folder holding the stage's `results.parquet` and `predictions/`; default the experiment.
        finished_only: keep only trials whose predictions file exists.

    Returns:
        The results rows, sorted, with `predictions_path` and `checkpoint_dir` columns added;
        `attrs["metric"]`, `attrs["mode"]` say how they were ranked.
    """
    exp_dir = Path(exp_dir)
    stage_dir = Path(stage_dir) if stage_dir is not None else exp_dir
    metric, mode = ranking_metric(exp_dir)
    df = load_results(stage_dir)
    if df.empty:
        df.attrs.update(metric=metric, mode=mode)
        return df.assign(predictions_path=pd.Series(dtype=str), checkpoint_dir=pd.Series(dtype=str))
    df = df.copy()
    df["trial_id"] = df["trial_id"].astype(str)
    if "predictions_path" not in df.columns:  # a search stage: predictions/<trial>.npz beside results.parquet
        df["predictions_path"] = [str(stage_dir / "predictions" / f"{t}.npz") for t in df["trial_id"]]
    if "checkpoint_dir" not in df.columns:  # results.py calls it `checkpoint`: the latest checkpoint folder
        df["checkpoint_dir"] = df["checkpoint"] if "checkpoint" in df.columns else ""
    df["checkpoint_dir"] = df["checkpoint_dir"].fillna("").astype(str)
    if finished_only:
        df = df[[Path(p).is_file() for p in df["predictions_path"]]]
    column = _metric_column(df, metric)
    df = df.dropna(subset=[column])
    df = df.sort_values(column, ascending=(mode == "min"), kind="stable", na_position="last").reset_index(drop=True)
    df.attrs.update(metric=metric, mode=mode)
    return df


def top_configs(exp_dir: str | Path, top_k: int) -> list[dict[str, Any]]:
    """The `top_k` distinct configurations of the search, best first: dicts with `config_key`,
    `source_trial_id`, `rank` and `config` (TrialConfig fields)."""
    if top_k < 1:
        raise CxrError(f"--top must be >= 1, got {top_k}.")
    ranked = rank_trials(exp_dir, finished_only=False)
    if ranked.empty:
        raise CxrError(f"{Path(exp_dir) / 'results.parquet'}: no search results; run a search into {exp_dir} first.")
    chosen: list[dict[str, Any]] = []
    seen: set[str] = set()
    for row in ranked.to_dict("records"):
        config = _config_fields(row)
        key = config_key(config)
        if key in seen:  # two trials with the same configuration count once
            continue
        seen.add(key)
        chosen.append({"config_key": key, "source_trial_id": str(row["trial_id"]), "rank": len(chosen) + 1,
                       "config": config})
        if len(chosen) == top_k:
            break
    return chosen


def seed_list(seeds: int | Iterable[int]) -> list[int]:
    """`--seeds 50` means seeds 0..49; an explicit list is taken as is (duplicates removed, order kept)."""
    if isinstance(seeds, int):
        if seeds < 1:
            raise CxrError(f"--seeds must be >= 1, got {seeds}.")
        return list(range(seeds))
    return list(dict.fromkeys(int(s) for s in seeds))


def run_dirs(retrain_dir: str | Path) -> list[Path]:
    """The retrain stage's Tune runs (`EXP/retrain/runs/001`, `002`, ...: one per launch), oldest first."""
    root = Path(retrain_dir) / "runs"
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit()) if root.is_dir() else []


def next_run_dir(retrain_dir: str | Path) -> Path:
    """Folder for a new Tune run of the retrain stage (numbered after the existing ones)."""
    existing = run_dirs(retrain_dir)
    return Path(retrain_dir) / "runs" / f"{int(existing[-1].name) + 1 if existing else 1:03d}"


def collect_runs(retrain_dir: str | Path) -> pd.DataFrame:
    """Every finished (configuration, seed) of every run: the runs' result rows whose predictions exist, with
    `run`, `predictions_path`, `config_key` and `seed`; a pair trained twice keeps its first run."""
    frames = []
    for run in run_dirs(retrain_dir):
        df = load_results(run)
        if df.empty:
            continue
        df = df.assign(trial_id=df["trial_id"].astype(str), run=run.name)
        df["predictions_path"] = [str(run / "predictions" / f"{t}.npz") for t in df["trial_id"]]
        frames.append(df[[Path(p).is_file() for p in df["predictions_path"]]])
    if not frames or all(f.empty for f in frames):
        return pd.DataFrame()
    df = pd.concat([f for f in frames if not f.empty], ignore_index=True)
    rows = df.to_dict("records")
    df["config_key"] = [config_key(_config_fields(r)) for r in rows]
    df["seed"] = [int(_config_fields(r).get("seed", 0)) for r in rows]
    return df.drop_duplicates(["config_key", "seed"], keep="first").reset_index(drop=True)


def finished_pairs(retrain_dir: str | Path) -> set[tuple[str, int]]:
    """(config_key, seed) pairs that already have finished predictions under `EXP/retrain/runs/`."""
    df = collect_runs(retrain_dir)
    return set() if df.empty else {(k, int(s)) for k, s in zip(df["config_key"], df["seed"], strict=True)}


def plan_runs(configs: Sequence[dict[str, Any]], seeds: Sequence[int], done: set[tuple[str, int]],
              *, max_epochs: int | None = None) -> list[dict[str, Any]]:
    """The TrialConfig dicts still to train: every configuration x seed not in `done`, in rank then seed order.

    Args:
        configs: from `top_configs`.
        seeds: from `seed_list`.
        done: from `finished_pairs`.
        max_epochs: override the configurations' epoch budget (part of the identity: a different
            budget is a different configuration).
    """
    runs = []
    for entry in configs:
        base = {k: v for k, v in entry["config"].items() if k != "fail_at_epoch"}  # test-only fault injection
        if max_epochs is not None:
            base["max_epochs"] = int(max_epochs)
        key = config_key(base)
        for seed in seeds:
            if (key, int(seed)) not in done:
                runs.append({**base, "seed": int(seed)})
    return runs


def annotate(results: pd.DataFrame, configs: Sequence[dict[str, Any]], *,
             max_epochs: int | None = None) -> pd.DataFrame:
    """Add each row's search `rank` and `source_trial_id` (from `top_configs`), sorted by rank then seed.

    Args:
        results: from `collect_runs` (has `config_key` and `seed`).
        configs: `top_configs` entries; pass all of them so rows of earlier, larger selections keep a rank.
        max_epochs: the epoch override the runs were planned with (part of the configuration's identity).
    """
    by_key = {}
    for entry in configs:
        base = dict(entry["config"])
        if max_epochs is not None:
            base["max_epochs"] = int(max_epochs)
        by_key.setdefault(config_key(base), entry)
    df = results.copy()
    if df.empty:
        return df
    df["rank"] = pd.array([by_key[k]["rank"] if k in by_key else None for k in df["config_key"]], dtype="Int64")
    df["source_trial_id"] = [by_key[k]["source_trial_id"] if k in by_key else "" for k in df["config_key"]]
    return df.sort_values(["rank", "config_key", "seed"], kind="stable", na_position="last").reset_index(drop=True)


def split_column(table: pd.DataFrame | Iterable[str], metric: str, split: str = "test") -> str | None:
    """Column of a split's metric (`test_acc` or `test/acc`) in a results table or a row's keys, or None."""
    names = set(table.columns if isinstance(table, pd.DataFrame) else table)
    for name in (f"{split}_{metric}", f"{split}/{metric}"):
        if name in names:
            return name
    return None


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
    return pd.DataFrame(rows).sort_values(["rank", "config_key"], kind="stable").reset_index(drop=True)


def _mean_ci(values: np.ndarray, level: float = 0.95) -> dict[str, float]:
    """Student-t interval of the mean over seeds (how well the seeds pin down the expected score)."""
    from scipy import stats

    if len(values) < 2:
        return {"mean_ci_low": float("nan"), "mean_ci_high": float("nan")}
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
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def write_outputs(retrain_dir: str | Path, results: pd.DataFrame) -> dict[str, Path]:
    """Write `results.parquet`, `summary.csv` and `distribution.png` into `EXP/retrain/`."""
    retrain_dir = Path(retrain_dir)
    retrain_dir.mkdir(parents=True, exist_ok=True)
    paths = {"results": retrain_dir / "results.parquet", "summary": retrain_dir / "summary.csv",
             "figure": retrain_dir / "distribution.png"}
    results.to_parquet(paths["results"], index=False)
    summarize_seeds(results).to_csv(paths["summary"], index=False)
    plot_seed_distribution(results, paths["figure"])
    return paths
