"""`cxr-search report EXP`: the experiment as one self-contained HTML file that opens offline in a browser.

Sections, in this order: data warnings, search, seed distribution, ensemble, explanations; a stage that has not
run says so in its section. The numbers and tables are `report.py`'s (the same Markdown as `summary.md`, rendered
with markdown-it), the static figures `figures.py`'s (PNG, base64-embedded), Optuna's figures come from
`optuna.visualization` as interactive plotly charts, with plotly.js embedded once. Nothing is fetched when the
page opens: no CDN, no external image, font or stylesheet.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from cxr_search.ensemble import ensemble_predictions, member_comparison, read_ensemble
from cxr_search.experiment.folder import Experiment
from cxr_search.experiment.trials import trial_histories
from cxr_search.io import storage
from cxr_search.report import figures
from cxr_search.report.study import study_summary
from cxr_search.report.summary import (
    accuracy_intervals,
    data_section,
    ensemble_section,
    explain_sheets,
    explanations_section,
    fmt,
    fmt_ci,
    markdown_table,
    retrain_section,
    search_section,
    seed_summary,
    shortcut_warning,
)

REPORT_FILE = "report.html"
# (id, title) of each section, in page order; the browser test looks for these ids.
SECTIONS = (("data", "Data"), ("search", "Search"), ("seeds", "Seed distribution"), ("ensemble", "Ensemble"),
            ("explanations", "Explanations"))
MIN_TRIALS_FOR_IMPORTANCE = 2  # Optuna's importance evaluators need at least two completed trials
FIGURE_DPI = 100

_STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #1d1d1f; }
header, main { max-width: 1180px; margin: 0 auto; padding: 0 20px; }
header { border-bottom: 1px solid #ddd; padding-bottom: 8px; }
nav a { margin-right: 14px; }
section { border-bottom: 1px solid #eee; padding: 6px 0 18px; }
h1 { font-size: 1.6em; } h2 { font-size: 1.35em; margin-top: 1.2em; } h3 { font-size: 1.1em; }
.note { background: #f5f5f7; border-left: 4px solid #999; padding: 8px 12px; }
.not-run { background: #fff8e1; border-left: 4px solid #f0b400; padding: 8px 12px; }
blockquote { background: #fdecea; border-left: 4px solid #d93025; margin: 0; padding: 6px 12px; }
.table-wrap { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; font-size: 12.5px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: left; white-space: nowrap; }
th { background: #f0f0f2; position: sticky; top: 0; cursor: pointer; user-select: none; }
th[data-sort="asc"]::after { content: " \\25B2"; } th[data-sort="desc"]::after { content: " \\25BC"; }
tbody tr:nth-child(even) { background: #fafafa; }
figure { margin: 12px 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 12.5px; }
code { background: #f0f0f2; padding: 0 3px; border-radius: 3px; }
"""

# Click a column header to sort by it (numbers by value, text alphabetically); a second click reverses.
_SORT_SCRIPT = """
document.querySelectorAll("table.sortable th").forEach(function (th) {
  th.addEventListener("click", function () {
    var table = th.closest("table"), body = table.tBodies[0], i = th.cellIndex;
    var asc = th.dataset.sort !== "asc";
    table.querySelectorAll("th").forEach(function (h) { delete h.dataset.sort; });
    th.dataset.sort = asc ? "asc" : "desc";
    var key = function (row) { var t = row.cells[i].textContent.trim(), n = parseFloat(t); return isNaN(n) ? t : n; };
    Array.from(body.rows).sort(function (a, b) {
      var x = key(a), y = key(b);
      var c = (typeof x === "number" && typeof y === "number") ? x - y : String(x).localeCompare(String(y));
      return asc ? c : -c;
    }).forEach(function (row) { body.appendChild(row); });
  });
});
"""


class _Page:
    """Collects the sections' HTML and whether plotly.js must be embedded."""

    def __init__(self) -> None:
        self.plotly = False

    def markdown(self, lines: list[str]) -> str:
        """report.py's Markdown as HTML (raw HTML in the text is escaped); its `##` headings nest under ours."""
        from markdown_it import MarkdownIt

        text = "\n".join("#" + line if line.startswith("## ") else line for line in lines)
        out = MarkdownIt("commonmark", {"html": False}).enable("table").render(text)
        return (out.replace("<table>", '<div class="table-wrap"><table class="sortable">')
                .replace("</table>", "</table></div>"))

    def table(self, df: pd.DataFrame) -> str:
        return self.markdown([markdown_table(df)])

    @staticmethod
    def figure(fig: Any, caption: str) -> str:
        """A matplotlib figure as an embedded PNG (the figure is closed)."""
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=FIGURE_DPI, bbox_inches="tight")
        plt.close(fig)
        return _image(buf.getvalue(), caption)

    def plotly_figure(self, fig: Any, caption: str) -> str:
        """An interactive plotly figure (plotly.js is embedded once, in the page head)."""
        import plotly.io as pio

        self.plotly = True
        div = pio.to_html(fig, full_html=False, include_plotlyjs=False, config={"displaylogo": False})
        return f"<figure>{div}<figcaption>{html.escape(caption)}</figcaption></figure>"


def _image(png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _not_run(text: str) -> str:
    return f'<p class="not-run">{text}</p>'


def data_html(page: _Page, exp: Experiment) -> str:
    """The data report's warnings (and the explanations' shortcut warning): they qualify every number below."""
    return page.markdown(shortcut_warning(exp.path) + data_section(exp))


def search_html(page: _Page, exp: Experiment, n_resamples: int) -> str:
    """The ranked trials beside the study, accuracy intervals, time against accuracy, learning curves with
    ASHA's stops, and Optuna's importances and parallel coordinates."""
    results = exp.results("search")
    if results.empty:
        return _not_run(f"The search has not run yet: no trial in {html.escape(str(exp.path))}. "
                        f"Continue it with <code>cxr-search resume {html.escape(str(exp.path))}</code>.")
    parts = [page.markdown(search_section(exp, n_resamples))]
    intervals = accuracy_intervals(exp, n_resamples)
    if len(intervals):
        parts.append(page.figure(figures.accuracy_intervals(intervals),
                                 "Test accuracy of the trials above with 95% stratified bootstrap intervals; red "
                                 "diamonds: the study's reported figure for the same backbone or variant."))
    if "wall_time_s" in results and results["wall_time_s"].notna().any():
        parts.append(page.figure(figures.time_vs_accuracy(results),
                                 "Training time of each trial against its accuracy (validation at the best epoch, "
                                 "test of the best-validation weights)."))
    histories = trial_histories(results)
    if len(histories):
        parts.append(page.figure(figures.learning_curves(histories, results, exp.objective.metric),
                                 "Validation curves of every trial; the marker at the end says how it ended (red X: "
                                 "stopped by ASHA)."))
    else:
        parts.append(_not_run("No trial folder holds a per-epoch history (history.jsonl): no learning curves."))
    parts.append(_optuna_html(page, exp))
    return "\n".join(parts)


def _optuna_html(page: _Page, exp: Experiment) -> str:
    import optuna
    import optuna.visualization as ov

    study = exp.study()
    if study is None:
        return _not_run(f"No Optuna study in {exp.journal.name}: this space used the "
                        f"{html.escape(str(exp.plan.space.searcher))} searcher, so there are no parameter "
                        "importances.")
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    head = (f"<h3>Optuna study '{html.escape(study.study_name)}'</h3><p>{len(study.trials)} trials, "
            f"{len(complete)} completed (ASHA's stops are PRUNED and left out of these figures). Live view: "
            f"<code>optuna-dashboard {html.escape(str(exp.journal))}</code>.</p>")
    if len(complete) < MIN_TRIALS_FOR_IMPORTANCE:
        return head + _not_run(f"Parameter importances need at least {MIN_TRIALS_FOR_IMPORTANCE} completed trials; "
                               f"this study has {len(complete)}.")
    return "\n".join([head,
                      page.plotly_figure(ov.plot_param_importances(study),
                                         "Optuna: parameter importances (fANOVA) for the objective."),
                      page.plotly_figure(ov.plot_parallel_coordinate(study),
                                         "Optuna: parallel coordinates of the completed trials."),
                      page.plotly_figure(ov.plot_intermediate_values(study),
                                         "Optuna: the objective per epoch of every trial, pruned ones included.")])


def seeds_html(page: _Page, exp: Experiment) -> str:
    """The retrained seeds' distributions, percentiles and CI of the mean beside the study's 50-run mean."""
    from cxr_search.retrain import finished_runs

    runs, summary = finished_runs(exp), seed_summary(exp)
    if runs.empty or summary.empty:
        return _not_run(f"The retrain stage has not run: <code>cxr-search retrain {html.escape(str(exp.path))} "
                        "--seeds 50</code> retrains the best configuration over seeds.")
    fig = figures.seed_distribution(runs, summary, study_summary("variant7_mean_of_50_runs"))
    return page.markdown(retrain_section(exp)) + page.figure(
        fig, "Test metrics of the retrained seeds; band: 95% CI of the mean; dashed: the study's mean of 50 runs.")


def ensemble_html(page: _Page, exp: Experiment) -> str:
    """The ensemble against the study and each member (paired intervals), confusion matrices, reliability."""
    ens = ensemble_predictions(exp.path)
    if ens is None:
        return _not_run(f"The ensemble stage has not run: <code>cxr-search ensemble {html.escape(str(exp.path))}"
                        "</code> builds it from the finished trials.")
    members = member_comparison(ens)
    table = pd.DataFrame({
        "member": members["trial_id"], "weight": [fmt(w, 3) for w in members["weight"]],
        "member test acc": [fmt(a) for a in members["member_acc"]],
        "ensemble test acc": [fmt(a) for a in members["ensemble_acc"]],
        "ensemble minus member (paired 95% CI)": [fmt_ci(g, lo, hi) for g, lo, hi in
                                                  zip(members["gain"], members["gain_lo"], members["gain_hi"],
                                                      strict=True)]})
    probs = {f"member {m.trial_id}": m.test_probs for m in ens.members}
    probs["ensemble"] = ens.test_probs
    classes = tuple(ens.description["classes"])
    return "\n".join([
        page.markdown(ensemble_section(exp)),
        "<h3>Members against the ensemble</h3>", page.table(table),
        page.figure(figures.confusion_matrices(ens.test_labels, probs, classes),
                    "Test confusion matrices (rows: true class, columns: predicted) of each member and the ensemble."),
        page.figure(figures.reliability(ens.test_labels, {
            "before temperature scaling": ens.test_probs_uncalibrated,
            f"after (T = {ens.temperature:.3f})": ens.test_probs}),
            "Reliability of the ensemble on test (15 equal-width bins of the top-class probability), before and "
            "after the temperature fitted on validation."),
    ])


def explanations_html(page: _Page, exp: Experiment) -> str:
    """Faithfulness of the explanations on phantom lesion masks, and the saved contact sheets."""
    faithfulness = explanations_section(exp.path)
    parts = [page.markdown(faithfulness)] if faithfulness else []
    for sheet in explain_sheets(exp.path):
        parts.append(_image(sheet.read_bytes(), f"Explanations: {sheet.name}"))
    if not parts:
        return _not_run(f"Explanations have not been evaluated: <code>cxr-search explain "
                        f"{html.escape(str(exp.path))} --evaluate</code> scores them on phantom lesion masks.")
    return "\n".join(parts)


def build_report(exp_dir: str | Path, *, n_resamples: int = 1000) -> str:
    """The whole report as one HTML document (figures and scripts embedded).

    Args:
        exp_dir: the experiment folder; stages that have not run say so in their section.
        n_resamples: bootstrap resamples for the per-trial test intervals.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    exp = Experiment.open(exp_dir)
    page = _Page()
    builders: dict[str, Callable[[], str]] = {
        "data": lambda: data_html(page, exp), "search": lambda: search_html(page, exp, n_resamples),
        "seeds": lambda: seeds_html(page, exp), "ensemble": lambda: ensemble_html(page, exp),
        "explanations": lambda: explanations_html(page, exp)}
    body = [f'<section id="{key}"><h2>{title}</h2>\n{builders[key]()}\n</section>' for key, title in SECTIONS]
    plan = exp.plan
    notes = "".join(f'<p class="note">{html.escape(n)}</p>' for n in plan.notes)
    nav = " ".join(f'<a href="#{key}">{title}</a>' for key, title in SECTIONS)
    head_script = ""
    if page.plotly:
        from plotly.offline import get_plotlyjs

        head_script = f'<script type="text/javascript">{get_plotlyjs()}</script>'
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>cxr-search report: {html.escape(plan.name)}</title><style>{_STYLE}</style>{head_script}</head>",
        "<body><header>", f"<h1>cxr-search report: {html.escape(plan.name)}</h1>",
        f"<p>{html.escape(str(exp.path))}<br>Budget {html.escape(plan.budget)}; stages planned: "
        f"{html.escape(', '.join(plan.stages))}; done: {html.escape(', '.join(plan.completed) or 'none')}"
        f"{html.escape(_run_on_their_own(exp))}; "
        f"objective: {html.escape(exp.objective.describe())}. Written "
        f"{dt.datetime.now().isoformat(timespec='seconds')}.</p>",
        notes, f"<nav>{nav}</nav></header><main>", *body, "</main>",
        f"<script>{_SORT_SCRIPT}</script></body></html>"])


def _run_on_their_own(exp: Experiment) -> str:
    """'; also run on their own: ...' for stages outside the plan whose outputs exist (`cxr-search retrain` or
    `ensemble` after a run), so the header does not contradict the sections below it."""
    found = {"retrain": not seed_summary(exp).empty, "ensemble": read_ensemble(exp.path) is not None}
    extra = [s for s, there in found.items() if there and s not in exp.plan.completed]
    return f"; also run on their own: {', '.join(extra)}" if extra else ""


def write_report(exp_dir: str | Path, out: str | Path | None = None, *, n_resamples: int = 1000) -> storage.Location:
    """Write the HTML report atomically and return its path.

    Args:
        exp_dir: the experiment folder.
        out: the HTML file (a folder gets `report.html` inside); default `EXP/report.html`.
        n_resamples: bootstrap resamples for the per-trial test intervals.
    """
    path = storage.path(exp_dir) / REPORT_FILE if out is None else Path(out) / REPORT_FILE if Path(out).is_dir() else Path(out)
    return storage.atomic_write_text(path, build_report(exp_dir, n_resamples=n_resamples))
