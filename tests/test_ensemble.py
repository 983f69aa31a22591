"""Soft voting, temperature scaling on validation only, and the saved ensemble a future `predict` loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, log_loss

from cxr_search import CLASSES
from cxr_search.ensemble import (
    apply_temperature,
    build_ensemble,
    fit_temperature,
    load_member,
    member_weights,
    soft_vote,
)
from cxr_search.errors import CxrError
from cxr_search.experiment.folder import Experiment
from cxr_search.experiment.plan import DataConfig, Plan
from cxr_search.experiment.results import write_predictions, write_results
from cxr_search.experiment.trials import config_key
from cxr_search.metrics import nll
from cxr_search.space import parse_space


def synthetic_predictions(y: np.ndarray, *, skill: float, overconfidence: float, rng: np.random.Generator) -> np.ndarray:
    """Probabilities of a fake classifier: logits favour the true class by `skill`, scaled by `overconfidence`."""
    logits = rng.normal(size=(len(y), 3))
    logits[np.arange(len(y)), y] += skill
    logits *= overconfidence
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def make_plan(name: str = "exp", metric: str = "val_loss", mode: str = "min") -> Plan:
    """A minimal plan for experiments made by hand in tests."""
    space = parse_space({"metric": metric, "mode": mode, "searcher": "random", "trial": {"backbone": "cnn3"}},
                        "test space")
    return Plan(name=name, space=space, data=DataConfig())


def make_experiment(root: Path, *, n_trials: int = 4, n_val: int = 120, n_test: int = 150, seed: int = 0,
                    test_override=None, same_config=()) -> Path:
    """A finished search on disk without training: pipeline.json, results.parquet, predictions/*.npz|json."""
    rng = np.random.default_rng(seed)
    exp = Experiment.create(make_plan(), root)
    y_val = rng.integers(0, 3, n_val)
    y_test = rng.integers(0, 3, n_test)
    rows = []
    for i in range(n_trials):
        val = synthetic_predictions(y_val, skill=0.5 + 0.4 * i, overconfidence=3.0, rng=rng)
        test = synthetic_predictions(y_test, skill=0.5 + 0.4 * i, overconfidence=3.0, rng=rng)
        if test_override is not None:
            test = test_override(i, test)
        tid = f"{i:04d}"
        path = write_predictions(exp.path, tid, val_labels=y_val, val_probs=val, test_labels=y_test,
                                            test_probs=test, metrics={}, model_file="best-e0001.pt")
        # trials listed in same_config repeat trial 0's configuration with another seed
        config = {"backbone": "cnn3", "optimizer": "rmsprop", "lr": 1e-3 * (1 if i in same_config else i + 1),
                  "seed": i if i in same_config else 0}
        rows.append({"trial_id": tid, **config, "config_key": config_key(config),
                     "best_val_loss": log_loss(y_val, val, labels=[0, 1, 2]),
                     "best_val_acc": accuracy_score(y_val, val.argmax(1)),
                     "predictions_path": str(path), "trial_dir": str(exp.path / f"trial_{tid}")})
    write_results(exp.path, pd.DataFrame(rows))
    return exp.path


def test_soft_vote_is_the_mean_of_member_probabilities():
    a = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    b = np.array([[0.1, 0.6, 0.3], [0.3, 0.3, 0.4]])
    np.testing.assert_allclose(soft_vote([a, b]), [[0.4, 0.4, 0.2], [0.2, 0.2, 0.6]])
    # weights 3:1 -> 0.75 a + 0.25 b
    np.testing.assert_allclose(soft_vote([a, b], [3, 1]), [[0.55, 0.3, 0.15], [0.15, 0.15, 0.7]])
    np.testing.assert_allclose(soft_vote([a, b], [3, 1]).sum(1), 1.0)
    np.testing.assert_array_equal(soft_vote([a]), a)


def test_soft_vote_rejects_bad_weights():
    a = np.full((2, 3), 1 / 3)
    with pytest.raises(CxrError, match="weights"):
        soft_vote([a, a], [1, -1])
    with pytest.raises(CxrError, match="at least one member"):
        soft_vote([])


def test_temperature_fitted_on_validation_lowers_nll_and_matches_a_grid_search():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 400)
    probs = synthetic_predictions(y, skill=1.5, overconfidence=4.0, rng=rng)  # overconfident
    t = fit_temperature(probs, y)
    assert t > 1.0  # overconfident models need softening
    assert nll(y, apply_temperature(probs, t)) < nll(y, probs)
    # Reference: scikit-learn's log loss on a fine grid of temperatures.
    grid = np.exp(np.linspace(-2, 3, 2001))
    best = grid[np.argmin([log_loss(y, apply_temperature(probs, g), labels=[0, 1, 2]) for g in grid])]
    assert t == pytest.approx(best, rel=0.01)
    # Temperature keeps every argmax (accuracy unchanged) and rows sum to 1.
    np.testing.assert_array_equal(apply_temperature(probs, t).argmax(1), probs.argmax(1))
    np.testing.assert_allclose(apply_temperature(probs, t).sum(1), 1.0)


def test_val_weights_follow_validation_accuracy(tmp_path):
    exp = make_experiment(tmp_path)
    members = [load_member(p) for p in sorted((exp / "predictions").glob("*.npz"))]
    w = member_weights(members, "val")
    accs = np.array([(m.val_probs.argmax(1) == m.val_labels).mean() for m in members])
    np.testing.assert_allclose(w, accs / accs.sum())
    np.testing.assert_allclose(member_weights(members, "uniform"), 0.25)
    with pytest.raises(CxrError, match="--weights"):
        member_weights(members, "test")


def test_ensemble_of_one_equals_its_member(tmp_path):
    from cxr_search.metrics import classification_metrics

    exp = make_experiment(tmp_path)
    out = build_ensemble(exp, top_k=1, source="search", calibrate=False, n_resamples=50)
    best = out["members"][0]["trial_id"]
    assert best == "0003"  # lowest val_loss (most skilful fake model)
    with np.load(exp / "predictions" / f"{best}.npz") as z:
        expected = classification_metrics(z["test_labels"], z["test_probs"])
    for name, value in expected.items():
        assert out["metrics"][name][0] == pytest.approx(value, abs=1e-9), name
    assert out["temperature"] == 1.0


def test_build_ensemble_writes_what_predict_needs(tmp_path):
    exp = make_experiment(tmp_path)
    out = build_ensemble(exp, top_k=3, source="search", weights="val", n_resamples=100)
    saved = json.loads((exp / "ensemble" / "ensemble.json").read_text())
    assert saved["classes"] == list(CLASSES)
    assert [m["trial_id"] for m in saved["members"]] == ["0003", "0002", "0001"]
    assert all(Path(m["checkpoint_dir"]) == exp / f"trial_{m['trial_id']}" for m in saved["members"])
    assert all(Path(m["checkpoint_dir"]).is_absolute() for m in saved["members"])
    assert sum(m["weight"] for m in saved["members"]) == pytest.approx(1.0)
    assert saved["temperature"] == out["temperature"] > 0
    # Intervals of the rates contain their point estimate (not asserted for ECE: small-sample biased upward).
    for name in ("acc", "macro_f1", "auroc_macro", "normal_recall", "covid_recall_vs_pneumonia", "disease_sensitivity"):
        point, lo, hi = saved["metrics"][name]
        assert lo - 1e-12 <= point <= hi + 1e-12, name
    assert saved["val_nll_after"] <= saved["val_nll_before"]
    table = pd.read_csv(exp / "ensemble" / "metrics.csv")
    assert {"ensemble", "ensemble_uncalibrated"} <= set(table["model"])
    assert table.loc[table["model"].str.startswith("member:"), "model"].nunique() == 3
    assert (exp / "ensemble" / "confusion_matrix.png").stat().st_size > 0
    cm = np.array(saved["confusion_matrix"])
    assert cm.sum() == saved["n_test"]


def test_search_ensemble_members_are_distinct_configurations(tmp_path):
    # trials 3 and 2 are the two best, but 2 repeats 0's configuration... and 3 repeats it too
    exp = make_experiment(tmp_path, n_trials=5, same_config=(0, 2, 3))
    saved = build_ensemble(exp, top_k=3, source="search", n_resamples=20)
    ids = [m["trial_id"] for m in saved["members"]]
    assert ids == ["0004", "0003", "0001"]  # 3 stands for its configuration; 2 and 0 are the same one
    keys = pd.read_parquet(exp / "results.parquet").set_index("trial_id").loc[ids, "config_key"]
    assert keys.nunique() == 3
    assert saved["best_single"]["trial_id"] == ids[0]  # the best single model is the top-ranked one
    assert saved["ranking_metric"] == "val_loss"


def test_temperature_never_sees_test_data(tmp_path):
    """Same validation data, wildly different test probabilities -> the very same temperature."""
    rng = np.random.default_rng(5)

    def scramble(i, test):
        return rng.dirichlet(np.full(3, 0.05), size=len(test))  # near one-hot and random: bad, overconfident

    a = build_ensemble(make_experiment(tmp_path / "a"), top_k=2, source="search", n_resamples=20)
    b = build_ensemble(make_experiment(tmp_path / "b", test_override=scramble), top_k=2, source="search",
                       n_resamples=20)
    assert a["temperature"] == b["temperature"] != 1.0
    assert a["metrics"]["acc"][0] != b["metrics"]["acc"][0]


def test_members_from_different_splits_are_refused(tmp_path):
    exp = make_experiment(tmp_path)
    path = exp / "predictions" / "0002.npz"
    with np.load(path) as z:
        arrays = dict(z)
    arrays["test_labels"] = np.roll(arrays["test_labels"], 1)
    np.savez(path, **arrays)
    with pytest.raises(CxrError, match="different test sets"):
        build_ensemble(exp, top_k=3, source="search", n_resamples=10)


def test_missing_stage_is_a_clear_error(tmp_path):
    exp = make_experiment(tmp_path)
    with pytest.raises(CxrError, match="cxr-search retrain"):
        build_ensemble(exp, top_k=2, source="retrain")


def test_ensemble_intervals_contain_the_point_and_shrink_with_more_test_images(tmp_path):
    widths = []
    for n_test in (100, 1600):
        out = build_ensemble(make_experiment(tmp_path / str(n_test), n_test=n_test), top_k=2, source="search",
                             n_resamples=300)
        for name in ("acc", "macro_f1", "normal_recall"):
            point, lo, hi = out["metrics"][name]
            assert lo <= point <= hi, name
        widths.append(out["metrics"]["acc"][2] - out["metrics"]["acc"][1])
    assert widths[1] < widths[0] / 2  # ~1/sqrt(n): 16x the images, about a quarter of the width


def test_a_temperature_at_its_bound_or_worse_test_calibration_is_flagged(tmp_path):
    from cxr_search.ensemble import calibration_warnings
    from cxr_search.report.summary import build_summary

    assert calibration_warnings(10.0, 0.1, 0.05, True)[0].startswith("the temperature hit the end")
    assert "made the test calibration worse (ECE 0.2028 -> 0.3449)" in calibration_warnings(1.3, 0.2028, 0.3449,
                                                                                             True)[0]
    assert calibration_warnings(1.3, 0.2, 0.1, True) == [] and calibration_warnings(1.0, 0.1, 0.2, False) == []
    # validation predictions that are certain and right (test ones are not) sharpen the probabilities, and the
    # test calibration gets worse: the summary says so next to the ensemble's figures
    exp = make_experiment(tmp_path, n_trials=2)
    for name in ("0000", "0001"):
        with np.load(exp / "predictions" / f"{name}.npz") as z:
            arrays = dict(z)
        arrays["val_probs"] = np.eye(3)[arrays["val_labels"]] * 0.999 + 0.0005
        np.savez(exp / "predictions" / f"{name}.npz", **arrays)
    saved = build_ensemble(exp, top_k=2, source="search", n_resamples=20)
    assert saved["ece_after"] > saved["ece_before"] and len(saved["calibration_warnings"]) == 1
    assert "**warning:** temperature scaling made the test calibration worse" in build_summary(exp, n_resamples=20)
