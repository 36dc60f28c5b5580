"""Step-2 methods by name: how a (labeled, unlabeled) batch pair becomes a loss (paper eqs 13-18).

A method owns the student (given), its EMA teacher and, for the text-guided methods, the text-mask generator
around the frozen VLM. The training loop only calls `parameters()`, `loss(...)`, `after_step(step)`,
`pseudo_labels(...)`, `train()/eval()` and `state_dict()/load_state_dict()`; it never knows which method runs.

* `supervised`: L_sup (eq 15) on the labeled images only.
* `mt`: L_sup + λ(t)·consistency(z_s, target(z_t)) with the EMA teacher of eq 13 (soft σ(z_t) or a
  confidence-masked hard label, `perturb.pseudo_label`; MSE on probabilities by default).
* `unimatch` (Yang et al., CVPR 2023): the student is its own teacher on the weak view (no EMA, no
  gradient); hard labels kept where confident (τ = 0.95) train two independent strong views (photometric +
  CutMix) and a feature-perturbed weak view: L_sup + λ(t)·(¼ℓ(s1) + ¼ℓ(s2) + ½ℓ(fp)) ... see the class.
* `dusss` / `amvlm` (identical Step 2; AMVLM differs only in the VLM): L_sup + λ(t)·L_semi (eqs 14-18, logit-space
  merge, targets detached, so no gradient from L_semi reaches the teacher, f_g or κ/β) + tg_weight·L_tg (eq 12,
  trains f_g, κ_m, β_m and the L_tg scale only) + text_supervised_weight·ℓ_text(z_text, y) on the labeled images
  (trains f_g and κ, β: "trained with L_tg and with the labeled masks"; ℓ_text = Dice + BCE by default). The
  text-mask generator can have its own learning rate (`text_mask_lr`) and be fitted on the labeled images before
  Step 2 (`text_warmup_steps`, `DuSSSMethod.warmup`).

λ(t) = consistency_weight · exp(−5(1 − min(t/T_r, 1))²), T_r = rampup_fraction · total_steps (0 → constant).

Views (`dusss.methods.perturb`): the teacher and the text-mask generator see the weak view (the loader's
geometric augmentation, plus `perturb.teacher_noise`); the student sees the strong view when
`perturb.strong` (photometric + CutMix, the targets CutMixed with the same boxes).

Student forward (`student_forward`): "separate" (default) runs the labeled and the unlabeled images through
the student in two forward passes, so BatchNorm normalises each with its own batch statistics; "joint"
concatenates them into one batch. With joint, the labeled loss reaches the unlabeled images through the
BatchNorm batch statistics, and gradient descent uses the unsupervised images as a lever on the
normalisation of the labeled ones: the eval-mode (running-statistics) network then collapses
(docs/method-notes.md, "Mean-Teacher collapse"). Batches are dicts `{"image", "mask", "has_mask", "text",
"key"}`. When a method that uses unlabeled data gets `unlabeled=None`, only the labeled terms are computed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from dusss.config import MAX_LR, MAX_WEIGHT, bounded, check, check_fields
from dusss.errors import CheckpointError, ConfigError
from dusss.losses.segmentation import consistency_loss, merge_logits, seg_loss, semi_loss, soft_bce
from dusss.methods.baseline_config import (
    BCPConfig,
    CCTConfig,
    CPSConfig,
    LViTConfig,
    MCNetConfig,
    SSNetConfig,
    UAMTConfig,
    UCMTConfig,
)
from dusss.methods.perturb import Mix, PerturbConfig, pseudo_targets, strong_view, teacher_view
from dusss.models.batchnorm import frozen_running_stats
from dusss.models.ema import EMATeacher, sigmoid_rampup, unwrap
from dusss.models.grounding import TextMaskConfig, TextMaskGenerator
from dusss.models.networks import segment
from dusss.models.unet import UNet, UNetConfig
from dusss.registry import Registry

__all__ = [
    "SEG_METHODS",
    "AMVLMMethod",
    "DuSSSMethod",
    "MeanTeacherMethod",
    "SegMethod",
    "SegMethodConfig",
    "SupervisedMethod",
    "UniMatchMethod",
    "build_seg_method",
    "consistency_lambda",
    "register_seg_method",
    "seg_method_preset",
    "sigmoid_rampup",
]


@dataclass
class SegMethodConfig:
    """Step-2 method settings (defaults: METHOD §3.7 recommendations; the paper gives no weights)."""

    consistency_weight: float = bounded(1.0, ge=0, le=MAX_WEIGHT)  # λ_max
    rampup_fraction: float = bounded(0.4, ge=0, le=1)  # T_r as a fraction of all optimizer steps; 0 = no ramp-up (the code)
    ema_decay: float = bounded(0.99, ge=0, lt=1)  # α of eq 13 (warm-up min(1 − 1/(t+1), α))
    ema_buffers: Literal["copy", "ema"] = "ema"  # BN running stats EMA-averaged with the weights, or copied
    # How the EMA teacher's BatchNorm normalises: with each batch's own statistics (SSL4MIS, the DuSSS code) or
    # with its running statistics (eval mode; the teacher then lags badly: docs/method-notes.md)
    teacher_norm: Literal["batch", "running"] = "batch"
    seg_loss: Literal["dice_bce", "bce"] = "dice_bce"  # L_sup (eq 15)
    semi_loss: Literal["bce", "dice_bce"] = "bce"  # ℓ of eqs 16-17
    consistency: Literal["bce", "mse", "dice_bce"] = "mse"  # mt/unimatch ℓ on unlabeled images (MT: MSE)
    student_forward: Literal["separate", "joint"] = "separate"  # labeled/unlabeled in two passes or one batch
    text_term: bool = True  # eq 17 (L_semi^text); False → L_semi = L_semi^merged
    merge: Literal["logit", "prob"] = "logit"  # "prob" = repro of the code's probability-space merge (S3)
    # L_tg (eq 12). 0 by default: beside the supervised text term it keeps the text mask empty (weight 1: text
    # Dice 0.12 = no lesion found; 0.1: 0.08-0.33; 0: 0.38-0.43 on the phantom set, docs/benchmarks.md).
    tg_weight: float = bounded(0.0, ge=0, le=MAX_WEIGHT)
    text_supervised_weight: float = bounded(1.0, ge=0, le=MAX_WEIGHT)  # ℓ(z_text, y) on labeled images
    # ℓ of the supervised text term: Dice + BCE survives the class imbalance (BCE alone fits an empty mask)
    text_supervised_loss: Literal["dice_bce", "bce"] = "dice_bce"
    text_mask_lr: float = bounded(1e-2, ge=0, le=MAX_LR)  # learning rate of f_g, κ, β, κ_m, β_m and the L_tg scale; 0 = the run's lr
    # Optimizer steps fitting the text-mask generator on the labeled images (ℓ_text + L_tg) before Step 2,
    # so that the text gate can open from the start; 0 = none (the paper).
    text_warmup_steps: int = bounded(300, ge=0, le=10**7)
    # Share of the labeled images whose supervised text term uses a *sub-report*: the report (`caption_mask`,
    # QaTa style) of a random subset of their lesions, each kept with probability ½, against the mask of that
    # subset (no lesion kept: "No pulmonary infection." and an empty mask). It teaches the generator that the
    # report chooses where the mask lights up. Only for reports in the style `caption_mask` writes (the phantom
    # set, QaTa); 0 = off (the paper).
    text_sub_reports: float = bounded(0.0, ge=0, le=1)
    # Share of the labeled images (of those not given a sub-report) whose supervised text term uses a
    # *counterfactual report*: the report of the next labeled image of the batch, against the image's own lesions
    # that this report describes (`caption.described_lesions`: lung and zones named; often none). Unlike
    # sub-reports it also shows single-lesion images under a report that points elsewhere. Same report style
    # condition as `text_sub_reports`; 0 = off.
    text_swap_reports: float = bounded(0.0, ge=0, le=1)
    # With `text_supervised_loss: dice_bce`: False drops the Dice half of ℓ_text on images whose (sub- or
    # counterfactual) target is empty, leaving their BCE half. Per-image Dice with an empty target is
    # 1 − 1/(Σσ(z) + 1): it pushes the whole mask towards empty, and counterfactual reports make many such rows.
    text_dice_on_empty: bool = True
    # With `text_gate: dice` only: the text mask enters L_semi (merge + eq 17) once its running Dice on the
    # labeled images reaches this value; before that L_semi^merged uses the teacher alone. 0 = always on (the
    # paper).
    text_gate_dice: float = bounded(0.3, ge=0, le=1)
    text_gate_momentum: float = bounded(0.9, ge=0, lt=1)  # EMA of the gate's measurements on labeled batches
    # What opens the text gate. "gain" (default): the merged label's Dice on the labeled images (teacher on the
    # weak view + text mask, own reports) beats the teacher's own, as a running mean over batches (> 0); the
    # text mask then only enters the pseudo-label while it measurably repairs it. "dice": the text mask's own
    # running Dice reaches `text_gate_dice` (the earlier rule; it let a text mask of Dice 0.55 veto a teacher of
    # 0.78: merged 0.67, docs/method-notes.md).
    text_gate: Literal["gain", "dice"] = "gain"
    # With the gain gate: the share of the labeled images (chosen by a hash of their key) that the text-mask
    # generator never trains on, so that the gain is measured on images it has not fitted (on its own training
    # images it looked better than on unseen ones and kept the gate open while the merge hurt).
    text_gate_holdout: float = bounded(0.25, ge=0, lt=1)
    text_mask: TextMaskConfig = field(default_factory=lambda: TextMaskConfig(skip_channels=16))
    perturb: PerturbConfig = field(default_factory=PerturbConfig)
    # the baselines' own settings (dusss.methods.baselines; each paper's values by default)
    uamt: UAMTConfig = field(default_factory=UAMTConfig)
    ucmt: UCMTConfig = field(default_factory=UCMTConfig)
    cct: CCTConfig = field(default_factory=CCTConfig)
    mcnet: MCNetConfig = field(default_factory=MCNetConfig)
    ssnet: SSNetConfig = field(default_factory=SSNetConfig)
    cps: CPSConfig = field(default_factory=CPSConfig)
    bcp: BCPConfig = field(default_factory=BCPConfig)
    lvit: LViTConfig = field(default_factory=LViTConfig)

    def __post_init__(self) -> None:
        check_fields(self, "semi")
        check(self.ema_buffers in ("copy", "ema"), f"ema_buffers must be copy or ema, got {self.ema_buffers!r}")
        check(self.teacher_norm in ("batch", "running"),
              f"teacher_norm must be batch or running, got {self.teacher_norm!r}")
        check(self.seg_loss in ("dice_bce", "bce"), f"seg_loss must be dice_bce or bce, got {self.seg_loss!r}")
        check(self.semi_loss in ("dice_bce", "bce"), f"semi_loss must be dice_bce or bce, got {self.semi_loss!r}")
        check(self.consistency in ("bce", "mse", "dice_bce"),
              f"consistency must be bce, mse or dice_bce, got {self.consistency!r}")
        check(self.student_forward in ("separate", "joint"),
              f"student_forward must be separate or joint, got {self.student_forward!r}")
        check(not (self.student_forward == "joint" and self.perturb.feature_dropout > 0),
              "perturb.feature_dropout needs student_forward: separate (it perturbs the unlabeled pass only)")
        check(self.merge in ("logit", "prob"), f"merge must be logit or prob, got {self.merge!r}")
        check(self.text_supervised_loss in ("dice_bce", "bce"),
              f"text_supervised_loss must be dice_bce or bce, got {self.text_supervised_loss!r}")
        check(self.text_gate in ("gain", "dice"), f"text_gate must be gain or dice, got {self.text_gate!r}")


# the baselines register themselves from their own modules, imported on the registry's first read
SEG_METHODS: Registry[type[SegMethod]] = Registry("segmentation method", plugins=("dusss.methods.baselines",))
MAX_SUB_REPORT_REGIONS = 64  # keep/drop draws per image for `text_sub_reports` (regions beyond are dropped)


def register_seg_method(name: str) -> Callable[[type[SegMethod]], type[SegMethod]]:
    """Class decorator: register a `SegMethod` subclass under `name` in `SEG_METHODS`."""

    def deco(cls: type[SegMethod]) -> type[SegMethod]:
        SEG_METHODS.add(name, cls)
        cls.name = name
        return cls

    return deco


def consistency_lambda(cfg: SegMethodConfig, step: int, total_steps: int) -> float:
    """λ(t) = consistency_weight · sigmoid_rampup(t, rampup_fraction · total_steps)."""
    return cfg.consistency_weight * sigmoid_rampup(step, cfg.rampup_fraction * max(total_steps, 0))


def _decay_groups(params: list[nn.Parameter], lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups of `params` at `lr` (stored as `base_lr` too): weight decay on matrices / filters only,
    none on scalars, biases and norms; empty groups left out."""
    groups = []
    for decay in (True, False):
        chosen = [p for p in params if (p.ndim >= 2) == decay]
        if chosen:
            groups.append({"params": chosen, "weight_decay": weight_decay if decay else 0.0, "lr": lr, "base_lr": lr})
    return groups


def _masked_mean(per_image: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean of per-image losses over images with weight 1 (0 with an intact graph if there are none)."""
    w = weights.to(per_image.dtype)
    return (per_image * w).sum() / w.sum().clamp_min(1.0)


class SegMethod:
    """Base class: the supervised part and the shared plumbing. Subclasses override `loss` and friends."""

    name: str = ""
    needs_vlm: bool = False
    # The pre-training method (`PRETRAIN_METHODS`) whose VLM this method expects, for harnesses that pre-train
    # one for it (`dusss compare`); meaningful only when `needs_vlm`.
    vlm_pretrain: ClassVar[str] = "dusss"
    uses_unlabeled: bool = False
    # The method's published setting as dotted `TrainConfig` keys (`seg_method_preset`); a class attribute so
    # that a method registered from another module brings its own.
    preset: ClassVar[dict[str, Any]] = {}
    # The network the method trains, saves and predicts with (`dusss.models.networks`): "unet" (images only),
    # or a text-conditioned one that needs each image's report at inference ("clip", "lvit").
    network: ClassVar[str] = "unet"

    @classmethod
    def build_student(cls, unet: UNetConfig, cfg: SegMethodConfig, vlm: nn.Module | None = None,
                      vlm_path: str = "") -> nn.Module:
        """The network this method trains: the U-Net for `network: unet` (which `run_train` builds itself, from
        `engine.train.UNet`), the method's own network for the text-conditioned baselines."""
        return UNet(unet)

    def __init__(self, cfg: SegMethodConfig, student: nn.Module, vlm: nn.Module | None = None) -> None:
        self.cfg = cfg
        self.student = student
        self.vlm = vlm
        self.teacher: EMATeacher | None = None
        self.text_mask: TextMaskGenerator | None = None
        # Trainable modules of the method beside the student (CCT's auxiliary decoders, MC-Net's second decoder,
        # CPS's second network): optimised with the student at the run's lr, moved, switched train/eval and
        # saved for resuming with it (`heads.*`), never exported (the model is the student).
        self.heads = nn.ModuleDict()

    # -- plumbing --------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        for p in self.student.parameters():
            return p.device
        return torch.device("cpu")

    def modules_to_train(self) -> list[nn.Module]:
        """Modules whose trainable parameters the optimizer gets (student, text-mask generator)."""
        mods: list[nn.Module] = [self.student, *self.heads.values()]
        if self.text_mask is not None:
            mods.append(self.text_mask)
        return mods

    def parameters(self) -> list[nn.Parameter]:
        """Parameters to optimise: the student's and the text-mask generator's trainables (no teacher, no VLM)."""
        seen: set[int] = set()
        out: list[nn.Parameter] = []
        params = list(self.student.parameters()) + list(self.heads.parameters())
        if self.text_mask is not None:
            params += self.text_mask.trainable_parameters()
        for p in params:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups: weight decay on matrices/filters only (none on scalars, biases, norms); the text-mask
        generator's parameters at `text_mask_lr` when it is set. Each group stores its `base_lr`."""
        text_ids = {id(p) for p in self.text_mask.trainable_parameters()} if self.text_mask is not None else set()
        params = self.parameters()
        return (_decay_groups([p for p in params if id(p) not in text_ids], lr, weight_decay)
                + _decay_groups([p for p in params if id(p) in text_ids], self._text_lr(lr), weight_decay))

    def _text_lr(self, lr: float) -> float:
        """The text-mask generator's learning rate: `text_mask_lr`, or the run's `lr` when that is 0."""
        return self.cfg.text_mask_lr if self.cfg.text_mask_lr > 0 else lr

    def train(self, mode: bool = True) -> SegMethod:
        """Student and f_g in train mode; the teacher and the VLM always stay in eval mode."""
        self.student.train(mode)
        self.heads.train(mode)
        if self.text_mask is not None:
            self.text_mask.train(mode)
        if self.teacher is not None:
            self.teacher.module.eval()
        return self

    def eval(self) -> SegMethod:
        return self.train(False)

    def to(self, device: torch.device | str) -> SegMethod:
        self.student.to(device)
        self.heads.to(device)
        if self.teacher is not None:
            self.teacher.to(device)
        if self.text_mask is not None:
            self.text_mask.to(device)
        return self

    def after_step(self, step: int) -> None:
        """Called after each optimizer step `step` (0-based): the EMA teacher update (eq 13) where there is one."""
        if self.teacher is not None:
            self.teacher.update(self.student, step)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Method state for resuming: `teacher.*`, `heads.*` and `text_mask.*` (trainables only); the student is
        not in it."""
        state: dict[str, torch.Tensor] = {f"heads.{k}": v for k, v in self.heads.state_dict().items()}
        if self.teacher is not None:
            state.update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})
        if self.text_mask is not None:
            state.update({f"text_mask.{k}": v for k, v in self.text_mask.trainable_state_dict().items()})
        for name in ("text_reliability", "text_gain"):
            if hasattr(self, name):
                state[name] = getattr(self, name).detach().clone().reshape(1)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of `state_dict`; raises CheckpointError on missing or unexpected keys."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shape = [k for k in own if k in state and own[k].shape != state[k].shape]
        if missing or unexpected or shape:
            raise CheckpointError(
                f"method state for {self.name!r} does not match: {len(missing)} missing, "
                f"{len(unexpected)} unexpected, {len(shape)} with another shape (e.g. {(missing + unexpected + shape)[0]})"
            )
        for name in ("text_reliability", "text_gain"):
            if name in state:
                setattr(self, name, state[name].reshape(()).clone())
        if self.teacher is not None:
            self.teacher.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("teacher.")})
        if len(self.heads):
            self.heads.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("heads.")})
        if self.text_mask is not None:
            self.text_mask.load_trainable_state_dict(
                {k[10:]: v for k, v in state.items() if k.startswith("text_mask.")}
            )

    # -- batches ---------------------------------------------------------------------------------------------
    def _unpack(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, list[str]]:
        dev = self.device
        images = batch["image"].to(dev, non_blocking=True)
        mask = batch.get("mask")
        mask = mask.to(dev, non_blocking=True) if isinstance(mask, torch.Tensor) else None
        has = batch.get("has_mask")
        if has is None:
            has_t = torch.full((images.shape[0],), mask is not None, dtype=torch.bool, device=dev)
        else:
            has_t = torch.as_tensor(has, dtype=torch.bool).to(dev).reshape(-1)
        if mask is None:
            has_t = torch.zeros_like(has_t)
        texts = batch.get("text")
        texts = [texts] if isinstance(texts, str) else list(texts) if texts is not None else [""] * len(images)
        return images, mask, has_t, texts

    def _student_forward(
        self, x_l: torch.Tensor, x_u: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Student logits for labeled and unlabeled images: two passes (`student_forward="separate"`), or one
        pass over the concatenation ("joint", the coupled-BatchNorm setting kept for the ablation)."""
        if x_u is None:
            return self.student(x_l), None
        pc = self.cfg.perturb
        if self.cfg.student_forward == "joint" and x_l.shape[1:] == x_u.shape[1:]:
            z = self.student(torch.cat([x_l, x_u], dim=0))
            return z[: x_l.shape[0]], z[x_l.shape[0] :]
        z_l = self.student(x_l)
        with self._perturbed_pass(pc.perturbs_student):
            z_u = self.student(x_u, feature_dropout=pc.feature_dropout) if pc.feature_dropout > 0 else self.student(x_u)
        return z_l, z_u

    def _perturbed_pass(self, perturbed: bool = True) -> contextlib.AbstractContextManager[None]:
        """Context for a student pass over unlabeled inputs: BatchNorm running statistics stay as they are for
        perturbed inputs (unless `perturb.bn_update_perturbed`) and, with `perturb.bn_update_clean_unlabeled`
        off, for clean ones too."""
        pc = self.cfg.perturb
        frozen = not pc.bn_update_perturbed if perturbed else not pc.bn_update_clean_unlabeled
        return frozen_running_stats(self.student, enabled=frozen)

    def _sup_loss(self, z_l: torch.Tensor, y: torch.Tensor | None, has: torch.Tensor) -> torch.Tensor:
        """L_sup (eq 15): seg_loss over the labeled images that have a mask."""
        if y is None:
            return z_l.sum() * 0.0
        return _masked_mean(seg_loss(z_l, y, self.cfg.seg_loss, reduction="none"), has)

    def _labeled_loss(self, labeled: dict[str, Any]) -> torch.Tensor:
        """L_sup of a labeled batch through its own student pass (methods that need no other labeled output)."""
        x_l, y_l, has_l, t_l = self._unpack(labeled)
        return self._sup_loss(segment(self.student, x_l, t_l), y_l, has_l)

    def _teacher_logits(self, x_u: torch.Tensor) -> torch.Tensor:
        """The EMA teacher's logits on the weak view (plus `perturb.teacher_noise`)."""
        assert self.teacher is not None
        return self.teacher(teacher_view(x_u, self.cfg.perturb))

    def _unlabeled_term(self, z_s: torch.Tensor, z_t: torch.Tensor, mix: Mix | None) -> torch.Tensor:
        """ℓ(z_s, target(z_t)): soft or confidence-masked hard targets (`perturb`), CutMixed like the student's view."""
        target, weight = pseudo_targets(z_t, self.cfg.perturb)
        if mix is not None:
            target = mix.apply(target)
            weight = mix.apply(weight) if weight is not None else None
        return consistency_loss(z_s, target, self.cfg.consistency, weight=weight)

    @torch.no_grad()
    def _student_eval(self, images: torch.Tensor, texts: list[str] | None = None) -> torch.Tensor:
        """Student logits in eval mode (BN running statistics untouched), restoring the previous mode; `texts`
        reach a text-conditioned student only."""
        was_training = self.student.training
        self.student.eval()
        try:
            return segment(self.student, images.to(self.device), texts)
        finally:
            self.student.train(was_training)

    @staticmethod
    def _floats(logs: dict[str, torch.Tensor | float]) -> dict[str, float]:
        keys = list(logs)
        vals = torch.stack([torch.as_tensor(logs[k], dtype=torch.float32).detach().cpu() for k in keys]).tolist()
        return dict(zip(keys, vals))

    # -- interface -------------------------------------------------------------------------------------------
    def loss(
        self,
        labeled: dict[str, Any],
        unlabeled: dict[str, Any] | None = None,
        step: int = 0,
        total_steps: int = 1,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def pseudo_labels(self, images: torch.Tensor, texts: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Logits the method would use as targets for `images`; always includes the student's (`student`)."""
        return {"student": self._student_eval(images, texts)}


@register_seg_method("supervised")
class SupervisedMethod(SegMethod):
    """L_sup (eq 15) on labeled images only (the lower bound; with 100 % labels, the upper bound)."""

    def loss(
        self,
        labeled: dict[str, Any],
        unlabeled: dict[str, Any] | None = None,
        step: int = 0,
        total_steps: int = 1,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        l_sup = self._labeled_loss(labeled)
        return l_sup, self._floats({"loss": l_sup, "sup": l_sup})


@register_seg_method("mt")
class MeanTeacherMethod(SegMethod):
    """Mean Teacher: L_sup + λ(t)·consistency(z_s^u, σ(z_t)) (MSE by default, `consistency`) with the EMA teacher of eq 13."""

    uses_unlabeled = True

    def __init__(self, cfg: SegMethodConfig, student: nn.Module, vlm: nn.Module | None = None) -> None:
        super().__init__(cfg, student, vlm)
        self.teacher = EMATeacher(unwrap(student), cfg.ema_decay, cfg.ema_buffers, cfg.teacher_norm)

    def loss(
        self,
        labeled: dict[str, Any],
        unlabeled: dict[str, Any] | None = None,
        step: int = 0,
        total_steps: int = 1,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        x_l, y_l, has_l, _ = self._unpack(labeled)
        x_u = self._unpack(unlabeled)[0] if unlabeled is not None else None
        x_s, mix = strong_view(x_u, self.cfg.perturb) if x_u is not None else (None, None)
        z_l, z_s = self._student_forward(x_l, x_s)
        l_sup = self._sup_loss(z_l, y_l, has_l)
        lam = consistency_lambda(self.cfg, step, total_steps)
        logs: dict[str, torch.Tensor | float] = {"sup": l_sup, "lambda": lam}
        loss = l_sup
        if z_s is not None and x_u is not None:
            l_cons, extra = self._consistency(z_s, x_u, mix, step, total_steps)
            loss = loss + lam * l_cons
            logs.update({"cons": l_cons, **extra})
        logs["loss"] = loss
        return loss, self._floats(logs)

    def _consistency(self, z_s: torch.Tensor, x_u: torch.Tensor, mix: Mix | None, step: int,
                     total_steps: int) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """(the unlabeled term of the student's logits `z_s` on the view of `x_u`, extra logs): the teacher's
        targets through `_unlabeled_term`. Variants of the Mean Teacher (UA-MT) override only this."""
        return self._unlabeled_term(z_s, self._teacher_logits(x_u), mix), {}

    @torch.no_grad()
    def pseudo_labels(self, images: torch.Tensor, texts: list[str] | None = None) -> dict[str, torch.Tensor]:
        """`student` and `teacher` logits."""
        assert self.teacher is not None
        out = super().pseudo_labels(images, texts)
        out["teacher"] = self.teacher(images.to(self.device))
        return out


@register_seg_method("unimatch")
class UniMatchMethod(SegMethod):
    """UniMatch (Yang et al., "Revisiting Weak-to-Strong Consistency in Semi-Supervised Semantic
    Segmentation", CVPR 2023), for binary masks.

    The student is its own teacher: its prediction on the weak view (no gradient, train mode as in the
    authors' code) gives hard labels 1[p ≥ 0.5] kept where max(p, 1 − p) ≥ τ (`perturb.confidence`). They
    train (i) two independent strong views of the weak batch (photometric + CutMix, targets CutMixed the
    same way) and (ii) the weak view with Dropout2d(`perturb.feature_dropout`) on the encoder features:
    L = L_sup + λ(t)·(¼ℓ(z_s1) + ¼ℓ(z_s2) + ½ℓ(z_fp)), ℓ = `consistency` with the confidence mask.
    The authors write (L_sup + L_u)/2; the common factor ½ is left out (Adam is scale-free). Their preset is
    `METHOD_PRESETS["unimatch"]`. The strong view is always on here, whatever `perturb.strong` says.
    """

    uses_unlabeled = True

    def loss(
        self,
        labeled: dict[str, Any],
        unlabeled: dict[str, Any] | None = None,
        step: int = 0,
        total_steps: int = 1,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        l_sup = self._labeled_loss(labeled)
        lam = consistency_lambda(self.cfg, step, total_steps)
        logs: dict[str, torch.Tensor | float] = {"sup": l_sup, "lambda": lam}
        loss = l_sup
        if unlabeled is not None:
            pcfg = dataclasses.replace(self.cfg.perturb, strong=True)
            x_w = self._unpack(unlabeled)[0]
            with torch.no_grad():
                z_w = self.student(x_w)
            x_s1, mix1 = strong_view(x_w, pcfg)
            x_s2, mix2 = strong_view(x_w, pcfg)
            fd = self.cfg.perturb.feature_dropout
            with self._perturbed_pass():
                z_s1, z_s2 = self.student(torch.cat([x_s1, x_s2], dim=0)).chunk(2, dim=0)
                z_fp = self.student(x_w, feature_dropout=fd) if fd > 0 else None
            l_s1 = self._unlabeled_term(z_s1, z_w, mix1)
            l_s2 = self._unlabeled_term(z_s2, z_w, mix2)
            if z_fp is not None:
                l_fp = self._unlabeled_term(z_fp, z_w, None)
                l_u = 0.25 * (l_s1 + l_s2) + 0.5 * l_fp
                logs["u_fp"] = l_fp
            else:
                l_u = 0.5 * (l_s1 + l_s2)
            loss = loss + lam * l_u
            p_w = torch.sigmoid(z_w.float())
            logs.update({"u_s": 0.5 * (l_s1 + l_s2), "cons": l_u,
                         "confident": (torch.maximum(p_w, 1 - p_w) >= self.cfg.perturb.confidence).float().mean()})
        logs["loss"] = loss
        return loss, self._floats(logs)


@register_seg_method("dusss")
class DuSSSMethod(MeanTeacherMethod):
    """DuSSS Step 2: L_sup + λ(t)·½(L_merged + L_text) + tg_weight·L_tg + text_supervised_weight·L_text_sup.

    The text-mask generator runs once per step on the unlabeled images and, when text_supervised_weight > 0,
    the labeled images too; L_tg (eq 12) is then computed over all of them (B_l + B_u image/text pairs).
    With `perturb.pseudo_label: hard` the merged and text targets of eqs 16-17 become UniMatch's confident hard
    labels (1[q ≥ 0.5] where max(q, 1 − q) ≥ `perturb.confidence`; ours, the paper's are soft).
    """

    needs_vlm = True
    uses_unlabeled = True

    def __init__(self, cfg: SegMethodConfig, student: nn.Module, vlm: nn.Module | None = None) -> None:
        if vlm is None:
            raise ConfigError(f"method {self.name!r} needs a pretrained VLM (--vlm)")
        super().__init__(cfg, student, vlm)
        self.text_mask = TextMaskGenerator(vlm, cfg.text_mask).to(self.device)
        self.text_reliability = torch.zeros(())  # running Dice of the text mask on labeled images
        self.text_gain = torch.zeros(())  # running Dice(merged) − Dice(teacher) on labeled images

    def _gate_holdout(self, batch: dict[str, Any], n: int) -> torch.Tensor:
        """`[n]` bool: the labeled images the text-mask generator does not train on (`text_gate_holdout` of the
        keys by CRC32, the same images in every epoch and process); none unless the gain gate is used."""
        share = self.cfg.text_gate_holdout if self.cfg.text_gate == "gain" else 0.0
        keys = batch.get("key")
        if share <= 0 or keys is None:
            return torch.zeros(n, dtype=torch.bool, device=self.device)
        keys = [keys] if isinstance(keys, str) else list(keys)
        held = [zlib.crc32(str(k).encode()) % 1000 < share * 1000 for k in keys]
        return torch.tensor(held, dtype=torch.bool, device=self.device)

    def _sub_reports(self, texts: list[str], y: torch.Tensor,
                     has: torch.Tensor) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """(texts, masks, replaced) of the labeled images with a `text_sub_reports` share of them replaced by the
        report and mask of a random subset of their lesions, then a `text_swap_reports` share of the others by a
        counterfactual report (`_swap_reports`); drawn from torch's RNG, so a seeded run repeats."""
        replaced = torch.zeros(len(texts), dtype=torch.bool, device=y.device)
        p = self.cfg.text_sub_reports
        if p <= 0 and self.cfg.text_swap_reports <= 0:
            return texts, y, replaced
        from dusss.data.caption import sub_report

        original = y
        texts, y = list(texts), y.clone()
        if p > 0:
            chosen = (torch.rand(len(texts)) < p).tolist()
            for i in range(len(texts)):
                if chosen[i] and bool(has[i]):
                    keep = (torch.rand(MAX_SUB_REPORT_REGIONS) < 0.5).numpy()
                    texts[i], sub = sub_report(y[i, 0].detach().cpu().numpy(), keep)
                    y[i, 0] = torch.from_numpy(sub).to(y.dtype)
                    replaced[i] = True
        if self.cfg.text_swap_reports > 0:
            self._swap_reports(texts, y, original, has, replaced)
        return texts, y, replaced

    def _swap_reports(self, texts: list[str], y: torch.Tensor, original: torch.Tensor, has: torch.Tensor,
                      replaced: torch.Tensor) -> None:
        """In place: a `text_swap_reports` share of the rows with a mask and no sub-report gets the report of the
        next row with a mask (cyclically, from its `original` mask) and, as target, its own lesions that report
        describes; `replaced` marks them."""
        from dusss.data.caption import described_lesions

        rows = torch.nonzero(has).flatten().tolist()
        chosen = (torch.rand(len(texts)) < self.cfg.text_swap_reports).tolist()
        for pos, i in enumerate(rows):
            if not chosen[i] or bool(replaced[i]) or len(rows) < 2:
                continue
            j = rows[(pos + 1) % len(rows)]
            texts[i], target = described_lesions(original[i, 0].detach().cpu().numpy(),
                                                 original[j, 0].detach().cpu().numpy())
            y[i, 0] = torch.from_numpy(target).to(y.dtype)
            replaced[i] = True

    def _text_supervised(self, z_text: torch.Tensor, y: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
        """ℓ_text(z_text, y) over the images with a mask (`text_supervised_loss`); updates the running Dice of
        the text mask on them (the text gate's reliability)."""
        from dusss.metrics import dice_score

        per_image = seg_loss(z_text, y, self.cfg.text_supervised_loss, reduction="none")
        if self.cfg.text_supervised_loss == "dice_bce" and not self.cfg.text_dice_on_empty:
            empty = y.flatten(1).sum(1) == 0
            per_image = torch.where(empty, 0.5 * soft_bce(z_text, y, reduction="none"), per_image)
        loss = _masked_mean(per_image, has)
        if bool(has.any()):
            batch_dice = dice_score(torch.sigmoid(z_text.detach()[has]).cpu(), y[has].cpu(),
                                    empty_policy="one").nanmean()
            m = self.cfg.text_gate_momentum
            self.text_reliability = m * self.text_reliability + (1 - m) * batch_dice.float()
        return loss

    def warmup(self, batches: Iterator[dict[str, Any]], steps: int, lr: float, weight_decay: float,
               sync: Callable[[list[nn.Parameter]], None] | None = None) -> dict[str, float]:
        """Fit the text-mask generator alone on `steps` labeled batches (ℓ_text + tg_weight·L_tg, AdamW at
        `text_mask_lr` or `lr`) before Step 2; `sync` averages gradients over processes. Returns the last
        losses and the text reliability."""
        assert self.text_mask is not None
        cfg = self.cfg
        params = self.text_mask.trainable_parameters()
        opt = torch.optim.AdamW(_decay_groups(params, self._text_lr(lr), weight_decay), lr=self._text_lr(lr))
        self.text_mask.train()
        logs: dict[str, torch.Tensor | float] = {}
        for _ in range(steps):
            batch = next(batches)
            x, y, has, texts = self._unpack(batch)
            has = has & ~self._gate_holdout(batch, len(texts))
            if y is None or not bool(has.any()):
                # Nothing to fit here; still join the gradient average (zeros) that the other ranks start, or
                # the collective would hang. In one process every gradient stays None and AdamW skips them all.
                opt.zero_grad(set_to_none=True)
                if sync is not None:
                    sync(params)
                opt.step()
                continue
            texts, y, _ = self._sub_reports(texts, y, has)
            out = self.text_mask(x, texts, with_tg=cfg.tg_weight > 0)
            l_text = self._text_supervised(out["logits"], y, has)
            loss = cfg.text_supervised_weight * l_text
            logs = {"text_sup": l_text}
            if out["loss_tg"] is not None:
                loss = loss + cfg.tg_weight * out["loss_tg"]
                logs["tg"] = out["loss_tg"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if sync is not None:
                sync(params)
            opt.step()
        logs["text_reliability"] = self.text_reliability
        return self._floats(logs)

    def text_gate_open(self) -> bool:
        """True when the text mask is trusted to shape the pseudo-labels (`text_gate`: a positive running
        merge gain on labeled images, or a running text Dice of at least `text_gate_dice`)."""
        if self.cfg.text_gate == "gain":
            return float(self.text_gain) > 0.0
        return float(self.text_reliability) >= self.cfg.text_gate_dice

    @torch.no_grad()
    def _update_text_gain(self, x: torch.Tensor, z_text: torch.Tensor, y: torch.Tensor, use: torch.Tensor) -> None:
        """Running mean of Dice(merged) − Dice(teacher) over the labeled images `use` (own reports, masks).

        Under torch.distributed the step's gain is the mean over every rank's images (one all-reduce of the sum
        and the count), so all ranks hold the same `text_gain` and open the gate together."""
        from dusss.metrics import dice_score

        total = torch.zeros(2, dtype=torch.float64)  # [sum of per-image gains, number of images]
        if bool(use.any()):
            z_t = self._teacher_logits(x[use])
            merged = merge_logits(z_t, z_text.detach()[use].to(z_t.dtype), self.cfg.merge)
            target = y[use].cpu()
            gains = (dice_score(torch.sigmoid(merged.float()).cpu(), target, empty_policy="one")
                     - dice_score(torch.sigmoid(z_t.float()).cpu(), target, empty_policy="one"))
            total = torch.stack([gains.double().sum(), torch.tensor(float(gains.numel()), dtype=torch.float64)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            total = total.to(self.device)
            torch.distributed.all_reduce(total)
            total = total.cpu()
        if total[1] == 0:
            return
        m = self.cfg.text_gate_momentum
        self.text_gain = m * self.text_gain + (1 - m) * (total[0] / total[1]).float()

    def loss(
        self,
        labeled: dict[str, Any],
        unlabeled: dict[str, Any] | None = None,
        step: int = 0,
        total_steps: int = 1,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        assert self.text_mask is not None
        cfg = self.cfg
        x_l, y_l, has_l, t_l = self._unpack(labeled)
        x_u, t_u = (None, [])
        if unlabeled is not None:
            x_u, _, _, t_u = self._unpack(unlabeled)
        x_s, mix = strong_view(x_u, cfg.perturb) if x_u is not None else (None, None)
        z_l, z_u = self._student_forward(x_l, x_s)
        l_sup = self._sup_loss(z_l, y_l, has_l)
        lam = consistency_lambda(cfg, step, total_steps)
        logs: dict[str, torch.Tensor | float] = {"sup": l_sup, "lambda": lam}
        loss = l_sup

        # Text-mask generator on [labeled (for the supervised text term)] + [unlabeled (for L_semi)].
        use_l = cfg.text_supervised_weight > 0 and y_l is not None and bool(has_l.any())
        if use_l:
            held = self._gate_holdout(labeled, len(t_l))
            t_l, y_text, replaced = self._sub_reports(t_l, y_l, has_l & ~held)
        gen_images = [x_l] if use_l else []
        gen_texts = list(t_l) if use_l else []
        if x_u is not None:
            gen_images.append(x_u)
            gen_texts += list(t_u)
        z_text_l = z_text_u = None
        if gen_images:
            if len(gen_images) == 2 and gen_images[0].shape[1:] != gen_images[1].shape[1:]:
                raise ValueError("labeled and unlabeled images must have the same size for the text-mask generator")
            out = self.text_mask(torch.cat(gen_images, dim=0), gen_texts, with_tg=cfg.tg_weight > 0)
            z_text = out["logits"]
            n_l = x_l.shape[0] if use_l else 0
            z_text_l = z_text[:n_l] if use_l else None
            z_text_u = z_text[n_l:] if x_u is not None else None
            if out["loss_tg"] is not None:
                loss = loss + cfg.tg_weight * out["loss_tg"]
                logs["tg"] = out["loss_tg"]
        if z_text_l is not None and y_l is not None:
            l_text_sup = self._text_supervised(z_text_l, y_text, has_l & ~held)
            loss = loss + cfg.text_supervised_weight * l_text_sup
            logs["text_sup"] = l_text_sup
            if cfg.text_gate == "gain":  # on the held-out labeled images (all of them if none is held out)
                gate_rows = has_l & held if cfg.text_gate_holdout > 0 else has_l & ~replaced
                self._update_text_gain(x_l, z_text_l, y_l, gate_rows)
        gate_open = self.text_gate_open()
        logs["text_reliability"] = self.text_reliability
        logs["text_gain"] = self.text_gain
        logs["text_gate"] = float(gate_open)
        if z_u is not None and z_text_u is not None and x_u is not None:
            z_t = self._teacher_logits(x_u)
            mixed = mix.apply if mix is not None else None
            # `perturb.pseudo_label: hard`: confident hard targets (UniMatch's) instead of eq 16-17's soft ones
            tau = cfg.perturb.confidence if cfg.perturb.pseudo_label == "hard" else None
            if gate_open:
                l_semi, parts = semi_loss(z_u, z_t, z_text_u.detach(), cfg.semi_loss, use_text_term=cfg.text_term,
                                          merge=cfg.merge, target_transform=mixed, hard_confidence=tau)
            else:  # text not yet reliable: the merged label is the teacher's alone, no eq-17 term
                l_semi, parts = semi_loss(z_u, z_t, torch.zeros_like(z_t), cfg.semi_loss, use_text_term=False,
                                          merge="logit", target_transform=mixed, hard_confidence=tau)
            loss = loss + lam * l_semi
            logs.update({f"semi_{k}" if k != "semi" else "semi": v for k, v in parts.items()})
        logs["kappa"] = self.text_mask.kappa.detach()
        logs["beta"] = self.text_mask.beta.detach()
        logs["loss"] = loss
        return loss, self._floats(logs)

    @torch.no_grad()
    def pseudo_labels(self, images: torch.Tensor, texts: list[str] | None = None) -> dict[str, torch.Tensor]:
        """`student`, `teacher`, `text` (own-text z_text) and `merged` logits: eq 16 (per `merge`) once the
        text gate is open, the teacher's alone before, i.e. the label L_semi^merged trains on at this point."""
        assert self.text_mask is not None
        if texts is None:
            raise ValueError(f"method {self.name!r} needs the texts of the images for pseudo-labels")
        out = super().pseudo_labels(images, texts)
        was_training = self.text_mask.training
        self.text_mask.eval()
        try:
            text = self.text_mask(images.to(self.device), list(texts), with_tg=False)["logits"]
        finally:
            self.text_mask.train(was_training)
        out["text"] = text
        out["merged"] = merge_logits(out["teacher"], text, self.cfg.merge) if self.text_gate_open() else out["teacher"]
        return out


@register_seg_method("amvlm")
class AMVLMMethod(DuSSSMethod):
    """AMVLM Step 2: the same SSMIS stage as DuSSS (only the pretrained VLM differs)."""

    vlm_pretrain = "amvlm"


# Each method's published setting, as dotted `TrainConfig` keys. `dusss train` applies the preset of the
# chosen method under the YAML file and the flags (both override it); benchmarks and the demo use it too.
METHOD_PRESETS: dict[str, dict[str, Any]] = {
    # SSL4MIS train_mean_teacher_2D.py (the paper's MT row): MSE of probabilities, λ_max 0.1 ramped over the
    # whole run (consistency_rampup 200 "epochs" of 150 iterations = max_iterations 30000), teacher input
    # noise clamp(N(0, 0.1²), ±0.2), EMA 0.99, soft targets, student on the weak view.
    "mt": {"semi.consistency": "mse", "semi.consistency_weight": 0.1, "semi.rampup_fraction": 1.0,
           "semi.ema_decay": 0.99, "semi.perturb.teacher_noise": 0.1, "semi.perturb.teacher_noise_clip": 0.2,
           "semi.perturb.pseudo_label": "soft"},
    # UniMatch: τ = 0.95, Dropout2d(0.5) feature stream, two strong views with CutMix p = 0.5, λ = 1 from the
    # first step, ℓ = cross-entropy (BCE) on the confident pixels over all pixels (their semantic-segmentation
    # loss; their medical code uses a batch-level class Dice, whose per-image binary form is ill-posed on the
    # sparse confident set: docs/method-notes.md).
    "unimatch": {"semi.consistency": "bce", "semi.consistency_weight": 1.0, "semi.rampup_fraction": 0.0,
                 "semi.perturb.pseudo_label": "hard", "semi.perturb.confidence": 0.95,
                 "semi.perturb.feature_dropout": 0.5, "semi.perturb.cutmix_p": 0.5},
    # DuSSS / AMVLM Step 2 (the papers give no augmentation): the student on the strong view (photometric +
    # CutMix), the EMA teacher and the text-mask generator on the weak view, soft targets (eq 16). Ours. The
    # confident hard targets (`--set semi.perturb.pseudo_label=hard`) were measured against them: best val +0.8
    # points on phantoms, −3.2 / −1.6 on MoNuSeg at 50 / 25 % (3 seeds each), so the paper's soft targets stay
    # (docs/benchmarks.md, session 11).
    "dusss": {"semi.perturb.strong": True},
    "amvlm": {"semi.perturb.strong": True},
}


def seg_method_preset(name: str) -> dict[str, Any]:
    """The dotted config overrides that give method `name` its published setting ({} when it has none): the
    entry in `METHOD_PRESETS`, else the registered class's `preset`."""
    if name in METHOD_PRESETS:
        return dict(METHOD_PRESETS[name])
    cls = SEG_METHODS.get(name)
    return dict(cls.preset) if cls is not None else {}


def build_seg_method(
    name: str, cfg: SegMethodConfig | None, student: nn.Module, vlm: nn.Module | None = None
) -> SegMethod:
    """Instantiate the registered method `name`; ConfigError for an unknown name or a missing VLM."""
    cls = SEG_METHODS.lookup(name)
    if cls.needs_vlm and vlm is None:
        raise ConfigError(f"method {name!r} needs a pretrained VLM (--vlm)")
    return cls(cfg or SegMethodConfig(), student, vlm)
