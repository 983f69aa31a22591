"""The `cxr-search` command line: each command is a few lines of glue over the library."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from cxr_search.errors import CxrError
from cxr_search.io import storage

app = typer.Typer(
    name="cxr-search",
    help="Distributed hyperparameter search for chest X-ray classification (COVID19 / PNEUMONIA / NORMAL).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Generate, check and inspect data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
weights_app = typer.Typer(help="Stage ImageNet weights once, so runs with `pretrained: imagenet` work offline.",
                          no_args_is_help=True)
app.add_typer(weights_app, name="weights")

# Logs and pipes get 160 columns (rich would wrap the study tables at 80); a terminal keeps its own width.
console = Console(width=None if sys.stdout.isatty() else 160)


def writable(path: Path | None, option: str, *, folder: bool = False) -> Path | None:
    """Refuse, before any work, an output the command could not write (one line naming the option).

    Probes by creating and deleting a temporary file in the deepest folder that exists, the same operation the
    atomic writers do, so read-only mounts, /proc and permission problems are caught, not guessed.

    Args:
        path: the output the user named (None: nothing to check).
        option: the option, for the message (`--json`).
        folder: the output is a folder (else a file).
    """
    import tempfile

    if path is None:
        return None
    target = path.expanduser()
    if not folder and target.is_dir():
        raise CxrError(f"{option} {path} is a folder; give a file name (e.g. {target / 'report.json'}).")
    if folder and target.exists() and not target.is_dir():
        raise CxrError(f"{option} {path} is a file; give a folder.")
    base = target if folder else target.parent
    existing = next(p for p in (base, *base.parents) if p.exists())
    if not existing.is_dir():
        raise CxrError(f"{option} {path}: {existing} is a file, not a folder; pick another path.")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise CxrError(f"{option} {path}: cannot write in {existing} ({e.strerror or e}); pick a folder you can "
                       "write to.") from None
    return path


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(..., "--out", help="Folder to write the phantom data set to (Kaggle layout)."),
    n_images: int = typer.Option(6432, "--n-images", help="Number of images (the Kaggle set has 6,432)."),
    size: int = typer.Option(256, "--size", help="Nominal image size in pixels (sizes vary around it)."),
    seed: int = typer.Option(0, "--seed", help="Random seed: same seed, same bytes."),
    difficulty: str = typer.Option("mixed", "--difficulty", help="easy | mixed | hard: lesion severity mix."),
    inject: str = typer.Option(
        "", "--inject", help="Comma-separated failure modes to inject: duplicates (re-exported copies, the transform "
        "in manifest.csv), confounder (marker on COVID19), corrupt (bad files), source (NORMAL from another hospital)."
    ),
) -> None:
    """Write seeded procedural chest X-ray phantoms with lesion masks and a manifest."""
    from cxr_search.data import phantoms

    writable(out, "--out", folder=True)
    injections = tuple(s.strip() for s in inject.split(",") if s.strip())
    summary = phantoms.generate(
        out, n_images=n_images, size=size, seed=seed, difficulty=difficulty, inject=injections, progress=True
    )
    phantoms.print_summary(summary, console)


@data_app.command("check")
def data_check(
    data_dir: Path = typer.Argument(..., help="Data folder (Kaggle or flat class folders) or a CSV manifest."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the report as JSON to this file."),
    strict: bool = typer.Option(
        False, "--strict", help="Exit 1 on any duplicate pair (within or across splits), patient shared across "
        "splits or label conflict."),
    workers: int | None = typer.Option(None, "--workers", help="Decoding processes (default: all cores)."),
) -> None:
    """Decode every image and report unusable files, sizes, formats, duplicates, label conflicts, patient leakage,
    quality flags, source shortcuts and whether the set can be split."""
    from cxr_search.data import integrity

    writable(json_out, "--json")  # before the (long) check, not after it
    report = integrity.check(data_dir, workers=workers, progress=True)
    integrity.print_report(report, console)
    if json_out is not None:
        report.write_json(json_out)
    if strict and report.strict_failures:
        raise typer.Exit(1)


@weights_app.command("fetch")
def weights_fetch(
    backbones: str = typer.Option("all", "--backbones", help="Comma-separated backbones, or 'all' (all but cnn3)."),
    to: Path = typer.Option(None, "--to", help="Folder to stage into (default $CXR_SEARCH_WEIGHTS or <cache>/weights)."),
    force: bool = typer.Option(False, "--force", help="Download again where weights are already staged."),
) -> None:
    """Download each backbone's ImageNet weights once (needs internet); runs then read them offline."""
    from cxr_search.io import paths
    from cxr_search.models import fetch as staging

    writable(to, "--to", folder=True)
    names = None if backbones.strip() == "all" else [b.strip() for b in backbones.split(",") if b.strip()]
    staged = staging.fetch(names, root=to, force=force)
    _print_weights(staged, f"ImageNet weights in {to or paths.weights_dir()}")
    if to is not None and Path(to).expanduser().resolve() != paths.weights_dir().resolve():
        console.print(f"runs read {paths.weights_dir()}: copy {to}'s contents there, or set "
                      f"{paths.WEIGHTS_ENV}={Path(to).expanduser().resolve()} (on every node of a cluster).")


@weights_app.command("list")
def weights_list(
    folder: Path = typer.Option(None, "--dir", help="Weights folder (default $CXR_SEARCH_WEIGHTS or <cache>/weights)."),
) -> None:
    """Which backbones have ImageNet weights staged (reads no weights, needs no network)."""
    from cxr_search.io import paths
    from cxr_search.models import weights

    if folder is not None and not folder.expanduser().is_dir():
        raise CxrError(f"--dir {folder}: no such folder; leave --dir out for {paths.weights_dir()}, or give the "
                       "folder `cxr-search weights fetch --to` wrote.")
    _print_weights(weights.list_staged(folder), f"ImageNet weights in {folder or paths.weights_dir()}")


def _print_weights(staged: list, title: str) -> None:
    from rich.table import Table

    table = Table(title=title)
    for name in ("backbone", "weights", "status", "MB"):
        table.add_column(name, justify="right" if name == "MB" else "left")
    for s in staged:
        tag = s.tag or "none (trained from scratch: use pretrained: none)"
        table.add_row(s.backbone, tag, s.status, f"{s.megabytes:.0f}" if s.megabytes else "")
    console.print(table)


@app.command("run")
def run(
    space: str = typer.Argument("inception", help="Search space: a name in search_spaces/ or a YAML path."),
    data: Path = typer.Option(None, "--data", help="X-ray folder (Kaggle layout, class folders or CSV); default: phantoms."),
    name: str = typer.Option(None, "--name", help="Experiment name (default <space>-<timestamp>)."),
    num_samples: int = typer.Option(None, "--num-samples", help="Trials to sample (per grid point)."),
    max_epochs: int = typer.Option(None, "--max-epochs", help="Epoch budget per trial (also ASHA's max_t)."),
    smoke: bool = typer.Option(False, "--smoke", help="A few tiny trials: checks the pipeline in about a minute."),
    full: bool = typer.Option(False, "--full", help="Run the space as written even without a GPU (no CPU budget)."),
    address: str = typer.Option(None, "--address", help="Ray cluster: 'auto' (after `ray up`) or ray://host:10001."),
    storage: str = typer.Option(None, "--storage", help="Experiments root folder (on a cluster: one every node can read, e.g. NFS)."),
    gpus_per_trial: str = typer.Option(None, "--gpus-per-trial", help="'auto' (from backbone memory) or a fraction."),
    seed: int = typer.Option(None, "--seed", help="Seed of the searcher and the trials."),
    stages: str = typer.Option("search,retrain,ensemble", "--stages", help="Stages to run, comma-separated."),
    top_k: int = typer.Option(None, "--top-k", help="Configurations to retrain / ensemble members."),
    seeds: int = typer.Option(None, "--seeds", help="Seeds per retrained configuration."),
    resplit: bool = typer.Option(False, "--resplit", help="Pool train and test, re-split train/val/test by patient."),
) -> None:
    """Search a space with Ray Tune (Optuna + ASHA), then retrain the best, ensemble and summarise."""
    from cxr_search.io import paths
    from cxr_search.pipeline import run_pipeline

    if storage is None or "://" not in storage:  # a remote URI is checked by the plan
        writable(Path(storage) if storage else paths.experiments_root(), "--storage", folder=True)
    run_pipeline(space, data_dir=data, name=name, num_samples=num_samples, max_epochs=max_epochs, smoke=smoke, full=full,
                 address=address, storage=storage, gpus_per_trial=gpus_per_trial, seed=seed,
                 stages=tuple(s.strip() for s in stages.split(",") if s.strip()), top_k=top_k, seeds=seeds,
                 resplit=resplit, console=console)


@app.command("resume")
def resume(
    exp: str = typer.Argument(..., help="Experiment folder (or s3://... URI) of an interrupted `cxr-search run`."),
    address: str = typer.Option(None, "--address", help="Ray cluster to resume on (default: as the run)."),
) -> None:
    """Continue an interrupted run: unfinished and errored trials resume from their checkpoints."""
    from cxr_search.pipeline import resume_pipeline

    resume_pipeline(exp, console=console, address=address)


@app.command("status")
def status(exp: str = typer.Argument(..., help="Experiment folder (or s3://... URI).")) -> None:
    """Trials of an experiment, read from its folder (no Ray needed; works while a search runs)."""
    from cxr_search.report.status import print_status

    print_status(exp, console)


@app.command("retrain")
def retrain(
    exp: str = typer.Argument(..., help="Experiment folder (or s3://... URI) written by `cxr-search run`."),
    top: int = typer.Option(1, "--top", help="Distinct configurations to retrain, best validation metric first."),
    seeds: int = typer.Option(50, "--seeds", help="Seeds per configuration (0..N-1); finished seeds are kept."),
    max_epochs: int = typer.Option(None, "--max-epochs", help="Epoch budget per run (default: the search's)."),
    address: str = typer.Option(None, "--address", help="Ray cluster (default: as the experiment ran)."),
) -> None:
    """Retrain the search's best configurations over many seeds on the same splits; summarise the spread."""
    from cxr_search.pipeline import retrain_experiment

    retrain_experiment(exp, top_k=top, seeds=seeds, max_epochs=max_epochs, address=address, console=console)
    _show_stage(exp, "retrain", "results.parquet, summary.csv, distribution.png")


@app.command("ensemble")
def ensemble(
    exp: str = typer.Argument(..., help="Experiment folder (or s3://... URI)."),
    top: int = typer.Option(3, "--top", help="Members: the best models by validation metric."),
    source: str = typer.Option(
        "search", "--from", help="search (top distinct trials, as the study and `run` do) | retrain (a seed ensemble)."
    ),
    weights: str = typer.Option("uniform", "--weights", help="uniform | val (by validation accuracy)."),
    calibrate: bool = typer.Option(True, "--calibrate/--no-calibrate", help="Temperature scaling on validation."),
) -> None:
    """Soft-voting ensemble of finished models (no retraining), evaluated on test with bootstrap intervals."""
    from cxr_search.ensemble import build_ensemble

    build_ensemble(exp, top_k=top, source=source, weights=weights, calibrate=calibrate)
    _show_stage(exp, "ensemble", "ensemble.json, metrics.csv, confusion_matrix.png")


def _show_stage(exp: str, stage: str, files: str) -> None:
    """After a stage run on its own: rewrite summary.md, print the stage's section and where its files are."""
    from cxr_search.experiment.folder import Experiment
    from cxr_search.report.summary import (
        ensemble_section,
        print_markdown,
        retrain_section,
        write_summary,
    )

    write_summary(exp)
    section = retrain_section if stage == "retrain" else ensemble_section
    print_markdown(section(Experiment.open(exp)), console)
    console.print(f"saved: {storage.path(exp) / stage} ({files})", highlight=False)


@app.command("report")
def report_command(
    exp: str = typer.Argument(..., help="Experiment folder (or s3://... URI)."),
    out: Path = typer.Option(None, "--out", help="HTML file to write (default EXP/report.html)."),
) -> None:
    """One self-contained HTML report: data warnings, search, seeds, ensemble, explanations (opens offline)."""
    from cxr_search.report import html as html_report

    if out is not None:
        writable(out, "--out")
    path = html_report.write_report(exp, out)
    console.print(f"saved: {path} (self-contained: open it in any browser, nothing is fetched)", highlight=False)


@app.command("train")
def train(
    backbone: str = typer.Option(..., "--backbone", help="cnn3, alexnet, vgg16, vgg19, resnet34, resnet50, inception_v3, xception, densenet121."),
    data: Path = typer.Option(None, "--data", help="X-ray folder (Kaggle layout, class folders or CSV); default: phantoms."),
    size: int = typer.Option(None, "--size", help="Image side in pixels (default 128; 64 with --smoke)."),
    epochs: int = typer.Option(None, "--epochs", help="Maximum epochs; early stopping on val loss (default 100; 2 with --smoke)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Training batch size."),
    optimizer: str = typer.Option("rmsprop", "--optimizer", help="sgd | rmsprop | adam | adamw."),
    lr: float = typer.Option(1e-3, "--lr", help="Learning rate."),
    freeze_fraction: float = typer.Option(0.0, "--freeze-fraction", help="Fraction of the backbone frozen, 0..1."),
    head: str = typer.Option("linear", "--head", help="linear | dense | dense_dropout."),
    regularizer: str = typer.Option("none", "--regularizer", help="none | l1 | l2 | l1_l2 (Keras-style, strength 0.1)."),
    pretrained: str = typer.Option("none", "--pretrained", help="none, imagenet (staged by `weights fetch`), a local weights file/folder, or a timm tag."),
    seed: int = typer.Option(0, "--seed", help="Seed of weights, batches and augmentation."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    out: Path = typer.Option(None, "--out", help="Checkpoint folder (default $CXR_SEARCH_EXPERIMENTS or experiments/, train-<backbone>-<time>)."),
    smoke: bool = typer.Option(False, "--smoke", help="Tiny phantom set, 64 px, 2 epochs: runs in seconds on a CPU."),
    resplit: bool = typer.Option(False, "--resplit", help="Pool train and test, re-split train/val/test by patient."),
) -> None:
    """Train one model without Ray, then print the study's summary columns and save the model folder."""
    from cxr_search import train_one as single
    from cxr_search.config import TrialConfig
    from cxr_search.io import paths

    for option, value in (("--epochs", epochs), ("--size", size)):
        if value is not None and value < 1:
            raise CxrError(f"{option} must be >= 1, got {value} (leave it out for the default).")
    writable(out or paths.experiments_root(), "--out", folder=True)
    epochs = epochs if epochs is not None else (single.SMOKE_EPOCHS if smoke else 100)
    size = size if size is not None else (single.SMOKE_SIZE if smoke else 128)
    cfg = TrialConfig.from_dict(
        dict(backbone=backbone, max_epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr,
             freeze_fraction=freeze_fraction, head=head, regularizer=regularizer, pretrained=pretrained, seed=seed,
             device=device), source="cxr-search train")
    single.check(cfg)  # device, weights (staged, readable) before any data work; never downloads
    for note in single.notes(cfg, size):
        console.print(f"[yellow]note:[/] {note}")
    run = single.train_model(cfg, data_dir=data, size=size, resplit=resplit, out=out, smoke=smoke)
    single.print_run(run, console)


@app.command("predict")
def predict_command(
    model: str = typer.Argument(..., help="Experiment folder (its ensemble; or s3://... URI), an ensemble.json, or a checkpoint folder."),
    inputs: list[Path] = typer.Argument(..., help="Image files and folders (walked recursively)."),
    out: Path = typer.Option(None, "--out", help="Also write the rows as CSV to this file."),
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON (a list of objects) instead of a table."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
) -> None:
    """Class probabilities for new X-rays, preprocessed exactly as the model's training images; exit 1 if any file failed."""
    import json

    from rich.table import Table

    from cxr_search import predict

    writable(out, "--out")
    predictor = predict.load(model, device=device)
    files = predict.list_inputs(inputs)
    if not files:
        raise CxrError(f"no image files in {', '.join(map(str, inputs))}; pass PNG, JPEG, BMP, TIFF or DICOM files.")
    table = predict.predict_files(predictor, files, progress=not as_json)
    if out is not None:
        predict.write_predictions(table, out)
    failed = int((table["error"] != "").sum())
    if as_json:
        print(json.dumps(json.loads(table.to_json(orient="records")), indent=1))
    else:
        shown = Table(caption=f"{len(table) - failed} predicted, {failed} unusable; {predictor.describe()}")
        for col in table.columns:
            shown.add_column(col, justify="right" if col.startswith("p_") else "left", overflow="fold")
        for row in table.itertuples(index=False):
            shown.add_row(*("" if isinstance(v, float) and v != v else f"{v:.4f}" if isinstance(v, float) else str(v)
                            for v in row))
        console.print(shown)
    if out is not None and not as_json:
        console.print(f"saved: {out}", highlight=False)
    if failed:
        raise typer.Exit(1)


@app.command("explain")
def explain_command(
    model: Path = typer.Argument(..., help="Experiment folder (its ensemble), an ensemble.json, or a checkpoint folder."),
    images: list[Path] = typer.Argument(None, help="Image files and folders to explain (not with --evaluate)."),
    method: str = typer.Option(None, "--method", help="gradcam | hirescam | lime (default gradcam; with --evaluate a comma-separated list, default all)."),
    out: Path = typer.Option(None, "--out", help="Output folder (default ./explanations); --evaluate writes EXP/explain."),
    samples: int = typer.Option(1000, "--samples", help="LIME: perturbed images per explanation."),
    seed: int = typer.Option(0, "--seed", help="LIME sampling and image draw seed."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    evaluate: bool = typer.Option(False, "--evaluate", help="Faithfulness on phantom lesion masks, and the shortcut probe."),
    n: int = typer.Option(100, "--n", help="--evaluate: test images with a lesion to score (at most)."),
    data: Path = typer.Option(None, "--data", help="--evaluate: the phantom data folder (default: the experiment's)."),
) -> None:
    """Grad-CAM / HiResCAM / LIME maps as overlays, raw .npy maps and a contact sheet; or --evaluate their faithfulness."""

    from cxr_search import explain, predict
    from cxr_search.report.summary import (
        explanations_section,
        print_markdown,
        write_summary,
    )

    writable(out, "--out", folder=True)
    if not evaluate and not images:
        raise CxrError("name the images to explain (files or folders), or pass --evaluate.")
    if evaluate:
        methods = explain.check_methods([m.strip() for m in method.split(",")] if method else list(explain.METHODS))
    else:
        methods = explain.check_methods([method or "gradcam"])  # one method per call without --evaluate
    if evaluate:
        from cxr_search.experiment.folder import Experiment

        exp = Experiment.open(model)  # --evaluate writes EXP/explain/ and summary.md: an experiment folder
    predictor = predict.load(model, device=device)
    if not evaluate:
        files = predict.list_inputs(images)
        chosen = methods[0]
        folder = out or Path("explanations")
        table = explain.explain_files(predictor, files, chosen, folder, samples=samples, seed=seed)
        failed = int((table["error"] != "").sum())
        console.print(f"{len(table) - failed} explained, {failed} unusable: {folder} (overlays, .npy maps, "
                      f"contact_sheet.{chosen}.png, explanations.{chosen}.csv)", highlight=False)
        if failed:
            raise typer.Exit(1)
        return
    if data is not None:
        from cxr_search.data.prepare import prepare

        prepared = prepare(data, size=predictor.preprocessing.size, equalize=predictor.preprocessing.equalize)
    else:
        prepared = exp.plan.data.prepare()
    table, probe = explain.evaluate_faithfulness(
        predictor, prepared.test.images, prepared.test.labels, prepared.test.paths, n=n, methods=methods,
        samples=samples, seed=seed, progress=True)
    folder = explain.write_faithfulness(model, table, probe, {
        "model": predictor.describe(), "n": n, "methods": list(methods), "samples": samples, "seed": seed,
        "split": "test", "data": str(data) if data is not None else "the experiment's"})
    write_summary(model)
    print_markdown(explanations_section(model), console)
    console.print(f"saved: {folder / explain.FAITHFULNESS_CSV}", highlight=False)


def main() -> None:
    """Console entry point: one error path for every command.

    - A usage error (unknown command or option, a missing or malformed value) prints the usage line, the help
      hint and one `error:` line; a `CxrError` (bad input the user can fix) prints one `error:` line. Both exit 2.
    - Anything else is a bug or an environment failure: one line naming the log file that holds the traceback,
      exit 1.
    - SIGINT (Ctrl-C) and SIGTERM stop a running stage cleanly: its state is saved, nothing is marked complete
      that is not, and the process exits 130 / 143 with the command that continues it.
    """
    from cxr_search.interrupt import StageInterrupted, interruptible

    click_errors = _click_exceptions()
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    command = typer.main.get_command(app)
    try:
        with interruptible():
            rc = command.main(args=sys.argv[1:], prog_name="cxr-search", standalone_mode=False)
    except StageInterrupted as e:
        hint = f"; continue with `cxr-search resume {e.experiment}`" if e.experiment else ""
        err.print(f"stopped by {e}: the finished work is saved{hint}", markup=False)
        sys.exit(128 + e.signum)
    except CxrError as e:
        _print_error(err, str(e))
        sys.exit(2)
    except click_errors.UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `cxr-search` or `cxr-search data` alone: typer printed help
            sys.exit(2)
        if e.ctx is not None:
            err.print(e.ctx.get_usage(), markup=False)
            err.print(f"Try '{e.ctx.command_path} --help' for help.", markup=False)
        _print_error(err, e.format_message())
        sys.exit(2)
    except click_errors.ClickException as e:  # e.g. a file typer could not open: the user's to fix
        _print_error(err, e.format_message())
        sys.exit(2)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - the last resort: one line and the traceback in a file
        log = _write_traceback(e)
        where = f"the traceback is in {log}" if log else "the traceback could not be saved"
        _print_error(err, f"internal error ({type(e).__name__}: {' '.join(str(e).split())[:300]}); {where}. "
                          "Please report it with that file.")
        sys.exit(1)
    sys.exit(rc if isinstance(rc, int) else 0)


def _click_exceptions() -> Any:
    """The click exception classes typer raises: its vendored copy (typer >= 0.22), else click's own."""
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions
    return exceptions


def _print_error(err: Console, message: str) -> None:
    from rich.markup import escape

    err.print(f"[bold red]error:[/] {escape(' '.join(message.split()))}")


def _write_traceback(error: BaseException) -> Path | None:
    """Save an unexpected error's traceback under `<cache>/logs/` (the temp folder if the cache is unwritable)."""
    import tempfile
    import time
    import traceback

    from cxr_search import __version__
    from cxr_search.io import paths

    text = (f"cxr-search {__version__}\ncommand: {' '.join(['cxr-search', *sys.argv[1:]])}\n"
            f"time: {time.strftime('%Y-%m-%d %H:%M:%S')}\n\n"
            + "".join(traceback.format_exception(type(error), error, error.__traceback__)))
    name = f"error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    for folder in (lambda: paths.cache_root() / "logs", lambda: Path(tempfile.gettempdir())):
        try:
            path = folder() / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            return path
        except OSError:
            continue
    return None


if __name__ == "__main__":
    main()
