"""`dusss data ...`: synth, caption, import-lvit, verify, split (thin wrappers over dusss.data)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

data_app = typer.Typer(help="Prepare, import, verify and split datasets.", no_args_is_help=True)


@data_app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Output folder (manifest.csv, images/, masks/).")],
    n: Annotated[int, typer.Option("--n", help="Number of images (>= 3).")] = 64,
    size: Annotated[int, typer.Option("--size", help="Image side in pixels.")] = 128,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (same seed, same bytes).")] = 0,
    caption_style: Annotated[
        str, typer.Option("--caption-style", help="Reports: qata (full), laterality (4 coarse reports) or generic.")
    ] = "qata",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace manifest.csv and phantom_* files already in OUT.")
    ] = False,
) -> None:
    """Write the embedded phantom chest X-ray dataset with QaTa-style reports."""
    from dusss.data.synth import generate_phantoms

    manifest = generate_phantoms(out, n=n, size=size, seed=seed, caption_style=caption_style, overwrite=overwrite)
    typer.echo(f"wrote {n} phantoms ({size}x{size}) and {manifest}")


@data_app.command()
def caption(
    masks: Annotated[list[Path], typer.Argument(help="Binary mask files ({0,1} or {0,255}).")],
    style: Annotated[
        str, typer.Option("--style", help="qata (radiological: patient's left = image right), laterality or generic.")
    ] = "qata",
) -> None:
    """Print a report per mask from its regions (laterality, count, location): 'FILE<TAB>TEXT' lines.

    WARNING: texts derived from ground-truth masks describe the answer: never use them at test time.
    """
    from dusss.data.caption import caption_mask, check_caption_style
    from dusss.data.readers import read_mask

    check_caption_style(style, "--style")
    lines = [f"{m}\t{caption_mask(read_mask(m), style=style)}" for m in masks]
    typer.echo("\n".join(lines))


@data_app.command("import-lvit")
def import_lvit(
    src: Annotated[
        Path, typer.Argument(help="LViT dataset folder ({Train,Val,Test}_Folder/{img,labelcol}).")
    ],
    out: Annotated[Path, typer.Argument(help="Folder for manifest.csv (images are referenced, not copied).")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing OUT/manifest.csv.")] = False,
) -> None:
    """Convert an LViT-layout dataset into a manifest; warn about unmatched images, masks and texts."""
    from dusss.data.lvit import import_lvit as run_import

    report = run_import(src, out, overwrite=overwrite)
    counts = ", ".join(f"{k} {v}" for k, v in report.counts.items())
    typer.echo(f"wrote {report.manifest} ({counts})")
    for title, items in (
        ("image without text", report.images_without_text),
        ("text without image", report.texts_without_image),
        ("image without mask", report.images_without_mask),
        ("mask without image", report.masks_without_image),
    ):
        for item in items:
            typer.echo(f"warning: {title}: {item}", err=True)


@data_app.command()
def verify(manifest: Annotated[Path, typer.Argument(help="Manifest CSV to check.")]) -> None:
    """Check every row (files decode, sizes match, masks binary, texts present, splits non-empty)."""
    from dusss.data.verify import format_summary, verify_manifest

    report = verify_manifest(manifest)
    if report.problems:
        for line in report.problems:
            typer.echo(line, err=True)
        typer.echo(f"{len(report.problems)} problem(s) in {manifest}", err=True)
        raise typer.Exit(1)
    typer.echo(format_summary(report.summary))
    typer.echo("OK")


@data_app.command()
def split(
    manifest: Annotated[Path, typer.Argument(help="Manifest CSV.")],
    labeled: Annotated[float, typer.Option("--labeled", help="Fraction of train cases that keep masks.")],
    out: Annotated[Path, typer.Option("--out", help="Split JSON file to write.")],
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing split file.")] = False,
) -> None:
    """Write a deterministic labeled/unlabeled partition of the train split, grouped by case_id."""
    from dusss.data.manifest import read_manifest, record_files
    from dusss.data.splits import make_split, save_split

    records = read_manifest(manifest)
    result = make_split(records, labeled, seed, source=manifest)
    save_split(result, out, inputs=[("MANIFEST", manifest), *record_files(records)], overwrite=overwrite)
    sizes = ", ".join(f"{k} {len(result[k])}" for k in ("labeled", "unlabeled", "val", "test"))
    typer.echo(f"wrote {out} ({sizes})")
