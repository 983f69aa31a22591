"""The experiment summary (`EXP/summary.md`): data warnings, search table beside the study's figures, seed
spread, ensemble, each with confidence intervals. Every section is optional: missing stages are skipped."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr_search.ensemble import read_ensemble
from cxr_search.experiment.folder import Experiment
from cxr_search.experiment.results import read_predictions
from cxr_search.io import storage
from cxr_search.report.study import study_summary, study_table

# Figures shown per model, in the study's table order (DESIGN.md names).
TABLE_METRICS = ("acc", "normal_recall", "covid_recall_vs_pneumonia")


MAX_SEARCH_ROWS = 12  # the summary lists the best trials, not hundreds


MISSING = "n/a"


def is_missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, (float, np.floating)) and math.isnan(value))


def fmt(value: Any, digits: int = 4) -> str:
    """The one number formatter of tables and summaries: `0.9512`, integers as such, `n/a` for missing."""
    if is_missing(value):
        return MISSING
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, str):
        return value
    return f"{float(value):.{digits}f}"


def fmt_ci(point: float, lo: float, hi: float, digits: int = 4) -> str:
    """`0.9512 [0.9321, 0.9688]`: point estimate and 95% interval; an interval that cannot be estimated
    (missing, or collapsed to the point because a class has too few images to resample) says so."""
    if is_missing(point):
        return MISSING
    if is_missing(lo) or is_missing(hi) or (lo == hi == point):
        return f"{fmt(point, digits)} (interval n/a)"
    return f"{fmt(point, digits)} [{fmt(lo, digits)}, {fmt(hi, digits)}]"


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (written here to avoid needing `tabulate` for `DataFrame.to_markdown`)."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(str(v).replace("|", "/") for v in row) + " |")
    return "\n".join(lines)


def _test_cis(predictions_path: str, n_resamples: int) -> dict[str, tuple[float, float, float]]:
    """Bootstrap CIs of one model's test figures from its stored predictions (empty if none stored)."""
    from cxr_search.metrics import bootstrap_ci

    if not predictions_path or not storage.path(predictions_path).is_file():
        return {}
    z = read_predictions(predictions_path)
    return bootstrap_ci(z["test_labels"], z["test_probs"], n_resamples=n_resamples, stratified=True, seed=0,
                        metrics=list(TABLE_METRICS))


def search_selection(exp: Experiment) -> tuple[pd.DataFrame, str]:
    """The search trials the report shows, best first, and their title: the best trial of each backbone when
    several backbones were searched (the study's table), else the best `MAX_SEARCH_ROWS`. Empty before a search."""
    ranked = exp.ranked("search", finished_only=False)
    if "backbone" in ranked.columns and ranked["backbone"].nunique() > 1:
        return ranked.drop_duplicates("backbone", keep="first").reset_index(drop=True), "Search: best trial per backbone"
    shown = ranked.head(MAX_SEARCH_ROWS)
    return shown, f"Search: best {len(shown)} of {len(ranked)} trials"


def accuracy_intervals(exp: Experiment, n_resamples: int = 1000) -> pd.DataFrame:
    """Test accuracy of the shown search trials (`search_selection`) with 95% stratified bootstrap intervals,
    beside the study's figure for the same backbone or variant.

    Returns:
        Columns `trial_id`, `model` (study_table's label), `acc`, `acc_lo`, `acc_hi`, `study_acc`; trials
        without predictions are left out.
    """
    shown, _ = search_selection(exp)
    if shown.empty:
        return pd.DataFrame(columns=["trial_id", "model", "acc", "acc_lo", "acc_hi", "study_acc"])
    ours = study_table(shown)
    rows = []
    for (_, r), trial_id, preds in zip(ours.iterrows(), shown["trial_id"], shown["predictions_path"], strict=True):
        cis = _test_cis(str(preds), n_resamples)
        if "acc" in cis:
            rows.append({"trial_id": str(trial_id), "model": r["model"], "acc": cis["acc"][0],
                         "acc_lo": cis["acc"][1], "acc_hi": cis["acc"][2], "study_acc": r["study_test_acc"]})
    return pd.DataFrame(rows, columns=["trial_id", "model", "acc", "acc_lo", "acc_hi", "study_acc"])


def search_section(exp: Experiment, n_resamples: int = 1000) -> list[str]:
    """The search's best trials (best per backbone if several backbones were searched) beside the study."""
    shown, title = search_selection(exp)
    if shown.empty:
        return []
    metric, mode = exp.objective.metric, exp.objective.mode
    ours = study_table(shown.reset_index(drop=True))
    rows = []
    for (_, r), trial_id, preds in zip(ours.iterrows(), shown["trial_id"], shown["predictions_path"], strict=True):
        cis = _test_cis(str(preds), n_resamples)
        row = {"trial": trial_id, "model": r["model"], "train acc": fmt(r["train_acc"]), "val acc": fmt(r["val_acc"])}
        for m in TABLE_METRICS:
            ours_key = "test_acc" if m == "acc" else m
            row[f"test {m}"] = fmt_ci(*cis[m]) if m in cis else fmt(r[ours_key])
            row[f"study {m}"] = fmt(r[f"study_{ours_key}"])
        row.update({"train-val gap": fmt(r["train_val_gap"]), "time s": fmt(r["time_s"], 0),
                    "stop": str(r["stop_reason"] or "")})
        rows.append(row)
    df = pd.DataFrame(rows)
    df = df.loc[:, [c for c in df.columns if (df[c].astype(str) != MISSING).any()]]  # drop all-empty columns
    return [f"## {title}", "",
            f"Ranked by validation `{metric}` ({mode}); test figures with 95% stratified bootstrap intervals "
            "from each trial's best-validation predictions. \"study\" columns: the study's reported test figures "
            "for the matching backbone or fine-tuning variant.", "", markdown_table(df), ""]


def retrain_section(exp: Experiment) -> list[str]:
    """The seed-to-seed spread of the retrained configurations (EXP/retrain/summary.csv)."""
    from cxr_search.retrain import MIN_SEEDS_FOR_INTERVAL

    summary = seed_summary(exp)
    if summary.empty:
        return []
    study = study_summary("variant7_mean_of_50_runs")
    table = []
    for r in summary.to_dict("records"):
        study_key = "test_acc" if r["metric"] == "acc" else r["metric"]
        rank = "" if pd.isna(r["rank"]) else f"#{int(r['rank'])} "
        source = r.get("source_trial_id")
        source = f" (from trial {source})" if isinstance(source, str) and source else ""
        ci = (f"n/a (fewer than {MIN_SEEDS_FOR_INTERVAL} seeds)" if r["n_seeds"] < MIN_SEEDS_FOR_INTERVAL
              else f"[{fmt(r.get('mean_ci_low'))}, {fmt(r.get('mean_ci_high'))}]")
        table.append({
            "config": f"{rank}{r['config_key']}{source}", "test metric": r["metric"],
            "seeds": r["n_seeds"], "mean ± std": f"{fmt(r['mean'])} ± {fmt(r['std'])}",
            "95% CI of mean": ci,
            "2.5-97.5 pct": f"[{fmt(r['p2_5'])}, {fmt(r['p97_5'])}]", "min-max": f"{fmt(r['min'])}-{fmt(r['max'])}",
            "study variant 7, mean of 50": fmt(study.get(study_key)) if study else "",
        })
    return ["## Retraining over seeds", "",
            "Each configuration retrained with different seeds on the same splits. The 2.5-97.5 percentile range is "
            "where a single run can land; the CI of the mean says how well the seeds pin down the expected score. "
            "Figure: `retrain/distribution.png`.", "",
            markdown_table(pd.DataFrame(table)), ""]


def ensemble_section(exp: Experiment) -> list[str]:
    """The soft-voting ensemble (EXP/ensemble/ensemble.json) against its best single member and the study."""
    ens = read_ensemble(exp.path)
    if ens is None:
        return []
    study_ens = study_summary("soft_voting_ensemble")
    study_best = study_summary("best_single_variant7")
    best = ens["best_single"]
    rows = []
    for m in ("acc", "macro_f1", "normal_recall", "covid_recall_vs_pneumonia", "disease_sensitivity",
              "auroc_macro", "ece", "nll"):
        if m not in ens["metrics"]:
            continue
        key = "test_acc" if m == "acc" else m
        rows.append({"test metric": m, "ensemble": fmt_ci(*ens["metrics"][m]),
                     f"best single ({best['trial_id']})": fmt_ci(*best["metrics"][m]) if m in best["metrics"] else "",
                     "study ensemble": fmt(study_ens.get(key)), "study best single": fmt(study_best.get(key))})
    gain = ens["acc_gain_vs_best_single"]
    members = ", ".join(f"{m['trial_id']} (w={m['weight']:.3f})" for m in ens["members"])
    kind = "seeds of the best retrained configuration" if ens["source"] == "retrain" else \
        "distinct configurations of the search"
    return ["## Soft-voting ensemble", "",
            f"{len(ens['members'])} members ({kind}, ranked by validation `{ens['ranking_metric']}`; the best "
            f"single model is the top-ranked one), {ens['weighting']} weights: {members}.",
            f"Temperature {ens['temperature']:.3f} fitted on validation NLL "
            f"({ens['val_nll_before']:.4f} -> {ens['val_nll_after']:.4f}); test ECE {ens['ece_before']:.4f} -> "
            f"{ens['ece_after']:.4f}. Accuracy gain over the best single member (chosen on validation): "
            f"{fmt_ci(*gain)} (paired bootstrap). Test set: {ens['n_test']} images.", "",
            *[line for w in ens.get("calibration_warnings", []) for line in (f"- **warning:** {w}", "")],
            markdown_table(pd.DataFrame(rows)), "", "Confusion matrix: `ensemble/confusion_matrix.png`.", ""]


def seed_summary(exp: Experiment) -> pd.DataFrame:
    """The retrain stage's `summary.csv` (one row per configuration x test metric: n_seeds, mean, std,
    percentiles, mean_ci_low/high); empty when the stage has not run."""
    path = exp.stage_dir("retrain") / "summary.csv"
    if not path.is_file() or path.stat().st_size == 0:
        return pd.DataFrame()
    with storage.open_binary(path) as f:
        return pd.read_csv(f, dtype={"config_key": str, "source_trial_id": str})


def explain_sheets(exp_dir: str | Path) -> list[storage.Location]:
    """Contact sheets of explanations saved in the experiment (`EXP/explain/contact_sheet*.png`, written by
    `cxr-search explain EXP IMAGES --out EXP/explain`), sorted; empty if none."""
    from cxr_search.explain import EXPLAIN_DIR

    return sorted((storage.path(exp_dir) / EXPLAIN_DIR).glob("contact_sheet*.png"))


def data_section(exp: Experiment) -> list[str]:
    """The data report's warnings (duplicates, shared patients, ...) first: they qualify every number below."""
    report = exp.data_report()
    if report is None:
        return ["> No data report found (`data_report.json`): data integrity unknown.", ""]
    warnings = report.get("warnings") or []
    if not warnings:
        return ["Data integrity: no warnings.", ""]
    return ["## Data warnings", "", *[f"- **warning:** {w}" for w in warnings], ""]


def shortcut_warning(exp_dir: Path) -> list[str]:
    """The shortcut probe's warning (EXP/explain/faithfulness.json), for the very top of the summary."""
    from cxr_search.explain import read_faithfulness

    saved = read_faithfulness(exp_dir)
    probe = saved[1].get("shortcut", {}) if saved else {}
    return [f"> **warning: {probe['message']}** (`explain/faithfulness.csv`)", ""] if probe.get("flagged") else []


def explanations_section(exp_dir: Path) -> list[str]:
    """Faithfulness of the explanations on phantom lesion masks (EXP/explain/faithfulness.csv), vs untrained."""
    from cxr_search.explain import read_faithfulness

    saved = read_faithfulness(exp_dir)
    if saved is None:
        return []
    table, meta = saved
    settings, probe = meta.get("settings", {}), meta.get("shortcut", {})
    rows = [{"method": r["method"], "model": r["model"],
             "pointing game": fmt_ci(r["pointing_game"], r["pointing_game_lo"], r["pointing_game_hi"], 3),
             "mass in lesion": fmt_ci(r["lesion_mass"], r["lesion_mass_lo"], r["lesion_mass_hi"], 3),
             "chance (lesion area)": fmt(r["chance"], 3),
             "mass in marker band": fmt_ci(r["marker_mass"], r["marker_mass_lo"], r["marker_mass_hi"], 3)}
            for r in table.to_dict("records")]
    marked = int(table["n_marked"].iloc[0]) if len(table) else 0
    probe_line = (f"Shortcut probe: {probe.get('message')}." if probe.get("flagged") else
                  f"Shortcut probe: no method puts more of its attribution in the marker band "
                  f"({probe.get('band', 'top-left corner')}) than on the lesions and at least "
                  f"{probe.get('threshold', 0.3):.0%} of it.")
    return ["## Explanations: faithfulness on phantom lesion masks", "",
            f"{int(table['n_images'].iloc[0]) if len(table) else 0} test images with a lesion, explained for their "
            f"true class ({marked} carry a confounder marker; the marker-band column is measured on those, else on "
            f"all). Pointing game: the map's maximum falls inside the lesion; mass in lesion: share of positive "
            f"attribution inside it; 95% stratified bootstrap intervals. \"untrained\": the same architectures "
            f"freshly initialised, the baseline a trustworthy explanation must beat. Model: {settings.get('model', '')}.",
            "", markdown_table(pd.DataFrame(rows)), "", probe_line, ""]


def build_summary(exp_dir: str | Path, *, n_resamples: int = 1000) -> str:
    """The whole summary as Markdown.

    Args:
        exp_dir: the experiment folder; stages that have not run are left out.
        n_resamples: bootstrap resamples for the per-trial test intervals.
    """
    exp = Experiment.open(exp_dir)
    parts = [f"# cxr-search summary: {exp.path.name}", "", *shortcut_warning(exp.path), *data_section(exp)]
    body = (search_section(exp, n_resamples) + retrain_section(exp) + ensemble_section(exp)
            + explanations_section(exp.path))
    if not body:
        body = ["No finished stage yet (no `results.parquet`): run a search first.", ""]
    return "\n".join(parts + body)


def write_summary(exp_dir: str | Path) -> Path:
    """Write `EXP/summary.md` and return its path."""
    return storage.atomic_write_text(storage.path(exp_dir) / "summary.md", build_summary(exp_dir))


def print_markdown(lines: list[str], console: Any) -> None:
    """Print summary lines (Markdown) on a rich console."""
    from rich.markdown import Markdown

    console.print(Markdown("\n".join(lines)))


def print_summary(exp_dir: str | Path, console: Any) -> None:
    """Print the summary (written by `write_summary` if present, else built now) on a rich console."""
    path = storage.path(exp_dir) / "summary.md"
    print_markdown([path.read_text() if path.is_file() else build_summary(exp_dir)], console)
