"""The live views the README documents: `optuna-dashboard EXP/optuna.journal` serves the search's study, and
`tensorboard --logdir EXP` finds every trial's epoch metrics (Ray's event files) under readable tags."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from cxr_search.experiment.folder import Experiment
from cxr_search.experiment.trials import trial_history


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str, deadline: float) -> object:
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.load(response)
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


@pytest.mark.slow
def test_optuna_dashboard_serves_the_search_study_with_ashas_stops_as_pruned(smoke_experiments):
    exp = Experiment.open(smoke_experiments["search_only"])
    results = exp.results("search")
    port = _free_port()
    dashboard = Path(sys.executable).with_name("optuna-dashboard")  # the command the README gives, from this venv
    proc = subprocess.Popen([str(dashboard), str(exp.journal), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        studies = _get_json(f"http://127.0.0.1:{port}/api/studies", deadline)["study_summaries"]
        assert [s["study_name"] for s in studies] == [exp.plan.name]
        detail = _get_json(f"http://127.0.0.1:{port}/api/studies/{studies[0]['study_id']}", deadline)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    states = {f"{t['number']:04d}": t["state"] for t in detail["trials"]}
    assert set(states) == set(results["trial_id"])
    stopped = set(results.loc[results["stop_reason"] == "asha", "trial_id"])
    assert {k for k, s in states.items() if s == "Pruned"} == stopped
    assert {k for k, s in states.items() if s == "Complete"} == set(results["trial_id"]) - stopped


def _scalars(event_file: Path) -> dict[str, dict[int, float]]:
    """Scalar summaries of a TensorBoard event file: TFRecords (u64 length, u32 crc, data, u32 crc), each an
    `Event` protobuf; read with tensorboardX's protobuf classes (tensorboard itself is not installed)."""
    from tensorboardX.proto import event_pb2

    data, at, out = event_file.read_bytes(), 0, {}
    while at < len(data):
        (length,) = struct.unpack("<Q", data[at: at + 8])
        event = event_pb2.Event.FromString(data[at + 12: at + 12 + length])
        at += 12 + length + 4
        for value in event.summary.value:
            out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


@pytest.mark.slow
def test_trial_event_files_hold_the_epoch_metrics_under_readable_tags(smoke_experiments):
    exp = Experiment.open(smoke_experiments["search_only"])
    for row in exp.results("search").to_dict("records"):
        history = trial_history(row["trial_dir"])
        files = sorted(Path(row["trial_dir"]).glob("events.out.tfevents.*"))
        assert files, f"trial {row['trial_id']}: no TensorBoard event file"
        scalars = {}
        for f in files:
            scalars.update(_scalars(f))
        # Ray's TBXLoggerCallback: tag ray/tune/<metric>, step = the trial's report count (= epoch in one launch)
        for metric in ("val_loss", "val_acc", "train_loss", "train_acc"):
            logged = scalars[f"ray/tune/{metric}"]
            assert sorted(logged) == list(history["epoch"])
            np.testing.assert_allclose([logged[e] for e in history["epoch"]], history[metric], rtol=1e-6)  # float32
        assert sorted(scalars["ray/tune/epoch"].values()) == list(history["epoch"])
