"""Seeded procedural chest-radiograph phantoms: the embedded default data set, written in the Kaggle layout.

Each image is drawn from its own random stream (seed, image index), so the bytes do not depend on the number of
workers or on the chunking. Anatomy is rendered on a coarse grid with vectorised numpy and upsampled by Pillow;
noise, windowing and quantisation happen at full resolution. Exposure, size, contrast, channel count and file
format are drawn before (and independently of) the class, so they cannot predict the label.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cxr_search import CLASSES
from cxr_search.errors import CxrError
from cxr_search.io.paths import cache_root

GENERATOR_VERSION = 2  # bump when the rendering or the manifest changes, so default_dataset() does not reuse stale sets
CLASS_MIX = {"COVID19": 576 / 6432, "PNEUMONIA": 4273 / 6432, "NORMAL": 1583 / 6432}  # the Kaggle set's mix
INJECTIONS = ("duplicates", "confounder", "corrupt", "source")
INJECTED_MARKS = {"duplicates": "duplicate", "confounder": "confounder", "corrupt": "corrupt",
                  "source": "source"}  # manifest values
# What a re-export does to a film, one transform per injected duplicate (recorded in the manifest's
# ``transform`` column as e.g. "jpeg q=63"). "jpeg" uses the qualities exports use (50-95); "jpeg-low" (10-49)
# is only used when asked for (benchmarks/duplicates.py measures where detection stops).
DUPLICATE_TRANSFORMS = ("jpeg", "rescale", "crop", "border", "brightness", "contrast", "gamma", "bitdepth",
                        "channels")
EXTRA_TRANSFORMS = ("jpeg-low", "mixed")
SOURCE_CLASS = "NORMAL"  # --inject source: this class comes from "another hospital" (as the pediatric NORMAL
# films of public COVID sets did): its own size, aspect and file format
DIFFICULTIES = ("easy", "mixed", "hard")
MANIFEST_COLUMNS = ("path", "split", "label", "patient_id", "mask_path", "injected", "duplicate_of", "transform")
MIN_SIZE = 32  # px; below this the lungs are a few pixels wide
JPEG_QUALITY = 90  # fixed so that the same seed gives the same bytes
# File formats (probability): independent of class. 16-bit PNGs use the full 0..65535 range.
FORMATS = (("png-gray8", 0.45), ("png-rgb8", 0.20), ("png-gray16", 0.15), ("jpg-gray", 0.10), ("jpg-rgb", 0.10))
IMAGES_PER_PATIENT = ((1, 0.20), (2, 0.25), (3, 0.25), (4, 0.15), (5, 0.10), (6, 0.05))  # mean 2.9


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------


def generate(
    out: str | os.PathLike,
    *,
    n_images: int = 6432,
    size: int = 256,
    seed: int = 0,
    difficulty: str = "mixed",
    inject: Sequence[str] | str = (),
    test_fraction: float = 0.2,
    workers: int | None = None,
    progress: bool = True,
    n_duplicates: int | None = None,
    duplicate_transforms: Sequence[str] = DUPLICATE_TRANSFORMS,
) -> dict[str, Any]:
    """Write a phantom chest X-ray data set in the Kaggle layout, with lesion masks and a manifest.

    Writes ``out/{train,test}/{COVID19,PNEUMONIA,NORMAL}/phantom-p{patient:06d}-i{k:02d}.png|.jpg``, a 0/255 mask
    per abnormal image under ``out/masks/<same relative path>.png``, ``out/manifest.csv`` (columns
    ``MANIFEST_COLUMNS``, paths relative to ``out``) and ``out/phantoms.json`` (settings and summary).

    Args:
        out: Folder to write to; created if missing, must be empty if it exists.
        n_images: Number of clean images (patients split by ``test_fraction``). Injected duplicates and corrupt
            files come on top of these; the confounder marks existing COVID19 images.
        size: Nominal image side in pixels; each image's height and width vary around it (>= 32).
        seed: Same seed, same bytes; different seeds give different images.
        difficulty: Lesion severity mix: ``easy``, ``mixed`` (some hard cases) or ``hard``.
        inject: Failure modes of real COVID sets to add: ``duplicates`` (re-exported copies of train images put
            in test, same patient id, each altered by one of ``duplicate_transforms``), ``confounder``
            (burned-in corner marker on every COVID19 image), ``corrupt`` (truncated, zero-byte and
            text-as-.png files), ``source`` (every NORMAL image from another "hospital": larger, square, RGB
            JPEG). A comma-separated string is accepted too.
        test_fraction: Fraction of each class's images (whole patients) put in ``test``, in (0, 1).
        workers: Worker processes; ``None`` uses every core for large sets and the calling process for small ones.
        progress: Show a progress bar on the terminal.
        n_duplicates: Injected duplicates (default 3% of ``n_images``, at least 2).
        duplicate_transforms: Transforms the duplicates cycle through (``DUPLICATE_TRANSFORMS``, plus
            ``EXTRA_TRANSFORMS``: "jpeg-low" and "mixed", brightness + rescale + JPEG together).

    Returns:
        Summary dict: ``out``, ``n_files``, ``counts`` {split: {class: n}}, ``patients``, ``injected``
        {duplicate|confounder|corrupt: n}, ``elapsed_s``, ``seconds_per_image``, ``settings``.

    Raises:
        CxrError: A bad argument or an unwritable / non-empty output folder.
    """
    started = time.perf_counter()
    injections = _validate(n_images, size, seed, difficulty, inject, test_fraction, workers)
    unknown = sorted(set(duplicate_transforms) - set(DUPLICATE_TRANSFORMS + EXTRA_TRANSFORMS))
    if unknown or not duplicate_transforms:
        raise CxrError(f"unknown duplicate transform {', '.join(unknown) or '(none given)'}; use "
                       f"{', '.join(DUPLICATE_TRANSFORMS + EXTRA_TRANSFORMS)}")
    out = _prepare_out(Path(out))
    settings = dict(
        n_images=n_images, size=size, seed=seed, difficulty=difficulty, inject=sorted(injections),
        test_fraction=test_fraction, generator_version=GENERATOR_VERSION,
    )
    plan = _plan_images(n_images, seed, test_fraction, confounder="confounder" in injections,
                        source="source" in injections)
    for split in ("train", "test"):
        for label in CLASSES:
            (out / split / label).mkdir(parents=True, exist_ok=True)
            (out / "masks" / split / label).mkdir(parents=True, exist_ok=True)

    n_workers = _worker_count(workers, n_images)
    jobs = [(str(out), size, seed, difficulty, chunk) for chunk in _chunks(plan, 32)]
    rows = _run_jobs(_render_chunk, jobs, n_workers, progress, "phantoms")
    if "duplicates" in injections:
        dup_plan = _plan_duplicates(rows, seed, n_images, n_duplicates, tuple(duplicate_transforms))
        dup_jobs = [(str(out), seed, chunk) for chunk in _chunks(dup_plan, 32)]
        rows += _run_jobs(_duplicate_chunk, dup_jobs, n_workers, progress, "duplicates")
    if "corrupt" in injections:
        rows += _write_corrupt(out, seed, n_images, first_pid=max(p["patient_id"] for p in plan) + 1)

    _write_manifest(out / "manifest.csv", rows)
    elapsed = time.perf_counter() - started
    summary = _summarise(out, rows, injections, elapsed, settings, n_images)
    (out / "phantoms.json").write_text(json.dumps(summary, indent=2))
    return summary


def default_dataset(*, n_images: int = 6432, size: int = 256, seed: int = 0) -> Path:
    """The default phantom set, generated once under the cache and reused.

    Generation writes to a temporary folder that is renamed when complete, so an interrupted run is never reused.

    Args:
        n_images: Number of images.
        size: Nominal image side in pixels.
        seed: Random seed.

    Returns:
        The data set folder ``cache_root()/phantoms/<settings-hash>``.
    """
    key = json.dumps(dict(n_images=n_images, size=size, seed=seed, version=GENERATOR_VERSION), sort_keys=True)
    final = cache_root() / "phantoms" / hashlib.sha256(key.encode()).hexdigest()[:12]
    if (final / "manifest.csv").is_file():
        return final
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        generate(tmp, n_images=n_images, size=size, seed=seed, progress=True)
        if final.exists() and not (final / "manifest.csv").is_file():
            shutil.rmtree(final)  # not written by this function (it only renames complete sets): replace it
        tmp.rename(final)
    except BaseException:  # interrupted, failed, or another process finished first (rename refused)
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / "manifest.csv").is_file():
            raise
    return final


def print_summary(summary: dict[str, Any], console) -> None:
    """Print image counts per split and class, the injections, and where the set was written.

    Args:
        summary: The dict returned by ``generate``.
        console: A ``rich.console.Console``.
    """
    from rich.table import Table

    table = Table(title="Phantom chest X-rays")
    table.add_column("class")
    for split in ("train", "test", "total"):
        table.add_column(split, justify="right")
    counts = summary["counts"]
    for label in CLASSES:
        tr, te = counts["train"][label], counts["test"][label]
        table.add_row(label, str(tr), str(te), str(tr + te))
    totals = [sum(counts[s].values()) for s in ("train", "test")]
    table.add_row("all", str(totals[0]), str(totals[1]), str(sum(totals)), style="bold")
    console.print(table)
    injected = ", ".join(f"{k}: {v}" for k, v in summary["injected"].items()) or "none"
    console.print(f"patients: {summary['patients']}; injected: {injected}")
    console.print(
        f"Wrote {summary['n_files']} files to {summary['out']} in {summary['elapsed_s']:.1f} s "
        f"({1000 * summary['seconds_per_image']:.1f} ms per image)."
    )


# ---------------------------------------------------------------------------------------------------------------
# Validation, planning, output
# ---------------------------------------------------------------------------------------------------------------


def _validate(n_images, size, seed, difficulty, inject, test_fraction, workers) -> frozenset[str]:
    def is_int(v) -> bool:
        return isinstance(v, int | np.integer) and not isinstance(v, bool)

    if not is_int(n_images) or n_images < 12:
        raise CxrError(f"n_images (--n-images) must be an integer >= 12 (a few images per class), got {n_images!r}")
    if not is_int(size) or size < MIN_SIZE:
        raise CxrError(f"size (--size) must be an integer >= {MIN_SIZE} pixels, got {size!r}")
    if not is_int(seed) or seed < 0:
        raise CxrError(f"seed (--seed) must be a non-negative integer, got {seed!r}")
    if difficulty not in DIFFICULTIES:
        raise CxrError(f"unknown difficulty (--difficulty) {difficulty!r}; use one of {', '.join(DIFFICULTIES)}")
    if not isinstance(test_fraction, float | int) or not 0 < test_fraction < 1:
        raise CxrError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction!r}")
    if workers is not None and (not is_int(workers) or workers < 1):
        raise CxrError(f"workers must be a positive integer or None, got {workers!r}")
    names = [s.strip() for s in inject.split(",")] if isinstance(inject, str) else list(inject)
    names = [s for s in names if s]
    unknown = sorted(set(names) - set(INJECTIONS))
    if unknown:
        raise CxrError(f"unknown injection (--inject) {', '.join(unknown)}; use a subset of {','.join(INJECTIONS)}")
    return frozenset(names)


def _prepare_out(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise CxrError(f"--out {out} is a file; give a folder to write the phantom data set to")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CxrError(f"cannot write to --out {out} ({e.strerror or e}); choose a writable folder") from None
    if any(out.iterdir()):
        raise CxrError(f"--out {out} is not empty; choose a new folder or delete this one first")
    return out.resolve()


def _plan_images(n_images: int, seed: int, test_fraction: float, confounder: bool, source: bool) -> list[dict]:
    """Decide each image's class, patient, index within patient and split (whole patients per split)."""
    rng = np.random.default_rng([seed, 0])
    counts = {c: max(2, round(f * n_images)) for c, f in CLASS_MIX.items() if c != "PNEUMONIA"}
    counts["PNEUMONIA"] = n_images - sum(counts.values())
    sizes, probs = zip(*IMAGES_PER_PATIENT, strict=True)
    plan, pid = [], 0
    for label in CLASSES:
        patients: list[int] = []  # images per patient
        while sum(patients) < counts[label]:
            patients.append(min(int(rng.choice(sizes, p=probs)), counts[label] - sum(patients)))
        if len(patients) == 1:  # keep at least one patient per split
            patients = [1, patients[0] - 1]
        order = rng.permutation(len(patients))
        target, in_test, test_patients = test_fraction * counts[label], 0, set()
        for j in order[:-1]:  # the last patient always stays in train
            if in_test >= target:
                break
            if in_test + patients[j] - target > target - in_test and test_patients:
                continue  # overshoot: try a smaller patient
            test_patients.add(j)
            in_test += patients[j]
        for j, n in enumerate(patients):
            split = "test" if j in test_patients else "train"
            for k in range(n):
                plan.append(dict(index=len(plan), patient_id=pid, k=k, label=label, split=split,
                                 confounder=confounder and label == "COVID19", source=source and label == SOURCE_CLASS))
            pid += 1
    return plan


def _plan_duplicates(rows: list[dict], seed: int, n_images: int, n_duplicates: int | None,
                     transforms: tuple[str, ...]) -> list[dict]:
    """Pick train images to copy, re-exported, into test under the same patient id (transforms in turn)."""
    rng = np.random.default_rng([seed, 3])
    train = [r for r in rows if r["split"] == "train"]
    n_dup = min(len(train), n_duplicates if n_duplicates is not None else max(2, round(0.03 * n_images)))
    next_k: dict[int, int] = {}
    for r in rows:
        next_k[r["patient_id"]] = max(next_k.get(r["patient_id"], 0), _image_k(r["path"]) + 1)
    plan = []
    for i, j in enumerate(sorted(rng.choice(len(train), size=n_dup, replace=False))):
        src = train[j]
        k = next_k[src["patient_id"]]
        next_k[src["patient_id"]] = k + 1
        plan.append(dict(index=i, source=src, k=k, transform=transforms[i % len(transforms)]))
    return plan


def _image_k(rel_path: str) -> int:
    return int(Path(rel_path).stem.rsplit("-i", 1)[1])


def _file_name(pid: int, k: int, ext: str) -> str:
    return f"phantom-p{pid:06d}-i{k:02d}{ext}"


def _worker_count(workers: int | None, n_images: int) -> int:
    if workers is not None:
        return workers
    return 1 if n_images < 400 else max(1, min(os.cpu_count() or 1, 8))


def _chunks(items: list, n: int) -> list[list]:
    return [items[i : i + n] for i in range(0, len(items), n)]


def _run_jobs(fn, jobs: list, n_workers: int, progress: bool, what: str) -> list[dict]:
    """Run ``fn`` over chunks (each job's last item), in order, in this process or a process pool.

    Fork when this process has no other threads (fast, and an unguarded user script is not re-imported); spawn
    otherwise (forking a process whose threads may hold locks, e.g. under Ray, can deadlock the children).
    """
    total = sum(len(job[-1]) for job in jobs)
    if n_workers == 1 or len(jobs) == 1:
        return _collect(map(fn, jobs), progress, what, total)
    method = "fork" if os.name == "posix" and threading.active_count() == 1 else "spawn"
    with ProcessPoolExecutor(min(n_workers, len(jobs)), mp_context=multiprocessing.get_context(method)) as pool:
        results = pool.map(fn, jobs)  # submits every chunk: workers start now, before the progress-bar thread
        return _collect(results, progress, what, total)


def _collect(results: Iterable[list[dict]], progress: bool, what: str, total: int) -> list[dict]:
    from rich.progress import Progress

    rows: list[dict] = []
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"writing {what}", total=total)
        for chunk_rows in results:
            rows += chunk_rows
            bar.advance(task, len(chunk_rows))
    return rows


def _write_manifest(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _summarise(out, rows, injections, elapsed, settings, n_images) -> dict[str, Any]:
    counts = {s: {c: 0 for c in CLASSES} for s in ("train", "test")}
    injected = {mark: 0 for name, mark in INJECTED_MARKS.items() if name in injections}
    for r in rows:
        counts[r["split"]][r["label"]] += 1
        if r["injected"]:
            injected[r["injected"]] += 1
    return dict(
        out=str(out), n_files=len(rows), counts=counts, patients=len({r["patient_id"] for r in rows}),
        injected=injected, elapsed_s=round(elapsed, 3), seconds_per_image=elapsed / max(1, n_images),
        settings=settings,
    )


# ---------------------------------------------------------------------------------------------------------------
# Workers: render, encode, write
# ---------------------------------------------------------------------------------------------------------------


def _render_chunk(job) -> list[dict]:
    out, size, seed, difficulty, chunk = job
    rows = []
    for spec in chunk:
        rng = np.random.default_rng([seed, 2, spec["index"]])
        look = _draw_look(rng, size)  # drawn first, before anything that depends on the class
        if spec.get("source"):  # another hospital's films: larger, square, RGB JPEG (drawn from their own stream)
            side = max(MIN_SIZE, round(1.5 * size * np.random.default_rng([seed, 6, spec["index"]]).uniform(0.95, 1.05)))
            look.update(h=side, w=side, format="jpg-rgb")
        anatomy = _draw_anatomy(np.random.default_rng([seed, 1, spec["patient_id"]]), rng)
        image, mask = _render(rng, look, anatomy, spec["label"], difficulty)
        if spec["confounder"]:
            _burn_marker(image, rng)
        ext = ".jpg" if look["format"].startswith("jpg") else ".png"
        rel = f"{spec['split']}/{spec['label']}/{_file_name(spec['patient_id'], spec['k'], ext)}"
        injected = "confounder" if spec["confounder"] else "source" if spec.get("source") else ""
        rows.append(_save(Path(out), rel, image, mask, look["format"], spec, injected=injected))
    return rows


def _duplicate_chunk(job) -> list[dict]:
    """Near-duplicates: the source image re-read and re-exported with one transform (see DUPLICATE_TRANSFORMS)."""
    out, seed, chunk = job
    out = Path(out)
    rows = []
    for dup in chunk:
        src = dup["source"]
        rng = np.random.default_rng([seed, 4, dup["index"]])
        with Image.open(out / src["path"]) as im:
            sixteen, rgb, jpeg = im.mode.startswith("I"), im.mode == "RGB", im.format == "JPEG"
            image = np.asarray(im.convert("F"), np.float32) / (65535.0 if sixteen else 255.0)
        image, fmt, quality, described = _reexport(image, dup["transform"], rng, sixteen, rgb, jpeg)
        h, w = image.shape
        mask = None
        if src["mask_path"]:
            with Image.open(out / src["mask_path"]) as m:
                mask = _reexport_mask(np.asarray(m) > 127, dup["transform"], described, h, w)
        ext = ".jpg" if fmt.startswith("jpg") else ".png"
        rel = f"test/{src['label']}/{_file_name(src['patient_id'], dup['k'], ext)}"
        spec = dict(split="test", label=src["label"], patient_id=src["patient_id"])
        rows.append(_save(out, rel, image, mask, fmt, spec, injected="duplicate", duplicate_of=src["path"],
                          transform=f"{dup['transform']} {described['text']}".strip(), quality=quality))
    return rows


def _reexport(image: np.ndarray, transform: str, rng: np.random.Generator, sixteen: bool, rgb: bool,
              jpeg: bool) -> tuple[np.ndarray, str, int, dict]:
    """Apply one re-export transform to a float [0, 1] image; returns (image, storage format, JPEG quality, params)."""
    h, w = image.shape
    lossless = "png-gray16" if sixteen else "png-rgb8" if rgb else "png-gray8"
    fmt, quality, params = lossless, JPEG_QUALITY, {}
    if transform in ("jpeg", "jpeg-low"):
        quality = int(rng.integers(50, 96) if transform == "jpeg" else rng.integers(10, 50))
        fmt, params["text"] = ("jpg-rgb" if rgb else "jpg-gray"), f"q={quality}"
    elif transform == "rescale":
        scale = float(rng.uniform(0.9, 1.1))
        image = _resize(image, max(MIN_SIZE, round(h * scale)), max(MIN_SIZE, round(w * scale)))
        params["text"] = f"x{scale:.3f}"
    elif transform in ("crop", "border"):
        top, bottom, left, right = (int(round(rng.uniform(0, 0.05) * d)) for d in (h, h, w, w))  # <= 5% a side
        if transform == "crop":
            image = image[top:h - bottom, left:w - right]
        else:
            value = float(rng.choice([0.0, 1.0, rng.uniform(0, 1)]))  # black, white or grey padding
            image = np.pad(image, ((top, bottom), (left, right)), constant_values=value)
        params.update(text=f"top={top} bottom={bottom} left={left} right={right}", box=(top, bottom, left, right))
    elif transform == "brightness":
        shift = float(rng.uniform(0.02, 0.15) * rng.choice([-1, 1]))
        image, params["text"] = image + shift, f"{shift:+.3f}"
    elif transform == "contrast":
        factor = float(rng.uniform(0.7, 1.3))
        image, params["text"] = (image - image.mean()) * factor + image.mean(), f"x{factor:.3f}"
    elif transform == "gamma":
        gamma = float(np.exp(rng.uniform(np.log(0.6), np.log(1.6))))
        image, params["text"] = np.clip(image, 0, 1) ** gamma, f"{gamma:.3f}"
    elif transform == "bitdepth":
        fmt = "png-gray8" if sixteen else "png-gray16"
        params["text"] = "16->8 bit" if sixteen else "8->16 bit"
    elif transform == "channels":
        fmt = "png-gray8" if rgb else "png-rgb8"
        params["text"] = "RGB->gray" if rgb else "gray->RGB"
    elif transform == "mixed":  # the example: brightness +6 grey levels, 97% size, JPEG quality 70
        image = _resize(image + 6 / 255, max(MIN_SIZE, round(0.97 * h)), max(MIN_SIZE, round(0.97 * w)))
        fmt, quality, params["text"] = ("jpg-rgb" if rgb else "jpg-gray"), 70, "+6 grey, x0.97, q=70"
    params.setdefault("text", "")
    return np.clip(image, 0, 1).astype(np.float32), fmt, quality, params


def _reexport_mask(mask: np.ndarray, transform: str, params: dict, h: int, w: int) -> np.ndarray:
    """The lesion mask of a re-exported image: cropped/padded like it, then resized to its size."""
    if transform in ("crop", "border"):
        top, bottom, left, right = params["box"]
        mh, mw = mask.shape
        mask = mask[top:mh - bottom, left:mw - right] if transform == "crop" else \
            np.pad(mask, ((top, bottom), (left, right)))
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(image.resize((w, h), Image.NEAREST)) > 127


def _save(out: Path, rel: str, image, mask, fmt: str, spec: dict, *, injected: str, duplicate_of: str = "",
          transform: str = "", quality: int = JPEG_QUALITY):
    _encode(image, fmt).save(out / rel, **({"quality": quality} if fmt.startswith("jpg") else {"compress_level": 1}))
    mask_rel = ""
    if mask is not None:
        mask_rel = f"masks/{Path(rel).with_suffix('.png').as_posix()}"
        Image.fromarray(mask.astype(np.uint8) * 255).save(out / mask_rel, compress_level=1)
    return dict(path=rel, split=spec["split"], label=spec["label"], patient_id=spec["patient_id"],
                mask_path=mask_rel, injected=injected, duplicate_of=duplicate_of, transform=transform)


def _encode(image: np.ndarray, fmt: str) -> Image.Image:
    """float [0, 1] HxW -> a Pillow image in the requested storage format."""
    if fmt == "png-gray16":
        return Image.fromarray(np.round(image * 65535).astype(np.uint16))
    gray = Image.fromarray(np.round(image * 255).astype(np.uint8))
    return gray.convert("RGB") if fmt.endswith("rgb8") or fmt == "jpg-rgb" else gray


def _write_corrupt(out: Path, seed: int, n_images: int, first_pid: int) -> list[dict]:
    """A few undecodable files: truncated PNGs, zero-byte files and text saved as .png."""
    rng = np.random.default_rng([seed, 5])
    rows = []
    for i in range(max(3, n_images // 500)):
        kind = ("truncated", "empty", "text")[i % 3]
        split, label = str(rng.choice(["train", "test"], p=[0.8, 0.2])), str(rng.choice(CLASSES))
        rel = f"{split}/{label}/{_file_name(first_pid + i, 0, '.png')}"
        if kind == "truncated":
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(buf, "PNG")
            data = buf.getvalue()[: len(buf.getvalue()) // 2]
        else:
            data = b"" if kind == "empty" else b"This is not an image; it is a text file with a .png name.\n"
        (out / rel).write_bytes(data)
        rows.append(dict(path=rel, split=split, label=label, patient_id=first_pid + i, mask_path="",
                         injected="corrupt", duplicate_of="", transform=""))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Rendering. Coordinates are in "patient units": 1.0 = the smaller image side at zoom 1, x to the image's right,
# y down, the image centre at (0.5, 0.52) before the per-image shift and rotation.
# Density is radiographic brightness before windowing: air ~0, soft tissue ~0.55, bone brighter.
# ---------------------------------------------------------------------------------------------------------------


def _draw_look(rng: np.random.Generator, size: int) -> dict:
    """Acquisition: size, framing, exposure, contrast, noise and file format. Never depends on the class."""
    h = max(MIN_SIZE, round(size * rng.uniform(0.85, 1.2)))
    w = max(MIN_SIZE, round(h * rng.uniform(0.85, 1.15)))
    names, probs = zip(*FORMATS, strict=True)
    return dict(
        h=h, w=w,
        zoom=rng.uniform(0.88, 1.08),  # field of view: <1 shows more around the chest
        angle=np.deg2rad(rng.uniform(-4, 4)),
        shift=rng.uniform(-0.03, 0.03, 2),
        lo=rng.uniform(-0.05, 0.12), hi=rng.uniform(0.75, 1.05),  # window on density
        gamma=float(np.exp(rng.uniform(np.log(0.7), np.log(1.4)))),
        contrast=rng.uniform(0.55, 1.0),  # poor contrast: output range squeezed
        offset=rng.uniform(0, 1),  # where the squeezed range sits (fraction of the free room)
        noise=rng.uniform(0.006, 0.03),
        format=str(rng.choice(names, p=probs)),
    )


def _draw_anatomy(patient_rng: np.random.Generator, image_rng: np.random.Generator) -> dict:
    """Patient build (fixed per patient) with a little per-image variation (breathing, positioning)."""
    p = patient_rng
    a = dict(
        cx=0.5 + p.uniform(-0.02, 0.02),
        body_w=p.uniform(0.38, 0.47),
        lung_dx=p.uniform(0.16, 0.2),  # lung centre distance from the midline
        lung_w=p.uniform(0.11, 0.135),  # half-width at the base
        lung_top=p.uniform(0.13, 0.2),
        lung_base=p.uniform(0.72, 0.8),
        heart=(p.uniform(0.14, 0.18), p.uniform(0.1, 0.125)),  # semi-axes: cardiothoracic ratio ~0.4-0.5
        rib_gap=p.uniform(0.055, 0.07),
        rib_curve=p.uniform(0.9, 1.5),
        clavicle_slope=p.uniform(-0.35, -0.15),
        tissue=p.uniform(0.45, 0.6),
        marking_seed=int(p.integers(2**31)),
    )
    a["lung_base"] += image_rng.uniform(-0.025, 0.025)  # inspiration depth
    return a


def _grid(look: dict, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Patient coordinates (x, y) of each pixel centre of an h x w grid covering the image."""
    scale = look["zoom"] / min(h, w)
    ys = (np.arange(h, dtype=np.float32) + 0.5 - h / 2) * scale
    xs = (np.arange(w, dtype=np.float32) + 0.5 - w / 2) * scale
    c, s = np.cos(look["angle"]), np.sin(look["angle"])
    x = c * xs[None, :] - s * ys[:, None] + 0.5 + look["shift"][0]
    y = s * xs[None, :] + c * ys[:, None] + 0.52 + look["shift"][1]
    return x.astype(np.float32), y.astype(np.float32)


def _ramp(d: np.ndarray, edge: float) -> np.ndarray:
    """Soft inside-indicator: 0 for d <= -edge/2, 1 for d >= edge/2, linear between."""
    return np.clip(d / edge + 0.5, 0.0, 1.0)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-ish smooth noise: a random cells x cells grid upsampled bicubically to h x w."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return _resize(coarse, h, w)


def _resize(a: np.ndarray, h: int, w: int) -> np.ndarray:
    return np.asarray(Image.fromarray(a, mode="F").resize((w, h), Image.BICUBIC))


def _render(rng, look, anat, label, difficulty) -> tuple[np.ndarray, np.ndarray | None]:
    h, w = look["h"], look["w"]
    f = max(1, round(min(h, w) / 96))  # coarse grid factor: anatomy is smooth, 96 px carries it
    hc, wc = -(-h // f), -(-w // f)
    x, y = _grid(look, hc, wc)
    edge = 1.5 * look["zoom"] / min(hc, wc)  # about 1.5 coarse pixels
    lungs, sides = _lungs(x, y, anat, edge)
    density = _anatomy_density(x, y, anat, lungs, edge)
    markings = _smooth_noise(np.random.default_rng(anat["marking_seed"]), hc, wc, 14)
    density += 0.035 * markings * lungs  # vascular markings: same pattern for a patient's images

    lesion = None
    if label != "NORMAL":
        severity = _severity(rng, difficulty)
        lesion = (_pneumonia if label == "PNEUMONIA" else _covid)(rng, x, y, anat, sides, severity, edge)
        density += lesion * lungs

    image = _resize(density, h, w) if f > 1 else density
    image = np.clip((image - look["lo"]) / (look["hi"] - look["lo"]), 0, 1) ** look["gamma"]
    image = look["offset"] * (1 - look["contrast"]) + look["contrast"] * image
    image += rng.standard_normal(image.shape, dtype=np.float32) * look["noise"]
    image = np.clip(image, 0, 1)

    mask = None
    if lesion is not None:
        field = lesion * (lungs > 0.5)
        field = _resize(field, h, w) if f > 1 else field
        mask = field > 0.4 * field.max()  # relative threshold: never empty, even for faint lesions
    return image.astype(np.float32), mask


def _lungs(x, y, a, edge) -> tuple[np.ndarray, list[np.ndarray]]:
    """Two lung fields: narrow apex, wide base, domed diaphragm (the right one a little higher)."""
    sides = []
    span = a["lung_base"] - a["lung_top"]
    for s in (-1, 1):  # image left = patient's right
        lcx = a["cx"] + s * a["lung_dx"]
        t = np.clip((y - a["lung_top"]) / span, 0.02, 1.0)
        half_w = a["lung_w"] * (0.45 + 0.55 * np.sqrt(t))
        u = (x - lcx) / half_w
        base = a["lung_base"] - (0.02 if s < 0 else 0.0) - 0.05 * np.clip(1 - u * u, 0, 1)
        lung = _ramp(1 - np.abs(u) ** 2.2, edge / a["lung_w"]) * _ramp(y - a["lung_top"], edge) * _ramp(base - y, edge)
        sides.append(lung)
    return np.maximum(sides[0], sides[1]), sides


def _anatomy_density(x, y, a, lungs, edge) -> np.ndarray:
    cx = a["cx"]
    dx = np.abs(x - cx)
    neck = np.clip((y - 0.0) / 0.16, 0, 1)  # shoulders widen from the neck down
    body_half = a["body_w"] * (0.3 + 0.7 * np.sqrt(neck))
    body = _ramp(body_half - dx, 2 * edge) * _ramp(y + 0.05, edge)
    density = 0.06 + a["tissue"] * body - 0.42 * lungs * body

    heart_y = a["lung_base"] - 0.1
    heart = _ramp(1 - ((x - cx - 0.05) / a["heart"][0]) ** 2 - ((y - heart_y) / a["heart"][1]) ** 2, 0.3)
    mediastinum = _ramp(0.06 - dx, edge) * _ramp(heart_y - y, 0.1) * body
    density += 0.22 * np.maximum(heart, mediastinum)
    trachea = _ramp(0.016 - dx, edge) * _ramp(0.36 - y, 0.04)
    density -= 0.12 * trachea

    spine = _ramp(0.028 - dx, edge) * body * (0.85 + 0.15 * np.cos(2 * np.pi * y / 0.045))
    density += 0.1 * spine

    # Posterior ribs: bands that rise then fall as they leave the spine, evenly spaced down the chest.
    phase = (y - 0.1 + 0.06 * dx - a["rib_curve"] * dx * dx) / a["rib_gap"]
    ribs = (0.5 + 0.5 * np.cos(2 * np.pi * phase)) ** 6
    ribs *= (phase > -0.5) * (phase < 10) * _ramp(a["body_w"] * 0.92 - dx, 0.04) * _ramp(dx - 0.03, edge)
    ribs *= _ramp(a["lung_base"] + 0.05 - y, 0.06)  # fade out below the diaphragm
    density += 0.11 * ribs * body

    clavicle_y = 0.155 + a["clavicle_slope"] * (dx - 0.03)
    clavicles = _ramp(0.013 - np.abs(y - clavicle_y), edge) * _ramp(dx - 0.03, edge) * _ramp(0.31 - dx, edge)
    density += 0.22 * clavicles
    return density.astype(np.float32)


def _severity(rng: np.random.Generator, difficulty: str) -> float:
    """Lesion severity in [0, 1]: scales opacity and extent. 'mixed' keeps a tail of hard cases."""
    if difficulty == "easy":
        return float(rng.uniform(0.6, 1.0))
    if difficulty == "hard":
        return float(rng.uniform(0.05, 0.45))
    return float(rng.beta(2.0, 1.6))


def _blob(rng, x, y, cx, cy, rx, ry, irregularity=0.5) -> np.ndarray:
    """A smooth, irregular blob of peak ~1: an elliptical Gaussian modulated by coarse noise."""
    g = np.exp(-0.5 * (((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2))
    wobble = _smooth_noise(rng, *x.shape, 6)
    return g * np.clip(1 + irregularity * wobble, 0.2, 2.0)


def _lung_point(a, side: int, t: float, lateral: float) -> tuple[float, float]:
    """A point inside a lung: t = 0 apex .. 1 base, lateral = -1 medial .. 1 lateral edge."""
    y = a["lung_top"] + t * (a["lung_base"] - a["lung_top"])
    half_w = a["lung_w"] * (0.45 + 0.55 * np.sqrt(t))
    return a["cx"] + side * (a["lung_dx"] + lateral * half_w), y


def _pneumonia(rng, x, y, a, sides, severity, edge) -> np.ndarray:
    """Lobar consolidation: a dense focal opacity in one lung (sometimes both), cut sharply at a fissure."""
    side = -1 if rng.random() < 0.6 else 1  # right lung more often
    lesion = np.zeros_like(x)
    for k in range(2 if rng.random() < 0.15 else 1):
        s = side if k == 0 else -side
        lower = rng.random() < 0.6
        t = rng.uniform(0.55, 0.85) if lower else rng.uniform(0.2, 0.45)
        cx, cy = _lung_point(a, s, t, rng.uniform(-0.3, 0.5))
        r = (0.05 + 0.06 * severity) * rng.uniform(0.8, 1.2)
        blob = _blob(rng, x, y, cx, cy, r * rng.uniform(0.9, 1.3), r)
        fissure = a["lung_top"] + 0.5 * (a["lung_base"] - a["lung_top"])
        lobe = _ramp(y - fissure, edge) if lower else _ramp(fissure - y, edge)
        if rng.random() < 0.5:  # half the cases respect the fissure (lobar), the rest are patchy
            blob = blob * np.maximum(lobe, 0.25)
        lesion = np.maximum(lesion, blob * sides[0 if s < 0 else 1])
    opacity = 0.15 + 0.35 * severity  # dense: near soft tissue at severity 1
    return (opacity * np.clip(lesion, 0, 1.2)).astype(np.float32)


def _covid(rng, x, y, a, sides, severity, edge) -> np.ndarray:
    """Ground-glass: several faint patches in both lungs, peripheral and in the lower zones."""
    lesion = np.zeros_like(x)
    n = int(rng.integers(2, 4)) + (severity > 0.5)  # patches per lung
    for s in (-1, 1):
        for _ in range(n):
            cx, cy = _lung_point(a, s, rng.uniform(0.5, 0.95), rng.uniform(0.45, 0.95))
            r = (0.03 + 0.035 * severity) * rng.uniform(0.8, 1.3)
            lesion = np.maximum(lesion, _blob(rng, x, y, cx, cy, r, r * rng.uniform(1.0, 1.6), 0.7)
                                * sides[0 if s < 0 else 1])
    opacity = 0.07 + 0.18 * severity  # faint: vessels and ribs stay visible
    texture = 1 + 0.3 * _smooth_noise(rng, *x.shape, 24)  # hazy, not solid
    return (opacity * np.clip(lesion * texture, 0, 1.2)).astype(np.float32)


def _burn_marker(image: np.ndarray, rng: np.random.Generator) -> None:
    """A bright, letter-like block (an 'L' in a box) burned into the top-left corner, in place."""
    h, w = image.shape
    side = max(6, round(0.1 * min(h, w) * rng.uniform(0.9, 1.1)))
    top, left = round(0.03 * h + rng.integers(0, 3)), round(0.03 * w + rng.integers(0, 3))
    box = image[top : top + side, left : left + side]
    box[:] = 0.95
    stroke = max(1, side // 5)
    box[stroke : side - stroke, stroke : 2 * stroke] = 0.1  # the upright of the L
    box[side - 2 * stroke : side - stroke, stroke : side - stroke] = 0.1  # its foot
