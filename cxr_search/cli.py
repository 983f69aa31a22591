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

console = Console()


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(..., "--out", help="Folder to write the phantom data set to (Kaggle layout)."),
    n_images: int = typer.Option(6432, "--n-images", help="Number of images (the Kaggle set has 6,432)."),
    size: int = typer.Option(256, "--size", help="Nominal image size in pixels (sizes vary around it)."),
    seed: int = typer.Option(0, "--seed", help="Random seed: same seed, same bytes."),
    difficulty: str = typer.Option("mixed", "--difficulty", help="easy | mixed | hard: lesion severity mix."),
    inject: str = typer.Option(
        "", "--inject", help="Comma-separated failure modes to inject: duplicates,confounder,corrupt."
    ),
) -> None:
    """Write seeded procedural chest X-ray phantoms with lesion masks and a manifest."""
    from cxr_search.data import phantoms

    injections = tuple(s.strip() for s in inject.split(",") if s.strip())
    summary = phantoms.generate(
        out, n_images=n_images, size=size, seed=seed, difficulty=difficulty, inject=injections, progress=True
    )
    phantoms.print_summary(summary, console)


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    command = typer.main.get_command(app)
    try:
        rc = command.main(args=sys.argv[1:], prog_name="cxr-search", standalone_mode=False)
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
