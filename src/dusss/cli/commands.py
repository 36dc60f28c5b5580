"""Top-level commands: pretrain, train, evaluate, predict, textmap, demo, compare, methods, version. Thin: parse, call the
library. Every command is a module-level function; `register` attaches them to the app.

Options shared by the commands are defined once below (`Epochs`, `Seed`, ...), each with its help text. The
method names are not repeated here: `dusss methods` lists what the registries hold.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

# -- options shared by pretrain and train (and some by evaluate / predict / textmap) ---------------------------
Config = Annotated[Path | None, typer.Option(
    help="YAML config: a file, or the name of a packaged one (e.g. train_paper_monuseg; see configs/README.md).")]
Sets = Annotated[list[str] | None, typer.Option(
    "--set", metavar="KEY=VALUE",
    help="Set any config key, dotted (e.g. --set semi.ema_decay=0.99 --set unet.base_width=32); the value is "
         "read as YAML; repeatable; applied after the config file and the other flags.")]
Epochs = Annotated[int | None, typer.Option(help="Maximum training epochs.")]
BatchSize = Annotated[int | None, typer.Option(help="Images per step and process.")]
ImageSize = Annotated[int | None, typer.Option(help="Square side the images are resized to, in pixels.")]
Lr = Annotated[float | None, typer.Option(help="Peak learning rate (cosine schedule).")]
Device = Annotated[str | None, typer.Option(help="auto | cpu | cuda | cuda:N (auto: a GPU when there is one).")]
Precision = Annotated[str | None, typer.Option(help="fp32 | bf16 | fp16 (autocast; fp16 with loss scaling).")]
GradAccum = Annotated[int | None, typer.Option(help="Micro-batches per optimizer step (step = batch x grad_accum).")]
NumWorkers = Annotated[int | None, typer.Option(help="DataLoader worker processes (0 = load in the main process).")]
Seed = Annotated[int | None, typer.Option(help="Random seed: same seed, data and device, same run.")]
Resume = Annotated[bool, typer.Option(help="Continue the run in OUT from its last saved epoch.")]
Overwrite = Annotated[bool, typer.Option(help="Replace a different or finished run already in OUT.")]
Quiet = Annotated[bool, typer.Option(help="No progress bars.")]
EvalDevice = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")]
RunModel = Annotated[Path, typer.Option(help="Run folder of `dusss train` or its model.safetensors.")]


def version() -> None:
    """Print the dusss version."""
    from dusss import __version__

    typer.echo(__version__)


def methods() -> None:
    """List the registered Step-1 (pretrain) and Step-2 (train) methods, with what each does."""
    from dusss.methods.pretrain import PRETRAIN_METHODS
    from dusss.methods.segmentation import SEG_METHODS

    def first_line(obj: object) -> str:  # the docstring's first paragraph, on one line
        return " ".join((obj.__doc__ or "").strip().split("\n\n")[0].split())

    for title, registry in (("pretrain --method", PRETRAIN_METHODS), ("train --method", SEG_METHODS)):
        typer.echo(f"{title}:")
        width = max(len(name) for name in registry)
        for name in sorted(registry):
            cls = registry[name]
            needs = " [needs --vlm]" if getattr(cls, "needs_vlm", False) else ""
            if getattr(cls, "network", "unet") != "unet":
                needs += " [text at inference]"
            typer.echo(f"  {name:<{width}}  {first_line(cls)}{needs}")


def pretrain(
    data: Annotated[Path, typer.Option(help="Manifest CSV (image,mask,text,split,case_id); masks are not needed.")],
    out: Annotated[Path, typer.Option(help="Run folder to write.")],
    method: Annotated[str | None, typer.Option(help="Pre-training objective (default dusss; `dusss methods`).")] = None,
    config: Config = None,
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    image_size: ImageSize = None,
    lr: Lr = None,
    device: Device = None,
    precision: Precision = None,
    channels_last: Annotated[bool | None, typer.Option(
        "--channels-last/--no-channels-last", help="channels_last memory format for the image encoder.")] = None,
    grad_accum: Annotated[int | None, typer.Option(
        help="Micro-batches per optimizer step (the contrastive negatives stay per micro-batch).")] = None,
    compile_model: Annotated[bool | None, typer.Option(
        "--compile/--no-compile", help="torch.compile the image encoder.")] = None,
    num_workers: NumWorkers = None,
    seed: Seed = None,
    image_encoder: Annotated[str | None, typer.Option(
        help="vit | efficientnet_lite0 | PATH to a local Hugging Face ViT/DeiT folder (safetensors).")] = None,
    text_encoder: Annotated[str | None, typer.Option(
        help="minilm | PATH to a local Hugging Face BERT-family folder (safetensors).")] = None,
    random_init: Annotated[bool, typer.Option(help="Random weights for both encoders.")] = False,
    no_sss: Annotated[bool, typer.Option(help="Ablation: SSS off (plain InfoNCE).")] = False,
    no_dcl: Annotated[bool, typer.Option(help="Ablation: intra-modal contrast off (CMC only).")] = False,
    sets: Sets = None,
    resume: Resume = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Step 1: pre-train the vision-language model on image-report pairs (no masks needed)."""
    from dusss.config import load_config, parse_overrides
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
    cfg = load_config(PretrainConfig, config, overrides, sets=parse_overrides(sets or []))
    ckpt = run_pretrain(cfg, overwrite=overwrite, resume=resume)
    if _is_rank0():
        typer.echo(f"VLM written to {ckpt}")


def train(
    data: Annotated[Path, typer.Option(help="Manifest CSV.")],
    splits: Annotated[Path, typer.Option(help="Split file from `dusss data split`.")],
    out: Annotated[Path, typer.Option(help="Run folder to write.")],
    method: Annotated[str | None, typer.Option(
        help="Step-2 method (default dusss; `dusss methods` lists them); each starts from its published preset.")] = None,
    vlm: Annotated[Path | None, typer.Option(
        help="RUN/vlm.safetensors from `dusss pretrain` (for the text-guided methods).")] = None,
    config: Config = None,
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    image_size: ImageSize = None,
    lr: Lr = None,
    width: Annotated[int | None, typer.Option(help="U-Net base width (64 = the paper's 14.75 M parameters).")] = None,
    device: Device = None,
    precision: Precision = None,
    channels_last: Annotated[bool | None, typer.Option(
        "--channels-last/--no-channels-last", help="channels_last memory format for the U-Net (faster convs).")] = None,
    grad_accum: GradAccum = None,
    compile_model: Annotated[bool | None, typer.Option(
        "--compile/--no-compile", help="torch.compile the student U-Net.")] = None,
    num_workers: NumWorkers = None,
    seed: Seed = None,
    patience: Annotated[int | None, typer.Option(
        help="Early stopping: epochs without a better val Dice (paper: 20).")] = None,
    sets: Sets = None,
    resume: Resume = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Step 2: train the student U-Net, semi-supervised, guided by the frozen VLM's text masks."""
    from dusss.config import parse_overrides
    from dusss.engine.train import load_train_config, run_train

    overrides = {"data": str(data), "splits": str(splits), "out": str(out), "method": method,
                 "vlm": str(vlm) if vlm else None, "epochs": epochs, "batch_size": batch_size,
                 "image_size": image_size, "lr": lr, "unet.base_width": width, "device": device,
                 "precision": precision, "seed": seed, "patience": patience, "channels_last": channels_last,
                 "grad_accum": grad_accum, "compile": compile_model, "num_workers": num_workers}
    if quiet:
        overrides["progress"] = False
    # the method's published preset, under the file, the flags and --set
    cfg = load_train_config(config, overrides, sets=parse_overrides(sets or []))
    run = run_train(cfg, overwrite=overwrite, resume=resume)
    if _is_rank0():
        typer.echo(f"best model: {run / 'model.safetensors'}")


def evaluate(
    model: RunModel,
    data: Annotated[Path, typer.Option(help="Manifest CSV.")],
    split: Annotated[str, typer.Option(help="train | val | test")] = "test",
    out: Annotated[Path | None, typer.Option(
        help="Folder for metrics.json / per_image.csv (default RUN/eval/SPLIT).")] = None,
    empty_policy: Annotated[str, typer.Option(
        help="Images with an empty ground truth: skip (left out, counted) | one (1 if the prediction is empty "
             "too) | zero.")] = "skip",
    device: EvalDevice = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace results already in the output folder.")] = False,
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


def predict(
    images: Annotated[list[Path], typer.Argument(
        help="Image files (PNG/JPG/TIF/NIfTI/DICOM; a volume's slice as FILE.nii.gz#slice=N).")],
    model: RunModel,
    out: Annotated[Path, typer.Option(help="Output folder for masks and overlays.")],
    device: EvalDevice = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace masks and overlays already in OUT.")] = False,
    text: Annotated[list[str] | None, typer.Option(
        help="The report of each image, for the text-conditioned baselines (clip, lvit): once for all images, "
             "or once per image in their order. A U-Net student (every other method) ignores it.")] = None,
) -> None:
    """Masks and overlays from the trained network: the student alone for every semi-supervised method (no
    text needed at inference); the clip and lvit baselines also need each image's report (--text).

    Writes OUT/NAME_mask.png (for a NIfTI image OUT/NAME_mask.nii.gz, in the image's world space) and
    OUT/NAME_overlay.png, NAME being the image's file name without its extension (a volume's slice
    vol.nii.gz#slice=12 -> vol_slice12); images with the same name in different folders are told apart by
    their folders (a/scan.png, b/scan.png -> a__scan_mask.png, b__scan_mask.png).
    """
    from dusss.engine.predict import predict_files

    written = predict_files(model, images, out, device=device, overwrite=overwrite, texts=text)
    typer.echo(f"{len(written)} mask(s) written to {out}")


def textmap(
    image: Annotated[Path, typer.Argument(help="One image.")],
    prompts: Annotated[list[str], typer.Argument(help="One or more texts.")],
    vlm: Annotated[Path, typer.Option(help="RUN/vlm.safetensors.")],
    model: Annotated[Path | None, typer.Option(
        help="A `dusss train` run whose trained grounding decoder to use.")] = None,
    out: Annotated[Path, typer.Option(help="PNG to write (one panel per prompt).")] = Path("textmap.png"),
    device: EvalDevice = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
) -> None:
    """Text-guided heat-map of the frozen VLM for any prompt (paper Fig. 5)."""
    from dusss.report.textmap import textmap_figure

    textmap_figure(vlm, image, list(prompts), out, model_run=model, device=device, overwrite=overwrite)
    typer.echo(f"heat-map written to {out}")


def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's runs and report.")] = Path("runs/demo"),
    quick: Annotated[bool, typer.Option(help="A tiny run (about a minute), for smoke tests.")] = False,
    seed: Annotated[int, typer.Option(help="Random seed of the data split and of every run.")] = 0,
    overwrite: Annotated[bool, typer.Option(
        help="Replace a previous demo in OUT (a folder holding anything else is refused).")] = True,
) -> None:
    """The whole method end to end on the embedded phantom set, with an HTML report."""
    from dusss.demo import run_demo

    summary = run_demo(out, quick=quick, seed=seed, overwrite=overwrite)
    typer.echo(f"report: {Path(out) / 'report.html'}  ({summary['seconds']:.0f} s)")


def compare(
    data: Annotated[Path, typer.Option(help="Manifest CSV (with train / val / test rows).")],
    methods: Annotated[str, typer.Option(help="Comma list of Step-2 methods (`dusss methods`).")],
    out: Annotated[Path, typer.Option(help="Folder of the grid: splits, VLMs, runs, table.md, table.json.")],
    labeled: Annotated[str, typer.Option(help="Comma list of labeled fractions of the training cases.")] = "0.25,0.5",
    seeds: Annotated[str, typer.Option(help="Comma list of seeds (split, initialisation, data order).")] = "0,1,2",
    config: Config = None,
    pretrain_config: Annotated[Path | None, typer.Option(
        help="YAML config of the VLM pre-training, once per seed, for the methods that need one.")] = None,
    epochs: Epochs = None,
    device: Device = None,
    reference: Annotated[str | None, typer.Option(
        help="Method whose per-image Dice is tested (Wilcoxon) against every other (default dusss).")] = None,
    sets: Sets = None,
    quiet: Quiet = False,
) -> None:
    """Every method over label fractions and seeds on the same data and protocol: a resumable grid and a table."""
    from dusss.config import parse_overrides
    from dusss.engine.compare import run_compare
    from dusss.errors import ConfigError

    try:
        fractions = [float(x) for x in labeled.split(",") if x.strip()]
        seed_list = [int(x) for x in seeds.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--labeled {labeled!r} / --seeds {seeds!r}: expected comma lists of numbers") from None
    overrides = {"epochs": epochs, "device": device, **parse_overrides(sets or [])}
    table = run_compare(data, [m.strip() for m in methods.split(",") if m.strip()], fractions, seed_list, out,
                        overrides={k: v for k, v in overrides.items() if v is not None}, train_config=config,
                        pretrain_config=pretrain_config,
                        pretrain_overrides={k: v for k, v in {"device": device}.items() if v is not None},
                        reference=reference, progress=not quiet)
    typer.echo((Path(out) / "table.md").read_text())
    typer.echo(f"{len(table['rows'])} row(s) written to {Path(out) / 'table.md'} and table.json")


COMMANDS = (version, methods, pretrain, train, evaluate, predict, textmap, demo, compare)


def register(app: typer.Typer) -> None:
    """Attach the top-level commands to `app`."""
    for command in COMMANDS:
        app.command()(command)


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
