"""Retraining top configurations over seeds: choosing them, skipping finished seeds, summarising the spread."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import yaml

from cxr_search import retrain
from cxr_search.errors import CxrError


def search_results(tmp_path, metric="val_loss", mode="min"):
    """A search's results table: four trials, two of them with the same configuration."""
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "search_space.yaml").write_text(yaml.safe_dump({"metric": metric, "mode": mode}))
    pd.DataFrame([
        {"trial_id": "a", "backbone": "cnn3", "lr": 1e-3, "seed": 0, "val_loss": 0.50, "val_acc": 0.80},
        {"trial_id": "b", "backbone": "cnn3", "lr": 3e-3, "seed": 0, "val_loss": 0.30, "val_acc": 0.70},
        {"trial_id": "c", "backbone": "cnn3", "lr": 3e-3, "seed": 7, "val_loss": 0.35, "val_acc": 0.75},  # = b
        {"trial_id": "d", "backbone": "alexnet", "lr": 1e-3, "seed": 0, "val_loss": 0.40, "val_acc": 0.90},
    ]).to_parquet(exp / "results.parquet")
    return exp


def test_config_key_ignores_seed_but_not_settings():
    assert retrain.config_key({"backbone": "cnn3", "seed": 1}) == retrain.config_key({"backbone": "cnn3", "seed": 2})
    assert retrain.config_key({"backbone": "cnn3"}) != retrain.config_key({"backbone": "cnn3", "lr": 0.01})
    # Tune's "config/" prefix and label columns (variant) do not change the identity.
    assert retrain.config_key({"config/backbone": "cnn3", "variant": "x"}) == retrain.config_key({"backbone": "cnn3"})


@pytest.mark.parametrize(("metric", "mode", "expected"), [
    ("val_loss", "min", ["b", "d", "a"]),  # c repeats b's configuration: counted once
    ("val_acc", "max", ["d", "a", "c"]),
])
def test_top_configs_follow_the_validation_metric(tmp_path, metric, mode, expected):
    exp = search_results(tmp_path, metric, mode)
    chosen = retrain.top_configs(exp, top_k=3)
    assert [c["source_trial_id"] for c in chosen] == expected
    assert [c["rank"] for c in chosen] == [1, 2, 3]
    assert len(retrain.top_configs(exp, top_k=10)) == 3  # only three distinct configurations exist


def test_top_configs_without_a_search_is_a_clear_error(tmp_path):
    with pytest.raises(CxrError, match="no search results"):
        retrain.top_configs(tmp_path, top_k=2)


def test_plan_skips_finished_pairs_and_counts_seeds(tmp_path):
    exp = search_results(tmp_path)
    configs = retrain.top_configs(exp, top_k=2)
    seeds = retrain.seed_list(3)
    assert seeds == [0, 1, 2]
    full = retrain.plan_runs(configs, seeds, set())
    assert len(full) == 6 and [r["seed"] for r in full] == [0, 1, 2, 0, 1, 2]
    done = {(retrain.config_key(configs[0]["config"]), 1)}
    left = retrain.plan_runs(configs, seeds, done)
    assert len(left) == 5
    assert all(not (r["lr"] == 3e-3 and r["seed"] == 1) for r in left)
    # A different epoch budget is a different configuration: nothing counts as done.
    assert len(retrain.plan_runs(configs, seeds, done, max_epochs=2)) == 6
    assert all(r["max_epochs"] == 2 for r in retrain.plan_runs(configs, seeds, done, max_epochs=2))


def test_finished_pairs_need_predictions(tmp_path):
    stage = tmp_path / "retrain"
    for run, trials in (("001", [("t1", 4), ("t2", 5)]), ("002", [("t3", 4), ("t4", 6)])):
        (stage / "runs" / run / "predictions").mkdir(parents=True)
        pd.DataFrame([{"trial_id": t, "backbone": "cnn3", "seed": s} for t, s in trials]).to_parquet(
            stage / "runs" / run / "results.parquet")
        for t, _ in trials[:1] if run == "001" else trials:  # t2 never finished
            np.savez(stage / "runs" / run / "predictions" / f"{t}.npz", val_labels=np.zeros(1))
    key = retrain.config_key({"backbone": "cnn3"})
    assert retrain.finished_pairs(stage) == {(key, 4), (key, 6)}
    collected = retrain.collect_runs(stage)
    assert list(collected["trial_id"]) == ["t1", "t4"]  # seed 4 trained twice: the first run's result counts
    assert retrain.next_run_dir(stage).name == "003"


def test_seed_summary_agrees_with_numpy(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for key, rank in (("k1", 1), ("k2", 2)):
        for seed in range(20):
            rows.append({"config_key": key, "rank": rank, "source_trial_id": f"src{rank}", "seed": seed,
                         "test_acc": rng.uniform(0.8, 1.0), "test_macro_f1": rng.uniform(0.7, 1.0),
                         "test_normal_recall": rng.uniform(0.9, 1.0),
                         "test_covid_recall_vs_pneumonia": rng.uniform(0.9, 1.0)})
    df = pd.DataFrame(rows)
    summary = retrain.summarize_seeds(df)
    assert len(summary) == 2 * 4
    for r in summary.to_dict("records"):
        values = df.loc[df["config_key"] == r["config_key"], f"test_{r['metric']}"].to_numpy()
        assert r["n_seeds"] == 20
        assert r["mean"] == pytest.approx(values.mean())
        assert r["min"] == pytest.approx(values.min()) and r["max"] == pytest.approx(values.max())
        assert r["p50"] == pytest.approx(np.median(values))
        assert r["p2_5"] == pytest.approx(np.percentile(values, 2.5))
        assert r["p97_5"] == pytest.approx(np.percentile(values, 97.5))
        assert r["std"] == pytest.approx(values.std(ddof=1))  # sample std, as numpy with ddof=1
        lo, hi = scipy.stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=scipy.stats.sem(values))
        assert (r["mean_ci_low"], r["mean_ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
    paths = retrain.write_outputs(tmp_path / "retrain", df)
    assert pd.read_csv(paths["summary"]).shape[0] == 8
    assert paths["figure"].stat().st_size > 0


@pytest.fixture(scope="module")
def tiny_search(tmp_path_factory):
    """A finished search of one configuration (cnn3, 32 px, ~120 phantom images, 2 epochs, deterministic CPU),
    written as the search stage leaves it (results.parquet, predictions), and a local 2-CPU Ray."""
    import os

    import ray

    from cxr_search.data import phantoms
    from cxr_search.data.prepare import prepare
    from cxr_search.search import tune as stage

    root = tmp_path_factory.mktemp("retrain")
    os.environ["CXR_SEARCH_CACHE"] = str(root / "cache")
    phantoms.generate(root / "phantoms", n_images=120, size=64, seed=0, progress=False, workers=1)
    data = prepare(root / "phantoms", size=32, progress=False)
    exp = root / "exp"
    (exp / "predictions").mkdir(parents=True)
    (exp / "search_space.yaml").write_text(yaml.safe_dump(
        {"metric": "val_loss", "mode": "min", "searcher": "random", "resources": {"cpu": 1, "gpu": 0},
         "max_concurrent_trials": 2}))
    config = {"backbone": "cnn3", "max_epochs": 2, "batch_size": 16, "deterministic": True, "device": "cpu"}
    pd.DataFrame([{"trial_id": "s1", **config, "best_val_loss": 0.9}]).to_parquet(exp / "results.parquet")
    probs = np.full((len(data.val), 3), 1 / 3)
    np.savez(exp / "predictions" / "s1.npz", val_labels=data.val.labels, val_probs=probs,
             test_labels=data.test.labels, test_probs=np.full((len(data.test), 3), 1 / 3))
    stage.init_ray(num_cpus=2)
    yield exp, data
    ray.shutdown()


def _trials_in(run) -> int:
    from cxr_search.search.results import trial_dirs

    return len(trial_dirs(run))


@pytest.mark.slow
def test_retrain_trains_each_seed_once_and_reproduces_a_seed(tiny_search):
    from cxr_search.search.retrain import run_retrain

    exp, data = tiny_search
    first = run_retrain(exp, data, top_k=1, seeds=2, verbose=0)
    assert sorted(first["seed"]) == [0, 1]
    # More seeds later: only the missing one trains, in a new run.
    second = run_retrain(exp, data, top_k=1, seeds=3, verbose=0)
    runs = retrain.run_dirs(exp / "retrain")
    assert [_trials_in(r) for r in runs] == [2, 1]
    assert sorted(second["seed"]) == [0, 1, 2] and second["config_key"].nunique() == 1
    probs = {}
    for row in second.itertuples():
        with np.load(row.predictions_path) as z:
            probs[row.seed] = z["test_probs"]
    assert not np.allclose(probs[0], probs[1]) and not np.allclose(probs[1], probs[2])  # 3 different runs
    # Lose seed 1's result: the rerun trains exactly that seed again, and deterministic CPU training
    # gives the very same predictions.
    lost = second.loc[second["seed"] == 1, "predictions_path"].item()
    Path(lost).unlink()
    third = run_retrain(exp, data, top_k=1, seeds=3, verbose=0)
    runs = retrain.run_dirs(exp / "retrain")
    assert [_trials_in(r) for r in runs] == [2, 1, 1]
    redo = third.loc[third["seed"] == 1].iloc[0]
    assert redo["run"] == runs[-1].name
    with np.load(redo["predictions_path"]) as z:
        np.testing.assert_allclose(z["test_probs"], probs[1], atol=1e-6)
    assert redo["test_acc"] == pytest.approx(second.loc[second["seed"] == 1, "test_acc"].item())
    # Outputs: one row per config x seed, the spread summary and its figure.
    summary = pd.read_csv(exp / "retrain" / "summary.csv")
    assert set(summary["metric"]) == set(retrain.SUMMARY_METRICS)
    assert summary.loc[summary["metric"] == "acc", "n_seeds"].item() == 3  # recalls can be undefined (NaN) on tiny sets
    assert (exp / "retrain" / "distribution.png").stat().st_size > 0
    assert len(pd.read_parquet(exp / "retrain" / "results.parquet")) == 3
