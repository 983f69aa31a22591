"""`cxr-search report EXP`: one self-contained HTML file, rendered in headless Chromium (Debian's `chromium`)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import chromium
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_ensemble import make_experiment
from typer.testing import CliRunner

from cxr_search import explain, metrics
from cxr_search.cli import app
from cxr_search.ensemble import ensemble_predictions, member_comparison
from cxr_search.report import html as html_report
from cxr_search.report.summary import build_summary, fmt_ci

SECTION_IDS = [key for key, _ in html_report.SECTIONS]
# What the page looks like once loaded: sections, images that decoded, plotly charts drawn, "has not run" notes.
PAGE_STATE = """(() => ({
  sections: Array.from(document.querySelectorAll("main > section")).map((s) => s.id),
  images: Array.from(document.images).map((i) => ({alt: i.alt, ok: i.complete && i.naturalWidth > 0})),
  charts: document.querySelectorAll(".plotly-graph-div").length,
  drawn: document.querySelectorAll(".plotly-graph-div .main-svg").length > 0 ?
    Array.from(document.querySelectorAll(".plotly-graph-div")).filter((d) => d.querySelector(".main-svg")).length : 0,
  plotly: typeof window.Plotly,
  notRun: Array.from(document.querySelectorAll(".not-run")).map((p) => p.closest("section").id),
}))()"""
SORT_FIRST_COLUMN = """(() => {
  const table = document.querySelector("#search table.sortable"), th = table.tHead.rows[0].cells[0];
  const column = () => Array.from(table.tBodies[0].rows).map((r) => r.cells[0].textContent);
  th.click(); const up = column(); th.click(); return {up: up, down: column()};
})()"""


def _browser() -> str:
    binary = chromium.executable()
    if binary is None:
        if os.environ.get("CXR_SEARCH_REQUIRE_BROWSER"):
            pytest.fail("CXR_SEARCH_REQUIRE_BROWSER is set but chromium is not installed (.ci/run installs it)")
        pytest.skip("Debian's chromium is not installed on this machine (apt-get install chromium); .ci/run "
                    "installs it, so CI runs this test")
    return binary


def _section(page: str, key: str) -> str:
    return re.search(rf'<section id="{key}">(.*?)</section>', page, re.S).group(1)


@pytest.mark.slow
@pytest.mark.parametrize("which, not_run", [("full", ["explanations"]),
                                            ("search_only", ["seeds", "ensemble", "explanations"])])
def test_report_renders_offline_in_headless_chromium(smoke_experiments, which, not_run, tmp_path):
    binary = _browser()
    out = tmp_path / "report.html"
    result = CliRunner().invoke(app, ["report", str(smoke_experiments[which]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    # self-contained: every src/href is embedded data or an anchor, and plotly.js is in the page once
    markup = re.sub(r"<script[^>]*>.*?</script>", "", page, flags=re.S)  # plotly.js quotes URLs in its code
    assert all(link.startswith(("data:", "#")) for link in re.findall(r'(?:src|href)="([^"]*)"', markup))
    assert page.count("* plotly.js v") == 1

    with chromium.Browser(binary) as browser:
        browser.open(out.resolve().as_uri())
        deadline = time.monotonic() + 20
        state = browser.evaluate(PAGE_STATE)
        while state["drawn"] < state["charts"] and time.monotonic() < deadline:  # plotly draws after load
            time.sleep(0.2)
            state = browser.evaluate(PAGE_STATE)
        shot = browser.screenshot(tmp_path / f"report-{which}.png")
        order = browser.evaluate(SORT_FIRST_COLUMN)
        failures, urls = browser.failures(), browser.requested_urls()

    assert failures == [], failures  # no script error, no console error, no failed load
    assert {u.split(":", 1)[0] for u in urls} <= {"file", "data"}, urls  # nothing fetched from a network
    assert state["sections"] == SECTION_IDS
    assert state["notRun"] == not_run
    assert state["images"] and all(i["ok"] for i in state["images"]), state["images"]
    assert state["plotly"] == "object"
    # Optuna's three charts, unless the study has too few completed trials (then the section says so)
    assert state["charts"] == state["drawn"] == 3 or "completed trials" in _section(page, "search")
    assert len(state["images"]) >= (6 if which == "full" else 3)
    assert order["up"] == sorted(order["up"]) and order["down"] == order["up"][::-1]
    with Image.open(shot) as im:
        assert im.width == chromium.VIEWPORT["width"] and im.height > chromium.VIEWPORT["height"]


@pytest.mark.slow
def test_report_tables_are_the_summarys_and_the_ensemble_is_replayed_exactly(smoke_experiments):
    full = smoke_experiments["full"]
    page = html_report.build_report(full, n_resamples=200)
    summary = build_summary(full, n_resamples=200)
    cells = {c.strip() for line in summary.splitlines() if line.startswith("| ") for c in line.strip("|").split("|")}
    missing = [c for c in cells if c and f">{c.replace('<', '&lt;').replace('>', '&gt;')}<" not in page]
    assert not missing, f"summary.md cells absent from the report: {missing[:5]}"
    # the header says the stages run on their own after the search (the plan had only the search)
    assert "done: search; also run on their own: retrain, ensemble;" in page
    assert page.index('id="data"') < page.index('id="search"') < page.index('id="seeds"') < page.index('id="ensemble"')

    ens = ensemble_predictions(full)
    saved, y = ens.description, ens.test_labels
    assert np.isclose((ens.test_probs.argmax(1) == y).mean(), saved["metrics"]["acc"][0])
    assert np.isclose(metrics.ece(ens.test_probs, y), saved["ece_after"])
    assert np.isclose(metrics.ece(ens.test_probs_uncalibrated, y), saved["ece_before"])
    members = member_comparison(ens)
    assert list(members["trial_id"]) == [m["trial_id"] for m in saved["members"]]
    np.testing.assert_allclose(members.iloc[0][["gain", "gain_lo", "gain_hi"]].to_numpy(dtype=float),
                               saved["acc_gain_vs_best_single"])
    assert ensemble_predictions(smoke_experiments["search_only"]) is None


def test_explanations_and_warnings_come_from_the_experiment_and_nothing_else_runs(tmp_path):
    exp = make_experiment(tmp_path)  # a finished search written by hand: no trial folders, no Optuna journal
    (exp / "data_report.json").write_text('{"warnings": ["12 test images duplicate training images (dropped)", '
                                          '"<img src=x onerror=alert(1)>"]}')
    rows = [{"method": "gradcam", "model": kind, "n_images": 8, "n_marked": 0, "chance": 0.1,
             **{f"{name}{end}": value for name in ("pointing_game", "lesion_mass", "marker_mass")
                for end, value in (("", v), ("_lo", v - 0.1), ("_hi", v + 0.1))}}
            for kind, v in (("trained", 0.75), ("untrained", 0.25))]
    explain.write_faithfulness(exp, pd.DataFrame(rows), {"flagged": True, "message": "explanations concentrate "
                               "on a non-anatomical marker: gradcam puts 60% in the corner"}, {"model": "hand-made"})
    sheet = explain.contact_sheet([np.full((40, 60, 3), 200, np.uint8), np.zeros((40, 60, 3), np.uint8)])
    Image.fromarray(sheet).save(exp / "explain" / "contact_sheet.gradcam.png")

    page = html_report.build_report(exp, n_resamples=50)
    data, explanations = _section(page, "data"), _section(page, "explanations")
    assert "non-anatomical marker" in data and "duplicate training images" in data
    assert "&lt;img src=x" in data and "<img src=x" not in page  # the data's text is escaped, never markup
    assert fmt_ci(0.75, 0.65, 0.85, 3) in explanations
    assert 'alt="Explanations: contact_sheet.gradcam.png"' in explanations and "not-run" not in explanations
    assert "No Optuna study" in _section(page, "search")
    for key, command in (("seeds", "cxr-search retrain"), ("ensemble", "cxr-search ensemble")):
        assert 'class="not-run"' in _section(page, key) and command in _section(page, key)
    assert "plotly.js" not in page  # no interactive chart, no plotly.js


def test_report_of_a_folder_that_is_not_an_experiment_is_a_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cxr_search.cli", "report", str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "not an experiment folder" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "report.html").exists()
