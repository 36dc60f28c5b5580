"""Step 1: VLM pre-training loop (method-agnostic: the objective comes from `dusss.methods.pretrain`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from dusss.config import check, to_dict
from dusss.data.datasets import PretrainDataset
from dusss.data.manifest import read_manifest
from dusss.engine import distributed as dist
from dusss.engine.logging import MetricsLogger, plot_curves, progress
from dusss.engine.precision import autocast_context, resolve_device, set_threads
from dusss.engine.runs import prepare_run_dir
from dusss.engine.samplers import EpochSampler
from dusss.engine.seed import rng_state, seed_everything, set_rng_state
from dusss.engine.state import (
    check_finite,
    cosine_lr,
    load_train_state,
    optimizer_from_tensors,
    save_train_state,
    set_lr,
)
from dusss.errors import DataError
from dusss.methods.pretrain import (
    PRETRAIN_METHODS,
    PretrainObjectiveConfig,
    build_pretrain_objective,
    retrieval_at_k,
)
from dusss.models.vlm import VisionLanguageModel, VLMConfig


@dataclass
class PretrainConfig:
    """Everything `dusss pretrain` needs; saved resolved as RUN/config.yaml."""

    data: str = ""
    out: str = ""
    method: str = "dusss"
    epochs: int = 10
    batch_size: int = 16
    image_size: int = 128
    lr: float = 1e-4
    encoder_lr: float = 3e-5
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    device: str = "auto"
    precision: str = "fp32"
    seed: int = 0
    num_workers: int = 0
    threads: int = 0
    text_aug: bool = True
    include_val_in_training: bool = False
    progress: bool = True
    vlm: VLMConfig = field(default_factory=VLMConfig)
    objective: PretrainObjectiveConfig = field(default_factory=PretrainObjectiveConfig)

    def __post_init__(self) -> None:
        check(self.method in PRETRAIN_METHODS, f"method: {self.method!r} is not one of {sorted(PRETRAIN_METHODS)}")
        check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        check(self.batch_size >= 2, f"batch_size must be >= 2 for a contrastive loss, got {self.batch_size}")
        check(self.image_size >= 32 and self.image_size % 16 == 0, f"image_size must be a multiple of 16 >= 32, got {self.image_size}")
        check(self.lr > 0 and self.encoder_lr >= 0, "lr must be > 0 and encoder_lr >= 0")
        check(self.precision in ("fp32", "bf16", "fp16"), f"precision must be fp32|bf16|fp16, got {self.precision!r}")


def _encoder_param_groups(vlm: torch.nn.Module, cfg: PretrainConfig) -> list[dict[str, Any]]:
    """Pretrained encoders at `encoder_lr`, new heads/PDT/temperature at `lr`."""
    enc, rest = [], []
    for name, p in vlm.named_parameters():
        if not p.requires_grad:
            continue
        (enc if name.startswith(("image_encoder.", "text_encoder.")) else rest).append(p)
    groups = [{"params": rest, "lr": cfg.lr}]
    if enc and cfg.encoder_lr > 0:
        groups.append({"params": enc, "lr": cfg.encoder_lr})
    return groups


@torch.no_grad()
def evaluate_retrieval(vlm: VisionLanguageModel, loader: DataLoader, device: torch.device) -> dict[str, float]:
    """Image→text and text→image R@1/R@5 over a whole split (one embedding per row)."""
    was_training = vlm.training
    vlm.eval()
    imgs, txts = [], []
    for batch in loader:
        imgs.append(vlm.encode_image(batch["image"].to(device))["global"].float().cpu())
        txts.append(vlm.encode_text(list(batch["text"]))["global"].float().cpu())
    vlm.train(was_training)
    if not imgs:
        return {}
    return retrieval_at_k(torch.cat(imgs), torch.cat(txts))


def run_pretrain(cfg: PretrainConfig, overwrite: bool = False, resume: bool = False) -> Path:
    """Pre-train the VLM; writes RUN/vlm.safetensors (+ .json), metrics, curves. Returns the checkpoint path."""
    dist.init_from_env(cfg.device)
    device = resolve_device(cfg.device)
    set_threads(cfg.threads)
    seed_everything(cfg.seed + dist.rank())
    records = read_manifest(cfg.data)
    train_split = ("train", "val") if cfg.include_val_in_training else ("train",)
    train_rec = [r for r in records if r.split in train_split and r.text.strip()]
    val_rec = [r for r in records if r.split == "val" and r.text.strip()]
    if len(train_rec) < cfg.batch_size:
        raise DataError(cfg.data, f"train split has {len(train_rec)} rows with text, fewer than batch_size {cfg.batch_size}")
    run = prepare_run_dir(cfg.out, to_dict(cfg), overwrite=overwrite, resume=resume, kind="pretrain")

    train_ds = PretrainDataset(train_rec, cfg.image_size, seed=cfg.seed, text_aug=cfg.text_aug)
    sampler = EpochSampler(len(train_ds), seed=cfg.seed, shuffle=True, drop_last=True)
    per_rank = max(2, cfg.batch_size // dist.world_size())
    loader = DataLoader(train_ds, batch_size=per_rank, sampler=sampler, drop_last=True, num_workers=cfg.num_workers)
    val_loader = None
    if val_rec:
        from dusss.data.datasets import SegmentationDataset

        val_loader = DataLoader(SegmentationDataset(val_rec, cfg.image_size), batch_size=64, shuffle=False)

    vlm = VisionLanguageModel(cfg.vlm).to(device)
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
    steps_per_epoch = max(1, len(loader))
    total_steps = cfg.epochs * steps_per_epoch
    warmup = int(cfg.warmup_fraction * total_steps)

    state_path = run / "state.safetensors"
    logger = MetricsLogger(run, fresh=not resume) if dist.is_main() else None
    start_epoch, step = 0, 0
    if resume and state_path.is_file():
        modules, otensors, _, meta = load_train_state(state_path)
        vlm.load_state_dict(modules["vlm"])
        if isinstance(objective, torch.nn.Module) and "objective" in modules:
            objective.load_state_dict(modules["objective"])
        optimizer_from_tensors(optimizer, otensors, meta["optimizer"])
        start_epoch, step = int(meta["epoch"]), int(meta["step"])
        set_rng_state(meta["rng"])
        if logger:
            logger.truncate_after(start_epoch)

    ckpt = run / "vlm.safetensors"
    t_start = time.time()
    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        train_ds.set_epoch(epoch)
        vlm.train()
        sums: dict[str, float] = {}
        n = 0
        t0 = time.time()
        for batch in progress(loader, desc=f"pretrain {epoch + 1}/{cfg.epochs}", total=len(loader), enabled=cfg.progress):
            set_lr(optimizer, cosine_lr(step, total_steps, 1.0, warmup))
            batch = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
            with autocast_context(device, cfg.precision):
                loss, logs = objective(vlm, batch)
            check_finite(loss, step, ckpt if ckpt.exists() else None)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            dist.sync_gradients(trainable, average=True)
            optimizer.step()
            vlm.update_momentum()
            step += 1
            n += 1
            for k, v in {"loss": float(loss.detach()), **logs}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        row: dict[str, Any] = {f"train/{k}": v / max(n, 1) for k, v in sums.items()}
        row["seconds_per_epoch"] = time.time() - t0
        row["lr"] = optimizer.param_groups[0]["lr"]
        if val_loader is not None and dist.is_main():
            row.update({f"val/{k}": v for k, v in evaluate_retrieval(vlm, val_loader, device).items()})
        if dist.is_main():
            tensors, meta = vlm.to_checkpoint()
            from dusss.engine.checkpoint import save_checkpoint

            save_checkpoint(ckpt, tensors, "vlm", {**meta, "method": cfg.method, "epoch": epoch + 1,
                                                     "image_size": cfg.image_size, "objective": to_dict(cfg.objective)})
            modules = {"vlm": vlm.state_dict()}
            if isinstance(objective, torch.nn.Module) and len(objective.state_dict()):
                modules["objective"] = objective.state_dict()
            save_train_state(state_path, modules, optimizer,
                             {"epoch": epoch + 1, "step": step, "rng": rng_state()})
            assert logger is not None
            logger.log(epoch + 1, row)
            plot_curves(run / "metrics.jsonl", run / "curves.png")
        dist.barrier()
    if logger:
        logger.close()
    if dist.is_main():
        (run / "DONE").write_text(f"{time.time() - t_start:.1f}\n")
    return ckpt


def pretrain_summary(run: Path) -> dict[str, Any]:
    """Last logged row of a pre-training run (for reports)."""
    import json

    lines = (Path(run) / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1]) if lines else {}


__all__ = ["PretrainConfig", "evaluate_retrieval", "pretrain_summary", "run_pretrain"]
