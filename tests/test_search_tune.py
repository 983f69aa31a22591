"""Ray Tune search on tiny phantoms: ASHA prunes and Optuna hears about it, results are tidy, crashes are
retried from checkpoints, and a killed driver resumes without rerunning finished trials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import ray

from cxr_search.search import results
from cxr_search.search import tune as stage
from cxr_search.search.pipeline import prepare_data, resume_pipeline
from cxr_search.search.space import load_space

pytestmark = pytest.mark.slow

TINY = """
name: tiny
metric: val_loss
mode: min
searcher: {type: optuna, seed: 0}
scheduler: {type: asha, max_t: 3, grace_period: 1, reduction_factor: 2}
num_samples: 6
max_concurrent_trials: 2
resources: {cpu: 1, gpu: 0}
data: {size: 32, n_images: 120}
trial: {backbone: cnn3, max_epochs: 3, patience: 3, device: cpu, batch_size: 16, augment: false}
params:
  lr: {loguniform: [1.0e-4, 1.0e-1]}
  optimizer: {choice: [sgd, adam]}
"""
FINISHED = ("asha", "early_stopping", "max_epochs")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One phantom/array cache for the module (and the subprocesses it starts)."""
    root = tmp_path_factory.mktemp("cache")
    old = os.environ.get("CXR_SEARCH_CACHE")
    os.environ["CXR_SEARCH_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("CXR_SEARCH_CACHE")
    else:
        os.environ["CXR_SEARCH_CACHE"] = old


@pytest.fixture(scope="module")
def ray_session(cache):
    stage.init_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_space(tmp_path_factory):
    path = tmp_path_factory.mktemp("space") / "tiny.yaml"
    path.write_text(textwrap.dedent(TINY))
    return path


@pytest.fixture(scope="module")
def data(cache):
    return prepare_data({"data_dir": None, "data": {"size": 32, "n_images": 120, "equalize": "hist",
                                                    "val_fraction": 0.2, "seed": 0}}, progress=False)


@pytest.fixture(scope="module")
def smoke_search(ray_session, tiny_space, data, tmp_path_factory):
    spec = load_space(tiny_space)
    exp = tmp_path_factory.mktemp("exps") / "smoke"
    (exp).mkdir()
    (exp / "search_space.yaml").write_text(tiny_space.read_text())
    grid = stage.run_stage(
        exp, spec.param_space(), data, metric=spec.metric, mode=spec.mode,
        search_alg=stage.make_searcher(spec, exp), scheduler=stage.make_scheduler(spec),
        num_samples=spec.num_samples, max_concurrent_trials=spec.max_concurrent_trials,
        resources={"cpu": 1}, verbose=0,
    )
    df = stage.finalize(exp, data)
    return spec, exp, grid, df


def _optuna_trials(exp: Path) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=exp.name, storage=stage.optuna_storage(exp))
    return study.get_trials(deepcopy=False)


def test_asha_stops_some_trials_and_optuna_records_every_trial_with_its_state(smoke_search):
    spec, exp, grid, df = smoke_search
    assert len(df) == spec.num_samples
    assert set(df["stop_reason"]) <= set(FINISHED)
    stopped = df[df["stop_reason"] == "asha"]
    assert len(stopped) >= 1 and (stopped["epochs"] < spec.scheduler.max_t).all()
    assert (df["stop_reason"] != "asha").any()

    trials = _optuna_trials(exp)
    assert len(trials) == spec.num_samples
    by_lr = {t.params["lr"]: t for t in trials}
    for row in df.itertuples():
        t = by_lr[row.lr]  # Optuna's sample is the config Tune ran
        assert t.params["optimizer"] == row.optimizer
        want = optuna.trial.TrialState.PRUNED if row.stop_reason == "asha" else optuna.trial.TrialState.COMPLETE
        assert t.state == want, (row.trial_id, row.stop_reason, t.state)
        assert t.value == pytest.approx(row.last_val_loss)  # the last value Tune saw
        assert max(t.intermediate_values) == row.epochs


def test_results_table_has_a_row_per_trial_with_the_documented_columns(smoke_search):
    spec, exp, grid, df = smoke_search
    stored = pd.read_parquet(exp / "results.parquet")
    assert sorted(stored["trial_id"]) == sorted(Path(r.path).name.removeprefix("trial_") for r in grid)
    for col in ("trial_id", "lr", "optimizer", "backbone", "status", "stop_reason", "epochs", "best_epoch",
                "best_val_loss", "best_val_acc", "last_val_loss", "test_acc", "test_normal_recall",
                "test_covid_recall_vs_pneumonia", "train_acc", "train_val_gap", "wall_time_s", "img_per_s"):
        assert col in stored, col
    assert stored["test_acc"].between(0, 1).all()
    # Each trial's best epoch is the argmin of its own val_loss history.
    for row in stored.itertuples():
        hist = results.read_history(Path(row.trial_dir))
        assert row.best_val_loss == pytest.approx(hist["val_loss"].min())
        assert row.epochs == len(hist)
    # The predictions of every trial are saved for ensembles.
    for row in stored.itertuples():
        with __import__("numpy").load(exp / "predictions" / f"{row.trial_id}.npz") as z:
            assert z["test_probs"].shape == (len(z["test_labels"]), 3)


def test_test_metrics_never_reach_tune_and_selection_uses_validation_only(smoke_search):
    spec, exp, grid, df = smoke_search
    for trial in results.trial_dirs(exp):
        for line in (trial.path / "result.json").read_text().splitlines():
            assert not [k for k in json.loads(line) if k.startswith("test")]
    best = results.best_trial(df, spec.metric, spec.mode)
    assert best["trial_id"] == df.loc[df["best_val_loss"].idxmin(), "trial_id"]
    # Tune's own choice (it only ever saw validation metrics) agrees.
    tune_best = grid.get_best_result(metric="val_loss", mode="min", scope="all")
    assert Path(tune_best.path).name == f"trial_{best['trial_id']}"


def test_a_crashing_trial_is_retried_from_its_checkpoint_and_finishes(ray_session, data, tmp_path):
    exp = tmp_path / "faulty"
    space = {"backbone": "cnn3", "max_epochs": 3, "patience": 3, "device": "cpu", "batch_size": 16,
             "augment": False, "fail_at_epoch": 2}
    grid = stage.run_stage(exp, space, data, max_failures=1, resources={"cpu": 1}, verbose=0)
    assert grid[0].error is None
    df = stage.finalize(exp, data)
    row = df.iloc[0]
    assert (row["status"], row["stop_reason"], row["epochs"]) == ("terminated", "max_epochs", 3)
    trial = results.trial_dirs(exp)[0].path
    reported = [json.loads(line)["epoch"] for line in (trial / "result.json").read_text().splitlines()]
    assert len(reported) == len(set(reported))  # epoch 1 came from the checkpoint, it was not trained again
    # Ray may drop result.json lines from before the restart; the history still has every epoch once
    assert list(results.read_history(trial)["epoch"]) == [1, 2, 3]
    assert "fault injected" in (trial / "error.txt").read_text()


def test_a_killed_driver_resumes_without_rerunning_finished_trials(ray_session, tiny_space, cache, tmp_path):
    storage = tmp_path / "exps"
    exp = storage / "killed"
    cmd = [sys.executable, "-m", "cxr_search.cli", "run", str(tiny_space), "--name", "killed", "--storage",
           str(storage), "--stages", "search", "--num-samples", "6", "--max-epochs", "3"]
    env = {**os.environ, "CXR_SEARCH_CACHE": str(cache)}
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and driver.poll() is None:
            if len(_finished_rows(exp)) >= 2:
                break
            time.sleep(0.5)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
        driver.wait()
    before = _finished_rows(exp)
    assert len(before) >= 2, "no trial finished before the driver was killed"
    assert len(before) < 6, "every trial finished before the kill: nothing left to resume"

    resume_pipeline(exp)

    df = pd.read_parquet(exp / "results.parquet")
    assert len(df) == 6
    assert set(df["stop_reason"]) <= set(FINISHED)
    after = {t.trial_id: _result_lines(t.path) for t in results.trial_dirs(exp)}
    for trial_id, lines in before.items():
        assert after[trial_id] == lines, f"finished trial {trial_id} was rerun"
    for lines in after.values():
        epochs = [json.loads(line)["epoch"] for line in lines]
        assert len(epochs) == len(set(epochs))  # no epoch trained twice
    # The restored Optuna searcher told the study about every trial; nothing is left RUNNING.
    trials = _optuna_trials(exp)
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    finished = {t.params["lr"] for t in trials if t.state.is_finished() and t.state.name != "FAIL"}
    assert set(df["lr"]) <= finished


def _result_lines(trial: Path) -> list[str]:
    path = trial / "result.json"
    return path.read_text().splitlines() if path.exists() else []


def _finished_rows(exp: Path) -> dict[str, list[str]]:
    """Trials whose last reported epoch carries a stop reason, with their result lines."""
    out = {}
    if not exp.exists():
        return out
    for t in results.trial_dirs(exp):
        lines = _result_lines(t.path)
        try:
            if lines and json.loads(lines[-1]).get("stop_reason"):
                out[t.trial_id] = lines
        except json.JSONDecodeError:
            continue
    return out
