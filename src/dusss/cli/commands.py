"""Top-level commands: pretrain, train, evaluate, predict, textmap, export, demo. Thin: parse, call the library."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Attach the top-level commands to `app`."""

    @app.command()
    def version() -> None:
        """Print the dusss version."""
        from dusss import __version__

        typer.echo(__version__)

    @app.command()
    def pretrain(
        data: Path = typer.Option(..., help="Manifest CSV (image,mask,text,split,case_id)."),
        out: Path = typer.Option(..., help="Run folder to write."),
        method: str | None = typer.Option(None, help="dusss | amvlm | clip (default dusss)."),
        config: Path | None = typer.Option(None, help="YAML config (see configs/)."),
        epochs: int | None = typer.Option(None),
        batch_size: int | None = typer.Option(None),
        image_size: int | None = typer.Option(None),
        lr: float | None = typer.Option(None),
        device: str | None = typer.Option(None, help="auto | cpu | cuda | cuda:N"),
        precision: str | None = typer.Option(None, help="fp32 | bf16 | fp16"),
        channels_last: bool | None = typer.Option(None, "--channels-last/--no-channels-last",
                                                  help="channels_last memory format for the image encoder."),
        grad_accum: int | None = typer.Option(None, help="Micro-batches per optimizer step (negatives stay per micro-batch)."),
        compile_model: bool | None = typer.Option(None, "--compile/--no-compile", help="torch.compile the image encoder."),
        num_workers: int | None = typer.Option(None, help="DataLoader worker processes."),
        seed: int | None = typer.Option(None),
        image_encoder: str | None = typer.Option(None, help="vit | efficientnet_lite0 | PATH to a local HF ViT/DeiT."),
        text_encoder: str | None = typer.Option(None, help="minilm | PATH to a local HF BERT-family model."),
        random_init: bool = typer.Option(False, help="Random weights for both encoders."),
        no_sss: bool = typer.Option(False, help="Ablation: SSS off (plain InfoNCE)."),
        no_dcl: bool = typer.Option(False, help="Ablation: intra-modal contrast off (CMC only)."),
        resume: bool = typer.Option(False, help="Continue the run in OUT from its last epoch."),
        overwrite: bool = typer.Option(False, help="Replace a different run already in OUT."),
        quiet: bool = typer.Option(False, help="No progress bars."),
    ) -> None:
        """Step 1: pre-train the vision-language model on image-report pairs (no masks needed)."""
        from dusss.config import load_config
        from dusss.engine.pretrain import PretrainConfig, run_pretrain

        overrides = {"data": str(data), "out": str(out), "method": method, "epochs": epochs, "batch_size": batch_size,
                     "image_size": image_size, "lr": lr, "device": device, "precision": precision, "seed": seed,
                     "channels_last": channels_last, "grad_accum": grad_accum, "compile": compile_model,
                     "num_workers": num_workers}
        overrides.update(_encoder_overrides(image_encoder, text_encoder, random_init))
        if image_size is not None:
            overrides["vlm.image.image_size"] = image_size
        if no_sss:
            overrides["objective.sss"] = False
        if no_dcl:
            overrides["objective.dcl"] = False
        if quiet:
            overrides["progress"] = False
        cfg = load_config(PretrainConfig, config, overrides)
        ckpt = run_pretrain(cfg, overwrite=overwrite, resume=resume)
        if _is_rank0():
            typer.echo(f"VLM written to {ckpt}")

    @app.command()
    def train(
        data: Path = typer.Option(..., help="Manifest CSV."),
        splits: Path = typer.Option(..., help="Split file from `dusss data split`."),
        out: Path = typer.Option(..., help="Run folder to write."),
        method: str | None = typer.Option(None, help="supervised | mt | unimatch | dusss | amvlm (default dusss); each starts from its published preset."),
        vlm: Path | None = typer.Option(None, help="RUN/vlm.safetensors from `dusss pretrain` (dusss, amvlm)."),
        config: Path | None = typer.Option(None, help="YAML config."),
        epochs: int | None = typer.Option(None),
        batch_size: int | None = typer.Option(None),
        image_size: int | None = typer.Option(None),
        lr: float | None = typer.Option(None),
        width: int | None = typer.Option(None, help="U-Net base width (64 = the paper's 14.75 M)."),
        device: str | None = typer.Option(None),
        precision: str | None = typer.Option(None, help="fp32 | bf16 | fp16"),
        channels_last: bool | None = typer.Option(None, "--channels-last/--no-channels-last",
                                                  help="channels_last memory format for the U-Net (faster convs)."),
        grad_accum: int | None = typer.Option(None, help="Micro-batches per optimizer step (step = batch x grad_accum)."),
        compile_model: bool | None = typer.Option(None, "--compile/--no-compile", help="torch.compile the student U-Net."),
        num_workers: int | None = typer.Option(None, help="DataLoader worker processes."),
        seed: int | None = typer.Option(None),
        patience: int | None = typer.Option(None, help="Early-stopping patience in epochs (paper: 20)."),
        resume: bool = typer.Option(False),
        overwrite: bool = typer.Option(False),
        quiet: bool = typer.Option(False),
    ) -> None:
        """Step 2: train the student U-Net, semi-supervised, guided by the frozen VLM's text masks."""
        from dusss.engine.train import load_train_config, run_train

        overrides = {"data": str(data), "splits": str(splits), "out": str(out), "method": method,
                     "vlm": str(vlm) if vlm else None, "epochs": epochs, "batch_size": batch_size,
                     "image_size": image_size, "lr": lr, "unet.base_width": width, "device": device,
                     "precision": precision, "seed": seed, "patience": patience, "channels_last": channels_last,
                     "grad_accum": grad_accum, "compile": compile_model, "num_workers": num_workers}
        if quiet:
            overrides["progress"] = False
        cfg = load_train_config(config, overrides)  # the method's published preset, under the file and flags
        run = run_train(cfg, overwrite=overwrite, resume=resume)
        if _is_rank0():
            typer.echo(f"best model: {run / 'model.safetensors'}")

    @app.command()
    def evaluate(
        model: Path = typer.Option(..., help="Run folder of `dusss train` or its model.safetensors."),
        data: Path = typer.Option(..., help="Manifest CSV."),
        split: str = typer.Option("test", help="train | val | test"),
        out: Path | None = typer.Option(None, help="Folder for metrics.json / per_image.csv (default RUN/eval/SPLIT)."),
        empty_policy: str = typer.Option("skip", help="Images with an empty ground truth: skip (left out, counted) | one (1 if the prediction is empty too) | zero."),
        device: str = typer.Option("auto"),
        overwrite: bool = typer.Option(False, help="Replace results already in the output folder."),
    ) -> None:
        """Dice, mIoU and HD95 of the student (protocol in README); each split's results in RUN/eval/SPLIT/."""
        from dusss.engine.evaluate import evaluate_run
        from dusss.errors import ConfigError

        if empty_policy not in ("skip", "one", "zero"):
            raise ConfigError(f"--empty-policy must be skip, one or zero, got {empty_policy!r}")
        result = evaluate_run(model, data, split=split, out=out, device=device, empty_policy=empty_policy,
                              overwrite=overwrite)
        keys = ("n_images", "dice", "iou", "hd95", "global_dice")
        typer.echo(json.dumps({k: result[k] for k in keys if k in result}, indent=2))

    @app.command()
    def predict(
        images: list[Path] = typer.Argument(..., help="Image files (PNG/JPG/TIF/NIfTI/DICOM)."),
        model: Path = typer.Option(..., help="Run folder of `dusss train` or its model.safetensors."),
        out: Path = typer.Option(..., help="Output folder for masks and overlays."),
        device: str = typer.Option("auto"),
        overwrite: bool = typer.Option(False, help="Replace masks and overlays already in OUT."),
    ) -> None:
        """Masks and overlays from the student alone (no text needed at inference).

        Writes OUT/NAME_mask.png and OUT/NAME_overlay.png, NAME being the image's file name without its
        extension; images with the same name in different folders are told apart by their folders
        (a/scan.png, b/scan.png -> a__scan_mask.png, b__scan_mask.png).
        """
        from dusss.engine.predict import predict_files

        written = predict_files(model, images, out, device=device, overwrite=overwrite)
        typer.echo(f"{len(written)} mask(s) written to {out}")

    @app.command()
    def textmap(
        image: Path = typer.Argument(..., help="One image."),
        prompts: list[str] = typer.Argument(..., help="One or more texts."),
        vlm: Path = typer.Option(..., help="RUN/vlm.safetensors."),
        model: Path | None = typer.Option(None, help="A `dusss train` run whose trained grounding decoder to use."),
        out: Path = typer.Option(Path("textmap.png"), help="PNG to write (one panel per prompt)."),
        device: str = typer.Option("auto"),
        overwrite: bool = typer.Option(False, help="Replace OUT if it exists."),
    ) -> None:
        """Text-guided heat-map of the frozen VLM for any prompt (paper Fig. 5)."""
        from dusss.report.textmap import textmap_figure

        textmap_figure(vlm, image, list(prompts), out, model_run=model, device=device, overwrite=overwrite)
        typer.echo(f"heat-map written to {out}")

    @app.command()
    def demo(
        out: Path = typer.Option(Path("runs/demo"), help="Folder for the demo's runs and report."),
        quick: bool = typer.Option(False, help="A tiny run (about a minute), for smoke tests."),
        seed: int = typer.Option(0),
        overwrite: bool = typer.Option(True, help="Replace a previous demo in OUT."),
    ) -> None:
        """The whole method end to end on the embedded phantom set, with an HTML report."""
        from dusss.demo import run_demo

        summary = run_demo(out, quick=quick, seed=seed, overwrite=overwrite)
        typer.echo(f"report: {Path(out) / 'report.html'}  ({summary['seconds']:.0f} s)")


def _is_rank0() -> bool:
    """False in the non-zero ranks of a torchrun launch (only rank 0 prints results)."""
    import os

    return os.environ.get("RANK", "0") == "0"


def _encoder_overrides(image_encoder: str | None, text_encoder: str | None, random_init: bool) -> dict:
    """Map the CLI's encoder flags to VLM config overrides."""
    out: dict = {}
    if image_encoder:
        if image_encoder in ("vit", "efficientnet_lite0"):
            out["vlm.image.kind"] = image_encoder
        else:
            out["vlm.image.kind"] = "vit"
            out["vlm.image.path"] = image_encoder
    if text_encoder:
        if text_encoder == "minilm":
            out["vlm.text.kind"] = "minilm"
        else:
            out["vlm.text.kind"] = "hf"
            out["vlm.text.path"] = text_encoder
    if random_init:
        out["vlm.image.random_init"] = True
        out["vlm.text.random_init"] = True
    return out
