"""The Optuna journal of an experiment on an object store (S3, GCS, ...), where files cannot be appended to.

Locally the journal is Optuna's own `JournalFileBackend` (one `optuna.journal` file, appended and fsynced;
optuna-dashboard opens it). An object store has no append and no rename, so there the journal is a folder of
numbered parts, `optuna.journal/NNNNNNNNNN.jsonl`, each holding the records of one `append_logs` call and named
by the number of its first record. A part is one whole object (a reader never sees half of it), and it is written
before Optuna goes on, so a trial number handed out is on the store before its trial starts.

Why parts and not a local journal copied to the store now and then: after a kill the copy would lag behind the
trial folders, and a resumed study would hand out trial numbers again whose folders (`trial_<number>`) already
hold another trial. Only the driver writes the journal (Tune's searcher runs there), under the experiment's lock.

`compact()` (called when a launch reconciles the journal) rewrites the parts as one part 0 and then deletes the
others; a reader skips records it already holds, so a kill between the two leaves a readable journal.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from optuna.storages.journal import BaseJournalBackend

from cxr_search.io import storage

log = logging.getLogger(__name__)

PART_SUFFIX = ".jsonl"
_DIGITS = 10


class ObjectStoreJournal(BaseJournalBackend):
    """Optuna `BaseJournalBackend` over numbered part objects in `folder` (a `storage.RemotePath`)."""

    def __init__(self, folder: storage.Location):
        self.folder = folder
        self._logs: list[dict[str, Any]] = []  # every record read or written so far, in order
        self._known: set[int] = set()  # parts (by first record) already in _logs

    def read_logs(self, log_number_from: int) -> list[dict[str, Any]]:
        self._refresh()
        return self._logs[log_number_from:]

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        self._refresh()
        text = "".join(json.dumps(log, separators=(",", ":")) + "\n" for log in logs)
        storage.atomic_write_text(self.folder / part_name(len(self._logs)), text)
        self._known.add(len(self._logs))
        self._logs.extend(logs)

    def compact(self) -> int:
        """Rewrite every part as part 0, then delete the rest; returns the number of parts removed."""
        parts = self._parts()
        if len(parts) <= 1:
            return 0
        self._refresh()
        text = "".join(json.dumps(log, separators=(",", ":")) + "\n" for log in self._logs)
        storage.atomic_write_text(self.folder / part_name(0), text)
        for start, part in parts:
            if start > 0:
                part.unlink(missing_ok=True)
        self._known = {0}
        return len(parts) - 1

    def _parts(self) -> list[tuple[int, storage.Location]]:
        out = []
        for p in self.folder.glob(f"*{PART_SUFFIX}"):
            stem = p.name[: -len(PART_SUFFIX)]
            if stem.isdigit():
                out.append((int(stem), p))
        return sorted(out, key=lambda item: item[0])

    def _refresh(self) -> None:
        """Read the parts this instance has not seen (one listing, then only the new objects)."""
        for start, part in self._parts():
            if start in self._known:
                continue
            if start > len(self._logs):
                raise RuntimeError(f"{self.folder}: journal part {part.name} starts at record {start} but only "
                                   f"{len(self._logs)} come before it; the journal is damaged.")
            records = [json.loads(line) for line in part.read_text().splitlines() if line.strip()]
            self._logs.extend(records[len(self._logs) - start:])  # a compacted part 0 repeats known records
            self._known.add(start)


def part_name(first_record: int) -> str:
    return f"{first_record:0{_DIGITS}d}{PART_SUFFIX}"


def journal_storage(journal: storage.Location) -> Any:
    """The Optuna storage of an experiment's journal: a local file (what `optuna-dashboard EXP/optuna.journal`
    opens), or on an object store a folder of whole parts (`journal.py`)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if storage.is_remote(journal):
        from cxr_search.io.journal import ObjectStoreJournal

        return JournalStorage(ObjectStoreJournal(journal))
    return JournalStorage(JournalFileBackend(str(journal)))


def repair_journal(journal: storage.Location) -> bytes:
    """Cut a journal tail a killed driver left mid-append (it would corrupt the next append); a stale lock
    file of the dead driver is removed too; on an object store the parts are compacted into one (nothing is ever
    cut there). Call only when no other process writes the journal."""
    if storage.is_remote(journal):
        from cxr_search.io.journal import ObjectStoreJournal

        ObjectStoreJournal(journal).compact()
        return b""
    cut = storage.repair_tail(journal)
    if cut:
        storage.atomic_write(journal.with_name(journal.name + ".cut"), lambda tmp: tmp.write_bytes(cut))
        log.warning("%s: removed an incomplete last record (%d bytes, kept in %s.cut)", journal, len(cut), journal.name)
    for lock in (journal.with_name(journal.name + ".lock"),):
        if lock.is_symlink() or lock.exists():
            lock.unlink()
    return cut
