"""The `cxr-search` command line: each command is a few lines of glue over the library."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import typer
from rich.console import Console

from cxr_search.errors import CxrError

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
    from cxr_search import paths, staging

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
    from cxr_search import paths, weights

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
    storage: str = typer.Option(None, "--storage", help="Experiments root: a path, or s3://... for a cluster."),
    gpus_per_trial: str = typer.Option(None, "--gpus-per-trial", help="'auto' (from backbone memory) or a fraction."),
    seed: int = typer.Option(None, "--seed", help="Seed of the searcher and the trials."),
    stages: str = typer.Option("search,retrain,ensemble", "--stages", help="Stages to run, comma-separated."),
    top_k: int = typer.Option(None, "--top-k", help="Configurations to retrain / ensemble members."),
    seeds: int = typer.Option(None, "--seeds", help="Seeds per retrained configuration."),
    resplit: bool = typer.Option(False, "--resplit", help="Pool train and test, re-split train/val/test by patient."),
) -> None:
    """Search a space with Ray Tune (Optuna + ASHA), then retrain the best, ensemble and summarise."""
    from cxr_search.search.pipeline import run_pipeline

    run_pipeline(space, data_dir=data, name=name, num_samples=num_samples, max_epochs=max_epochs, smoke=smoke, full=full,
                 address=address, storage=storage, gpus_per_trial=gpus_per_trial, seed=seed,
                 stages=tuple(s.strip() for s in stages.split(",") if s.strip()), top_k=top_k, seeds=seeds,
                 resplit=resplit, console=console)


@app.command("resume")
def resume(
    exp: Path = typer.Argument(..., help="Experiment folder of an interrupted `cxr-search run`."),
    address: str = typer.Option(None, "--address", help="Ray cluster to resume on (default: as the run)."),
) -> None:
    """Continue an interrupted run: unfinished and errored trials resume from their checkpoints."""
    from cxr_search.search.pipeline import resume_pipeline

    resume_pipeline(exp, console=console, address=address)


@app.command("status")
def status(exp: Path = typer.Argument(..., help="Experiment folder.")) -> None:
    """Trials of an experiment, read from its folder (no Ray needed; works while a search runs)."""
    from cxr_search.report import print_status

    print_status(exp, console)


@app.command("retrain")
def retrain(
    exp: Path = typer.Argument(..., help="Experiment folder written by `cxr-search run`."),
    top: int = typer.Option(1, "--top", help="Distinct configurations to retrain, best validation metric first."),
    seeds: int = typer.Option(50, "--seeds", help="Seeds per configuration (0..N-1); finished seeds are kept."),
    max_epochs: int = typer.Option(None, "--max-epochs", help="Epoch budget per run (default: the search's)."),
    address: str = typer.Option(None, "--address", help="Ray cluster (default: as the experiment ran)."),
) -> None:
    """Retrain the search's best configurations over many seeds on the same splits; summarise the spread."""
    from cxr_search import report
    from cxr_search.experiment import Experiment
    from cxr_search.search.retrain import retrain_experiment

    retrain_experiment(exp, top_k=top, seeds=seeds, max_epochs=max_epochs, address=address, console=console)
    report.write_summary(exp)
    report.print_markdown(report.retrain_section(Experiment.open(exp)), console)
    console.print(f"results: {exp / 'retrain'} (results.parquet, summary.csv, distribution.png)")


@app.command("ensemble")
def ensemble(
    exp: Path = typer.Argument(..., help="Experiment folder."),
    top: int = typer.Option(3, "--top", help="Members: the best models by validation metric."),
    source: str = typer.Option(
        "search", "--from", help="search (top distinct trials, as the study and `run` do) | retrain (a seed ensemble)."
    ),
    weights: str = typer.Option("uniform", "--weights", help="uniform | val (by validation accuracy)."),
    calibrate: bool = typer.Option(True, "--calibrate/--no-calibrate", help="Temperature scaling on validation."),
) -> None:
    """Soft-voting ensemble of finished models (no retraining), evaluated on test with bootstrap intervals."""
    from cxr_search import report
    from cxr_search.ensemble import build_ensemble
    from cxr_search.experiment import Experiment

    build_ensemble(exp, top_k=top, source=source, weights=weights, calibrate=calibrate)
    report.write_summary(exp)
    report.print_markdown(report.ensemble_section(Experiment.open(exp)), console)
    console.print(f"saved: {exp / 'ensemble'} (ensemble.json, metrics.csv, confusion_matrix.png)")


@app.command("report")
def report_command(
    exp: Path = typer.Argument(..., help="Experiment folder."),
    out: Path = typer.Option(None, "--out", help="HTML file to write (default EXP/report.html)."),
) -> None:
    """One self-contained HTML report: data warnings, search, seeds, ensemble, explanations (opens offline)."""
    from cxr_search import html_report

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
    from cxr_search import train as single
    from cxr_search.config import TrialConfig

    cfg = TrialConfig.from_dict(
        dict(backbone=backbone, max_epochs=epochs or (single.SMOKE_EPOCHS if smoke else 100), batch_size=batch_size,
             optimizer=optimizer, lr=lr, freeze_fraction=freeze_fraction, head=head, regularizer=regularizer,
             pretrained=pretrained, seed=seed, device=device), source="cxr-search train")
    single.check(cfg)  # staged weights before any data work; never downloads
    for note in single.notes(cfg):
        console.print(f"[yellow]note:[/] {note}")
    run = single.train_model(cfg, data_dir=data, size=size or (single.SMOKE_SIZE if smoke else 128), resplit=resplit,
                             out=out, smoke=smoke)
    single.print_run(run, console)


@app.command("predict")
def predict_command(
    model: Path = typer.Argument(..., help="Experiment folder (its ensemble), an ensemble.json, or a checkpoint folder."),
    inputs: list[Path] = typer.Argument(..., help="Image files and folders (walked recursively)."),
    out: Path = typer.Option(None, "--out", help="Also write the rows as CSV to this file."),
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON (a list of objects) instead of a table."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
) -> None:
    """Class probabilities for new X-rays, preprocessed exactly as the model's training images; exit 1 if any file failed."""
    import json

    from rich.table import Table

    from cxr_search import predict

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

    from cxr_search import explain, predict, report

    predictor = predict.load(model, device=device)
    if not evaluate:
        if not images:
            raise CxrError("name the images to explain (files or folders), or pass --evaluate.")
        files = predict.list_inputs(images)
        chosen = explain.check_methods([method or "gradcam"])[0]
        folder = out or Path("explanations")
        table = explain.explain_files(predictor, files, chosen, folder, samples=samples, seed=seed)
        failed = int((table["error"] != "").sum())
        console.print(f"{len(table) - failed} explained, {failed} unusable: {folder} (overlays, .npy maps, "
                      f"contact_sheet.{chosen}.png, explanations.{chosen}.csv)", highlight=False)
        if failed:
            raise typer.Exit(1)
        return
    from cxr_search.experiment import Experiment

    exp = Experiment.open(model)  # --evaluate writes EXP/explain/ and summary.md: an experiment folder
    methods = explain.check_methods([m.strip() for m in method.split(",")] if method else list(explain.METHODS))
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
    report.write_summary(model)
    report.print_markdown(report.explanations_section(model), console)
    console.print(f"saved: {folder / explain.FAITHFULNESS_CSV}", highlight=False)


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2, never a traceback.

    SIGINT (Ctrl-C) and SIGTERM stop a running stage cleanly: its state is saved, nothing is marked complete
    that is not, and the process exits 130 / 143 with the command that continues it.
    """
    from cxr_search.interrupt import StageInterrupted, interruptible

    command = typer.main.get_command(app)
    try:
        with interruptible():
            rc = command.main(args=sys.argv[1:], prog_name="cxr-search", standalone_mode=False)
    except StageInterrupted as e:
        hint = f"; continue with `cxr-search resume {e.experiment}`" if e.experiment else ""
        Console(stderr=True).print(f"stopped by {e}: the finished work is saved{hint}", highlight=False,
                                   soft_wrap=True)
        sys.exit(128 + e.signum)
    except CxrError as e:
        Console(stderr=True).print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except click.exceptions.Abort:
        Console(stderr=True).print("aborted")
        sys.exit(130)
    except click.ClickException as e:
        Console(stderr=True).print(f"[bold red]error:[/] {e.format_message()}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
