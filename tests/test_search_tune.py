"""Ray Tune search on tiny phantoms: ASHA prunes and Optuna hears about it with the right objective, results are
tidy, failing trials are retried from their folders, and a killed or interrupted driver resumes without
rerunning finished trials."""

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
from rich.console import Console

from cxr_search.experiment.folder import Experiment
from cxr_search.experiment.trials import trial_dirs, trial_history
from cxr_search.io import storage
from cxr_search.io.journal import journal_storage
from cxr_search.io.layout import EVENTS_FILE
from cxr_search.pipeline import resume_pipeline, run_pipeline
from cxr_search.training.faults import FAULTS_ENV
from cxr_search.training.model_folder import HISTORY_FILE, best_files, read_history, read_resume_state
from cxr_search.tuning.cluster import init_ray
from cxr_search.tuning.searcher import trial_key
from cxr_search.tuning.stages import ended_keys

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
GRID = """
name: grid
metric: val_loss
searcher: {type: grid, seed: 0}
scheduler: fifo
num_samples: 1
max_concurrent_trials: 2
max_failures: 1
resources: {cpu: 1, gpu: 0}
data: {size: 32, n_images: 120}
trial: {backbone: cnn3, max_epochs: 3, patience: 3, device: cpu, batch_size: 16, augment: false, lr: 1e-3}
params:
  optimizer: {grid: [sgd, adam]}
"""
FINISHED = ("asha", "early_stopping", "max_epochs")
QUIET = Console(file=open(os.devnull, "w"))  # noqa: SIM115 - module lifetime


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
    init_ray(num_cpus=2)
    yield
    ray.shutdown()


def _space(tmp_path_factory, text: str, name: str) -> Path:
    path = tmp_path_factory.mktemp("space") / f"{name}.yaml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture(scope="module")
def tiny_space(tmp_path_factory):
    return _space(tmp_path_factory, TINY, "tiny")


@pytest.fixture(scope="module")
def smoke_search(ray_session, tiny_space, tmp_path_factory):
    exp = run_pipeline(tiny_space, name="smoke", storage=str(tmp_path_factory.mktemp("exps")), stages=("search",),
                       console=QUIET)
    return Experiment.open(exp), pd.read_parquet(exp / "results.parquet")


def _optuna_trials(exp: Experiment) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=exp.plan.name, storage=journal_storage(exp.journal))
    return study.get_trials(deepcopy=False)


def assert_journal_matches_results(exp: Experiment, df: pd.DataFrame) -> None:
    """Every trial's Optuna record says what results.parquet says: PRUNED for ASHA's stops, COMPLETE with the
    trial's best validation value otherwise (the value that ranks and selects models)."""
    trials = {trial_key(t.number): t for t in _optuna_trials(exp)}
    assert set(trials) == set(df["trial_id"])
    for row in df.itertuples():
        t = trials[row.trial_id]
        assert t.params["lr"] == pytest.approx(row.lr) and t.params["optimizer"] == row.optimizer
        if row.stop_reason == "asha":
            assert t.state == optuna.trial.TrialState.PRUNED, row.trial_id
        else:
            assert t.state == optuna.trial.TrialState.COMPLETE, (row.trial_id, row.stop_reason, t.state)
            assert t.value == pytest.approx(row.best_val_loss), row.trial_id
        assert max(t.intermediate_values) == row.epochs


def test_asha_stops_some_trials_and_optuna_records_every_trial_with_its_objective(smoke_search):
    exp, df = smoke_search
    assert len(df) == exp.plan.space.num_samples
    assert set(df["stop_reason"]) <= set(FINISHED)
    stopped = df[df["stop_reason"] == "asha"]
    assert len(stopped) >= 1 and (stopped["epochs"] < exp.plan.space.scheduler.max_t).all()
    assert (df["stop_reason"] != "asha").any()
    assert_journal_matches_results(exp, df)


def test_results_table_has_a_row_per_trial_with_the_documented_columns(smoke_search):
    exp, stored = smoke_search
    for col in ("trial_id", "lr", "optimizer", "backbone", "status", "stop_reason", "epochs", "best_epoch",
                "best_val_loss", "best_val_acc", "last_val_loss", "test_acc", "test_normal_recall",
                "test_covid_recall_vs_pneumonia", "train_acc", "train_val_gap", "wall_time_s", "img_per_s",
                "config_key", "trial_dir", "predictions_path"):
        assert col in stored, col
    assert stored["test_acc"].between(0, 1).all()
    for row in stored.itertuples():
        hist = trial_history(row.trial_dir)
        assert row.best_val_loss == pytest.approx(hist["val_loss"].min())
        assert row.epochs == len(hist) and list(hist["epoch"]) == list(range(1, len(hist) + 1))
        with __import__("numpy").load(row.predictions_path) as z:
            assert z["test_probs"].shape == (len(z["test_labels"]), 3)
        # a trial that ended keeps its best weights only
        assert read_resume_state(row.trial_dir)["finished"]
        assert len(best_files(row.trial_dir)) == 1


def test_test_metrics_never_reach_tune_and_selection_uses_validation_only(smoke_search):
    exp, df = smoke_search
    for trial in trial_dirs(exp.path):
        for line in (trial.path / "result.json").read_text().splitlines():
            assert not [k for k in json.loads(line) if k.startswith("test")]
    best = exp.ranked("search").iloc[0]
    assert best["trial_id"] == df.loc[df["best_val_loss"].idxmin(), "trial_id"]


def test_a_trial_that_raises_or_is_killed_is_retried_from_its_folder(ray_session, tmp_path_factory, monkeypatch):
    grid = _space(tmp_path_factory, GRID, "grid")
    faults = [{"kind": "raise", "epoch": 2, "match": {"optimizer": "sgd"}},
              {"kind": "kill", "epoch": 3, "match": {"optimizer": "adam"}}]
    monkeypatch.setenv(FAULTS_ENV, json.dumps(faults))
    exp = Experiment.open(run_pipeline(grid, name="faulty", storage=str(tmp_path_factory.mktemp("exps")),
                                       stages=("search",), console=QUIET))
    df = exp.results()
    assert list(df["stop_reason"]) == ["max_epochs", "max_epochs"] and list(df["status"]) == ["terminated"] * 2
    for trial in trial_dirs(exp.path):
        assert list(trial_history(trial.path)["epoch"]) == [1, 2, 3]  # every epoch once
        fault = ".fault-raise-e0002" if trial.trial_id == "0000" else ".fault-kill-e0003"
        assert (trial.path / fault).exists()  # the fault fired, and the retry went past it
    retries = [e for e in storage.read_records(exp.path / EVENTS_FILE) if e["event"] == "retry"]
    assert sorted(e["trial_id"] for e in retries) == ["0000", "0001"]


def test_a_trial_that_always_fails_ends_as_error_and_the_later_stages_go_on(ray_session, tmp_path_factory,
                                                                            monkeypatch):
    grid = _space(tmp_path_factory, GRID, "grid")
    monkeypatch.setenv(FAULTS_ENV, json.dumps(
        {"kind": "raise", "epoch": 2, "always": True, "match": {"optimizer": "sgd"}}))
    exp = Experiment.open(run_pipeline(grid, name="failing", storage=str(tmp_path_factory.mktemp("exps")),
                                       stages=("search", "ensemble"), console=QUIET))
    df = exp.results().set_index("trial_id")
    assert (df.loc["0000", "status"], df.loc["0000", "stop_reason"]) == ("error", "error")
    assert "fault injected at epoch 2" in df.loc["0000", "error"]
    assert df.loc["0001", "stop_reason"] == "max_epochs"
    assert exp.is_complete("search") and exp.is_complete("ensemble")
    ens = json.loads((exp.path / "ensemble" / "ensemble.json").read_text())
    assert [m["trial_id"] for m in ens["members"]] == ["0001"]


def test_a_grid_space_runs_no_more_trials_at_once_than_it_says(ray_session, tmp_path_factory):
    text = GRID.replace("max_concurrent_trials: 2", "max_concurrent_trials: 1").replace(
        "optimizer: {grid: [sgd, adam]}", "optimizer: {grid: [sgd, adam, rmsprop]}").replace(
        "max_epochs: 3, patience: 3", "max_epochs: 1, patience: 3")
    exp = Experiment.open(run_pipeline(_space(tmp_path_factory, text, "serial"), name="serial", stages=("search",),
                                       storage=str(tmp_path_factory.mktemp("exps")), console=QUIET))
    events = storage.read_records(exp.path / EVENTS_FILE)
    running, most = set(), 0
    for e in events:  # the driver logs starts and ends in the order they happen
        if e["event"] == "start":
            running.add(e["trial_id"])
        elif e["event"] in ("complete", "error"):
            running.discard(e["trial_id"])
        most = max(most, len(running))
    assert most == 1 and len({e["trial_id"] for e in events}) == 3  # 2 CPUs free, the file says 1 at a time


# ---------------------------------------------------------------- the driver dies, or is asked to stop


def _cli(*args: str, cache: Path) -> subprocess.Popen:
    env = {**os.environ, "CXR_SEARCH_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "cxr_search.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended before the awaited moment:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("timed out waiting for the run to reach the awaited moment")


def _ended(stage_dir: Path) -> dict[str, list[dict]]:
    """Trials that ended by our records, with their history at that moment."""
    return {k: read_history(stage_dir / f"trial_{k}") for k in ended_keys(stage_dir)}


def test_a_killed_driver_resumes_without_rerunning_finished_trials(ray_session, tiny_space, cache, tmp_path):
    storage = tmp_path / "exps"
    exp_path = storage / "killed"
    driver = _cli("run", str(tiny_space), "--name", "killed", "--storage", str(storage), "--stages", "search",
                  cache=cache)
    try:
        _wait_for(lambda: exp_path.is_dir() and len(_ended(exp_path)) >= 2, driver)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
        driver.wait()
    before = _ended(exp_path)
    resume_pipeline(exp_path, console=QUIET)

    exp = Experiment.open(exp_path)
    df = pd.read_parquet(exp_path / "results.parquet")
    assert len(df) == 6 and set(df["stop_reason"]) <= set(FINISHED)
    for key, history in before.items():
        assert read_history(exp_path / f"trial_{key}") == history, f"finished trial {key} was rerun"
    assert not [t for t in _optuna_trials(exp) if not t.state.is_finished()]
    assert_journal_matches_results(exp, df)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_search_stops_cleanly_and_resume_finishes_it(ray_session, tiny_space, cache, tmp_path,
                                                                        sig):
    storage = tmp_path / "exps"
    exp_path = storage / "stopped"
    driver = _cli("run", str(tiny_space), "--name", "stopped", "--storage", str(storage), "--stages", "search",
                  cache=cache)
    _wait_for(lambda: any((t.path / HISTORY_FILE).is_file() and read_history(t.path)
                          for t in trial_dirs(exp_path)), driver)
    os.kill(driver.pid, sig)
    out, _ = driver.communicate(timeout=180)
    assert driver.returncode == 128 + sig, out[-3000:]
    assert f"cxr-search resume {exp_path}" in out
    # a log gets one line per trial event, not Tune's status tables
    assert "trial 0000: started" in out and "== Status ==" not in out and "Configuration for experiment" not in out
    exp = Experiment.open(exp_path)
    assert not exp.is_complete("search")
    assert len(ended_keys(exp_path)) < 6
    resume_pipeline(exp_path, console=QUIET)
    exp = Experiment.open(exp_path)
    assert exp.is_complete("search") and len(exp.results()) == 6
    assert_journal_matches_results(exp, exp.results())


def test_sigterm_during_the_retrain_stops_cleanly_and_resume_trains_the_planned_seeds(ray_session, tiny_space,
                                                                                     cache, tmp_path):
    storage = tmp_path / "exps"
    exp_path = storage / "retrain-stopped"
    driver = _cli("run", str(tiny_space), "--name", "retrain-stopped", "--storage", str(storage), "--stages",
                  "search,retrain", "--seeds", "3", cache=cache)
    retrain_dir = exp_path / "retrain"
    _wait_for(lambda: any(read_history(t.path) for t in trial_dirs(retrain_dir)), driver)
    os.kill(driver.pid, signal.SIGTERM)
    out, _ = driver.communicate(timeout=180)
    assert driver.returncode == 143, out[-3000:]
    exp = Experiment.open(exp_path)
    assert exp.is_complete("search") and not exp.is_complete("retrain")
    resume_pipeline(exp_path, console=QUIET)
    exp = Experiment.open(exp_path)
    assert exp.is_complete("retrain")
    seeds = pd.read_parquet(retrain_dir / "results.parquet")
    assert sorted(seeds["seed"]) == [0, 1, 2] and seeds["config_key"].nunique() == 1
