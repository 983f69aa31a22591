"""On phantoms with injected failure modes the report finds exactly what the generator injected (per its
manifest.csv), and the prepared splits put no patient in two splits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cxr_search.cli import app
from cxr_search.data import integrity
from cxr_search.data.prepare import prepare


@pytest.fixture
def injected(phantoms_with_injections) -> Path:
    return phantoms_with_injections


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_SEARCH_CACHE", str(tmp_path / "cache"))


def _manifest(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "manifest.csv", dtype=str, keep_default_na=False)


def _shared_patients(manifest: pd.DataFrame) -> set[str]:
    usable = manifest[manifest["injected"] != "corrupt"]
    n_splits = usable.groupby("patient_id")["split"].nunique()
    return set(n_splits[n_splits > 1].index)


def test_report_finds_exactly_the_injected_problems(injected):
    manifest = _manifest(injected)
    report = integrity.check(injected, workers=1, progress=False)
    truth_pairs = {frozenset(p) for p in manifest.loc[manifest["injected"] == "duplicate", ["path", "duplicate_of"]]
                   .itertuples(index=False)}
    found_pairs = {frozenset((d["a"], d["b"])) for d in report.duplicates}
    # At 64 px one JPEG block is an eighth of the film: JPEG copies of such tiny images are a documented miss
    # (tests/test_data_duplicates.py checks every transform, JPEG included, at 160 px).
    jpeg_copies = set(manifest.loc[manifest["transform"].str.startswith("jpeg"), "path"])
    expected = {pair for pair in truth_pairs if not pair & jpeg_copies}
    assert len(expected) > 0 and expected <= found_pairs <= truth_pairs
    assert report.summary["cross_split_duplicate_pairs"] == len(found_pairs)  # all injected train -> test
    corrupt = set(manifest.loc[manifest["injected"] == "corrupt", "path"])
    assert len(corrupt) > 0 and {q["path"] for q in report.quarantined} == corrupt
    assert {p["patient_id"] for p in report.shared_patients} == _shared_patients(manifest)
    assert report.cross_split_leakage
    assert report.n_usable == len(manifest) - len(corrupt)


def test_prepared_splits_share_no_patient_and_drop_leaked_test_images(injected, private_cache):
    manifest = _manifest(injected)
    shared = _shared_patients(manifest)
    test_rows = manifest[(manifest["split"] == "test") & (manifest["injected"] != "corrupt")]
    data = prepare(injected, size=32, seed=0, progress=False)  # parallel decoding path (over SERIAL_BELOW files)
    parts = [set(s.patient_ids) for s in (data.train, data.val, data.test)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert data.report["split"]["dropped_from_test"] == int(test_rows["patient_id"].isin(shared).sum())
    assert len(data.train) + len(data.val) + len(data.test) + data.report["split"]["dropped_from_test"] == \
        len(manifest) - (manifest["injected"] == "corrupt").sum()
    assert any("dropped" in w for w in data.report["warnings"])
    assert data.train.images.dtype == np.uint8 and data.train.images.shape[1:] == (32, 32)
    assert set(np.unique(data.train.labels)) == {0, 1, 2}
    json.dumps(data.report)  # JSON-able

    kept = prepare(injected, size=32, seed=0, duplicate_policy="keep", progress=False)
    assert kept.report["cache"]["hit"] and len(kept.test) == len(test_rows)
    pooled = prepare(injected, size=32, seed=0, resplit=True, progress=False)
    parts = [set(s.patient_ids) for s in (pooled.train, pooled.val, pooled.test)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])


def test_check_command_writes_json_and_strict_fails_on_leakage(injected, tmp_path):
    out = tmp_path / "report.json"
    runner = CliRunner()
    result = runner.invoke(app, ["data", "check", str(injected), "--json", str(out), "--workers", "1"])
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert saved["summary"]["cross_split_duplicate_pairs"] > 0 and "duplicate pairs" in result.output
    strict = runner.invoke(app, ["data", "check", str(injected), "--strict", "--workers", "1"])
    assert strict.exit_code == 1


def test_clean_phantoms_pass_strict_check(tiny_phantoms):
    result = CliRunner().invoke(app, ["data", "check", str(tiny_phantoms), "--strict", "--workers", "1"])
    assert result.exit_code == 0, result.output
    report = integrity.check(tiny_phantoms, workers=1, progress=False)
    assert report.duplicates == [] and report.quarantined == [] and report.n_usable == 120
