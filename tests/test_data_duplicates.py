"""Near-duplicates survive what re-exports do (JPEG, rescaling, crops, borders, brightness/contrast/gamma,
8/16 bit, gray/RGB) and look-alike films of other patients are not paired; the candidate index matches a
brute-force Hamming search."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxr_search.data import duplicates, integrity, phantoms


@pytest.fixture(scope="module")
def reexported(tmp_path_factory) -> Path:
    """120 phantoms around 160 px with one re-exported copy per transform (and a second round of them)."""
    out = tmp_path_factory.mktemp("dups") / "set"
    phantoms.generate(out, n_images=120, size=160, seed=3, inject=("duplicates",), progress=False,
                      n_duplicates=2 * len(phantoms.DUPLICATE_TRANSFORMS))
    return out


def test_manifest_records_each_copy_and_its_transform(reexported):
    manifest = pd.read_csv(reexported / "manifest.csv", dtype=str, keep_default_na=False)
    copies = manifest[manifest["injected"] == "duplicate"]
    kinds = copies["transform"].str.split(" ").str[0]
    assert sorted(set(kinds)) == sorted(phantoms.DUPLICATE_TRANSFORMS)
    assert (copies["transform"].str.len() > len("jpeg")).all()  # parameters recorded too, e.g. "jpeg q=63"


def test_every_reexport_is_found_and_no_clean_pair_is_reported(reexported):
    manifest = pd.read_csv(reexported / "manifest.csv", dtype=str, keep_default_na=False)
    report = integrity.check(reexported, workers=1, progress=False)
    truth = {frozenset(p) for p in manifest.loc[manifest["injected"] == "duplicate", ["path", "duplicate_of"]]
             .itertuples(index=False)}
    found = {frozenset((d["a"], d["b"])) for d in report.duplicates}
    transform = dict(zip(manifest["path"], manifest["transform"], strict=True))
    missed = sorted(transform[p] for pair in truth - found for p in pair if transform[p])
    assert missed == []
    assert found == truth  # nothing else: the other 120 films of 30-odd look-alike patients are not paired
    assert all(d["split_a"] != d["split_b"] for d in report.duplicates)  # train source, test copy


def test_signature_ignores_monotone_intensity_changes_and_padding():
    rng = np.random.default_rng(0)
    film = (rng.random((150, 120)) * 200 + 20).astype(np.uint8)
    film = np.asarray(np.clip(np.cumsum(film.astype(float), axis=1) / 60, 0, 255), np.uint8)  # some structure
    gamma = np.rint(255 * (film / 255) ** 1.4).astype(np.uint8)
    padded = np.pad(film, ((6, 3), (4, 0)), constant_values=255)
    base = duplicates.signature(film).astype(int)
    assert np.abs(duplicates.signature(gamma).astype(int) - base).mean() < 2  # ranks, not grey levels
    np.testing.assert_array_equal(duplicates.trim_padding(padded), film)


def test_candidate_index_agrees_with_brute_force_hamming():
    from scipy.spatial.distance import cdist

    rng = np.random.default_rng(1)
    keys = rng.integers(0, 256, (300, duplicates.HASH_SIZE ** 2 // 8), np.uint8)
    keys[150:] = keys[:150] ^ (rng.random((150, keys.shape[1])) < 0.03).astype(np.uint8)  # close partners
    bits = np.unpackbits(keys, axis=1).astype(bool)
    dist = np.rint(cdist(bits, bits, metric="hamming") * bits.shape[1]).astype(int)
    np.fill_diagonal(dist, 10**6)
    pairs = set(duplicates._nearest_keys(keys))
    for a in range(len(keys)):
        b = int(np.argmin(dist[a]))
        assert (min(a, b), max(a, b)) in pairs  # each key's nearest neighbour is a candidate
    assert all(dist[a, b] <= duplicates.MAX_HASH_DISTANCE for a, b in pairs)
