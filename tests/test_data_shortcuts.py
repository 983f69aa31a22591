"""The source-shortcut audit: silent on clean phantoms, warns (in `data check` and at the top of summary.md)
when a class has its own file format/size (``--inject source``) or a burned-in marker (``--inject confounder``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cxr_search.cli import app
from cxr_search.data import integrity, phantoms, shortcuts


@pytest.fixture(scope="module")
def sourced(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shortcut") / "source"
    phantoms.generate(out, n_images=150, size=48, seed=2, inject=("source",), progress=False)
    return out


@pytest.fixture(scope="module")
def confounded(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shortcut") / "confounder"
    phantoms.generate(out, n_images=150, size=48, seed=2, inject=("confounder",), progress=False)
    return out


def _check(root: Path, tmp_path: Path) -> tuple[int, str, dict]:
    out = tmp_path / f"{root.name}.json"
    result = CliRunner().invoke(app, ["data", "check", str(root), "--json", str(out), "--workers", "1"])
    return result.exit_code, result.output, json.loads(out.read_text())


def test_source_injection_is_flagged_by_data_check_with_an_interval(sourced, tmp_path):
    code, output, report = _check(sourced, tmp_path)
    assert code == 0, output
    audit = report["shortcut"]
    assert audit["shortcut"] and audit["ci"][0] > audit["chance"] + shortcuts.MARGIN
    assert audit["groups"]["metadata"] > audit["groups"]["image"]  # the format/size mix carries it
    assert any(w.startswith("source shortcut") for w in report["warnings"])
    assert "source shortcut" in output


def test_confounder_marker_is_flagged_and_carried_by_the_image(confounded, tmp_path):
    code, output, report = _check(confounded, tmp_path)
    assert code == 0, output
    audit = report["shortcut"]
    assert audit["shortcut"] and audit["groups"]["image"] > audit["groups"]["metadata"]
    assert "source shortcut" in output


def test_clean_phantoms_raise_no_shortcut_warning(tiny_phantoms):
    report = integrity.check(tiny_phantoms, workers=1, progress=False)
    audit = report.shortcut
    assert audit["status"] == "ok" and not audit["shortcut"]
    assert audit["ci"][0] <= audit["chance"] + shortcuts.MARGIN <= audit["ci"][1] + shortcuts.MARGIN
    assert not any("shortcut" in w for w in report.warnings)


def test_too_few_images_skip_the_audit_with_a_reason():
    import pandas as pd

    table = pd.DataFrame({"label": ["NORMAL", "COVID19"] * 3, "patient_id": list("abcdef")})
    result = shortcuts.audit(table)
    assert result["status"] == "skipped" and not result["shortcut"] and "facts lack" in result["reason"]


def test_shortcut_warning_reaches_the_top_of_summary_md(sourced, tmp_path):
    from test_ensemble import make_plan

    from cxr_search.experiment.folder import Experiment
    from cxr_search.report.summary import build_summary

    exp = Experiment.create(make_plan(), tmp_path)
    exp.write_data_report(integrity.check(sourced, workers=1, progress=False).to_dict())
    lines = build_summary(exp.path).splitlines()
    warning = next(i for i, line in enumerate(lines) if line.startswith("- **warning:** source shortcut"))
    assert lines.index("## Data warnings") < warning < 8  # at the top, before any result table
    assert "balanced accuracy" in lines[warning] and "vs chance 0.33" in lines[warning]
