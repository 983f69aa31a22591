"""Experiments on object storage (`--storage s3://...`) against a local S3 server (moto's server mode, started by
the test on 127.0.0.1 as Ray's own tests do): the storage layer, the Optuna journal kept as whole parts, and a
search stopped by SIGTERM, then `status`, `resume` (retrain, ensemble), the report and `predict` reading it back
from the bucket.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import optuna
import pytest
from moto.server import ThreadedMotoServer

from cxr_search.experiment.folder import Experiment
from cxr_search.experiment.trials import trial_dirs, trial_end, trial_events
from cxr_search.io import storage
from cxr_search.io.journal import ObjectStoreJournal, journal_storage, part_name
from cxr_search.io.layout import EVENTS_FILE
from cxr_search.report.summary import build_summary

REPO = Path(__file__).resolve().parents[1]
BUCKET = "cxr-test"
TINY = """
name: tiny
metric: val_loss
mode: min
searcher: {type: optuna, seed: 0}
scheduler: {type: asha, max_t: 2, grace_period: 1, reduction_factor: 2}
num_samples: 4
max_concurrent_trials: 2
resources: {cpu: 1, gpu: 0}
data: {size: 32, n_images: 120}
trial: {backbone: cnn3, max_epochs: 2, patience: 3, device: cpu, batch_size: 16, augment: false}
params:
  lr: {loguniform: [1.0e-4, 1.0e-2]}
  optimizer: {choice: [sgd, adam]}
"""


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on loopback with one bucket; the AWS variables point every process at it."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1").create_bucket(Bucket=BUCKET)
    yield {"host": host, "port": port, "env": env}
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _keys(s3: dict, prefix: str) -> list[str]:
    client = boto3.client("s3", endpoint_url=s3["env"]["AWS_ENDPOINT_URL"], region_name="us-east-1")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_files_and_logs_on_s3_are_whole_objects(s3):
    # The endpoint in the URI itself (what Ray's storage_path accepts too) survives joining and str().
    uri = f"s3://{BUCKET}/unit?endpoint_override={s3['host']}:{s3['port']}&scheme=http&region=us-east-1"
    root = storage.path(uri)
    assert storage.is_remote(root) and not storage.is_remote("/tmp/x") and not storage.is_remote("file:///tmp/x")
    doc = root / "a" / "doc.json"
    assert str(doc).startswith(f"s3://{BUCKET}/unit/a/doc.json?endpoint_override=")
    assert storage.path(str(doc)) == doc  # another process (a Ray worker) reopens the same object
    storage.atomic_write_json(doc, {"x": 1})
    assert storage.read_json(storage.path(str(doc))) == {"x": 1}
    assert [p.name for p in root.iterdir()] == ["a"] and (root / "a").is_dir() and doc.is_file()
    assert [p.name for p in (root / "a").glob("*.json")] == ["doc.json"]
    log = root / "events.jsonl"
    assert storage.read_records(log) == []
    for i in range(3):
        storage.append_record(log, {"i": i})
    assert storage.read_records(log) == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert storage.repair_tail(log) == b""  # an object is never cut
    assert _keys(s3, "unit/events") == ["unit/events.jsonl"]  # one object, rewritten whole: no temporary names
    doc.unlink()
    doc.unlink(missing_ok=True)
    assert not doc.exists()


def test_a_missing_bucket_is_a_one_line_error_before_anything_runs(s3, tmp_path):
    from cxr_search.errors import CxrError
    from cxr_search.experiment.plan import plan_run

    space = tmp_path / "tiny.yaml"
    space.write_text(TINY)
    with pytest.raises(CxrError, match="s3://no-such-bucket does not exist; create the bucket"):
        plan_run(space, storage="s3://no-such-bucket/experiments")
    assert plan_run(space, storage=f"s3://{BUCKET}/experiments").storage == f"s3://{BUCKET}/experiments"


def test_the_optuna_journal_on_s3_survives_compaction_and_a_kill_inside_it(s3):
    folder = storage.path(f"s3://{BUCKET}/journal-test/optuna.journal")
    study = optuna.create_study(study_name="j", storage=journal_storage(folder),
                                sampler=optuna.samplers.RandomSampler(seed=0))
    for i in range(3):
        trial = study.ask()
        trial.suggest_float("x", 0, 1)
        trial.report(float(i), 1)
        study.tell(trial, float(i))
    running = study.ask()
    running.suggest_float("x", 0, 1)
    parts = [p.name for p in folder.iterdir()]
    assert len(parts) > 3 and parts == sorted(parts)
    expected = [(t.number, t.state, t.value, t.params) for t in study.trials]

    def reread() -> list:
        again = optuna.load_study(study_name="j", storage=journal_storage(folder))
        return [(t.number, t.state, t.value, t.params) for t in again.trials]

    assert reread() == expected
    # A kill after the compacted part 0 was written but before the old parts went: the records are read once.
    backend = ObjectStoreJournal(folder)
    logs = backend.read_logs(0)
    storage.atomic_write_text(folder / part_name(0), "".join(json.dumps(r) + "\n" for r in logs))
    assert reread() == expected
    assert ObjectStoreJournal(folder).compact() == len(parts) - 1
    assert [p.name for p in folder.iterdir()] == [part_name(0)]
    assert reread() == expected


def _cli(env: dict, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cxr_search.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


@pytest.mark.slow
def test_a_search_on_s3_stopped_then_status_resume_report_and_predict_read_it_back(s3, tmp_path, tiny_phantoms):
    space = tmp_path / "tiny.yaml"
    space.write_text(TINY)
    local = tmp_path / "local-experiments"
    env = {**os.environ, **s3["env"], "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "CXR_SEARCH_CACHE": str(tmp_path / "cache"), "CXR_SEARCH_EXPERIMENTS": str(local),
           "PYTHONUNBUFFERED": "1"}
    exp_uri = f"s3://{BUCKET}/experiments/tiny-s3"
    events = storage.path(exp_uri) / EVENTS_FILE

    driver = _cli(env, "run", str(space), "--storage", f"s3://{BUCKET}/experiments", "--name", "tiny-s3",
                  "--stages", "search,retrain,ensemble", "--top-k", "1", "--seeds", "2")
    deadline = time.monotonic() + 300
    while not any(e["event"] == "complete" for e in storage.read_records(events)) and driver.poll() is None:
        assert time.monotonic() < deadline, "no trial ended within 300 s"
        time.sleep(1)
    driver.send_signal(signal.SIGTERM)  # stop the run once a trial has ended (or it has already finished)
    out, _ = driver.communicate(timeout=180)
    assert driver.returncode in (0, 143), out[-3000:]

    status = _cli(env, "status", exp_uri)
    status_out, _ = status.communicate(timeout=120)
    assert status.returncode == 0 and "search trials" in status_out, status_out[-3000:]

    resume = _cli(env, "resume", exp_uri)
    resume_out, _ = resume.communicate(timeout=400)
    assert resume.returncode == 0, resume_out[-3000:]

    exp = Experiment.open(exp_uri)
    assert exp.is_complete("search") and exp.is_complete("retrain") and exp.is_complete("ensemble")
    trials = trial_dirs(exp.path)
    ended = trial_events(exp.path)
    assert len(trials) == exp.plan.space.num_samples
    # Every trial ended, once: a trial that finished just as the run stopped may have no event of its own
    # (its folder says it finished), but none ended twice or trained an epoch twice across the two launches.
    assert all(trial_end(t.path, ended.get(t.trial_id)) in ("finished", "stopped") for t in trials)
    completes = [e["trial_id"] for e in storage.read_records(events) if e["event"] == "complete"]
    assert len(completes) == len(set(completes))
    for t in trials:
        epochs = [h["epoch"] for h in storage.read_records(t.path / "history.jsonl")]
        assert epochs == list(range(1, len(epochs) + 1))
    study = optuna.load_study(study_name="tiny-s3", storage=journal_storage(exp.journal))
    assert len(study.trials) == len(trials) and all(t.state.is_finished() for t in study.trials)
    assert len(exp.ranked("search")) == len(trials)  # results.parquet and predictions read from the bucket

    summary = build_summary(exp_uri)
    assert "tiny-s3" in summary and "Retraining over seeds" in summary and "Soft-voting ensemble" in summary
    assert len(exp.results("retrain")) == 2  # the retrain stage's table, read from the bucket
    assert (exp.path / "summary.md").is_file()
    html_report = _cli(env, "report", exp_uri)  # the HTML report, read from and written to the bucket
    html_out, _ = html_report.communicate(timeout=300)
    assert html_report.returncode == 0, html_out[-3000:]
    page = (exp.path / "report.html").read_text()
    assert "Members against the ensemble" in page and "The ensemble stage has not run" not in page
    keys = _keys(s3, "experiments/tiny-s3/")
    for name in ("pipeline.json", "report.html", "results.parquet", "trials.jsonl", "ensemble/ensemble.json", "retrain/summary.csv",
                 "retrain/distribution.png", "retrain/results.parquet",
                 f"trial_{trials[0].trial_id}/resume.pt", f"trial_{trials[0].trial_id}/config.json"):
        assert f"experiments/tiny-s3/{name}" in keys
    assert any(k.startswith("experiments/tiny-s3/optuna.journal/") for k in keys)
    assert not local.exists() or not any(local.iterdir())  # nothing of the experiment went to a local folder

    from cxr_search import predict

    images = sorted(tiny_phantoms.rglob("*.png"))[:2]
    table = predict.predict_files(predict.load(exp_uri, device="cpu"), images, progress=False)
    assert list(table["error"]) == ["", ""] and len(table) == 2
