"""The experiment summary: warnings first, every finished stage with intervals, study figures beside ours."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from test_ensemble import make_experiment, make_plan

from cxr_search import retrain
from cxr_search.ensemble import build_ensemble
from cxr_search.errors import CxrError
from cxr_search.experiment.folder import Experiment
from cxr_search.io import paths
from cxr_search.metrics import bootstrap_ci
from cxr_search.report.summary import build_summary, fmt, fmt_ci, print_summary, write_summary

WARNING = "12 test images duplicate training images (dropped)"


def _with_data_report(exp, warnings):
    (exp / "data_report.json").write_text(json.dumps({"warnings": warnings}))
    return exp


def test_search_only_summary_has_warnings_first_and_intervals(tmp_path):
    exp = _with_data_report(make_experiment(tmp_path), [WARNING])
    path = write_summary(exp)
    text = path.read_text()
    assert path == exp / "summary.md"
    assert text.index(WARNING) < text.index("## Search")
    assert "Retraining" not in text and "ensemble" not in text.lower()
    # The best trial's test accuracy is shown with the same bootstrap interval metrics.py gives.
    with np.load(exp / "predictions" / "0003.npz") as z:
        point, lo, hi = bootstrap_ci(z["test_labels"], z["test_probs"], n_resamples=1000, metrics=["acc"])["acc"]
    assert fmt_ci(point, lo, hi) in text
    rows = [line for line in text.splitlines() if line.startswith("| 000")]
    assert [r.split("|")[1].strip() for r in rows] == ["0003", "0002", "0001", "0000"]


def test_study_figures_sit_beside_the_matching_variant(tmp_path):
    exp = make_experiment(tmp_path, n_trials=2)
    df = pd.read_parquet(exp / "results.parquet")
    df["backbone"] = "inception_v3"
    df["variant"] = ["variant_7", "sgd_baseline"]
    df.to_parquet(exp / "results.parquet")
    study = pd.read_csv(paths.reference_dir() / "study_inception_finetuning.csv", dtype={"variant": str})
    text = build_summary(exp, n_resamples=50)
    for variant, label in (("7", "variant_7"), ("sgd_baseline", "sgd_baseline")):
        row = next(line for line in text.splitlines() if f"| {label} |" in line)
        expected = study.loc[study["variant"] == variant, "test_acc"].item()
        assert f"{expected:.4f}" in row


def test_full_summary_has_every_stage(tmp_path):
    exp = _with_data_report(make_experiment(tmp_path), [])
    build_ensemble(exp, top_k=3, source="search", n_resamples=100)
    rng = np.random.default_rng(0)
    seeds = pd.DataFrame({"config_key": "abc", "rank": 1, "source_trial_id": "0003", "seed": range(5),
                          "test_acc": rng.uniform(0.9, 1, 5), "test_macro_f1": rng.uniform(0.9, 1, 5)})
    retrain.write_outputs(exp / "retrain", seeds)
    text = build_summary(exp, n_resamples=50)
    assert "Data integrity: no warnings." in text
    for section in ("## Search", "## Retraining over seeds", "## Soft-voting ensemble"):
        assert section in text
    assert "0.9756" in text  # the study's ensemble accuracy, beside ours
    assert "0.9668" in text  # the study's mean over 50 runs
    assert f"{seeds['test_acc'].mean():.4f}" in text
    console = Console(record=True, width=200)
    print_summary(exp, console)
    assert "Soft-voting ensemble" in console.export_text()


def test_an_experiment_without_results_is_reported_and_a_plain_folder_refused(tmp_path):
    exp = Experiment.create(make_plan(), tmp_path)
    text = build_summary(exp.path)
    assert "run a search first" in text
    assert "data integrity unknown" in text
    with pytest.raises(CxrError, match="not an experiment folder"):
        build_summary(tmp_path)


def test_seed_table_says_when_there_are_too_few_seeds_for_an_interval(tmp_path):
    exp = make_experiment(tmp_path)
    seeds = pd.DataFrame({"config_key": "abc", "rank": 1, "source_trial_id": "0003", "seed": range(2),
                          "test_acc": [0.9, 0.95]})
    retrain.write_outputs(exp / "retrain", seeds)
    text = build_summary(exp, n_resamples=20)
    assert "n/a (fewer than 3 seeds)" in text and "[0.0000, 1.0000]" not in text


def test_collapsed_or_missing_intervals_are_not_printed_as_certainty():
    assert fmt_ci(0.65, 0.65, 0.65) == "0.6500 (interval n/a)"
    assert fmt_ci(0.65, float("nan"), float("nan")) == "0.6500 (interval n/a)"
    assert fmt(None) == fmt(float("nan")) == "n/a"
    assert fmt_ci(0.5, 0.4, 0.6) == "0.5000 [0.4000, 0.6000]"
