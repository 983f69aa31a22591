"""Where bytes go: the one filesystem layer of the project, so that a kill at any line leaves every file whole.

An experiment lives in a local (or NFS) folder or on any filesystem pyarrow opens (`s3://bucket/prefix`,
`gs://...`, `abfs://...`, `hdfs://...`): `path(where)` gives a `pathlib.Path` for a local folder and a `RemotePath`
(the subset of pathlib the project uses, over `pyarrow.fs`) for a URI. Ray Tune opens the same URIs with
`pyarrow.fs.FileSystem.from_uri`, so the trial folders Ray writes and ours are in one place. Local files keep
pathlib and the OS: pyarrow's LocalFileSystem has no fsync, which the crash-safe order below needs.

Two kinds of writes cover every file the project owns:
- `atomic_write(path, ...)`: locally the file is written under a temporary name in the same folder, flushed to disk
  and renamed over the target; on an object store it is written to a local temporary file and uploaded as one
  object (a PUT, or a multipart upload, becomes visible only when complete). Either way a reader (or a resume after
  a kill) sees the old file or the new one, never half of one.
- `append_record(path, obj)`: one JSON line added to a log (a per-epoch history, an event ledger). Locally an
  fsynced append; a kill mid-append leaves at most one cut line at the end, which `read_records` skips and the
  next append first cuts off (`repair_tail`). Object stores have no append: the log is rewritten whole as one new
  object (logs are small, and each has one writer: a trial's own history, the driver's event log). The Optuna
  journal, which grows with every report, is kept as numbered parts instead (`journal.py`).

Names ending in `.json` or `.pkl` are avoided for files that change while Ray Tune runs in a folder: Tune copies
every such file of the experiment to its staging folder when it restores a run and copies them back every few
seconds, which would overwrite a newer file with the stale copy. Logs use `.jsonl`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import json
import os
import posixpath
import re
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

_URI = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://")
_UPLOAD_CHUNK = 8 << 20  # bytes per write when uploading a temporary file


def is_remote(where: Any) -> bool:
    """Whether `where` names a location on a pyarrow filesystem (a URI such as `s3://bucket/prefix`)."""
    if isinstance(where, RemotePath):
        return True
    m = _URI.match(str(where)) if isinstance(where, str) else None
    return bool(m) and m.group("scheme").lower() != "file"


def path(where: str | Path | RemotePath) -> Path | RemotePath:
    """The location `where` names: a `RemotePath` for a URI (`s3://...`), else a `pathlib.Path` (`file://` too).

    Raises:
        CxrError: a URI no pyarrow filesystem opens (unknown scheme, missing credentials or endpoint).
    """
    if isinstance(where, (Path, RemotePath)):
        return where
    text = os.fspath(where) if not isinstance(where, str) else where
    if is_remote(text):
        return RemotePath.from_uri(text)
    if text.lower().startswith("file://"):
        return Path(text[len("file://"):])
    return Path(text)


@dataclass(frozen=True)
class _Root:
    """What the paths of one URI share: the filesystem, how to write a path back as a URI, the query."""

    filesystem: Any  # pyarrow.fs.FileSystem
    prefix: str  # URI text before a filesystem path (`s3://`, `hdfs://host:8020`)
    query: str  # `endpoint_override=...&scheme=http` (kept, so another process reopens the same store)


_roots: dict[tuple[str, str], _Root] = {}
_roots_lock = threading.Lock()


class RemotePath:
    """A file or folder on a pyarrow filesystem, with the part of `pathlib.Path`'s interface the project uses.

    Its `str()` is a URI that `path()` (in this process or a Ray worker) turns back into the same location.
    Folders on object stores are key prefixes: `mkdir` is a no-op marker and a folder exists while it holds a file.
    """

    __slots__ = ("_root", "_path")

    def __init__(self, root: _Root, fs_path: str):
        self._root, self._path = root, fs_path.rstrip("/") or "/"

    @classmethod
    def from_uri(cls, uri: str) -> RemotePath:
        from pyarrow import fs as pafs

        from cxr_search.errors import CxrError

        base, _, query = uri.partition("?")
        scheme = _URI.match(base).group("scheme").lower()
        netloc = base[len(scheme) + 3:].split("/", 1)[0]
        key = (f"{scheme}://{netloc}", query)  # one filesystem per store (s3: per endpoint, not per bucket)
        try:
            filesystem, fs_path = pafs.FileSystem.from_uri(uri)
        except (OSError, ValueError, TypeError) as e:  # pyarrow's ArrowInvalid/ArrowIOError derive from these
            raise CxrError(f"{uri}: no filesystem opens it ({' '.join(str(e).split())[:200]}); give a local folder "
                           "or a URI pyarrow opens (s3://bucket/prefix, gs://bucket/prefix; credentials from the "
                           "environment, e.g. AWS_ACCESS_KEY_ID, and AWS_ENDPOINT_URL for an S3-compatible "
                           "server).") from None
        fs_path = fs_path.rstrip("/")
        stem = base.rstrip("/")
        prefix = stem[: len(stem) - len(fs_path)] if fs_path and stem.endswith(fs_path) else f"{scheme}://"
        with _roots_lock:
            root = _roots.setdefault(key, _Root(filesystem, prefix, query))
        return cls(root, fs_path)

    # -- names
    def __str__(self) -> str:
        return self._root.prefix + self._path + (f"?{self._root.query}" if self._root.query else "")

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __reduce__(self) -> tuple:
        return path, (str(self),)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __lt__(self, other: RemotePath) -> bool:
        return self._path < other._path

    def __truediv__(self, name: str | os.PathLike) -> RemotePath:
        return RemotePath(self._root, posixpath.join(self._path, os.fspath(name)))

    @property
    def name(self) -> str:
        return posixpath.basename(self._path)

    @property
    def stem(self) -> str:
        return posixpath.splitext(self.name)[0]

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    @property
    def parent(self) -> RemotePath:
        return RemotePath(self._root, posixpath.dirname(self._path))

    def with_name(self, name: str) -> RemotePath:
        return self.parent / name

    def with_suffix(self, suffix: str) -> RemotePath:
        return self.parent / (self.stem + suffix)

    def resolve(self) -> RemotePath:
        return self

    expanduser = absolute = resolve

    # -- queries
    @property
    def filesystem(self) -> Any:
        """The pyarrow filesystem holding this path."""
        return self._root.filesystem

    @property
    def fs_path(self) -> str:
        """This path as the filesystem names it (`bucket/key` on S3)."""
        return self._path

    def _info(self) -> Any:
        return self.filesystem.get_file_info(self._path)

    def exists(self) -> bool:
        from pyarrow import fs as pafs

        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        from pyarrow import fs as pafs

        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        from pyarrow import fs as pafs

        return self._info().type == pafs.FileType.Directory

    def is_symlink(self) -> bool:
        return False

    def stat(self) -> os.stat_result:
        info = self._info()
        if info.size is None:
            raise FileNotFoundError(str(self))
        mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
        return os.stat_result((0, 0, 0, 1, 0, 0, info.size, mtime, mtime, mtime))

    def iterdir(self) -> Iterator[RemotePath]:
        from pyarrow import fs as pafs

        infos = self.filesystem.get_file_info(pafs.FileSelector(self._path, allow_not_found=True))
        for info in sorted(infos, key=lambda i: i.path):
            yield RemotePath(self._root, info.path)

    def glob(self, pattern: str) -> Iterator[RemotePath]:
        """Children whose name matches `pattern` (one level: the only kind of glob the project uses)."""
        if "/" in pattern or "**" in pattern:
            raise ValueError(f"RemotePath.glob: only patterns within one folder, got {pattern!r}")
        return (p for p in self.iterdir() if fnmatch.fnmatchcase(p.name, pattern))

    def read_bytes(self) -> bytes:
        try:
            with self.filesystem.open_input_stream(self._path) as f:
                return f.read()
        except FileNotFoundError:
            raise
        except OSError as e:
            if not self.is_file():
                raise FileNotFoundError(str(self)) from None
            raise OSError(f"{self}: {e}") from None

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    # -- changes (whole objects only: see the module docstring)
    def mkdir(self, parents: bool = True, exist_ok: bool = True) -> None:
        self.filesystem.create_dir(self._path, recursive=True)

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.filesystem.delete_file(self._path)
        except FileNotFoundError:
            if not missing_ok:
                raise
        except OSError:
            if not missing_ok or self.exists():
                raise

    def touch(self) -> None:
        if not self.exists():
            self._put_file(None)

    def _put_file(self, local: Path | None) -> None:
        """Upload a local file (None: an empty object) as this object, in one PUT or one multipart upload."""
        with self.filesystem.open_output_stream(self._path) as out:
            if local is not None:
                with open(local, "rb") as f:
                    while chunk := f.read(_UPLOAD_CHUNK):
                        out.write(chunk)


# ---------------------------------------------------------------- whole files


def atomic_write(where: str | Path | RemotePath, write: Callable[[Path], Any]) -> Path | RemotePath:
    """Write `where` through `write(tmp_path)` and put it in place whole (readers never see a partial file).

    Args:
        where: the file to (re)place, local or remote.
        write: a function that writes the whole content to the local temporary path it is given.

    Returns:
        The location written.
    """
    target = path(where)
    if isinstance(target, RemotePath):
        with tempfile.TemporaryDirectory(prefix="cxr-upload-") as tmpdir:
            tmp = Path(tmpdir) / target.name
            write(tmp)
            target._put_file(tmp)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def atomic_write_text(where: str | Path | RemotePath, text: str) -> Path | RemotePath:
    """`atomic_write` of a text file (UTF-8)."""
    return atomic_write(where, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(where: str | Path | RemotePath, obj: Any) -> Path | RemotePath:
    """`atomic_write` of a JSON document (indented; NaN written as null-safe JSON by `default=str`)."""
    return atomic_write_text(where, json.dumps(obj, indent=2, default=str) + "\n")


def read_bytes(where: str | Path | RemotePath) -> bytes:
    """A whole file (raises FileNotFoundError / OSError like `Path.read_bytes`)."""
    return path(where).read_bytes()


def read_json(where: str | Path | RemotePath) -> Any:
    """A JSON document written by `atomic_write_json` (raises OSError / ValueError like `json.loads`)."""
    return json.loads(path(where).read_text(encoding="utf-8"))


def read_json_or_none(where: str | Path | RemotePath) -> Any:
    """A JSON document, or None when it is missing or unreadable (a file another process has not written yet)."""
    try:
        return read_json(where)
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def open_binary(where: str | Path | RemotePath) -> Iterator[IO[bytes]]:
    """A file opened for reading, for readers that take a file object (`np.load`, `torch.load`, pandas)."""
    target = path(where)
    if isinstance(target, RemotePath):
        with io.BytesIO(target.read_bytes()) as f:
            yield f
    else:
        with open(target, "rb") as f:
            yield f


# ---------------------------------------------------------------- logs (.jsonl)


def append_record(where: str | Path | RemotePath, record: dict[str, Any]) -> None:
    """Append one JSON line to a log: locally fsynced (a cut last line left by a kill is cut off first); on an
    object store the log is rewritten whole, so it is never cut (one writer per log)."""
    target = path(where)
    line = (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode("utf-8")
    if isinstance(target, RemotePath):
        try:
            old = target.read_bytes()
        except FileNotFoundError:
            old = b""
        atomic_write(target, lambda tmp: tmp.write_bytes(old + line))
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    repair_tail(target)
    with open(target, "ab") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_records(where: str | Path | RemotePath) -> list[dict[str, Any]]:
    """Every complete JSON line of a log (a missing log is empty; a cut or garbled line is skipped)."""
    return list(iter_records(where))


def iter_records(where: str | Path | RemotePath) -> Iterator[dict[str, Any]]:
    target = path(where)
    try:
        data = target.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            return  # cut by a kill mid-append
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            yield record


def rewrite_records(where: str | Path | RemotePath, records: list[dict[str, Any]]) -> None:
    """Replace a log with `records` atomically (used to drop lines a resumed run will write again)."""
    text = "".join(json.dumps(r, separators=(",", ":"), default=str) + "\n" for r in records)
    atomic_write_text(where, text)


def repair_tail(where: str | Path | RemotePath) -> bytes:
    """Cut a local log back to its last complete line; returns the bytes cut off (empty if the log was whole).

    A writer killed mid-append leaves a line without its newline. Appending after it would glue two records
    into one garbled line, so every appender (and a resume) cuts it off first. Objects are never cut.
    """
    target = path(where)
    if isinstance(target, RemotePath) or not target.is_file():
        return b""
    size = target.stat().st_size
    if size == 0:
        return b""
    with open(target, "rb+") as f:
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


def _fsync(target: Path) -> None:
    try:
        fd = os.open(target, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (e.g. a few network mounts) refuse fsync on a read-only descriptor
        pass
    finally:
        os.close(fd)


Location = Path | RemotePath  # what `path()` returns: a local path or a location on a pyarrow filesystem
