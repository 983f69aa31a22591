"""Retraining top configurations over seeds: choosing them, skipping finished seeds, summarising the spread."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from test_ensemble import make_plan

from cxr_search import retrain
from cxr_search.errors import CxrError
from cxr_search.experiment.folder import Experiment
from cxr_search.experiment.plan import DataConfig, Plan
from cxr_search.experiment.results import write_predictions, write_results
from cxr_search.experiment.trials import config_key, trial_dirs


def search_results(tmp_path, metric="val_loss", mode="min"):
    """A search's results table: four finished trials, two of them with the same configuration."""
    exp = Experiment.create(make_plan(metric=metric, mode=mode), tmp_path)
    rows = []
    for tid, lr, seed, loss, acc in (("a", 1e-3, 0, 0.50, 0.80), ("b", 3e-3, 0, 0.30, 0.70),
                                     ("c", 3e-3, 7, 0.35, 0.75), ("d", 1e-3, 1, 0.40, 0.90)):
        backbone = "alexnet" if tid == "d" else "cnn3"
        config = {"backbone": backbone, "lr": lr, "seed": seed}
        path = write_predictions(exp.path, tid, val_labels=np.zeros(1), val_probs=np.ones((1, 3)) / 3,
                                            test_labels=np.zeros(1), test_probs=np.ones((1, 3)) / 3, metrics={},
                                            model_file="best-e0001.pt")
        rows.append({"trial_id": tid, **config, "config_key": config_key(config), "best_val_loss": loss,
                     "best_val_acc": acc, "predictions_path": str(path), "trial_dir": str(exp.path / tid)})
    write_results(exp.path, pd.DataFrame(rows))
    return exp


def test_config_key_ignores_seed_budget_and_device_but_not_settings():
    key = config_key
    assert key({"backbone": "cnn3", "seed": 1}) == key({"backbone": "cnn3", "seed": 2})
    # the epoch budget of a retrain is not a new configuration (a smoke run's 1-epoch seeds count as done)
    assert key({"backbone": "cnn3", "max_epochs": 1}) == key({"backbone": "cnn3", "max_epochs": 2, "device": "cpu"})
    assert key({"backbone": "cnn3"}) != key({"backbone": "cnn3", "lr": 0.01})
    # Tune's "config/" prefix and label columns (variant) do not change the identity.
    assert key({"config/backbone": "cnn3", "variant": "x"}) == key({"backbone": "cnn3"})


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


def test_top_configs_without_a_finished_search_is_a_clear_error(tmp_path):
    exp = Experiment.create(make_plan(), tmp_path)
    with pytest.raises(CxrError, match="no finished search trials"):
        retrain.top_configs(exp, top_k=2)


def test_plan_skips_finished_pairs_whatever_their_budget(tmp_path):
    exp = search_results(tmp_path)
    configs = retrain.top_configs(exp, top_k=2)
    seeds = retrain.seed_list(3)
    assert seeds == [0, 1, 2]
    full = retrain.plan_runs(configs, seeds, set())
    assert len(full) == 6 and [r["seed"] for r in full] == [0, 1, 2, 0, 1, 2]
    done = {(configs[0]["config_key"], 1)}
    left = retrain.plan_runs(configs, seeds, done)
    assert len(left) == 5
    assert all(not (r["lr"] == 3e-3 and r["seed"] == 1) for r in left)
    # Another epoch budget is the same configuration: the finished seed still counts.
    again = retrain.plan_runs(configs, seeds, done, max_epochs=2)
    assert len(again) == 5 and all(r["max_epochs"] == 2 for r in again)
    assert len({retrain.run_key(r) for r in full}) == 6  # every (configuration, seed) has its own trial name


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
    two = retrain.summarize_seeds(df[df["seed"] < 2])
    assert two["mean_ci_low"].isna().all()  # two seeds: no interval is claimed


@pytest.fixture(scope="module")
def tiny_search(tmp_path_factory):
    """A finished search of one configuration (cnn3, 32 px, ~120 phantom images, 2 epochs, deterministic CPU),
    written as the search stage leaves it (results.parquet, predictions), and a local 2-CPU Ray."""
    import os

    import ray

    from cxr_search.data import phantoms
    from cxr_search.data.prepare import prepare
    from cxr_search.space import parse_space
    from cxr_search.tuning.cluster import init_ray

    root = tmp_path_factory.mktemp("retrain")
    os.environ["CXR_SEARCH_CACHE"] = str(root / "cache")
    phantoms.generate(root / "phantoms", n_images=120, size=64, seed=0, progress=False, workers=1)
    data = prepare(root / "phantoms", size=32, progress=False)
    space = parse_space({"metric": "val_loss", "mode": "min", "searcher": "random", "max_concurrent_trials": 2,
                         "resources": {"cpu": 1, "gpu": 0}, "trial": {"backbone": "cnn3"}}, "tiny")
    exp = Experiment.create(Plan(name="exp", space=space, data=DataConfig()), root)
    config = {"backbone": "cnn3", "max_epochs": 2, "batch_size": 16, "deterministic": True, "device": "cpu"}
    probs = np.full((len(data.val), 3), 1 / 3)
    path = write_predictions(exp.path, "s1", val_labels=data.val.labels, val_probs=probs,
                                        test_labels=data.test.labels, test_probs=np.full((len(data.test), 3), 1 / 3),
                                        metrics={}, model_file="best-e0001.pt")
    pd.DataFrame([{"trial_id": "s1", **config, "config_key": config_key(config), "best_val_loss": 0.9,
                   "predictions_path": str(path), "trial_dir": str(exp.path / "trial_s1")}]).to_parquet(
        exp.path / "results.parquet")
    init_ray(num_cpus=2)
    yield exp, data
    ray.shutdown()


@pytest.mark.slow
def test_retrain_trains_each_seed_once_and_reproduces_a_seed(tiny_search):
    from cxr_search.tuning.stages import run_retrain

    exp, data = tiny_search
    retrain_dir = exp.stage_dir("retrain")
    first = run_retrain(exp, data, top_k=1, seeds=2, max_epochs=1)  # as a smoke run retrains: 1 epoch
    assert sorted(first["seed"]) == [0, 1]
    # More seeds later, under the configuration's own budget: only the missing one trains (the budget is not
    # part of the configuration's identity, so the 1-epoch seeds count as done).
    started = {t.trial_id: (t.path / "history.jsonl").stat().st_mtime_ns for t in trial_dirs(retrain_dir)}
    second = run_retrain(exp, data, top_k=1, seeds=3)
    after = {t.trial_id: (t.path / "history.jsonl").stat().st_mtime_ns for t in trial_dirs(retrain_dir)}
    assert len(after) == 3 and all(after[k] == v for k, v in started.items())  # seeds 0 and 1 untouched
    assert sorted(second["seed"]) == [0, 1, 2] and second["config_key"].nunique() == 1
    probs = {}
    for row in second.itertuples():
        with np.load(row.predictions_path) as z:
            probs[row.seed] = z["test_probs"]
    assert not np.allclose(probs[0], probs[1]) and not np.allclose(probs[1], probs[2])  # 3 different runs
    # Lose seed 1's model: the rerun trains exactly that seed again, and deterministic CPU training
    # gives the very same predictions.
    lost = second.loc[second["seed"] == 1].iloc[0]
    import shutil

    shutil.rmtree(lost["trial_dir"])
    for suffix in (".npz", ".json"):
        (retrain_dir / "predictions" / f"{lost['trial_id']}{suffix}").unlink()
    third = run_retrain(exp, data, top_k=1, seeds=3, max_epochs=1)  # as seed 1 was first trained
    redo = third.loc[third["seed"] == 1].iloc[0]
    with np.load(redo["predictions_path"]) as z:
        np.testing.assert_allclose(z["test_probs"], probs[1], atol=1e-6)
    assert redo["test_acc"] == pytest.approx(lost["test_acc"])
    # Outputs: one row per config x seed, the spread summary and its figure.
    summary = pd.read_csv(retrain_dir / "summary.csv")
    assert set(summary["metric"]) == set(retrain.SUMMARY_METRICS)
    assert len(pd.read_parquet(retrain_dir / "results.parquet")) == 3
    assert set(third["rank"]) == {1} and set(third["source_trial_id"]) == {"s1"}
