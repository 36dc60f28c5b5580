"""`dusss export`: the student U-Net of a training run to ONNX or TorchScript. Thin: parse, call the library."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def export(
    model: Annotated[Path, typer.Option(help="Run folder of `dusss train` or its model.safetensors.")],
    fmt: Annotated[str, typer.Option("--format", help="onnx | torchscript")],
    out: Annotated[Path, typer.Option(help="File to write (e.g. model.onnx); a JSON description goes beside it.")],
    opset: Annotated[int, typer.Option(help="ONNX opset (ignored for torchscript).")] = 17,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT (and its JSON) if they exist.")] = False,
) -> None:
    """Export the segmentation U-Net, with a JSON of its preprocessing (size, normalisation, threshold)."""
    from dusss.engine.export import export_model, sidecar_for

    written = export_model(model, fmt, out, opset=opset, overwrite=overwrite)
    typer.echo(f"{fmt.strip().lower()} model written to {written}")
    typer.echo(f"preprocessing written to {sidecar_for(written)}")


def register(app: typer.Typer) -> None:
    """Attach the export command to `app`."""
    app.command()(export)
