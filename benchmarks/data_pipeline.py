"""Time the data layer on the phantom set: scan, cold cache build (hash + decode + preprocess + duplicates),
a run after touching every file (stat miss, content hit), and a warm ``prepare()`` (cache hit).

Usage:
    python benchmarks/data_pipeline.py                # the default 6,432-image phantom set
    python benchmarks/data_pipeline.py --n-images 500 # quicker

The phantom set is generated once under the user cache (not timed); the array cache of each run goes to a
fresh temporary folder so that "cold" is really cold.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from datetime import date
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-images", type=int, default=6432, help="phantom images (default: the study's 6,432)")
    parser.add_argument("--phantom-size", type=int, default=256, help="nominal phantom side in pixels")
    parser.add_argument("--size", type=int, default=128, help="cached image side in pixels")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
    args = parser.parse_args()

    t = time.perf_counter()
    from cxr_search.data import cache, phantoms, split  # noqa: F401  (split: sklearn, imported by prepare)
    from cxr_search.data.prepare import prepare
    from cxr_search.data.scan import scan

    rows = [("imports (once per process)", time.perf_counter() - t)]
    data = phantoms.default_dataset(n_images=args.n_images, size=args.phantom_size)
    with tempfile.TemporaryDirectory(prefix="cxr-bench-") as tmp:
        os.environ["CXR_SEARCH_CACHE"] = tmp  # array cache only: the phantom folder is already resolved
        t = time.perf_counter()
        scanned = scan(data)
        rows.append(("scan (list + classify)", time.perf_counter() - t))
        t = time.perf_counter()
        built = cache.build_or_load(scanned, size=args.size, workers=args.workers, progress=False)
        cold = time.perf_counter() - t
        rows.append(("cold cache build (hash, decode, preprocess, duplicates)", cold))
        now = time.time_ns()
        for p in scanned.records["path"]:
            os.utime(p, ns=(now, now))
        t = time.perf_counter()
        cache.build_or_load(scan(data), size=args.size, progress=False)
        rows.append(("touched files: stat miss, content-hash hit", time.perf_counter() - t))
        t = time.perf_counter()
        prepared = prepare(data, size=args.size, progress=False)
        rows.append(("first prepare() on the built cache (report + split computed)", time.perf_counter() - t))
        assert prepared.report["cache"]["hit"], "the warm run should be a cache hit"
        t = time.perf_counter()
        prepare(data, size=args.size, progress=False)
        rows.append(("warm prepare() (scan + cache hit + report + saved split)", time.perf_counter() - t))
    n = len(scanned.records)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; date {date.today()}")
    print(f"data: {n} files ({built.images.shape[0]} usable) at ~{args.phantom_size}px -> {args.size}px, "
          f"duplicate pairs found: {len(built.pairs)}")
    print(f"command: python benchmarks/data_pipeline.py --n-images {args.n_images}")
    print("| step | seconds | images/s |")
    print("|---|---|---|")
    for name, seconds in rows:
        rate = "" if name.startswith("imports") else f"{n / seconds:,.0f}"
        print(f"| {name} | {seconds:.2f} | {rate} |")
    print(f"data folder: {Path(data)}")


if __name__ == "__main__":
    main()
