"""The `prism` command line (Typer) and everything it renders (rich tables, progress bars)."""

from prism_convert.cli.app import app, main  # noqa: F401
