"""Step 2: the semi-supervised segmentation loop. The method (how a batch becomes a loss) comes from the
`dusss.methods.segmentation` registry; this loop only feeds batches, steps the optimizer, validates,
early-stops, checkpoints and logs.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from dusss import distributed as dist
from dusss.checkpoint import save_checkpoint
from dusss.config import (
    MAX_BATCH,
    MAX_EPOCHS,
    MAX_GRAD_ACCUM,
    MAX_IMAGE_SIZE,
    MAX_LR,
    MAX_SEED,
    MAX_THREADS,
    MAX_WORKERS,
    bounded,
    check,
    check_fields,
    to_dict,
)
from dusss.data.datasets import SegmentationDataset
from dusss.data.manifest import Record, read_manifest, record_files
from dusss.data.splits import load_split
from dusss.engine.logging import CURVES_EVERY
from dusss.engine.loop import Stepper, begin_run, close_epoch, finish_run, open_log
from dusss.engine.precision import (
    autocast_context,
    compile_inplace,
    make_grad_scaler,
    maybe_channels_last,
)
from dusss.engine.runs import check_run_dir, copy_split, prepare_run_dir
from dusss.engine.samplers import EpochSampler, epoch_batches
from dusss.engine.step import to_device
from dusss.errors import ConfigError, DataError
from dusss.methods.segmentation import SEG_METHODS, SegMethodConfig, build_seg_method
from dusss.metrics import SegmentationMetrics
from dusss.models.networks import load_network, needs_text, segment
from dusss.models.unet import CHECKPOINT_KIND, UNet, UNetConfig
from dusss.runfiles import RunFiles, run_file

MODEL_KIND = CHECKPOINT_KIND  # the checkpoint kind of a student U-Net


@dataclass
class TrainConfig:
    """Everything `dusss train` needs; saved resolved as RUN/config.yaml."""

    data: str = ""
    splits: str = ""
    out: str = ""
    method: str = "dusss"
    vlm: str = ""
    epochs: int = bounded(50, ge=1, le=MAX_EPOCHS)
    batch_size: int = bounded(8, ge=1, le=MAX_BATCH)
    unlabeled_batch_size: int = bounded(0, ge=0, le=MAX_BATCH)  # 0 = batch_size
    image_size: int = bounded(128, ge=32, le=MAX_IMAGE_SIZE)
    lr: float = bounded(3e-4, gt=0, le=MAX_LR)
    weight_decay: float = bounded(1e-4, ge=0, le=1)
    warmup_fraction: float = bounded(0.0, ge=0, le=1)
    patience: int = bounded(20, ge=1, le=MAX_EPOCHS)
    device: str = "auto"
    precision: str = "fp32"
    channels_last: bool = False
    grad_accum: int = bounded(1, ge=1, le=MAX_GRAD_ACCUM)
    compile: bool = False
    seed: int = bounded(0, ge=0, le=MAX_SEED)
    num_workers: int = bounded(0, ge=0, le=MAX_WORKERS)
    threads: int = bounded(0, ge=0, le=MAX_THREADS)
    augment: bool = True
    progress: bool = True
    # unlabeled rows with hidden masks scored each epoch (0 = none)
    pseudo_label_eval_max: int = bounded(64, ge=0, le=10**6)
    # redraw curves.png every this many epochs (0 = only at the end)
    curves_every: int = bounded(CURVES_EVERY, ge=0, le=MAX_EPOCHS)
    threshold: float = bounded(0.5, gt=0, lt=1)
    unet: UNetConfig = field(default_factory=UNetConfig)
    semi: SegMethodConfig = field(default_factory=SegMethodConfig)

    def __post_init__(self) -> None:
        check_fields(self)
        check(self.method in SEG_METHODS, f"method: {self.method!r} is not one of {sorted(SEG_METHODS)}")
        check(self.image_size % 16 == 0, f"image_size must be a multiple of 16, got {self.image_size}")
        check(self.precision in ("fp32", "bf16", "fp16"), f"precision must be fp32|bf16|fp16, got {self.precision!r}")


def load_train_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                      sets: dict[str, Any] | None = None) -> TrainConfig:
    """A `TrainConfig` from the YAML file at `path`, dotted `overrides` (None: not given) and dotted `sets`
    (`--set`), on top of the chosen method's published preset (`METHOD_PRESETS`): defaults < preset < file <
    overrides < sets."""
    from dusss.config import load_config
    from dusss.methods.segmentation import seg_method_preset

    method = load_config(TrainConfig, path, overrides, sets=sets).method
    return load_config(TrainConfig, path, overrides, presets=seg_method_preset(method), sets=sets)


def _split_records(records: list[Record], split: dict[str, Any]) -> dict[str, list[Record]]:
    by_key = {r.key: r for r in records}
    out = {name: [by_key[k] for k in split.get(name, [])] for name in ("labeled", "unlabeled", "val", "test")}
    # Unlabeled rows never show their masks to training, even where the manifest has them.
    out["unlabeled_eval"] = [r for r in out["unlabeled"] if r.mask is not None]
    out["unlabeled"] = [dataclasses.replace(r, mask=None) for r in out["unlabeled"]]
    return out


def load_segmentation_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load the network written by `dusss train` (a run folder or its model.safetensors), in eval mode: the
    student U-Net, or a text-conditioned baseline's network (`dusss.models.networks`)."""
    model, meta = load_network(run_file(path))
    return model.to(device).eval(), meta


@torch.no_grad()
def validate(model: torch.nn.Module, loader: DataLoader, device: torch.device, precision: str,
             threshold: float = 0.5) -> dict[str, float]:
    """Per-image mean Dice / IoU of the model on a loader with masks."""
    was = model.training
    model.eval()
    metrics = SegmentationMetrics(threshold=threshold, compute_hd95=False)
    for batch in loader:
        with autocast_context(device, precision):
            logits = segment(model, batch["image"].to(device), batch.get("text"))
        metrics.update(torch.sigmoid(logits.float()).cpu(), batch["mask"], list(batch["key"]))
    model.train(was)
    return metrics.compute()


@torch.no_grad()
def pseudo_label_dice(method: Any, loader: DataLoader, device: torch.device, threshold: float = 0.5) -> dict[str, float]:
    """Dice of the teacher / text-mask / merged pseudo-labels against the (hidden) masks of unlabeled rows
    (`pseudo/<name>_dice`), and each label's foreground ratio: its predicted foreground pixels over the true
    ones, summed over the rows (`pseudo/<name>_fg_ratio`; 1 = the right amount, 0 = an empty label)."""
    accs: dict[str, SegmentationMetrics] = {}
    fg: dict[str, float] = {}
    true_fg = 0.0
    for batch in loader:
        labels = method.pseudo_labels(batch["image"].to(device), list(batch["text"]))
        true_fg += float(batch["mask"].sum())
        for name, logits in labels.items():
            prob = torch.sigmoid(logits.float()).cpu()
            accs.setdefault(name, SegmentationMetrics(threshold=threshold, compute_hd95=False)).update(
                prob, batch["mask"], list(batch["key"]))
            fg[name] = fg.get(name, 0.0) + float((prob >= threshold).sum())
    out = {f"pseudo/{name}_dice": m.compute()["dice"] for name, m in accs.items()}
    if true_fg > 0:
        out.update({f"pseudo/{name}_fg_ratio": n / true_fg for name, n in fg.items()})
    return out


def run_train(cfg: TrainConfig, overwrite: bool = False, resume: bool = False) -> Path:
    """Train a student U-Net with `cfg.method`; returns the run folder (best model in RUN/model.safetensors).

    The run folder is locked (`dusss.engine.runlock`) from the moment it is written until this returns or
    raises, so that a second run on it is refused.
    """
    with ExitStack() as hold:
        return _run_train(cfg, overwrite, resume, hold)


def _run_train(cfg: TrainConfig, overwrite: bool, resume: bool, hold: ExitStack) -> Path:
    """`run_train`'s body; the run folder's lock is released when `hold` closes."""
    device = begin_run(cfg.device, cfg.threads, cfg.seed)
    inputs = [("--data", cfg.data), ("--splits", cfg.splits), ("--vlm", cfg.vlm)]
    # a taken output folder is reported at once (prepare_run_dir decides again, and writes, further down)
    check_run_dir(cfg.out, to_dict(cfg), overwrite=overwrite, resume=resume, kind="train",
                  frozen_on_resume=("unet", "method"), inputs=inputs)
    records = read_manifest(cfg.data)
    split = load_split(cfg.splits, records)
    parts = _split_records(records, split)
    if not parts["labeled"]:
        raise DataError(cfg.splits, "no labeled training rows")
    if not parts["val"]:
        raise DataError(cfg.splits, "val split is empty: needed for early stopping and model selection")

    method_cls = SEG_METHODS[cfg.method]
    # the U-Net first: its initial weights are the same draws whether or not a VLM is built after it
    student = UNet(cfg.unet) if method_cls.network == "unet" else None
    vlm = None
    if method_cls.needs_vlm:
        if not cfg.vlm:
            raise ConfigError(f"method {cfg.method!r} needs a pre-trained VLM: pass --vlm RUN/vlm.safetensors")
        from dusss.models.vlm import VisionLanguageModel

        vlm = VisionLanguageModel.from_checkpoint(cfg.vlm).to(device)
    # the U-Net, or the method's text-conditioned network (which records where its frozen VLM lives)
    if student is None:
        student = method_cls.build_student(cfg.unet, cfg.semi, vlm, str(Path(cfg.vlm).resolve()) if cfg.vlm else "")
    student = student.to(device)
    maybe_channels_last(student, cfg.channels_last)
    # Under torchrun the method trains the student through DistributedDataParallel (rank 0's weights everywhere
    # from here on; bucketed gradient all-reduce during backward); the EMA teacher copies the plain module.
    trained_student = dist.wrap_ddp(student, device)
    method = build_seg_method(cfg.method, cfg.semi, trained_student, vlm)
    method.to(device)
    uses_unlabeled = method.uses_unlabeled and bool(parts["unlabeled"])

    # batch_size / unlabeled_batch_size are global micro-batches, split evenly over the ranks; one optimizer
    # step sees batch_size x grad_accum labeled images whatever the number of processes.
    world, accum = dist.world_size(), cfg.grad_accum
    bs_l = cfg.batch_size
    bs_u = cfg.unlabeled_batch_size or cfg.batch_size
    if bs_l % world or bs_u % world:
        raise ConfigError(f"batch_size {bs_l} and unlabeled batch size {bs_u} must be multiples of the number of "
                          f"processes ({world}): they are global batches split evenly over the ranks")
    rbs_l, rbs_u = bs_l // world, bs_u // world
    pin = device.type == "cuda"
    lab_ds = SegmentationDataset(parts["labeled"], cfg.image_size, augment=cfg.augment, seed=cfg.seed)
    unl_ds = SegmentationDataset(parts["unlabeled"], cfg.image_size, augment=cfg.augment, seed=cfg.seed + 1) if parts["unlabeled"] else None
    val_loader = DataLoader(SegmentationDataset(parts["val"], cfg.image_size), batch_size=16, shuffle=False)
    # pseudo-label quality only where there are pseudo-labels (a supervised run would score its student twice)
    pl_rows = parts["unlabeled_eval"][: cfg.pseudo_label_eval_max] if SEG_METHODS[cfg.method].uses_unlabeled else []
    pl_loader = DataLoader(SegmentationDataset(pl_rows, cfg.image_size), batch_size=16, shuffle=False) if pl_rows else None
    for ds in (lab_ds, unl_ds, val_loader.dataset, pl_loader.dataset if pl_loader is not None else None):
        if ds is not None:
            ds.preload()  # decode + resize once (a bad file fails before the run folder is touched)
    n_unl = len(parts["unlabeled"])
    # Same number of optimizer steps for every method and any number of processes: one epoch = one pass over
    # the larger stream in global steps of (batch size x grad_accum) images.
    steps_per_epoch = max(1, math.ceil(len(lab_ds) / (bs_l * accum)),
                          math.ceil(n_unl / (bs_u * accum)) if n_unl else 0)
    micro_per_epoch = steps_per_epoch * accum
    total_steps = steps_per_epoch * cfg.epochs
    # Rank r takes perm[r::world] of each pass (fresh permutation per pass): the first global batch is the
    # same set of rows as a single process's first batch.
    lab_sampler = EpochSampler(len(lab_ds), seed=cfg.seed, shuffle=True, length=micro_per_epoch * rbs_l)
    unl_sampler = (EpochSampler(n_unl, seed=cfg.seed + 1, shuffle=True, length=micro_per_epoch * rbs_u)
                   if n_unl else None)

    params = [p for p in method.parameters() if p.requires_grad]
    # Parameters outside the student (text-mask generator, gates): rank 0's initial weights everywhere, and
    # their gradients averaged by hand after backward (the student's are DDP's).
    student_ids = {id(p) for p in student.parameters()}
    other_params = [p for p in params if id(p) not in student_ids]
    dist.broadcast_tensors(other_params)
    compile_inplace(student, cfg.compile)  # after the EMA teacher's deep copy; state-dict keys unchanged
    scaler = make_grad_scaler(cfg.precision, device)
    # No weight decay on scalars, biases and norm parameters (gates, kappa/beta, temperatures); the text-mask
    # generator at its own learning rate where one is set.
    optimizer = torch.optim.AdamW(method.param_groups(cfg.lr, cfg.weight_decay), lr=cfg.lr)

    # Everything above only reads: a bad input fails before the run folder is created or touched.
    run = prepare_run_dir(cfg.out, to_dict(cfg), overwrite=overwrite, resume=resume, kind="train",
                          frozen_on_resume=("unet", "method"), inputs=[*inputs, *record_files(records)], hold=hold)
    if dist.is_main():
        copy_split(cfg.splits, run)
    files = RunFiles(run)
    state_path = files.state
    best_path = files.model
    logger, resumed = open_log(run, resume, state_path, {"student": student}, {"method": method}, optimizer, scaler)
    start_epoch, step = int(resumed["epoch"]), int(resumed["step"])
    best_dice, best_epoch = float(resumed.get("best_dice", -1.0)), int(resumed.get("best_epoch", 0))
    bad_epochs = int(resumed.get("bad_epochs", 0))

    net_meta = student.to_checkpoint()[1]  # the network's name and what rebuilds it ({"network": "unet", "unet": ..})
    meta_common = {**net_meta, "image_size": cfg.image_size, "method": cfg.method,
                   "threshold": cfg.threshold, "input": "RGB float in [0,1], resized to image_size (bilinear)",
                   "output": "logits [B,1,H,W]; probability = sigmoid(logits); mask = probability >= threshold",
                   "needs_text": needs_text(student)}
    t_run = time.time()
    last_meta: dict[str, Any] | None = None  # sidecar of last.safetensors: the last epoch trained by this call
    warmup_logs: dict[str, float] = {}
    if start_epoch == 0 and step == 0 and cfg.semi.text_warmup_steps and hasattr(method, "warmup"):
        warmup_logs = _warmup_text_mask(method, lab_ds, lab_sampler, rbs_l, cfg, device)
    stepper = Stepper(optimizer, scaler, accum, total_steps, int(cfg.warmup_fraction * total_steps), device,
                      cfg.precision, best_path, sync_params=other_params,
                      ddp_module=trained_student,
                      buffers_of=student, after_step=method.after_step)
    image_keys = ("image",) if cfg.channels_last else ()

    def loss_of(micro: tuple[dict[str, Any], dict[str, Any] | None], at: int) -> tuple[torch.Tensor, dict[str, float]]:
        lab_batch, unl_batch = micro
        lab_batch = to_device(lab_batch, device, image_keys)
        unl_batch = to_device(unl_batch, device, image_keys) if unl_batch is not None else None
        return method.loss(lab_batch, unl_batch, at, total_steps)

    for epoch in range(start_epoch, cfg.epochs):
        if bad_epochs >= cfg.patience:
            break
        for ds in (lab_ds, unl_ds):
            if ds is not None:
                ds.set_epoch(epoch)
        lab_sampler.set_epoch(epoch)
        lab_loader = DataLoader(lab_ds, batch_size=rbs_l, sampler=list(lab_sampler), num_workers=cfg.num_workers,
                                pin_memory=pin)
        unl_iter = iter([None] * micro_per_epoch)
        if uses_unlabeled and unl_sampler is not None and unl_ds is not None:
            unl_sampler.set_epoch(epoch)
            unl_iter = iter(DataLoader(unl_ds, batch_size=rbs_u, sampler=list(unl_sampler),
                                       num_workers=cfg.num_workers, pin_memory=pin))
        method.train()
        step, sums, counts, seconds = stepper.epoch(zip(lab_loader, unl_iter), micro_per_epoch, step, loss_of,
                                                    f"{cfg.method} {epoch + 1}/{cfg.epochs}", cfg.progress)
        row = stepper.train_row(sums, counts, seconds, micro_per_epoch * (bs_l + (bs_u if uses_unlabeled else 0)))
        if epoch == 0 and warmup_logs:
            row.update({f"warmup/{k}": v for k, v in warmup_logs.items()})
        if dist.is_main():
            val = validate(student, val_loader, device, cfg.precision, cfg.threshold)
            row.update({f"val/{k}": v for k, v in val.items() if isinstance(v, (int, float))})
            if pl_loader is not None and hasattr(method, "pseudo_labels"):
                method.eval()
                row.update(pseudo_label_dice(method, pl_loader, device, cfg.threshold))
                method.train()
            dice = float(val["dice"])
            if dice > best_dice:
                best_dice, best_epoch, bad_epochs = dice, epoch + 1, 0
                save_checkpoint(best_path, student.state_dict(), MODEL_KIND,
                                {**meta_common, "epoch": epoch + 1, "val_dice": dice})
                _save_text_mask(method, run, cfg)
            else:
                bad_epochs += 1
            # stability: how far this epoch's val Dice sits below the best so far (0 at a new best)
            row.update({"best/val_dice": best_dice, "best/epoch": best_epoch, "val/drop_from_best": best_dice - dice})
            last_meta = {**meta_common, "epoch": epoch + 1, "val_dice": dice}
        close_epoch(logger, files, step, epoch + 1, row, cfg.curves_every,
                    lambda: {"student": student.state_dict(), "method": method.state_dict()}, optimizer, scaler,
                    {"best_dice": best_dice, "best_epoch": best_epoch, "bad_epochs": bad_epochs})
        # Early-stopping state lives on rank 0; every rank takes the same decision (works for gloo and NCCL).
        best_dice, best_epoch, bad_epochs = dist.broadcast_object((best_dice, best_epoch, bad_epochs))
        dist.barrier()
    # the student after the last epoch, once (the resume point holds it during the run)
    if last_meta is None and start_epoch > 0 and not files.last.is_file():  # killed between the state and this
        last_meta = {**meta_common, "epoch": start_epoch}
    if dist.is_main() and last_meta is not None:
        save_checkpoint(files.last, student.state_dict(), MODEL_KIND, last_meta)
    finish_run(logger, files, t_run)
    return run


WARMUP_EPOCH_OFFSET = 10**6  # sampler/augmentation epochs of the text-mask warm-up


def _warmup_text_mask(method: Any, lab_ds: SegmentationDataset, sampler: EpochSampler, batch_size: int,
                      cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    """`semi.text_warmup_steps` steps fitting the text-mask generator on the labeled images before Step 2,
    over passes of the labeled sampler at epochs 10⁶ + 1, 10⁶ + 2, ... (apart from the training epochs)."""

    passes = epoch_batches(lab_ds, sampler, batch_size, itertools.count(WARMUP_EPOCH_OFFSET + 1), cfg.num_workers)
    batches = (to_device(batch, device, ()) for batch in passes)
    t0 = time.time()
    logs = method.warmup(batches, cfg.semi.text_warmup_steps, cfg.lr, cfg.weight_decay,
                         sync=lambda ps: dist.sync_gradients(ps, average=True))
    logs["seconds"] = time.time() - t0
    return logs


def _save_text_mask(method: Any, run: Path, cfg: TrainConfig) -> None:
    """Keep the trained grounding decoder beside the student, for `dusss textmap --model RUN`."""
    gen = getattr(method, "text_mask", None)
    if gen is None or not hasattr(gen, "trainable_state_dict"):
        return
    save_checkpoint(RunFiles(run).text_mask, gen.trainable_state_dict(), "text_mask",
                    {"vlm": str(cfg.vlm), "text_mask": to_dict(cfg.semi)})
