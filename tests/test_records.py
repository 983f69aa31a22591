"""The experiment's own records, each written so that a kill at any line leaves something a resume can trust:
atomic files, append-only logs with a cut last line, trial folders, the Optuna journal reconciled with them,
and the experiment folder's plan (no Ray started here)."""

from __future__ import annotations

import json
import os

import optuna
import pandas as pd
import pytest
from test_ensemble import make_plan

from cxr_search.errors import CxrError
from cxr_search.experiment.budget import estimate_seconds
from cxr_search.experiment.folder import Experiment, exclusive
from cxr_search.experiment.plan import EXPERIMENT_KIND, Objective, plan_run
from cxr_search.experiment.results import build_results, finalize
from cxr_search.experiment.trials import record_trial_event, trial_events
from cxr_search.io import storage
from cxr_search.io.journal import journal_storage
from cxr_search.io.layout import EVENTS_FILE, JOURNAL_FILE, PLAN_FILE, RESULTS_FILE
from cxr_search.tuning.searcher import reconcile_journal
from cxr_search.tuning.stages import ended_keys

# ---------------------------------------------------------------- storage


def test_an_append_after_a_cut_line_keeps_both_records_whole(tmp_path):
    log = tmp_path / "events.jsonl"
    storage.append_record(log, {"n": 1})
    with open(log, "ab") as f:
        f.write(b'{"n": 2, "cut by a ki')  # the writer died mid-append
    assert storage.read_records(log) == [{"n": 1}]
    storage.append_record(log, {"n": 3})
    assert storage.read_records(log) == [{"n": 1}, {"n": 3}]
    assert log.read_bytes().count(b"\n") == 2


def test_an_atomic_write_that_fails_leaves_the_old_file(tmp_path):
    path = tmp_path / "plan.json"
    storage.atomic_write_json(path, {"v": 1})

    def boom(tmp):
        tmp.write_text('{"v": 2, "half')
        raise OSError("disk full")

    with pytest.raises(OSError):
        storage.atomic_write(path, boom)
    assert storage.read_json(path) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]


# ---------------------------------------------------------------- the experiment folder


def test_open_refuses_what_is_not_an_experiment_and_changes_nothing(tmp_path):
    data_dir = tmp_path / "xrays"
    data_dir.mkdir()
    (data_dir / "a.png").write_bytes(b"x")
    cases = {
        "missing": (tmp_path / "nope", "no such experiment folder"),
        "data folder": (data_dir, "not an experiment folder"),
    }
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / PLAN_FILE).write_text('{"kind": "cxr-search experiment", "format_ver')
    cases["corrupt plan"] = (broken, "unreadable")
    old = tmp_path / "old"
    old.mkdir()
    (old / PLAN_FILE).write_text(json.dumps({"kind": EXPERIMENT_KIND, "format_version": 1,
                                                        "cxr_search": "0.1.0"}))
    cases["other version"] = (old, "format 1")
    for name, (path, message) in cases.items():
        before = sorted(p.name for p in path.iterdir()) if path.is_dir() else None
        with pytest.raises(CxrError, match=message) as e:
            Experiment.open(path)
        assert "\n" not in str(e.value), name
        assert (sorted(p.name for p in path.iterdir()) if path.is_dir() else None) == before, name


def test_a_plan_round_trips_with_absolute_paths_and_reopens_from_anywhere(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.chdir(tmp_path)
    plan = plan_run("inception", data_dir="data", name="p", smoke=True)
    assert plan.data.data_dir == str(data.resolve())
    Experiment.create(plan, "exps")
    monkeypatch.chdir("/")
    again = Experiment.open(tmp_path / "exps" / "p")
    assert again.plan == plan and again.path == (tmp_path / "exps" / "p").resolve()


@pytest.mark.parametrize("kwargs, message", [
    ({"data_dir": "does-not-exist"}, "--data does-not-exist: no such file or folder"),
    ({"seeds": 0}, "--seeds must be >= 1"),
    ({"stages": ("retrain",)}, "--stages must include search"),
    ({"stages": ("search", "retrian")}, "unknown stage 'retrian'"),
])
def test_a_bad_plan_fails_before_anything_is_written(tmp_path, monkeypatch, kwargs, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CxrError, match=message):
        plan_run("inception", name="bad", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_a_second_driver_on_one_experiment_is_refused(tmp_path):
    exp = Experiment.create(make_plan(), tmp_path)
    with exclusive(exp):
        with pytest.raises(CxrError, match="in use by cxr-search pid"):
            with exclusive(Experiment.open(exp.path)):
                pass
    with exclusive(Experiment.open(exp.path)):  # released with the holder
        pass


# ---------------------------------------------------------------- trial folders, events and the journal


def _trial(stage_dir, key, losses, stop="", lean=False):
    """A model folder as engine.fit leaves it (history.jsonl, a best file, resume.pt)."""
    import torch

    from cxr_search.training.model_folder import (
        CONFIG_FILE,
        FORMAT_VERSION,
        HISTORY_FILE,
        RESUME_FILE,
        best_file_name,
    )

    folder = stage_dir / f"trial_{key}"
    folder.mkdir(parents=True)
    (folder / CONFIG_FILE).write_text(json.dumps({"backbone": "cnn3", "lr": 0.01 * (int(key) + 1)}))
    history = [{"epoch": e, "val_loss": v, "val_acc": 0.5, "train_acc": 0.6, "epoch_time_s": 1.0,
                "stop_reason": stop if e == len(losses) else ""} for e, v in enumerate(losses, 1)]
    for row in history:
        storage.append_record(folder / HISTORY_FILE, row)
    best = min(range(len(losses)), key=losses.__getitem__) + 1
    torch.save({"format_version": FORMAT_VERSION, "num_classes": 3, "epoch": best, "model": {}},
               folder / best_file_name(best))
    state = {"format_version": FORMAT_VERSION, "num_classes": 3, "epoch": len(losses), "finished": lean,
             "early_stopping": {"best_loss": min(losses), "best_epoch": best, "wait": 0, "best_val_metrics": {}},
             "best_file": best_file_name(best), "history": history, "stop_reason": stop}
    torch.save(state, folder / RESUME_FILE)
    return folder


def test_how_a_trial_ended_comes_from_its_folder_and_the_event_log(tmp_path):
    _trial(tmp_path, "0000", [0.9, 0.8, 0.7], stop="max_epochs", lean=True)
    _trial(tmp_path, "0001", [0.9, 0.95])  # stopped by the scheduler after epoch 2
    _trial(tmp_path, "0002", [0.9])  # failed every retry
    _trial(tmp_path, "0003", [1.0, 0.9])  # still running (or killed)
    record_trial_event(tmp_path, "0001", "complete", stop_reason="")
    record_trial_event(tmp_path, "0002", "retry", error="x")
    record_trial_event(tmp_path, "0002", "error", error="RuntimeError: boom")
    with open(tmp_path / EVENTS_FILE, "ab") as f:
        f.write(b'{"trial_id": "0003", "event": "comp')  # the driver died mid-append: not an event
    df = build_results(tmp_path, Objective()).set_index("trial_id")
    assert list(df["status"]) == ["terminated", "terminated", "error", "running"]
    assert list(df["stop_reason"]) == ["max_epochs", "asha", "error", ""]
    assert df.loc["0002", "error"] == "RuntimeError: boom"
    assert df.loc["0000", "best_val_loss"] == 0.7 and df.loc["0001", "best_epoch"] == 1
    assert ended_keys(tmp_path) == {"0000", "0001", "0002"}


def _study(tmp_path, n: int) -> optuna.Study:
    study = optuna.create_study(study_name="s", storage=journal_storage(tmp_path / JOURNAL_FILE))
    for _i in range(n):
        study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)})
    if n:
        study.tell(0, 0.5)  # trial 0 ended and the journal knows
    return study


def test_reconciling_the_journal_tells_it_what_the_folders_know(tmp_path):
    _study(tmp_path, 5)
    _trial(tmp_path, "0000", [0.6, 0.5], stop="max_epochs", lean=True)
    _trial(tmp_path, "0001", [0.9, 0.4, 0.45], stop="early_stopping", lean=True)  # journal never heard
    _trial(tmp_path, "0002", [0.9, 0.95])  # ASHA stopped it; the log has the event, the journal does not
    record_trial_event(tmp_path, "0002", "complete", stop_reason="")
    _trial(tmp_path, "0003", [1.0])  # unfinished: handed out again
    # trial 4 was asked but never started (no folder): handed out again
    with open(tmp_path / JOURNAL_FILE, "ab") as f:
        f.write(b'{"op_code": 4, "worker_id": "x", "study_id": 0, "dat')  # a tail cut mid-write
    state = reconcile_journal(tmp_path, tmp_path / JOURNAL_FILE, "s", Objective())
    assert (state.ended, state.pending, state.total) == (3, (3, 4), 5)
    assert (tmp_path / (JOURNAL_FILE + ".cut")).read_bytes().startswith(b'{"op_code": 4')
    trials = optuna.load_study(study_name="s", storage=journal_storage(tmp_path / JOURNAL_FILE)
                               ).get_trials()
    states = [t.state.name for t in trials]
    assert states == ["COMPLETE", "COMPLETE", "PRUNED", "RUNNING", "RUNNING"]
    assert trials[1].value == 0.4  # the best validation loss, not the last
    assert trials[1].intermediate_values == {1: 0.9, 2: 0.4, 3: 0.45}
    # the journal ended trial 0 but the event log had not heard of it: now it has
    assert trial_events(tmp_path)["0000"]["event"] == "complete"
    # reconciling again changes nothing
    again = reconcile_journal(tmp_path, tmp_path / JOURNAL_FILE, "s", Objective())
    assert again == state


def test_a_trial_whose_parameters_were_cut_short_gets_its_enqueued_values(tmp_path):
    space = {"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True),
             "optimizer": optuna.distributions.CategoricalDistribution(["sgd", "adam"])}
    study = _study(tmp_path, 0)
    study.enqueue_trial({"lr": 3e-3, "optimizer": "adam"})
    trial = study.ask()  # popped from the queue, RUNNING, no parameter written yet (as if killed here)
    assert trial.params == {}
    state = reconcile_journal(tmp_path, tmp_path / JOURNAL_FILE, "s", Objective(), space)
    assert state.pending == (0,)
    frozen = optuna.load_study(study_name="s", storage=journal_storage(tmp_path / JOURNAL_FILE)
                               ).get_trials()[0]
    assert frozen.params == {"lr": 3e-3, "optimizer": "adam"}


def test_results_and_predictions_are_rebuilt_by_finalize_without_duplicates(tmp_path):
    """finalize twice (as after a kill during it) writes each trial's predictions once."""
    from test_engine import _data  # a tiny learnable data set

    from cxr_search.config import TrialConfig
    from cxr_search.training.loop import fit

    data = _data()
    cfg = TrialConfig(backbone="cnn3", device="cpu", max_epochs=2, batch_size=16, deterministic=True)
    for key in ("0000", "0001"):
        fit(cfg.replace(seed=int(key)), data, checkpoint_dir=tmp_path / f"trial_{key}")
    first = finalize(tmp_path, data, Objective())
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "predictions").iterdir()}
    second = finalize(tmp_path, data, Objective())
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "predictions").iterdir()} == stamps
    pd.testing.assert_frame_equal(first, second)
    assert sorted(stamps) == ["0000.json", "0000.npz", "0001.json", "0001.npz"]
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]
    assert os.path.getsize(tmp_path / RESULTS_FILE) > 0


def test_a_plan_knows_roughly_how_long_it_takes_on_cpus(tmp_path):
    space = tmp_path / "big.yaml"
    space.write_text("metric: val_loss\nsearcher: {type: optuna, seed: 0}\nnum_samples: 32\n"
                     "max_concurrent_trials: 4\nresources: {cpu: 2, gpu: 0}\ndata: {size: 128}\n"
                     "trial: {backbone: inception_v3, max_epochs: 30, pretrained: none}\n"
                     "params: {lr: {loguniform: [1.0e-4, 1.0e-2]}}\n")
    full = plan_run(space, full=True, seeds=50)
    smoke = plan_run("inception", smoke=True)
    cpu = plan_run("inception")
    hours = estimate_seconds(full, cpus=2) / 3600
    assert hours > 24  # the study's budget on two cores: days, and the run says so before it starts
    assert estimate_seconds(smoke, 2) < estimate_seconds(cpu, 2) < 3600
    assert estimate_seconds(full, 16) < estimate_seconds(full, 2) / 3  # 4 slots, not 1
