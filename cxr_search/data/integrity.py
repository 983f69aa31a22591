"""Integrity report of a data folder: what is usable, what is not and why, duplicates, label conflicts, patient
leakage, quality flags and source shortcuts.

Every file is decoded once (in parallel over the cores); failures are quarantined with the decoder's reason,
never raised. Exact duplicates share a hash of their decoded pixels. Near-duplicates (re-exports: re-encoded,
rescaled, cropped, padded, brightness/contrast/gamma, bit depth, channels) are found by
:mod:`cxr_search.data.duplicates` from a small signature kept per image. A duplicate pair whose two images
carry different labels is a label conflict. Quality flags come from :mod:`cxr_search.data.quality`; the
source-shortcut audit (label predicted from metadata and non-lung image statistics) from
:mod:`cxr_search.data.shortcuts`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr_search import CLASSES
from cxr_search.data import duplicates as near
from cxr_search.data import quality, shortcuts
from cxr_search.data.decode import DecodeError, decode_with_info
from cxr_search.data.scan import ScanResult, relative_path, scan
from cxr_search.data.split import make_splits, split_problem

# The array cache keys on these two (cache.py): the signature's side and the near-duplicate threshold.
THUMB_SIZE = near.SIGNATURE_SIZE  # pixels per side of the near-duplicate signature kept per image
NEAR_THRESHOLD = near.NEAR_THRESHOLD  # aligned correlation at or above which two images are near-duplicates
MAX_PAIRS = 100_000  # report at most this many duplicate pairs (a too-low threshold would list N^2)
STATS_SIDE = 256  # px: quality statistics and the signature are taken on the image shrunk to this longer side
SERIAL_BELOW = 64  # decode fewer files than this in-process: starting worker processes costs more


@dataclass
class ImageFacts:
    """What decoding one file taught us; ``image`` is the preprocessed array when a preprocess was given."""

    ok: bool
    reason: str = ""
    format: str = ""  # "FORMAT/mode", e.g. "PNG/I;16"
    height: int = 0
    width: int = 0
    pixel_hash: str = ""
    thumb: np.ndarray | None = None  # uint8 [THUMB_SIZE * THUMB_SIZE], the near-duplicate signature
    image: np.ndarray | None = None
    file_bytes: int = 0
    stats: dict[str, float] = field(default_factory=dict)  # quality.image_stats
    flags: str = ""  # quality flags, comma-separated


@dataclass
class IntegrityReport:
    """The JSON-able integrity summary of one data folder (``to_dict()``/``write_json()``)."""

    root: str
    layout: str
    n_files: int
    n_usable: int
    counts: dict[str, dict[str, int]]  # split -> class -> usable images
    sizes: dict[str, int]  # "WxH" -> images (the 20 most common; "other" for the rest)
    size_range: dict[str, int]  # min/median/max of height and width
    modes: dict[str, int]  # "FORMAT/mode" -> images
    quarantined: list[dict[str, str]]  # {"path", "reason"}, paths relative to root
    duplicates: list[dict[str, Any]]  # {"a", "b", "split_a", "split_b", "label_a", "label_b", "kind", "similarity"}
    shared_patients: list[dict[str, Any]]  # {"patient_id", "splits", "n_images"}: patients in 2+ splits
    label_conflicts: list[dict[str, Any]] = field(default_factory=list)  # duplicate pairs with two labels
    quality: dict[str, Any] = field(default_factory=dict)  # {"counts": {flag: n}, "examples": {flag: [paths]}}
    shortcut: dict[str, Any] = field(default_factory=dict)  # shortcuts.audit result
    summary: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def cross_split_leakage(self) -> bool:
        return bool(self.summary.get("cross_split_duplicate_pairs") or self.shared_patients)

    @property
    def strict_failures(self) -> bool:
        """What ``data check --strict`` fails on: any duplicate pair, shared patient or label conflict."""
        return bool(self.duplicates or self.shared_patients or self.label_conflicts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write_json(self, out: str | Path) -> None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def examine_file(path: str, preprocess: Callable[[np.ndarray], np.ndarray] | None = None) -> ImageFacts:
    """Decode one file and collect its facts; never raises for a bad file.

    Args:
        path: the image file.
        preprocess: optional function of the decoded uint8 [H, W] image whose result is kept in ``image``.
    """
    try:
        gray, fmt = decode_with_info(path)
        if gray.ndim != 2 or min(gray.shape) < quality.MIN_SIDE:
            raise DecodeError(f"image too small to use ({'x'.join(map(str, gray.shape[::-1]))} px; "
                              f"at least {quality.MIN_SIDE} px a side)")
    except DecodeError as e:
        return ImageFacts(False, e.reason)
    except Exception as e:  # a decoder bug must not stop a scan of thousands of files
        return ImageFacts(False, " ".join(f"unexpected decoder error: {type(e).__name__}: {e}".split()))
    digest = hashlib.blake2b(f"{gray.shape}".encode() + gray.tobytes(), digest_size=16).hexdigest()
    image = preprocess(gray) if preprocess is not None else None
    small = _shrink(gray, STATS_SIDE)
    stats = quality.image_stats(small)
    flags = ",".join(quality.quality_flags(stats, *gray.shape))
    return ImageFacts(True, "", fmt, int(gray.shape[0]), int(gray.shape[1]), digest, near.signature(small), image,
                      os.path.getsize(path), stats, flags)


def _shrink(gray: np.ndarray, side: int) -> np.ndarray:
    """``gray`` area-averaged so that its longer side is at most ``side`` (statistics and signature need no more)."""
    import cv2

    scale = side / max(gray.shape)
    if scale >= 1:
        return gray
    h, w = (max(1, round(d * scale)) for d in gray.shape)
    return cv2.resize(gray, (w, h), interpolation=cv2.INTER_AREA)


def examine_files(
    paths: Sequence[str],
    *,
    preprocess: Callable[[np.ndarray], np.ndarray] | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> Iterator[ImageFacts]:
    """Examine files in parallel over the cores, yielding facts in input order with a progress bar.

    Args:
        paths: image files.
        preprocess: picklable function applied to each decoded image (see :func:`examine_file`).
        workers: processes to use (default: all cores); 1 decodes in this process.
        progress: show a rich progress bar.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    workers = workers or os.cpu_count() or 1
    bar = Progress(
        TextColumn("decoding"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        disable=not progress, transient=True,
    )
    with bar:
        task = bar.add_task("decode", total=len(paths))
        if workers <= 1 or len(paths) < SERIAL_BELOW:
            results: Iterator[ImageFacts] = (examine_file(p, preprocess) for p in paths)
            for facts in results:
                bar.advance(task)
                yield facts
            return
        import multiprocessing

        # spawn, not fork: the caller may hold threads (Ray, torch) that a forked child would inherit locked
        ctx = multiprocessing.get_context("spawn")
        chunk = max(1, min(64, len(paths) // (workers * 8)))
        done = 0
        try:
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                for facts in pool.map(examine_file, paths, [preprocess] * len(paths), chunksize=chunk):
                    done += 1
                    bar.advance(task)
                    yield facts
        except BrokenProcessPool:  # a worker died (e.g. a decoder crash): finish the rest here, in order
            for p in paths[done:]:
                bar.advance(task)
                yield examine_file(p, preprocess)


def facts_table(scan_result: ScanResult, facts: Sequence[ImageFacts]) -> pd.DataFrame:
    """Scan records joined with their decode facts (one row per record; signatures and images left out).

    Columns: the scan's, then ok, reason, format, height, width, pixel_hash, file_bytes, flags and one
    ``stat_<name>`` per :data:`cxr_search.data.quality.STAT_NAMES` (NaN for unusable files).
    """
    table = scan_result.records.copy()
    for name in ("ok", "reason", "format", "height", "width", "pixel_hash", "file_bytes", "flags"):
        table[name] = [getattr(f, name) for f in facts]
    for name in quality.STAT_NAMES:
        table[f"stat_{name}"] = [f.stats.get(name, np.nan) for f in facts]
    return table


def find_duplicates(
    pixel_hashes: Sequence[str], thumbs: np.ndarray, *, threshold: float = NEAR_THRESHOLD
) -> pd.DataFrame:
    """Exact (same decoded pixels) and near-duplicate pairs among usable images.

    Args:
        pixel_hashes: hash of each image's decoded pixels.
        thumbs: uint8 [N, THUMB_SIZE**2] near-duplicate signatures (:func:`cxr_search.data.duplicates.signature`).
        threshold: aligned correlation at or above which a verified pair is near.

    Returns:
        DataFrame with columns a, b (row indices, a < b), kind ("exact" | "near"), similarity.
    """
    pairs: dict[tuple[int, int], tuple[str, float]] = {}
    groups: dict[str, list[int]] = {}
    for i, h in enumerate(pixel_hashes):
        groups.setdefault(h, []).append(i)
    for members in groups.values():
        for x, a in enumerate(members):
            for b in members[x + 1:]:
                pairs[(a, b)] = ("exact", 1.0)
    if len(pixel_hashes) > 1:
        for a, b, s in near.find_pairs(np.asarray(thumbs), threshold=threshold):
            pairs.setdefault((a, b), ("near", s))
            if len(pairs) >= MAX_PAIRS:
                break
    rows = [(a, b, kind, round(s, 4)) for (a, b), (kind, s) in sorted(pairs.items())][:MAX_PAIRS]
    return pd.DataFrame(rows, columns=["a", "b", "kind", "similarity"]).astype({"a": "int64", "b": "int64"})


def summarize(
    scan_result: ScanResult, table: pd.DataFrame, pairs: pd.DataFrame, *, shortcut: dict[str, Any] | None = None
) -> IntegrityReport:
    """Build the report from a facts table (:func:`facts_table`) and duplicate pairs over its usable rows.

    Args:
        scan_result: the scan (root, layout and the entries it set aside).
        table: one row per record with ok/reason/format/height/width/pixel_hash (and the quality columns).
        pairs: :func:`find_duplicates` output, indices into ``table[table.ok]`` (usable rows, in order).
        shortcut: a :func:`cxr_search.data.shortcuts.audit` result computed earlier (the audit fits a
            classifier: callers that cache it pass it here); None runs the audit now.
    """
    root = scan_result.root
    rel = [relative_path(p, root) for p in table["path"].tolist()]  # lists: iterating arrow strings is slow
    quarantined = list(scan_result.quarantined) + [
        {"path": r, "reason": reason} for r, ok, reason in zip(rel, table["ok"].tolist(), table["reason"].tolist(), strict=True) if not ok
    ]
    usable = table[table["ok"].astype(bool)].reset_index(drop=True)
    usable_rel = [r for r, ok in zip(rel, table["ok"].tolist(), strict=True) if ok]
    splits = sorted(set(usable["split"]) | set(table["split"]))
    counts = {
        split or "all": {c: int(((usable["split"] == split) & (usable["label"] == c)).sum()) for c in CLASSES}
        for split in splits
    }
    size_counts = Counter(f"{w}x{h}" for w, h in zip(usable["width"].tolist(), usable["height"].tolist(), strict=True))
    sizes = dict(size_counts.most_common(20))
    if len(size_counts) > 20:
        sizes["other"] = int(sum(size_counts.values()) - sum(sizes.values()))
    size_range = {}
    if len(usable):
        for dim in ("height", "width"):
            size_range.update({
                f"min_{dim}": int(usable[dim].min()), f"median_{dim}": int(usable[dim].median()),
                f"max_{dim}": int(usable[dim].max()),
            })
    split_of, label_of = usable["split"].tolist(), usable["label"].tolist()
    duplicates = [
        {
            "a": usable_rel[a], "b": usable_rel[b], "split_a": split_of[a], "split_b": split_of[b],
            "label_a": label_of[a], "label_b": label_of[b], "kind": kind, "similarity": float(sim),
        }
        for a, b, kind, sim in pairs.itertuples(index=False)
    ]
    conflicts = [{k: d[k] for k in ("a", "b", "label_a", "label_b", "kind", "similarity")}
                 for d in duplicates if d["label_a"] != d["label_b"]]
    shared = []
    if usable["split"].nunique() > 1:
        n_splits = usable.groupby("patient_id")["split"].nunique()
        leaked = usable[usable["patient_id"].isin(n_splits.index[n_splits > 1])]
        for pid, rows in leaked.groupby("patient_id"):
            shared.append({"patient_id": str(pid), "splits": sorted(set(rows["split"].tolist())),
                           "n_images": len(rows)})
    cross = [d for d in duplicates if d["split_a"] != d["split_b"]]
    summary = {
        "exact_duplicate_pairs": sum(d["kind"] == "exact" for d in duplicates),
        "near_duplicate_pairs": sum(d["kind"] == "near" for d in duplicates),
        "cross_split_duplicate_pairs": len(cross),
        "within_split_duplicate_pairs": len(duplicates) - len(cross),
        "patients": int(usable["patient_id"].nunique()),
        "patients_in_several_splits": len(shared),
        "quarantined": len(quarantined),
        "label_conflicts": len(conflicts),
        "near_threshold": NEAR_THRESHOLD,
        "signature_size": THUMB_SIZE,
    }
    if shortcut is None:
        shortcut = shortcuts.audit(usable)
    report = IntegrityReport(
        root=str(root), layout=scan_result.layout, n_files=len(table), n_usable=len(usable), counts=counts,
        sizes=sizes, size_range=size_range, modes=dict(Counter(usable["format"].tolist()).most_common()),
        quarantined=quarantined, duplicates=duplicates, shared_patients=shared, label_conflicts=conflicts,
        quality=_quality(usable, usable_rel), shortcut=shortcut, summary=summary,
    )
    report.warnings = _warnings(report)
    problem = split_problem(usable["label"].to_numpy(str), usable["patient_id"].to_numpy(str),
                            usable["split"].to_numpy(str))
    if problem:
        report.warnings.append(problem)
    return report


def _quality(usable: pd.DataFrame, paths: list[str], n_examples: int = 5) -> dict[str, Any]:
    """Images per quality flag, with a few example paths each."""
    flags = usable["flags"].tolist() if "flags" in usable else [""] * len(usable)
    counts = dict.fromkeys(quality.FLAGS, 0)
    examples: dict[str, list[str]] = {}
    for path, joined in zip(paths, flags, strict=True):
        for flag in filter(None, str(joined).split(",")):
            counts[flag] = counts.get(flag, 0) + 1
            if len(examples.setdefault(flag, [])) < n_examples:
                examples[flag].append(path)
    return {"counts": counts, "examples": examples}


def _warnings(report: IntegrityReport) -> list[str]:
    s = report.summary
    out = []
    if report.quarantined:
        out.append(f"{len(report.quarantined)} files or folders set aside (see 'quarantined' for reasons)")
    if s["cross_split_duplicate_pairs"]:
        out.append(f"{s['cross_split_duplicate_pairs']} duplicate pairs across splits (exact or near)")
    if s["within_split_duplicate_pairs"]:
        out.append(f"{s['within_split_duplicate_pairs']} duplicate pairs within a split")
    if report.shared_patients:
        out.append(f"{len(report.shared_patients)} patients have images in more than one split")
    if report.label_conflicts:
        out.append(f"{len(report.label_conflicts)} label conflicts: the same image under two labels "
                   "(see 'label_conflicts')")
    flagged = {f: n for f, n in report.quality.get("counts", {}).items() if n}
    if flagged:
        out.append("quality flags (kept, not quarantined): " + ", ".join(
            f"{n} {quality.FLAG_TEXT.get(f, f)}" for f, n in flagged.items()))
    shortcut_warning = shortcuts.warning(report.shortcut)
    if shortcut_warning:
        out.append(shortcut_warning)
    for split, per_class in report.counts.items():
        empty = [c for c, n in per_class.items() if n == 0]
        if empty:
            out.append(f"split {split!r} has no usable image of {', '.join(empty)}")
    return out


def check(
    data: str | Path | ScanResult, *, workers: int | None = None, progress: bool = True
) -> IntegrityReport:
    """Scan (if needed), decode every file and report problems; the `cxr-search data check` command.

    Args:
        data: a data folder / CSV manifest, or a finished scan.
        workers: decoding processes (default: all cores).
        progress: show a progress bar.
    """
    scan_result = data if isinstance(data, ScanResult) else scan(data)
    paths = scan_result.records["path"].tolist()
    facts = list(examine_files(paths, workers=workers, progress=progress))
    table = facts_table(scan_result, facts)
    usable = [f for f in facts if f.ok]
    thumbs = np.stack([f.thumb for f in usable]) if usable else np.zeros((0, THUMB_SIZE**2), np.uint8)
    pairs = find_duplicates([f.pixel_hash for f in usable], thumbs)
    report = summarize(scan_result, table, pairs)
    ok = table[table["ok"].astype(bool)]
    if not any(w.startswith("too few images to split") for w in report.warnings):
        report.warnings += _split_check(ok, pairs)
    return report


def _split_check(usable: pd.DataFrame, pairs: pd.DataFrame) -> list[str]:
    """Draw the default split now, as ``train``/``run`` will: its error, or the classes val/test would lack."""
    from cxr_search.errors import CxrError

    labels = usable["label"].map(CLASSES.index).to_numpy(np.int64)
    try:
        idx = make_splits(labels, usable["patient_id"].to_numpy(str), usable["split"].to_numpy(str),
                          duplicate_pairs=pairs[["a", "b"]].to_numpy())
    except CxrError as e:
        return [f"cannot be split for training: {e}"]
    out = []
    for name in ("val", "test"):
        missing = [c for i, c in enumerate(CLASSES) if not (labels[idx[name]] == i).any()]
        if missing:
            out.append(f"with the default split, {name} would hold no image of {', '.join(missing)}")
    return out


def print_report(report: IntegrityReport | dict[str, Any], console: Any, *, max_rows: int = 15) -> None:
    """Print the report as rich tables (counts, formats, quarantined files, duplicates, shared patients)."""
    from rich.table import Table

    r = report.to_dict() if isinstance(report, IntegrityReport) else report
    console.print(f"[bold]{r['root']}[/]  layout: {r['layout']}  files: {r['n_files']}  usable: {r['n_usable']}")
    counts = Table(title="usable images per split and class")
    counts.add_column("split")
    for c in CLASSES:
        counts.add_column(c, justify="right")
    counts.add_column("total", justify="right")
    for split, per_class in r["counts"].items():
        counts.add_row(split, *(str(per_class[c]) for c in CLASSES), str(sum(per_class.values())))
    console.print(counts)
    modes = Table(title="formats and pixel modes")
    modes.add_column("format/mode")
    modes.add_column("images", justify="right")
    for mode, n in r["modes"].items():
        modes.add_row(mode, str(n))
    console.print(modes)
    if r["size_range"]:
        sr = r["size_range"]
        console.print(
            f"image size: height {sr['min_height']}..{sr['max_height']} (median {sr['median_height']}), "
            f"width {sr['min_width']}..{sr['max_width']} (median {sr['median_width']}); "
            f"{len(r['sizes'])} distinct sizes listed"
        )
    _print_rows(console, "quarantined", ["path", "reason"], r["quarantined"], max_rows)
    _print_rows(console, "duplicate pairs", ["a", "b", "split_a", "split_b", "kind", "similarity"],
                r["duplicates"], max_rows)
    _print_rows(console, "patients in more than one split", ["patient_id", "splits", "n_images"],
                r["shared_patients"], max_rows)
    _print_rows(console, "label conflicts (one image, two labels)", ["a", "b", "label_a", "label_b", "kind"],
                r.get("label_conflicts", []), max_rows)
    flagged = {f: n for f, n in r.get("quality", {}).get("counts", {}).items() if n}
    console.print("quality flags: " + (", ".join(f"{f} {n}" for f, n in flagged.items()) or "none"))
    sc = r.get("shortcut", {})
    if sc.get("status") == "ok":
        console.print(f"source-shortcut audit (label from metadata and non-lung image statistics): balanced "
                      f"accuracy {sc['balanced_accuracy']:.3f} [{sc['ci'][0]:.3f}, {sc['ci'][1]:.3f}], chance "
                      f"{sc['chance']:.3f} over {sc['n_images']} images")
    elif sc:
        console.print(f"source-shortcut audit skipped: {sc.get('reason', '')}")
    for w in r["warnings"]:
        console.print(f"[yellow]warning:[/] {w}")


def _print_rows(console: Any, title: str, columns: list[str], rows: list[dict], max_rows: int) -> None:
    from rich.table import Table

    if not rows:
        console.print(f"{title}: none")
        return
    table = Table(title=f"{title} ({len(rows)})" + (f", first {max_rows}" if len(rows) > max_rows else ""))
    for c in columns:
        table.add_column(c, overflow="fold")
    for row in rows[:max_rows]:
        table.add_row(*(", ".join(v) if isinstance(v, list) else str(v) for v in (row[c] for c in columns)))
    console.print(table)
