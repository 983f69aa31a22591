"""Test-only fault injection (`$CXR_SEARCH_FAULTS`): never part of a config a user writes."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cxr_search.config import TrialConfig
from cxr_search.io import storage


@dataclass(frozen=True)
class Fault:
    """A fault a test asks for through ``$CXR_SEARCH_FAULTS`` (never through a config a user writes).

    kind: ``raise`` (an exception), ``kill`` (SIGKILL of the training process) or ``stall`` (sleep ``seconds``),
    fired after the first training batch of ``epoch``; ``always`` fires on every attempt, otherwise once per
    model folder (a marker file remembers it); ``match`` limits it to configs with these field values.
    """

    kind: str
    epoch: int
    always: bool = False
    seconds: float = 60.0
    match: tuple[tuple[str, Any], ...] = ()

    def applies(self, cfg: TrialConfig, epoch: int) -> bool:
        return epoch == self.epoch and all(getattr(cfg, k, None) == v for k, v in self.match)


FAULTS_ENV = "CXR_SEARCH_FAULTS"


def faults_from_env(value: str | None = None) -> tuple[Fault, ...]:
    """Parse ``$CXR_SEARCH_FAULTS``: a JSON object or list, e.g. ``{"kind": "raise", "epoch": 2}``."""
    text = os.environ.get(FAULTS_ENV, "") if value is None else value
    if not text.strip():
        return ()
    raw = json.loads(text)
    items = raw if isinstance(raw, list) else [raw]
    out = []
    for item in items:
        if item.get("kind") not in ("raise", "kill", "stall"):
            raise ValueError(f"{FAULTS_ENV}: kind must be raise, kill or stall, got {item.get('kind')!r}")
        out.append(Fault(item["kind"], int(item["epoch"]), bool(item.get("always", False)),
                         float(item.get("seconds", 60.0)), tuple(sorted((item.get("match") or {}).items()))))
    return tuple(out)


def armed_faults(faults: Sequence[Fault], cfg: TrialConfig, epoch: int,
                  folder: storage.Location | None) -> Callable[[], None] | None:
    chosen = [f for f in faults if f.applies(cfg, epoch)]
    if not chosen:
        return None

    def fire() -> None:
        for fault in chosen:
            marker = folder / f".fault-{fault.kind}-e{fault.epoch:04d}" if folder is not None else None
            if marker is not None and marker.exists() and not fault.always:
                continue
            if marker is not None:
                marker.touch()
            if fault.kind == "raise":
                raise RuntimeError(f"fault injected at epoch {epoch} ({FAULTS_ENV})")
            if fault.kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(fault.seconds)

    return fire
