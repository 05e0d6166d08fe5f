"""The `prism` command line. Thin: parse options, call the library function of the same name, render.

Heavy modules (torch, transformers-free model code) are imported inside commands so `prism --help` is instant.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

from prism_load import __version__
from prism_load.errors import PrismError

app = typer.Typer(
    name="prism",
    help="Convert sparse MoE checkpoints into mixed-precision .prism containers and run them on small hardware.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        console.print(f"prism {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """prism: spend precision, rank, bandwidth and locality where tokens actually go."""


def _not_yet(name: str) -> None:
    raise PrismError(f"'prism {name}' is not implemented yet")


@app.command()
def profile(model: Path = typer.Argument(..., help="Hugging Face checkpoint folder.")) -> None:
    """Run calibration data through the model layer by layer and record routing and activation statistics."""
    _not_yet("profile")


@app.command()
def compress(model: Path = typer.Argument(..., help="Hugging Face checkpoint folder.")) -> None:
    """Allocate bits and rank per expert from activation-weighted error, under a size budget."""
    _not_yet("compress")


@app.command()
def pack(work_dir: Path = typer.Argument(..., help="Output folder of prism compress.")) -> None:
    """Write a sharded .prism container with tier metadata."""
    _not_yet("pack")


@app.command()
def run(
    model: Path = typer.Argument(..., help="Checkpoint folder or .prism container."),
    prompt: str = typer.Option("def fibonacci(n):", "--prompt", "-p", help="Text to continue."),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", "-n", min=1),
) -> None:
    """Generate text, streaming tokens as they come."""
    from prism_convert.run import run_prompt

    run_prompt(model, prompt, max_new_tokens, console)


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2, no traceback."""
    try:
        app()
    except PrismError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
