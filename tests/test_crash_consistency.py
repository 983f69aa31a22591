"""A killed run always resumes: the whole pipeline (search -> finalize -> retrain -> ensemble -> summary) is
SIGKILLed, process group and local Ray included, at many points of its life, resumed after each kill, and
compared with an uninterrupted run of the same plan.

The plan is deterministic (FIFO, deterministic CPU training, Optuna's startup trials drawn per trial number), so
the killed-and-resumed experiment must equal the uninterrupted one: the same trials with the same configurations,
the same per-epoch history, each finished trial's predictions once, every stage complete, the summary written;
and no trial that had ended before a kill is trained again after it. Kill points are events seen in the
experiment folder (or times), checked every 50 ms; a point that the run passes between two checks is hit at the
next moment, which is a kill point too, and the table printed at the end says where each kill landed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_search_tune import TINY, assert_journal_matches_results

from cxr_search.experiment.folder import Experiment
from cxr_search.experiment.plan import STAGES
from cxr_search.experiment.trials import (
    config_fields,
    config_key,
    trial_dirs,
    trial_end,
    trial_events,
    trial_history,
)
from cxr_search.io import storage
from cxr_search.io.layout import JOURNAL_FILE, PLAN_FILE, RETRAIN_DIR, SUMMARY_FILE
from cxr_search.training.model_folder import read_history

pytestmark = pytest.mark.slow

# The search tests' tiny space, made deterministic: FIFO (every trial runs to its end) and deterministic CPU kernels.
SPACE = (TINY.replace("name: tiny", "name: crash")
         .replace("scheduler: {type: asha, max_t: 3, grace_period: 1, reduction_factor: 2}", "scheduler: fifo")
         .replace("augment: false}", "augment: false, deterministic: true}")
         .replace("lr: {loguniform: [1.0e-4, 1.0e-1]}", "lr: {loguniform: [1.0e-3, 1.0e-1]}"))
RUN_ARGS = ("--stages", "search,retrain,ensemble", "--top-k", "1", "--seeds", "2")
STEP_TIMEOUT_S = 240  # one launch reaching its next kill point (Ray start + data + a few epochs), on a loaded box


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    space = root / "crash.yaml"
    space.write_text(textwrap.dedent(SPACE))
    assert "fifo" in SPACE and "deterministic: true" in SPACE
    env = {**os.environ, "CXR_SEARCH_CACHE": str(root / "cache"), "PYTHONUNBUFFERED": "1"}
    return root, space, env


def _launch(env: dict, *args: str, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cxr_search.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=cwd)


@pytest.fixture(scope="module")
def reference(setup):
    """The uninterrupted run."""
    root, space, env = setup
    proc = _launch(env, "run", str(space), "--name", "ref", "--storage", str(root / "exps"), *RUN_ARGS)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    return root / "exps" / "ref"


# ---------------------------------------------------------------- what the folder says


def _completed(exp: Path) -> tuple[str, ...]:
    try:
        return tuple(storage.read_json(exp / PLAN_FILE)["completed"])
    except (OSError, ValueError, KeyError):
        return ()


def _stage_dirs(exp: Path) -> list[Path]:
    return [exp, exp / RETRAIN_DIR]


def _histories(stage_dir: Path) -> dict[str, list[dict]]:
    return {t.trial_id: read_history(t.path) for t in trial_dirs(stage_dir)}


def _ended(stage_dir: Path) -> dict[str, list[dict]]:
    """Trials that ended by the experiment's own records, with their history at this moment."""
    events = trial_events(stage_dir)
    out = {}
    for t in trial_dirs(stage_dir):
        if trial_end(t.path, events.get(t.trial_id)) is not None:
            out[t.trial_id] = read_history(t.path)
    return out


def _epochs(stage_dir: Path) -> int:
    return sum(len(h) for h in _histories(stage_dir).values())


def _journal_trials(exp: Path) -> int:
    path = exp / JOURNAL_FILE
    return sum(1 for r in storage.read_records(path) if r.get("op_code") == 4) if path.is_file() else 0  # CREATE_TRIAL


@dataclass(frozen=True)
class KillPoint:
    label: str
    reached: Callable[[Path, float], bool]  # (experiment folder, seconds since this launch started)


def _n_ended(exp: Path, stage: str = "search") -> int:
    return len(_ended(exp if stage == "search" else exp / RETRAIN_DIR))


POINTS = (
    KillPoint("0.5 s after the start (before any file)", lambda e, t: t >= 0.5),
    KillPoint("plan written", lambda e, t: (e / PLAN_FILE).is_file()),
    KillPoint("3 s into a resume (Ray starting, data loading)", lambda e, t: t >= 3.0),
    KillPoint("first trial started", lambda e, t: bool(trial_events(e))),
    KillPoint("first epoch on disk", lambda e, t: _epochs(e) >= 1),
    KillPoint("first trial ended", lambda e, t: _n_ended(e) >= 1),
    KillPoint("journal holds 4 trials (mid-search)", lambda e, t: _journal_trials(e) >= 4),
    KillPoint("5 trials ended", lambda e, t: _n_ended(e) >= 5),
    KillPoint("finalize writing predictions", lambda e, t: len(list((e / "predictions").glob("*.json"))) >= 2
              or "search" in _completed(e)),
    KillPoint("search marked complete", lambda e, t: "search" in _completed(e)),
    KillPoint("first retrain epoch on disk", lambda e, t: _epochs(e / RETRAIN_DIR) >= 1),
    KillPoint("a retrain trial ended", lambda e, t: _n_ended(e, "retrain") >= 1),
    KillPoint("retrain marked complete (ensemble next)", lambda e, t: "retrain" in _completed(e)),
)


@dataclass
class Kill:
    point: str
    stage: str
    ended_before: int
    rerun_after: int = 0
    lost: int = 0


def _stage_now(exp: Path) -> str:
    done = _completed(exp)
    for name in STAGES:
        if name not in done:
            return name if (exp / PLAN_FILE).is_file() else "planning"
    return "summary"


def _wait(proc: subprocess.Popen, exp: Path, point: KillPoint, started: float) -> bool:
    """Poll until the point is reached (True) or the launch ends by itself (False)."""
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if point.reached(exp, time.monotonic() - started):
            return True
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"launch did not reach '{point.label}' in {STEP_TIMEOUT_S} s:\n{proc.communicate()[0][-3000:]}")


def test_killing_the_driver_anywhere_loses_and_repeats_nothing(setup, reference):
    root, space, env = setup
    storage_root = root / "exps"
    exp = storage_root / "killed"
    kills: list[Kill] = []
    ended_at_kill: list[dict[str, dict[str, list[dict]]]] = []  # per kill: stage dir -> ended trial histories
    elsewhere = root / "elsewhere"  # resumes run from another working directory: the plan's paths are absolute
    elsewhere.mkdir(exist_ok=True)
    for point in POINTS:
        if (exp / PLAN_FILE).is_file():
            args, cwd = ("resume", str(exp)), elsewhere
        else:  # killed before the plan existed: the run never started, so it is started again
            args, cwd = ("run", str(space), "--name", "killed", "--storage", str(storage_root), *RUN_ARGS), None
        started = time.monotonic()
        proc = _launch(env, *args, cwd=cwd)
        reached = _wait(proc, exp, point, started)
        if not reached:  # finished before the point: nothing left to kill
            out = proc.communicate()[0]
            assert proc.returncode == 0, out[-3000:]
            break
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        ended = {str(d): _ended(d) for d in _stage_dirs(exp)}
        ended_at_kill.append(ended)
        kills.append(Kill(point.label, _stage_now(exp), sum(len(v) for v in ended.values())))
    proc = _launch(env, "resume", str(exp), cwd=elsewhere)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]

    # No trial that had ended before a kill was trained again, or lost, afterwards.
    final = {str(d): _histories(d) for d in _stage_dirs(exp)}
    for kill, ended in zip(kills, ended_at_kill, strict=True):
        for stage_dir, trials in ended.items():
            for key, history in trials.items():
                if key not in final[stage_dir]:
                    kill.lost += 1
                elif final[stage_dir][key] != history:
                    kill.rerun_after += 1
    table = pd.DataFrame([k.__dict__ for k in kills])
    print("\n" + table.to_string(index=False))
    print(f"kills: {len(kills)}, resumes: {len(kills)}, trials lost: {table['lost'].sum()}, "
          f"finished trials trained again: {table['rerun_after'].sum()}")
    assert len(kills) >= 12, f"only {len(kills)} kill points were reached"
    assert table["lost"].sum() == 0 and table["rerun_after"].sum() == 0

    # The killed-and-resumed experiment is the uninterrupted one, and its Optuna journal says what its table says.
    killed = Experiment.open(exp)
    _assert_same_experiment(Experiment.open(reference), killed)
    assert_journal_matches_results(killed, killed.results())


def _assert_same_experiment(ref: Experiment, got: Experiment) -> None:
    assert set(got.plan.completed) == set(ref.plan.completed) == set(STAGES)
    assert (got.path / SUMMARY_FILE).is_file()
    for stage in ("search", "retrain"):
        a, b = ref.results(stage).set_index("trial_id"), got.results(stage).set_index("trial_id")
        assert sorted(a.index) == sorted(b.index), stage  # the same trials, none lost, none extra
        for key in a.index:
            ca, cb = config_fields(a.loc[key].to_dict()), config_fields(b.loc[key].to_dict())
            assert config_key(ca) == config_key(cb), f"{stage} {key}: {ca} != {cb}"
            assert a.loc[key, "seed"] == b.loc[key, "seed"]
            ha = trial_history(a.loc[key, "trial_dir"])
            hb = trial_history(b.loc[key, "trial_dir"])
            assert list(hb["epoch"]) == list(range(1, len(hb) + 1))  # every epoch once
            np.testing.assert_allclose(hb["val_loss"], ha["val_loss"], rtol=1e-6, err_msg=f"{stage} {key}")
            assert b.loc[key, "stop_reason"] == a.loc[key, "stop_reason"]
        # every finished trial's predictions, once
        preds = sorted(p.stem for p in (got.stage_dir(stage) / "predictions").glob("*.npz"))
        assert preds == sorted(b.index[b["predictions_path"].astype(bool)])
    ens_a = json.loads((ref.path / "ensemble" / "ensemble.json").read_text())
    ens_b = json.loads((got.path / "ensemble" / "ensemble.json").read_text())
    assert [m["trial_id"] for m in ens_b["members"]] == [m["trial_id"] for m in ens_a["members"]]
    assert ens_b["metrics"]["acc"] == pytest.approx(ens_a["metrics"]["acc"])
