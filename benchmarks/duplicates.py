"""Near-duplicate detector benchmark: recall per re-export transform and false pairs per 10k clean images.

Generates phantoms (``data synth --inject duplicates`` with every transform, ``--per-transform`` copies each),
runs the integrity check's decoding and duplicate search on them, and scores the reported pairs against the
manifest: a pair is true when both files are the same film (a source and its copy, or two copies of one
source); every other pair among clean films is false (counted apart for films of one patient and of two).
Also times the candidate index on ``--scale`` random keys, with its peak Python memory.

Usage:
    python benchmarks/duplicates.py                         # 10,000 clean images, 100 copies per transform
    python benchmarks/duplicates.py --n-images 2000 --per-transform 30   # quicker
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import tracemalloc
from collections import Counter
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-images", type=int, default=10_000, help="clean phantom images")
    parser.add_argument("--per-transform", type=int, default=100, help="injected copies per transform")
    parser.add_argument("--size", type=int, default=256, help="nominal phantom side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=int, default=100_000, help="random keys for the index timing (0: skip)")
    args = parser.parse_args()

    from cxr_search.data import duplicates, integrity, phantoms
    from cxr_search.data.scan import relative_path, scan

    transforms = phantoms.DUPLICATE_TRANSFORMS + phantoms.EXTRA_TRANSFORMS
    with tempfile.TemporaryDirectory(prefix="cxr-dups-") as tmp:
        out = Path(tmp) / "set"
        t = time.perf_counter()
        phantoms.generate(out, n_images=args.n_images, size=args.size, seed=args.seed, inject=("duplicates",),
                          n_duplicates=args.per_transform * len(transforms), duplicate_transforms=transforms,
                          progress=False)
        generate_s = time.perf_counter() - t
        manifest = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
        scanned = scan(out)
        t = time.perf_counter()
        facts = list(integrity.examine_files(scanned.records["path"].tolist(), progress=False))
        decode_s = time.perf_counter() - t
        usable = [f for f in facts if f.ok]
        rel = [relative_path(p, scanned.root) for p, f in zip(scanned.records["path"], facts, strict=True) if f.ok]
        t = time.perf_counter()
        pairs = integrity.find_duplicates([f.pixel_hash for f in usable], np.stack([f.thumb for f in usable]))
        search_s = time.perf_counter() - t

    root = {r.path: (r.duplicate_of or r.path) for r in manifest.itertuples()}
    kind = {r.path: r.transform.split(" ")[0] for r in manifest.itertuples() if r.injected == "duplicate"}
    patient = dict(zip(manifest["path"], manifest["patient_id"], strict=True))
    found = {frozenset((rel[a], rel[b])) for a, b in zip(pairs["a"], pairs["b"], strict=True)}
    hits = Counter(kind[p] for pair in found for p in pair if p in kind and root[p] in pair)
    total = Counter(kind.values())
    false = [tuple(pair) for pair in found if len({root[p] for p in pair}) == 2]
    same_patient = sum(patient[a] == patient[b] for a, b in false)
    n_clean = int((manifest["injected"] == "").sum())

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; date {date.today()}")
    print(f"command: python benchmarks/duplicates.py --n-images {args.n_images} --per-transform "
          f"{args.per_transform} --size {args.size}")
    print(f"data: {n_clean} clean phantoms at ~{args.size} px + {sum(total.values())} copies; generate "
          f"{generate_s:.0f} s, decode + signatures {decode_s:.1f} s, duplicate search {search_s:.1f} s; "
          f"thresholds: correlation >= {duplicates.NEAR_THRESHOLD}, shear <= {duplicates.MAX_SHEAR}")
    print("| transform | copies | found | recall |")
    print("|---|---|---|---|")
    for name in transforms:
        print(f"| {name} | {total[name]} | {hits[name]} | {hits[name] / max(1, total[name]):.3f} |")
    print(f"false pairs among {n_clean} clean images: {len(false)} ({same_patient} of one patient, "
          f"{len(false) - same_patient} of two) = {len(false) / n_clean * 10_000:.2f} per 10k clean images")
    if args.scale:
        keys = np.random.default_rng(0).integers(0, 256, (args.scale, duplicates.HASH_SIZE ** 2 // 8), np.uint8)
        tracemalloc.start()
        t = time.perf_counter()
        candidates = duplicates._nearest_keys(keys)
        elapsed = time.perf_counter() - t
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(f"candidate index on {args.scale:,} random keys: {elapsed:.1f} s, {len(candidates):,} candidate "
              f"pairs, peak traced memory {peak / 2**20:.0f} MiB (an N x N int32 matrix would be "
              f"{args.scale**2 * 4 / 2**30:.0f} GiB)")


if __name__ == "__main__":
    main()
