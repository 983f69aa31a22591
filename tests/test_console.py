"""The console a person watches: a live table on a terminal, one line per trial event in a log."""

from __future__ import annotations

import io
from types import SimpleNamespace

from rich.console import Console

from cxr_search.experiment.plan import Objective
from cxr_search.tuning.console import TrialConsole, asha_milestones


def _trial(key: str, **config):
    return SimpleNamespace(trial_id=f"t{key}", config={"trial_key": key, **config}, last_result={}, error_file="")


def _run(console: Console) -> TrialConsole:
    log = TrialConsole(console, objective=Objective(), total=2, shown=("lr",), milestones=(1,), title="search")
    log.setup()
    a, b = _trial("0000", lr=0.001), _trial("0001", lr=0.01)
    for t in (a, b):
        log.on_trial_start(0, [], t)
    log.on_trial_result(0, [], a, {"epoch": 1, "val_loss": 0.9, "best_val_loss": 0.9, "img_per_s": 50.0})
    log.on_trial_result(0, [], b, {"epoch": 1, "val_loss": 1.2, "best_val_loss": 1.2, "img_per_s": 40.0})
    a.last_result = {"epoch": 2, "stop_reason": "max_epochs"}
    log.on_trial_result(0, [], a, {"epoch": 2, "val_loss": 0.7, "best_val_loss": 0.7, "stop_reason": "max_epochs"})
    log.on_trial_complete(0, [], a)
    b.last_result = {"epoch": 1, "stop_reason": ""}
    log.on_trial_complete(0, [], b)
    log.on_experiment_end([])
    return log


def test_a_log_gets_one_line_per_trial_event():
    out = io.StringIO()
    _run(Console(file=out, width=200, force_terminal=False))
    lines = out.getvalue().splitlines()
    assert lines == [
        "  trial 0000: started (lr=0.001)",
        "  trial 0001: started (lr=0.01)",
        "  trial 0000: epoch 1, an ASHA rung: val_loss 0.9000 (best 0.9000)",
        "  trial 0001: epoch 1, an ASHA rung: val_loss 1.2000 (best 1.2000)",
        "  trial 0000: finished (max_epochs) after 2 epochs: best val_loss 0.7000",
        "  trial 0001: stopped by ASHA after 1 epoch: best val_loss 1.2000",
    ]


def test_a_terminal_gets_one_table_with_every_trial():
    out = io.StringIO()
    log = _run(Console(file=out, width=200, force_terminal=True, color_system=None))
    text = out.getvalue()
    assert "search: 2 of 2 ended" in text and "best val_loss" in text
    assert "finished" in text and "stopped" in text and "0.7000" in text
    assert "trial 0000: started" not in text  # no event lines when the table shows the state
    assert log.live is None  # stopped at the end of the stage


def test_asha_milestones_are_rays_rungs():
    assert asha_milestones(3, 1, 2) == (1, 2)
    assert asha_milestones(8, 4, 3) == (4,)
    assert asha_milestones(30, 3, 3) == (3, 9, 27)
