"""Step 1: VLM pre-training loop (method-agnostic: the objective comes from `dusss.methods.pretrain`)."""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from dusss import distributed as dist
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
from dusss.data.datasets import PretrainDataset
from dusss.data.manifest import read_manifest, record_files, refuse_leaks
from dusss.engine.logging import CURVES_EVERY
from dusss.engine.loop import Stepper, begin_run, close_epoch, finish_run, open_log
from dusss.engine.precision import (
    compile_inplace,
    make_grad_scaler,
    maybe_channels_last,
)
from dusss.engine.runs import check_run_dir, prepare_run_dir
from dusss.engine.samplers import EpochSampler
from dusss.engine.step import to_device
from dusss.errors import ConfigError, DataError
from dusss.methods.pretrain import (
    PRETRAIN_METHODS,
    PretrainObjectiveConfig,
    build_pretrain_objective,
    retrieval_at_k,
)
from dusss.models.vlm import VisionLanguageModel, VLMConfig
from dusss.runfiles import RunFiles


@dataclass
class PretrainConfig:
    """Everything `dusss pretrain` needs; saved resolved as RUN/config.yaml."""

    data: str = ""
    out: str = ""
    method: str = "dusss"
    epochs: int = bounded(10, ge=1, le=MAX_EPOCHS)
    batch_size: int = bounded(16, ge=2, le=MAX_BATCH)  # >= 2 for a contrastive loss
    image_size: int = bounded(128, ge=32, le=MAX_IMAGE_SIZE)
    lr: float = bounded(1e-4, gt=0, le=MAX_LR)
    encoder_lr: float = bounded(3e-5, ge=0, le=MAX_LR)
    weight_decay: float = bounded(0.05, ge=0, le=1)
    warmup_fraction: float = bounded(0.05, ge=0, le=1)
    device: str = "auto"
    precision: str = "fp32"
    channels_last: bool = False
    grad_accum: int = bounded(1, ge=1, le=MAX_GRAD_ACCUM)
    compile: bool = False
    seed: int = bounded(0, ge=0, le=MAX_SEED)
    num_workers: int = bounded(0, ge=0, le=MAX_WORKERS)
    threads: int = bounded(0, ge=0, le=MAX_THREADS)
    text_aug: bool = True
    include_val_in_training: bool = False
    progress: bool = True
    vlm: VLMConfig = field(default_factory=VLMConfig)
    objective: PretrainObjectiveConfig = field(default_factory=PretrainObjectiveConfig)

    def __post_init__(self) -> None:
        check_fields(self)
        check(self.method in PRETRAIN_METHODS, f"method: {self.method!r} is not one of {sorted(PRETRAIN_METHODS)}")
        check(self.image_size % 16 == 0, f"image_size must be a multiple of 16, got {self.image_size}")
        check(self.precision in ("fp32", "bf16", "fp16"), f"precision must be fp32|bf16|fp16, got {self.precision!r}")


def pretrained_encoders(cfg: VLMConfig) -> tuple[str, ...]:
    """Attribute prefixes of the encoders that start from pretrained weights (they train at `encoder_lr`)."""
    out = []
    image_pretrained = not cfg.image.random_init and (cfg.image.kind == "efficientnet_lite0" or cfg.image.path)
    if image_pretrained:
        out.append("image_encoder.")
    if not cfg.text.random_init:
        out.append("text_encoder.")
    return tuple(out)


def _encoder_param_groups(vlm: torch.nn.Module, cfg: PretrainConfig) -> list[dict[str, Any]]:
    """Pretrained encoders at `encoder_lr`; randomly initialised encoders, heads, PDT, temperature at `lr`."""
    enc, rest = [], []
    prefixes = pretrained_encoders(cfg.vlm)
    for name, p in vlm.named_parameters():
        if not p.requires_grad:
            continue
        (enc if prefixes and name.startswith(prefixes) else rest).append(p)
    groups = [{"params": rest, "lr": cfg.lr}]
    if enc and cfg.encoder_lr > 0:
        groups.append({"params": enc, "lr": cfg.encoder_lr})
    return groups


@torch.no_grad()
def evaluate_retrieval(vlm: VisionLanguageModel, loader: DataLoader, device: torch.device) -> dict[str, float]:
    """Image→text and text→image R@1/R@5 over a whole split; rows with the same report count as correct."""
    was_training = vlm.training
    vlm.eval()
    imgs, txts, texts = [], [], []
    for batch in loader:
        texts.extend(batch["text"])
        imgs.append(vlm.encode_image(batch["image"].to(device))["global"].float().cpu())
        txts.append(vlm.encode_text(list(batch["text"]))["global"].float().cpu())
    vlm.train(was_training)
    if not imgs:
        return {}
    return retrieval_at_k(torch.cat(imgs), torch.cat(txts), groups=texts)


def run_pretrain(cfg: PretrainConfig, overwrite: bool = False, resume: bool = False) -> Path:
    """Pre-train the VLM; writes RUN/vlm.safetensors (+ .json), metrics, curves. Returns the checkpoint path.

    The run folder is locked (`dusss.engine.runlock`) from the moment it is written until this returns or
    raises, so that a second run on it is refused.
    """
    with ExitStack() as hold:
        return _run_pretrain(cfg, overwrite, resume, hold)


def _run_pretrain(cfg: PretrainConfig, overwrite: bool, resume: bool, hold: ExitStack) -> Path:
    """`run_pretrain`'s body; the run folder's lock is released when `hold` closes."""
    device = begin_run(cfg.device, cfg.threads, cfg.seed, seed_per_rank=True)
    inputs = [("--data", cfg.data), ("--image-encoder", cfg.vlm.image.path), ("--text-encoder", cfg.vlm.text.path)]
    # a taken output folder is reported at once (prepare_run_dir decides again, and writes, further down)
    check_run_dir(cfg.out, to_dict(cfg), overwrite=overwrite, resume=resume, kind="pretrain",
                  frozen_on_resume=("vlm", "method"), inputs=inputs)
    records = read_manifest(cfg.data)
    refuse_leaks(records, cfg.data)  # a test patient's images must not shape the VLM either
    train_split = ("train", "val") if cfg.include_val_in_training else ("train",)
    train_rec = [r for r in records if r.split in train_split and r.text.strip()]
    val_rec = [r for r in records if r.split == "val" and r.text.strip()]
    if len(train_rec) < cfg.batch_size:
        raise DataError(cfg.data, f"train split has {len(train_rec)} rows with text, fewer than batch_size {cfg.batch_size}")

    train_ds = PretrainDataset(train_rec, cfg.image_size, seed=cfg.seed, text_aug=cfg.text_aug)
    train_ds.preload()  # decode + resize once (a bad file fails before the run folder is touched)
    sampler = EpochSampler(len(train_ds), seed=cfg.seed, shuffle=True, drop_last=True)
    # batch_size is the global batch of one forward pass (the contrastive negatives, gathered over ranks).
    world, accum = dist.world_size(), cfg.grad_accum
    per_rank = cfg.batch_size // world
    if cfg.batch_size % world or (per_rank < 2 and cfg.vlm.head_norm == "batch"):
        raise ConfigError(f"batch_size {cfg.batch_size} must be a multiple of the number of processes ({world})"
                          f"{' with at least 2 rows per process (BatchNorm heads)' if cfg.vlm.head_norm == 'batch' else ''}")
    loader = DataLoader(train_ds, batch_size=per_rank, sampler=sampler, drop_last=True, num_workers=cfg.num_workers,
                        pin_memory=device.type == "cuda")
    val_loader = None
    if val_rec:
        from dusss.data.datasets import SegmentationDataset

        val_loader = DataLoader(SegmentationDataset(val_rec, cfg.image_size), batch_size=64, shuffle=False)
        val_loader.dataset.preload()

    vlm = VisionLanguageModel(cfg.vlm).to(device)
    dist.broadcast_module(vlm)  # rank 0's initial weights everywhere (ranks are seeded differently)
    for enc in (vlm.image_encoder, vlm.image_encoder_m):
        maybe_channels_last(enc, cfg.channels_last)
        compile_inplace(enc, cfg.compile)  # in place: state-dict keys and the momentum pairing unchanged
    objective = build_pretrain_objective(cfg.method, cfg.objective)
    if isinstance(objective, torch.nn.Module):
        objective.to(device)
    params = _encoder_param_groups(vlm, cfg)
    if isinstance(objective, torch.nn.Module):
        obj_params = [p for p in objective.parameters() if p.requires_grad]
        if obj_params:
            params.append({"params": obj_params, "lr": cfg.lr})
    optimizer = torch.optim.AdamW(params, weight_decay=cfg.weight_decay)
    trainable = [p for group in params for p in group["params"]]
    dist.broadcast_tensors(trainable)
    scaler = make_grad_scaler(cfg.precision, device)
    if len(loader) < accum:
        raise ConfigError(f"grad_accum {accum} needs at least {accum} batches of {cfg.batch_size} per epoch; "
                          f"the train split gives {len(loader)}")
    # An optimizer step = grad_accum micro-batches (negatives stay within a micro-batch: accumulation is not
    # a bigger contrastive batch; more processes are). Leftover micro-batches of an epoch are skipped.
    steps_per_epoch = max(1, len(loader) // accum)
    total_steps = cfg.epochs * steps_per_epoch
    warmup = int(cfg.warmup_fraction * total_steps)

    # Everything above only reads: a bad input fails before the run folder is created or touched.
    run = prepare_run_dir(cfg.out, to_dict(cfg), overwrite=overwrite, resume=resume, kind="pretrain",
                          frozen_on_resume=("vlm", "method"), inputs=[*inputs, *record_files(records)], hold=hold)
    files = RunFiles(run)
    state_path = files.state
    optional = {"objective": objective} if isinstance(objective, torch.nn.Module) else {}
    logger, resumed = open_log(run, resume, state_path, {"vlm": vlm}, optional, optimizer, scaler)
    start_epoch, step = int(resumed["epoch"]), int(resumed["step"])

    def modules() -> dict[str, dict[str, torch.Tensor]]:
        """The states the resume point keeps."""
        states = {"vlm": vlm.state_dict()}
        if isinstance(objective, torch.nn.Module):
            states["objective"] = objective.state_dict()
        return states

    ckpt = files.vlm
    t_start = time.time()
    stepper = Stepper(optimizer, scaler, accum, total_steps, warmup, device, cfg.precision, ckpt,
                      sync_params=trainable, buffers_of=vlm, after_step=lambda _: vlm.update_momentum())
    image_keys = ("image", "image_aug") if cfg.channels_last else ()
    n_micro = steps_per_epoch * accum
    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        train_ds.set_epoch(epoch)
        vlm.train()
        step, sums, counts, seconds = stepper.epoch(
            loader, n_micro, step, lambda batch, _: objective(vlm, to_device(batch, device, image_keys)),
            f"pretrain {epoch + 1}/{cfg.epochs}", cfg.progress)
        row = stepper.train_row(sums, counts, seconds, n_micro * cfg.batch_size)
        if val_loader is not None and dist.is_main():
            row.update({f"val/{k}": v for k, v in evaluate_retrieval(vlm, val_loader, device).items()})
        if dist.is_main():
            tensors, meta = vlm.to_checkpoint()
            from dusss.checkpoint import save_checkpoint

            save_checkpoint(ckpt, tensors, "vlm", {**meta, "method": cfg.method, "epoch": epoch + 1,
                                                     "image_size": cfg.image_size, "objective": to_dict(cfg.objective)})

        close_epoch(logger, files, step, epoch + 1, row, CURVES_EVERY, modules, optimizer, scaler, {})
        dist.barrier()
    finish_run(logger, files, t_start)
    return ckpt


def pretrain_summary(run: Path) -> dict[str, Any]:
    """Last logged row of a pre-training run (for reports)."""
    import json

    lines = RunFiles(run).metrics.read_text().splitlines()
    return json.loads(lines[-1]) if lines else {}


__all__ = ["PretrainConfig", "evaluate_retrieval", "pretrain_summary", "run_pretrain"]
