"""Find the images of a data folder, their class, split and patient, without decoding anything.

Accepted layouts:

- ``kaggle``: ``ROOT/{train,test}/<class>/...`` (the study's data set; a ``val``/``validation`` folder joins
  train, because the validation split is drawn from train by :mod:`cxr_search.data.split`).
- ``flat``: ``ROOT/<class>/...`` (no split yet: train/val/test are drawn by patient).
- ``manifest``: a CSV file ``path,label[,patient_id][,split]`` (paths relative to the CSV's folder), given as
  the CSV itself or as a folder holding exactly one CSV and no class folders.

Class folder names and labels match case-insensitively, ignoring punctuation, with common aliases
(``covid``, ``COVID-19``, ``covid_19``, ``Viral Pneumonia``, ``bacterial``, ``healthy``, ...). Unknown class
folders, stray files, empty class folders and symlinks leaving the data root are reported in
``ScanResult.quarantined`` with a reason; they never stop the scan. Patient ids come from the manifest when it
has them (a phantom folder's ``manifest.csv`` does), else from a known file-name pattern
(``person123_bacteria_45.jpeg`` -> ``person123``, ``phantom-p000123-i02.png`` -> ``p000123``), else each image
is its own patient (``file:<relative path>``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from cxr_search import CLASSES
from cxr_search.errors import CxrError

LAYOUTS_HELP = (
    "accepted layouts: DIR/{train,test}/{COVID19,PNEUMONIA,NORMAL}/<images> (Kaggle), "
    "DIR/{COVID19,PNEUMONIA,NORMAL}/<images> (flat class folders), "
    "or a CSV manifest with columns path,label[,patient_id][,split] (paths relative to the CSV)"
)

# Normalised name (lower case, letters and digits only) -> class. Viral/bacterial pneumonia folders of public
# sets (e.g. "Viral Pneumonia" of the COVID-19 Radiography Database) are non-COVID pneumonia.
CLASS_ALIASES: dict[str, str] = {
    **dict.fromkeys(["covid19", "covid", "covid2019", "sarscov2", "coronavirus", "ncov"], "COVID19"),
    **dict.fromkeys(
        ["pneumonia", "viralpneumonia", "bacterialpneumonia", "pneumoniaviral", "pneumoniabacterial",
         "viral", "bacterial", "bacteria", "virus"],
        "PNEUMONIA",
    ),
    **dict.fromkeys(["normal", "healthy", "nofinding"], "NORMAL"),
}
SPLIT_ALIASES: dict[str, str] = {
    "train": "train", "training": "train", "val": "train", "valid": "train", "validation": "train",
    "test": "test", "testing": "test",
}
# Folders and files of a data root that are not images (phantom masks and manifest, OS litter).
IGNORED_DIRS = {"masks", "__macosx", ".ipynb_checkpoints"}
IGNORED_FILES = {"manifest.csv", "thumbs.db", "desktop.ini", "readme.md", "readme.txt", "license", "license.txt"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"}

# File-name patterns that carry a patient id (first group).
PATIENT_PATTERNS = (
    re.compile(r"^phantom-(p\d+)-i\d+", re.IGNORECASE),  # this project's phantoms
    re.compile(r"^(person\d+)_(?:bacteria|virus)_\d+", re.IGNORECASE),  # Kermany/Mooney pediatric set
)


@dataclass
class ScanResult:
    """What a data folder holds: one record per candidate image, plus what was set aside and why."""

    root: Path
    layout: str  # "kaggle" | "flat" | "manifest"
    records: pd.DataFrame  # columns path (absolute), label (class name), patient_id, split ("train"|"test"|"")
    quarantined: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}


def class_from_name(name: str) -> str | None:
    """The class a folder name or manifest label means (case/punctuation-insensitive aliases), else None."""
    return CLASS_ALIASES.get(re.sub(r"[^a-z0-9]", "", str(name).lower()))


def patient_from_filename(filename: str) -> str | None:
    """A patient id parsed from a known file-name pattern, else None."""
    for pattern in PATIENT_PATTERNS:
        m = pattern.match(filename)
        if m:
            return m.group(1)
    return None


def scan(root: str | Path) -> ScanResult:
    """List the images of a data folder (or CSV manifest) with their class, split and patient id.

    Args:
        root: a folder in the Kaggle or flat layout, a folder holding one CSV manifest, or the CSV itself.

    Returns:
        ScanResult with records sorted by path and the quarantined entries (unknown class folders, stray
        files, empty class folders, symlinks leaving the root, manifest rows that do not resolve).

    Raises:
        CxrError: the folder is missing, has no recognisable layout, or holds no image at all.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise CxrError(f"data folder {root} does not exist; {LAYOUTS_HELP}")
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise CxrError(f"{root} is a file, not a data folder or CSV manifest; {LAYOUTS_HELP}")
        result = _scan_manifest(root)
    else:
        result = _scan_folder(root)
    if result.records.empty:
        raise CxrError(f"no images found in {root} ({len(result.quarantined)} entries set aside); {LAYOUTS_HELP}")
    result.records = result.records.sort_values("path", kind="stable").reset_index(drop=True)
    return result


def _scan_folder(root: Path) -> ScanResult:
    root_abs = Path(os.path.abspath(root))
    subdirs = [d for d in _entries(root_abs) if d.is_dir() and d.name.lower() not in IGNORED_DIRS]
    split_dirs = [d for d in subdirs if d.name.lower() in SPLIT_ALIASES]
    class_dirs = [d for d in subdirs if class_from_name(d.name)]
    csvs = [f for f in _entries(root_abs) if f.is_file() and f.suffix.lower() == ".csv"]
    quarantined: list[dict[str, str]] = []
    rows: list[dict[str, str]] = []
    if split_dirs:
        layout = "kaggle"
        for split_dir in split_dirs:
            split = SPLIT_ALIASES[split_dir.name.lower()]
            if not _inside(split_dir, root_abs, quarantined):
                continue
            _scan_class_dirs(split_dir, split, root_abs, rows, quarantined)
        _report_strays(root_abs, set(split_dirs), quarantined)
    elif class_dirs:
        layout = "flat"
        _scan_class_dirs(root_abs, "", root_abs, rows, quarantined)
    elif len(csvs) == 1:
        return _scan_manifest(csvs[0])
    else:
        found = ", ".join(sorted(d.name for d in subdirs)[:10]) or "no folders"
        raise CxrError(f"no recognisable layout in {root} (found {found}); {LAYOUTS_HELP}")
    records = pd.DataFrame(rows, columns=["path", "label", "patient_id", "split"])
    manifest = root_abs / "manifest.csv"
    if manifest.is_file() and not records.empty:  # a phantom folder: its manifest knows the patients
        records = _patients_from_manifest(records, manifest, root_abs)
    return ScanResult(root_abs, layout, records, quarantined)


def _scan_class_dirs(parent: Path, split: str, root: Path, rows: list, quarantined: list) -> None:
    for entry in _entries(parent):
        if entry.is_dir():
            label = class_from_name(entry.name)
            if entry.name.lower() in IGNORED_DIRS or (split == "" and entry.name.lower() in SPLIT_ALIASES):
                continue
            if label is None:
                n = sum(1 for _ in _walk_files(entry))
                quarantined.append({
                    "path": relative_path(entry, root),
                    "reason": f"unknown class folder {entry.name!r} ({n} files ignored); "
                    f"expected one of {', '.join(CLASSES)} or an alias",
                })
                continue
            if not _inside(entry, root, quarantined):
                continue
            n_before = len(rows)
            for f in _walk_files(entry):
                if f.is_symlink() and not _inside(Path(f.path), root, quarantined):
                    continue
                if f.is_dir():
                    quarantined.append({"path": relative_path(f.path, root), "reason": "symlinked folder; not followed"})
                else:
                    pid = patient_from_filename(f.name) or f"file:{relative_path(f.path, root)}"
                    rows.append({"path": f.path, "label": label, "patient_id": pid, "split": split})
            if len(rows) == n_before:
                quarantined.append({"path": relative_path(entry, root), "reason": "empty class folder (no usable files)"})
        elif entry.suffix.lower() in IMAGE_SUFFIXES:
            quarantined.append({"path": relative_path(entry, root), "reason": "image outside any class folder"})


def _report_strays(root: Path, used: set[Path], quarantined: list) -> None:
    for entry in _entries(root):
        if entry in used or entry.name.lower() in IGNORED_DIRS:
            continue
        if entry.is_dir():
            quarantined.append({"path": relative_path(entry, root), "reason": "folder is not a split (train/test); ignored"})
        elif entry.suffix.lower() in IMAGE_SUFFIXES:
            quarantined.append({"path": relative_path(entry, root), "reason": "image outside any split/class folder"})


def _scan_manifest(csv_path: Path) -> ScanResult:
    csv_path = Path(os.path.abspath(csv_path))
    root = csv_path.parent
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise CxrError(f"cannot read manifest {csv_path}: {e}") from None
    table.columns = [c.strip().lower() for c in table.columns]
    missing = {"path", "label"} - set(table.columns)
    if missing:
        raise CxrError(
            f"manifest {csv_path} lacks column(s) {', '.join(sorted(missing))}; "
            "expected path,label[,patient_id][,split]"
        )
    quarantined: list[dict[str, str]] = []
    rows = []
    for item in table.to_dict("records"):
        rel = item["path"].strip()
        f = Path(os.path.abspath(root / rel))
        label = class_from_name(item["label"])
        split_raw = item.get("split", "").strip().lower()
        split = SPLIT_ALIASES.get(split_raw, "") if split_raw else ""
        if label is None:
            reason = f"unknown label {item['label']!r}; expected one of {', '.join(CLASSES)}"
        elif split_raw and split_raw not in SPLIT_ALIASES:
            reason = f"unknown split {item.get('split')!r}; expected train, val or test"
        elif not f.is_relative_to(root):
            reason = "path leaves the manifest's folder; refused"
        elif not f.exists() and not f.is_symlink():
            reason = "file listed in the manifest does not exist"
        else:
            reason = ""
        if reason:
            quarantined.append({"path": rel, "reason": reason})
            continue
        if not f.is_file() or not _inside(f, root, quarantined):
            if f.is_dir():
                quarantined.append({"path": rel, "reason": "manifest path is a folder, not a file"})
            continue
        pid = item.get("patient_id", "").strip() or patient_from_filename(f.name) or f"file:{relative_path(f, root)}"
        rows.append({"path": str(f), "label": label, "patient_id": pid, "split": split})
    records = pd.DataFrame(rows, columns=["path", "label", "patient_id", "split"])
    return ScanResult(root, "manifest", records, quarantined)


def _patients_from_manifest(records: pd.DataFrame, manifest: Path, root: Path) -> pd.DataFrame:
    try:
        table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError):
        return records  # an unreadable side manifest only loses patient ids, which file names may also give
    if not {"path", "patient_id"} <= set(table.columns):
        return records
    known = {
        os.path.normpath(os.path.join(root, p)): pid
        for p, pid in zip(table["path"].tolist(), table["patient_id"].tolist(), strict=True)
        if pid.strip()
    }
    records = records.copy()
    records["patient_id"] = [known.get(p, pid) for p, pid in zip(records["path"].tolist(), records["patient_id"].tolist(), strict=True)]
    return records


def _entries(folder: Path) -> list[Path]:
    """Visible entries of a folder, sorted (hidden files such as .DS_Store and ._* are skipped)."""
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError:
        return []


def _walk_files(folder: Path) -> Iterator[os.DirEntry]:
    """Files under a folder, recursively, sorted; folder symlinks are yielded, not followed (loops, escapes)."""
    try:
        with os.scandir(folder) as it:
            entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError:
        return
    for e in entries:
        if e.is_dir(follow_symlinks=False):
            if e.name.lower() not in IGNORED_DIRS:
                yield from _walk_files(Path(e.path))
        elif e.is_symlink() or e.name.lower() not in IGNORED_FILES:
            yield e  # files, and symlinks (to files or folders) for the caller to check


def _inside(path: Path, root: Path, quarantined: list) -> bool:
    """True if ``path`` (after following symlinks) stays inside ``root``; else record why it was refused."""
    if not path.is_symlink():
        return True
    target = Path(os.path.realpath(path))
    if not target.exists():
        quarantined.append({"path": relative_path(path, root), "reason": "broken symlink"})
        return False
    if not target.is_relative_to(Path(os.path.realpath(root))):
        quarantined.append({"path": relative_path(path, root), "reason": f"symlink leaves the data root (-> {target}); refused"})
        return False
    return True


def relative_path(path: str | Path, root: str | Path) -> str:
    """``path`` relative to ``root``; a string cut when it lies under root (os.path.relpath is slow in bulk)."""
    path, root = str(path), str(root)
    if path.startswith(root + os.sep):
        return path[len(root) + 1:]
    return os.path.relpath(path, root)
