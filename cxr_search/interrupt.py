"""Ctrl-C and SIGTERM (what a terminal, `kill`, Slurm and Kubernetes send) stop a command cleanly.

Inside a Ray Tune run the first signal asks Tune to stop (Tune's own graceful stop: it ends the run, and the
trials it leaves are continued by `resume`); elsewhere it raises at once, which is safe because every file is
written atomically. Either way the command ends with `StageInterrupted`, which the CLI turns into exit code
130 (SIGINT) or 143 (SIGTERM) and the `cxr-search resume EXP` line. A second signal stops at once.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class StageInterrupted(Exception):
    """A command stopped on SIGINT/SIGTERM with its finished work saved; `resume` continues it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.experiment: Path | None = None  # set by the command that was running, for the resume hint


@dataclass
class _State:
    signum: int = 0  # the first SIGINT/SIGTERM received (0: none)
    in_tune: bool = False
    active: bool = False  # inside `interruptible`


STATE = _State()


def _on_signal(signum: int, frame: Any) -> None:
    if STATE.signum or not STATE.in_tune:
        STATE.signum = STATE.signum or signum
        raise StageInterrupted(signum)  # a second signal, or outside a Tune run: stop at once (still resumable)
    STATE.signum = signum
    print(f"\n{signal.Signals(signum).name}: stopping the stage and saving its state "
          "(press Ctrl-C again to stop at once)", flush=True)
    # Tune's graceful stop: `tune.run` installs a SIGUSR1 handler that ends its loop (TUNE_DISABLE_SIGINT_HANDLER=1
    # keeps it from taking SIGINT itself, so this handler knows which signal it was).
    signal.raise_signal(signal.SIGUSR1)


class interruptible:
    """Context for a command: SIGINT/SIGTERM stop it cleanly and raise `StageInterrupted`."""

    def __enter__(self) -> interruptible:
        self.saved: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.saved[sig] = signal.signal(sig, _on_signal)
            STATE.active = True
        STATE.signum = 0
        return self

    def __exit__(self, *exc: Any) -> None:
        STATE.active = False
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)


def reinstall() -> None:
    """Take SIGINT/SIGTERM back after a library installed its own (`ray.init` sets a SIGTERM handler that
    aborts the process)."""
    if STATE.active and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _on_signal)


class tune_run:
    """Marks a Tune run as in progress (the first signal asks Tune to stop); raises `StageInterrupted` after it."""

    def __enter__(self) -> None:
        STATE.in_tune = True

    def __exit__(self, kind: Any, error: Any, tb: Any) -> None:
        STATE.in_tune = False
        if error is None and STATE.signum:
            raise StageInterrupted(STATE.signum)


class naming:
    """Attach the experiment folder to a `StageInterrupted` passing through (the CLI prints the resume command)."""

    def __init__(self, exp_path: Path):
        self.exp_path = exp_path

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, error: Any, tb: Any) -> None:
        if isinstance(error, StageInterrupted):
            error.experiment = self.exp_path
