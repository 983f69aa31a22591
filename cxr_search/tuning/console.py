"""What a person watching a stage sees: one live table on a terminal, one line per trial event in a log.

Ray Tune's own status table (reprinted every few seconds, hundreds of lines in a log) is switched off; this
callback follows the same events Tune's scheduler and searcher see. On a terminal a rich table is redrawn in
place (trials, state, epoch, best validation metric, img/s, the stage's ETA); when the output is a file or a
pipe, each trial event is one line: started, reached an ASHA rung, stopped by ASHA, finished, failed and retried,
error.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ray import tune

from cxr_search.experiment.plan import Objective

_STATE_STYLE = {"running": "cyan", "finished": "green", "stopped": "yellow", "error": "red", "pending": "dim"}


@dataclass
class _Row:
    state: str = "pending"
    epoch: int = 0
    best: float = float("nan")
    img_per_s: float = float("nan")
    params: str = ""
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None


class TrialConsole(tune.Callback):
    """A Tune callback printing a stage's progress for people (see the module docstring).

    Args:
        console: a rich Console; a live table when it is a terminal, event lines otherwise.
        objective: the metric shown as "best".
        total: trials this launch will run (for the ETA).
        shown: searched setting names shown beside each trial.
        milestones: epochs at which ASHA compares trials (its rungs); empty for FIFO.
        title: the stage's name.
    """

    def __init__(self, console: Any, *, objective: Objective, total: int, shown: tuple[str, ...] = (),
                 milestones: tuple[int, ...] = (), title: str = "trials"):
        self.console, self.objective, self.total = console, objective, max(1, total)
        self.shown, self.milestones, self.title = shown, set(milestones), title
        self.rows: dict[str, _Row] = {}
        self.live: Any = None
        self.t0 = time.monotonic()

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its run config (tuner.pkl) for a restore we never do; a console and a live display cannot
        # be pickled and mean nothing in another process
        return {**self.__dict__, "console": None, "live": None}

    # -- Tune's callback hooks
    def setup(self, **info: Any) -> None:
        self.t0 = time.monotonic()
        if self.console.is_terminal:
            from rich.live import Live

            self.live = Live(self._table(), console=self.console, refresh_per_second=2, transient=False)
            self.live.start()

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        row = self._row(trial)
        row.state, row.started = "running", time.monotonic()
        self._say(trial, f"started{(' (' + row.params + ')') if row.params else ''}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        row = self._row(trial)
        row.state, row.epoch = "running", int(result.get("epoch", row.epoch))
        row.best = float(result.get(self.objective.column, result.get(self.objective.metric, row.best)))
        row.img_per_s = float(result.get("img_per_s", row.img_per_s))
        if row.epoch in self.milestones and not result.get("stop_reason"):
            self._say(trial, f"epoch {row.epoch}, an ASHA rung: {self.objective.metric} "
                             f"{result.get(self.objective.metric, float('nan')):.4f} (best {row.best:.4f})")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        row = self._row(trial)
        last = trial.last_result or {}
        reason = last.get("stop_reason", "")
        row.state, row.ended = ("finished" if reason else "stopped"), time.monotonic()
        what = f"finished ({reason})" if reason else "stopped by ASHA"
        self._say(trial, f"{what} after {row.epoch} epoch{'' if row.epoch == 1 else 's'}: best "
                         f"{self.objective.metric} {row.best:.4f}")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._say(trial, "failed; retrying from its folder")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        from cxr_search.tuning.callbacks import first_error_line

        row = self._row(trial)
        row.state, row.ended = "error", time.monotonic()
        self._say(trial, f"error, every retry failed: {first_error_line(trial)}", style="red")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self.live is not None:
            self.live.update(self._table())
            self.live.stop()
            self.live = None

    # -- output
    def _row(self, trial: Any) -> _Row:
        from cxr_search.tuning.trainable import KEY

        key = str(trial.config.get(KEY, trial.trial_id))
        if key not in self.rows:
            params = ", ".join(f"{k}={_short(trial.config[k])}" for k in self.shown if k in trial.config)
            self.rows[key] = _Row(params=params)
        return self.rows[key]

    def _say(self, trial: Any, text: str, style: str = "") -> None:
        from cxr_search.tuning.trainable import KEY

        key = str(trial.config.get(KEY, trial.trial_id))
        if self.live is not None:
            self.live.update(self._table())
            if style == "red":  # errors also stay on screen after the table
                self.live.console.print(f"[red]trial {key}: {text}[/]", highlight=False)
            return
        self.console.print(f"  trial {key}: {text}", highlight=False, soft_wrap=True)

    def _eta(self) -> str:
        ended = [r for r in self.rows.values() if r.ended is not None]
        if not ended:
            return "ETA: after the first trial ends"
        elapsed = time.monotonic() - self.t0
        left = elapsed * (self.total - len(ended)) / len(ended)
        return f"ETA ~{_minutes(left)}"

    def _table(self) -> Any:
        from rich.table import Table

        ended = sum(r.ended is not None for r in self.rows.values())
        table = Table(title=f"{self.title}: {ended} of {self.total} ended, {_minutes(time.monotonic() - self.t0)} "
                            f"elapsed, {self._eta()}", title_justify="left")
        for name in ("trial", "state", "epoch", f"best {self.objective.metric}", "img/s", "settings"):
            table.add_column(name, justify="left" if name in ("trial", "state", "settings") else "right")
        for key, row in self.rows.items():
            style = _STATE_STYLE.get(row.state, "")
            table.add_row(key, f"[{style}]{row.state}[/]" if style else row.state, str(row.epoch),
                          "" if row.best != row.best else f"{row.best:.4f}",
                          "" if row.img_per_s != row.img_per_s else f"{row.img_per_s:.0f}", row.params)
        return table


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def asha_milestones(max_t: int, grace_period: int, reduction_factor: int) -> tuple[int, ...]:
    """The epochs at which Ray's ASHA compares trials (its rungs, below max_t)."""
    out, epoch = [], grace_period
    while epoch < max_t:
        out.append(epoch)
        epoch *= reduction_factor
    return tuple(out)
