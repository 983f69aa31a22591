"""Optuna on Ray Tune: the searcher that names trials by Optuna's trial number and continues a study across launches,
and the reconciliation of the journal with the trial folders before a launch."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from ray.tune.search.optuna import OptunaSearch

from cxr_search.experiment.plan import Objective
from cxr_search.experiment.trials import record_trial_event, trial_end, trial_events, trial_history
from cxr_search.io import storage
from cxr_search.io.journal import journal_storage, repair_journal
from cxr_search.io.layout import TRIAL_PREFIX
from cxr_search.space import ParamSpec
from cxr_search.tuning.trainable import KEY

log = logging.getLogger(__name__)


TPE_STARTUP = 10  # TPE's random startup trials (Optuna's default), drawn per trial number here


class ReplayingOptunaSearch(OptunaSearch):
    """OptunaSearch that names trials by Optuna's trial number and continues a study across launches.

    - `suggest` first hands out the Optuna trials a previous launch left RUNNING (`pending`), with their own
      parameters, then asks new ones; the config's `trial_key` is the Optuna number (the trial's folder).
    - TPE's first `n_startup` trials are random draws; here trial number n draws from a generator seeded with
      (seed, n) and is enqueued before it is asked, so an interrupted and resumed search, or one whose trials
      finish in another order, starts with exactly the trials of an uninterrupted one. Later trials are TPE's.
    - Steps are the trial's own epochs (`epoch`, not Tune's iteration), so epochs repeated after a retry or in a
      later launch are not reported twice; a trial the journal holds as finished is never reported to or told.
    - A finished trial is told its best validation value (`best_<metric>`, what results.parquet and the ranking
      use), not its last epoch's; a trial ASHA stopped (no `stop_reason` of its own) is told PRUNED.
    """

    def __init__(self, *args: Any, pending: tuple[int, ...] = (), params: tuple[ParamSpec, ...] = (),
                 seed: int = 0, n_startup: int = 0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._pending = list(pending)
        self._params, self._draw_seed, self._n_startup = params, seed, n_startup

    def suggest(self, trial_id: str) -> dict | None:
        import numpy as np
        import optuna
        from optuna.trial import TrialState

        if trial_id not in self._ot_trials and self._pending:
            number = self._pending.pop(0)
            frozen = self._ot_study.get_trials(deepcopy=False)[number]
            self._ot_trials[trial_id] = optuna.Trial(self._ot_study, frozen._trial_id)
        elif trial_id not in self._ot_trials and self._ot_study is not None:
            trials = self._ot_study.get_trials(deepcopy=False)
            number = len(trials)
            waiting = any(t.state == TrialState.WAITING for t in trials)  # enqueued by a launch that died
            if number < self._n_startup and not waiting:
                rng = np.random.default_rng([self._draw_seed, number])
                self._ot_study.enqueue_trial({p.name: p.sample(rng) for p in self._params})
        config = super().suggest(trial_id)
        if config is not None:
            config[KEY] = trial_key(self._ot_trials[trial_id].number)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self._open(trial_id):
            self._report_step(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        from optuna.trial import TrialState

        if not self._open(trial_id):
            self._completed_trials.add(trial_id)
            return
        ot_trial = self._ot_trials[trial_id]
        if error or not result or self.metric not in result:
            state, value = (TrialState.FAIL if error else TrialState.PRUNED), None
        else:
            self._report_step(trial_id, result)  # Tune skips on_trial_result for the result that stops a trial
            finished = bool(result.get("stop_reason"))
            state = TrialState.COMPLETE if finished else TrialState.PRUNED
            value = float(result.get(f"best_{self.metric}", result[self.metric])) if finished else None
        if value is not None and not math.isfinite(value):
            state, value = TrialState.FAIL, None  # a diverged trial: Optuna cannot rank NaN
        self._ot_study.tell(ot_trial, value, state=state)
        self._completed_trials.add(trial_id)

    def _open(self, trial_id: str) -> bool:
        """Whether the trial may still be reported to: known, and not finished in the journal (read fresh)."""
        if trial_id not in self._ot_trials or trial_id in self._completed_trials:
            return False
        ot_trial = self._ot_trials[trial_id]
        return not ot_trial.storage.get_trial(ot_trial._trial_id).state.is_finished()

    def _report_step(self, trial_id: str, result: dict) -> None:
        ot_trial = self._ot_trials[trial_id]
        step = int(result.get("epoch", result["training_iteration"]))
        if step not in ot_trial.storage.get_trial(ot_trial._trial_id).intermediate_values:
            ot_trial.report(float(result[self.metric]), step)


def trial_key(number: int) -> str:
    return f"{number:04d}"


@dataclass(frozen=True)
class JournalState:
    ended: int  # trials that ended (COMPLETE, PRUNED, FAIL)
    pending: tuple[int, ...]  # RUNNING trials to hand out again, by number
    total: int  # every trial in the study


def reconcile_journal(stage_dir: storage.Location, journal: storage.Location, study_name: str, objective: Objective,
                      space: dict[str, Any] | None = None) -> JournalState:
    """Bring the Optuna journal and the event log in line with the trial folders before a launch.

    For each trial the journal holds as RUNNING: if its folder finished, it is told COMPLETE with its best value;
    if the event log says the scheduler stopped it, PRUNED; if it failed every retry, FAIL (missing epochs are
    reported first, from the folder's history). Trials still unfinished stay RUNNING and are handed out again.
    Trials the journal ended but the event log never heard of are added to the log. A RUNNING trial whose
    parameters were cut short by the kill (Optuna writes them one record at a time) gets the rest from its
    enqueued values, or from the sampler, before it is handed out (`space`: the Optuna distributions).
    """
    import optuna
    from optuna.trial import TrialState

    if not (journal.is_dir() if storage.is_remote(journal) else journal.is_file()):
        return JournalState(0, (), 0)
    repair_journal(journal)
    study = optuna.load_study(study_name=study_name, storage=journal_storage(journal))
    events = trial_events(stage_dir)
    pending = []
    for frozen in study.get_trials(deepcopy=False):
        key = trial_key(frozen.number)
        folder = stage_dir / f"{TRIAL_PREFIX}{key}"
        event = events.get(key)
        if frozen.state.is_finished():
            if (event is None or event.get("event") not in ("complete", "error")) and folder.is_dir():
                kind = "error" if frozen.state == TrialState.FAIL else "complete"
                record_trial_event(stage_dir, key, kind, reconciled="from optuna.journal")
            continue
        end = trial_end(folder, event) if folder.is_dir() else None
        if end is None:
            if space and set(space) - set(frozen.params):
                _complete_params(optuna.Trial(study, frozen._trial_id), space)
            pending.append(frozen.number)
            continue
        history = trial_history(folder)
        trial = optuna.Trial(study, frozen._trial_id)
        if objective.metric in history:
            for epoch, value in zip(history["epoch"], history[objective.metric], strict=True):
                if int(epoch) not in frozen.intermediate_values and math.isfinite(float(value)):
                    trial.report(float(value), int(epoch))
        if end == "finished":
            best = objective.best(history[objective.metric]) if objective.metric in history else float("nan")
            if math.isfinite(best):
                study.tell(trial, best, state=TrialState.COMPLETE)
            else:
                study.tell(trial, None, state=TrialState.FAIL)
        else:
            study.tell(trial, None, state=TrialState.PRUNED if end == "stopped" else TrialState.FAIL)
    trials = study.get_trials(deepcopy=False)
    ended = sum(t.state.is_finished() for t in trials)
    return JournalState(ended, tuple(pending), len(trials))


def _complete_params(trial: Any, space: dict[str, Any]) -> None:
    """Give a trial the parameters it lacks, through Optuna's own suggest API (an enqueued value wins)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    for name, dist in space.items():
        if name in trial.params:
            continue
        if isinstance(dist, CategoricalDistribution):
            trial.suggest_categorical(name, dist.choices)
        elif isinstance(dist, FloatDistribution):
            trial.suggest_float(name, dist.low, dist.high, log=dist.log, step=dist.step)
        elif isinstance(dist, IntDistribution):
            trial.suggest_int(name, dist.low, dist.high, log=dist.log, step=dist.step)
