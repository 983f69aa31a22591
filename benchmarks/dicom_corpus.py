"""Decode every DICOM test file pydicom ships (an independent corpus of real exports) and print a Markdown table:
decoded (with the format) or quarantined (with the reason).

Usage:
    python benchmarks/dicom_corpus.py
"""

from __future__ import annotations

import os
import warnings
from collections import Counter


def main() -> None:
    from pydicom.data import get_testdata_files

    from cxr_search.data.decode import DecodeError, decode_with_info

    files = sorted(f for f in get_testdata_files() if f.endswith(".dcm") and os.path.isfile(f))
    rows, outcome = [], Counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the files that are odd on purpose
        for path in files:
            try:
                gray, fmt = decode_with_info(path)
                rows.append((os.path.basename(path), "decoded", f"{fmt} {gray.shape[1]}x{gray.shape[0]}"))
            except DecodeError as e:
                rows.append((os.path.basename(path), "quarantined", e.reason[:160]))
            outcome[rows[-1][1]] += 1
    print(f"{len(files)} files: {outcome['decoded']} decoded, {outcome['quarantined']} quarantined")
    print("| file | result | format or reason |")
    print("|---|---|---|")
    for name, result, text in rows:
        print(f"| {name} | {result} | {text.replace('|', '/')} |")


if __name__ == "__main__":
    main()
