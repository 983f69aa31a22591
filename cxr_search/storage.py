"""Where bytes go: the one way this project writes a file so that a kill at any line leaves it whole.

Two kinds of writes cover every file the project owns:
- `atomic_write(path, ...)`: the file is written under a temporary name in the same folder, flushed to disk
  and renamed over the target, so a reader (or a resume after a kill) sees the old file or the new one,
  never half of one.
- `append_record(path, obj)`: one JSON line appended and fsynced (a per-epoch history, an event ledger).
  A kill mid-append leaves at most one cut line at the end; `read_records` skips it and the next append
  first cuts it off (`repair_tail`), so the log never mixes a cut line with a new one.

Names ending in `.json` or `.pkl` are avoided for files that change while Ray Tune runs in a folder: Tune copies
every such file of the experiment to its staging folder when it restores a run and copies them back every few
seconds, which would overwrite a newer file with the stale copy. Logs use `.jsonl`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Write `path` through `write(tmp_path)` and rename it into place (readers never see a partial file).

    Args:
        path: the file to (re)place.
        write: a function that writes the whole content to the temporary path it is given.

    Returns:
        `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`atomic_write` of a text file (UTF-8)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """`atomic_write` of a JSON document (indented; NaN written as null-safe JSON by `default=str`)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    """A JSON document written by `atomic_write_json` (raises OSError / ValueError like `json.loads`)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def append_record(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line to a log and fsync it (a cut last line left by a kill is cut off first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    repair_tail(path)
    line = json.dumps(record, separators=(",", ":"), default=str) + "\n"
    with open(path, "ab") as f:
        f.write(line.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Every complete JSON line of a log (a missing log is empty; a cut or garbled line is skipped)."""
    return list(iter_records(path))


def iter_records(path: str | Path) -> Iterator[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                return  # cut by a kill mid-append
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                yield record


def rewrite_records(path: str | Path, records: list[dict[str, Any]]) -> None:
    """Replace a log with `records` atomically (used to drop lines a resumed run will write again)."""
    text = "".join(json.dumps(r, separators=(",", ":"), default=str) + "\n" for r in records)
    atomic_write_text(path, text)


def repair_tail(path: str | Path) -> bytes:
    """Cut a log back to its last complete line; returns the bytes cut off (empty if the log was whole).

    A writer killed mid-append leaves a line without its newline. Appending after it would glue two records
    into one garbled line, so every appender (and a resume) cuts it off first.
    """
    path = Path(path)
    if not path.is_file():
        return b""
    size = path.stat().st_size
    if size == 0:
        return b""
    with open(path, "rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return b""
        # Walk back to the last newline (logs are small; lines are short).
        block = 4096
        end = size
        keep = 0
        while end > 0:
            start = max(0, end - block)
            f.seek(start)
            chunk = f.read(end - start)
            i = chunk.rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
                break
            end = start
        f.seek(keep)
        cut = f.read()
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return cut


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (e.g. a few network mounts) refuse fsync on a read-only descriptor
        pass
    finally:
        os.close(fd)
