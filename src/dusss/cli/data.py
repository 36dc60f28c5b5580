"""`dusss data ...` commands (filled in by the data module owner)."""

import typer

data_app = typer.Typer(help="Prepare, import, verify and split datasets.", no_args_is_help=True)
