"""Trials larger than one worker: `resources: {workers: 2}` runs each trial of a search as a Ray Train
TorchTrainer (DistributedDataParallel, gloo on the CPU) with the same engine loop, ASHA and Optuna as any trial.

A test-only fault (`$CXR_SEARCH_FAULTS`) SIGKILLs rank 0 of every trial once, after the first batch of epoch 2:
the worker group is restarted and resumes from the trial's model folder (epoch 1 is not trained again).
"""

from __future__ import annotations

import json
import math
import os
import threading
import time

import optuna
import pytest
import ray
from rich.console import Console

from cxr_search.config import TrialConfig
from cxr_search.experiment.folder import Experiment
from cxr_search.experiment.trials import trial_dirs, trial_events
from cxr_search.io import storage
from cxr_search.io.journal import journal_storage
from cxr_search.pipeline import run_pipeline
from cxr_search.training.faults import FAULTS_ENV
from cxr_search.training.loop import fit
from cxr_search.training.model_folder import CONFIG_FILE, HISTORY_FILE, read_history
from cxr_search.tuning.cluster import init_ray

pytestmark = pytest.mark.slow

SPACE = """
name: ddp
metric: val_loss
mode: min
searcher: {type: optuna, seed: 0}
scheduler: {type: asha, max_t: 2, grace_period: 1, reduction_factor: 2}
num_samples: 1
max_concurrent_trials: 1
resources: {cpu: 0.5, gpu: 0, workers: 2}
data: {size: 32, n_images: 120}
trial: {backbone: cnn3, max_epochs: 2, patience: 3, device: cpu, batch_size: 16, augment: false}
params:
  lr: {loguniform: [1.0e-4, 1.0e-3]}
"""
# The 2-worker run differs from a 1-worker run by BatchNorm statistics over half batches and the order in which
# each worker meets its images; measured 3% on this space's first trial.
FIRST_EPOCH_RTOL = 0.1
QUIET = Console(file=open(os.devnull, "w"))  # noqa: SIM115 - module lifetime


@pytest.fixture(scope="module")
def ddp_search(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    saved = {k: os.environ.get(k) for k in ("CXR_SEARCH_CACHE", FAULTS_ENV)}
    os.environ["CXR_SEARCH_CACHE"] = str(cache)
    os.environ[FAULTS_ENV] = json.dumps({"kind": "kill", "epoch": 2})
    space = tmp_path_factory.mktemp("space") / "ddp.yaml"
    space.write_text(SPACE)
    root = tmp_path_factory.mktemp("exps")
    seen_before_kill: dict[str, dict] = {}
    done = threading.Event()

    def watch() -> None:  # the epoch-1 record each trial had on disk when its rank 0 was killed
        while not done.is_set():
            for marker in root.glob("ddp/trial_*/.fault-kill-e0002"):
                key = marker.parent.name
                if key not in seen_before_kill:
                    records = storage.read_records(marker.parent / HISTORY_FILE)
                    if records:
                        seen_before_kill[key] = records[0]
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    init_ray(num_cpus=3)  # logical CPUs: two workers at 0.5 and the trial's driver at 0.1
    try:
        exp = run_pipeline(space, name="ddp", storage=str(root), stages=("search",), console=QUIET)
    finally:
        done.set()
        watcher.join()
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return Experiment.open(exp), seen_before_kill


def test_two_worker_trials_finish_in_a_search_after_a_killed_worker(ddp_search):
    exp, seen_before_kill = ddp_search
    trials = trial_dirs(exp.path)
    events = trial_events(exp.path)
    assert exp.is_complete("search") and len(trials) == exp.plan.space.num_samples
    study = optuna.load_study(study_name="ddp", storage=journal_storage(exp.journal))
    assert [t.state.is_finished() for t in study.trials] == [True] * len(trials)  # Optuna heard of every trial
    for trial in trials:
        assert events[trial.trial_id]["event"] == "complete"
        assert (trial.path / "ray_train").is_dir()  # trained by a Ray Train run, not in the trial's own process
        assert (trial.path / ".fault-kill-e0002").exists()  # rank 0 was killed in epoch 2 ...
        history = read_history(trial.path)
        assert [h["epoch"] for h in history] == [1, 2]  # ... and the trial still has each epoch once
        assert history[-1]["stop_reason"] == "max_epochs"
        # Recovered from the folder: epoch 1 as written before the kill, not trained again.
        assert history[0] == seen_before_kill[trial.path.name]
    assert len(exp.ranked("search")) == len(trials)  # finalize predicted from each trial's best weights


def test_two_workers_give_the_first_epoch_loss_of_one(ddp_search):
    exp, _ = ddp_search
    data = exp.plan.data.prepare(progress=False)
    for trial in trial_dirs(exp.path):
        cfg = TrialConfig.from_dict(storage.read_json(trial.path / CONFIG_FILE), source="config.json")
        one = fit(cfg.replace(max_epochs=1), data).history[0]["train_loss"]
        two = read_history(trial.path)[0]["train_loss"]
        assert math.isclose(two, one, rel_tol=FIRST_EPOCH_RTOL), (trial.trial_id, one, two)
