"""Top-level commands: pretrain, train, evaluate, predict, textmap, export, demo."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Attach the top-level commands to `app`."""
    @app.command()
    def version() -> None:
        """Print the dusss version."""
        from dusss import __version__

        typer.echo(__version__)
