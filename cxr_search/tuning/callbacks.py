"""Tune callbacks on the driver: the trial event log (`trials.jsonl`) and the note on trials that wait for resources."""

from __future__ import annotations

import math
import time
from typing import Any

import ray
from ray import tune

from cxr_search.experiment.trials import record_trial_event
from cxr_search.io import storage
from cxr_search.tuning.resources import fmt_resources
from cxr_search.tuning.trainable import KEY

PENDING_NOTE_S = 180.0  # a trial waiting this long for resources gets a printed reason (PendingWatch), seconds


class TrialEventLog(tune.Callback):
    """Records each trial's start, end and errors in the stage's `trials.jsonl` the moment Tune learns of them.

    Trials a stopped run leaves behind (Ctrl-C, SIGTERM) get no event: they did not end, `resume` continues them.
    """

    def __init__(self, stage_dir: storage.Location):
        self.stage_dir = storage.path(stage_dir)

    def _record(self, trial: Any, event: str, **info: Any) -> None:
        record_trial_event(self.stage_dir, str(trial.config[KEY]), event,
                                      tune_trial_id=trial.trial_id, **info)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._record(trial, "start")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._record(trial, "retry", error=first_error_line(trial))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        self._record(trial, "complete", epoch=last.get("epoch"), stop_reason=last.get("stop_reason", ""))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._record(trial, "error", error=first_error_line(trial))


class PendingWatch(tune.Callback):
    """Says why trials wait: when one has been PENDING for `after_s` while no trial runs, or while no node fits it
    (a cluster waiting for its autoscaler), print its request and the free resources; again every `after_s`."""

    def __init__(self, after_s: float = PENDING_NOTE_S, clock: Any = time.monotonic, say: Any = None):
        self.after_s, self.clock, self.say = after_s, clock, say or _print_now
        self._since: dict[str, float] = {}
        self._last = -math.inf

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        now = self.clock()
        pending = [t for t in trials if t.status == "PENDING"]
        self._since = {t.trial_id: self._since.get(t.trial_id, now) for t in pending}
        if not pending or now - self._last < self.after_s:
            return
        oldest = min(pending, key=lambda t: self._since[t.trial_id])
        waited = now - self._since[oldest.trial_id]
        if waited < self.after_s:
            return
        want = {k: float(v) for k, v in oldest.placement_group_factory.required_resources.items() if v}
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        fits = any(all(n.get(k, 0) >= v for k, v in want.items()) for n in nodes)
        running = sum(t.status == "RUNNING" for t in trials)
        if fits and running:
            return  # an ordinary queue: it starts when a running trial ends
        free = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
        why = ("no node has that much: waiting for the autoscaler to add one (`ray status` on the head shows "
               "pending and failed nodes)" if not fits else "no trial is running: nodes are busy with other work "
               "or still starting (`ray status`)")
        self.say(f"note: trial {oldest.config.get(KEY, oldest.trial_id)} has waited {waited / 60:.0f} min for "
                 f"{fmt_resources(want)}; free now: {fmt_resources(free) or 'nothing'}; {why}.")
        self._last = now


def _print_now(text: str) -> None:
    print(text, flush=True)


def first_error_line(trial: Any) -> str:
    path = getattr(trial, "error_file", None) or ""
    try:
        text = storage.path(path).read_text() if path else ""
    except OSError:
        text = ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "trial failed"
