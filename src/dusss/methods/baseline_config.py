"""Settings of the semi-supervised baselines (`dusss.methods.baselines`), one dataclass per method, nested in
`SegMethodConfig` as `semi.<method>.*` (e.g. `--set semi.uamt.passes=8`). Defaults are each paper's setting;
each field says where it comes from. Lower layer: imports only `dusss.config` (and the text encoder's config).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dusss.config import MAX_WEIGHT, bounded, check, check_fields
from dusss.models.text_encoders import TextEncoderConfig


@dataclass
class UAMTConfig:
    """UA-MT (Yu et al., MICCAI 2019)."""

    # T stochastic teacher passes whose mean prediction gives the uncertainty (SSL4MIS
    # train_uncertainty_aware_mean_teacher_2D.py and _3D.py: T = 8)
    passes: int = bounded(8, ge=1, le=64)
    # input noise of those passes: N(0, noise²) clamped to ±noise_clip (SSL4MIS: clamp(randn·0.1, −0.2, 0.2))
    noise: float = bounded(0.1, ge=0, le=10)
    noise_clip: float = bounded(0.2, ge=0, le=10)  # 0 = no clamp
    # entropy threshold (start + (end − start)·ramp(t))·ln 2, ramp = sigmoid_rampup over threshold_rampup_fraction
    # of the steps (SSL4MIS: (0.75 + 0.25·sigmoid_rampup(iter, max_iterations))·ln 2)
    threshold_start: float = bounded(0.75, ge=0, le=1)
    threshold_end: float = bounded(1.0, ge=0, le=1)
    threshold_rampup_fraction: float = bounded(1.0, ge=0, le=1)  # SSL4MIS: the whole run (max_iterations)

    def __post_init__(self) -> None:
        check_fields(self, "semi.uamt")


@dataclass
class UCMTConfig:
    """UCMT (Shen et al., IJCAI 2023)."""

    # UMIX: per image, the top-k most uncertain patches of each student's map are overwritten by the k least
    # uncertain patches of the other's (github:Senyh/UCMT train.py: --topk 2)
    topk: int = bounded(2, ge=0, le=1024)  # 0 = no UMIX (CMT alone: the paper's ablation)
    # patches per image side; patch side = size // grid (train.py: kernel image_size // 16 → a 16 × 16 grid)
    grid: int = bounded(16, ge=1, le=256)
    # the students see two independent photometric views (train.py: ColorJitter + GaussianBlur views A1, A2;
    # teacher on the plain image); False = both on the weak view, disagreement from the decoders' init only
    strong_views: bool = True

    def __post_init__(self) -> None:
        check_fields(self, "semi.ucmt")


@dataclass
class CCTConfig:
    """CCT (Ouali et al., CVPR 2020)."""

    # Auxiliary decoders per perturbation of the encoder maps (SSL4MIS UNet_CCT: one of each; the CCT code's
    # configs/config.json for Pascal VOC: 6 feature-noise, 6 feature-drop, 6 (spatial) dropout decoders)
    noise_decoders: int = bounded(1, ge=0, le=16)  # x + x·u, u ~ U(±noise_range) per feature element
    dropout_decoders: int = bounded(1, ge=0, le=16)  # element-wise dropout of the features
    feature_drop_decoders: int = bounded(1, ge=0, le=16)  # drop the most activated regions (attention map)
    noise_range: float = bounded(0.3, ge=0, le=10)  # SSL4MIS / CCT FeatureNoise uniform_range
    dropout_rate: float = bounded(0.3, ge=0, lt=1)  # SSL4MIS Dropout(x, p=0.3) (CCT: Dropout2d, drop_rate 0.5)
    # threshold of the feature-drop mask: the map's maximum times U(low, high) (SSL4MIS / CCT: 0.7-0.9)
    drop_threshold: tuple[float, float] = bounded((0.7, 0.9), ge=0, le=1)
    # L_sup on the auxiliary decoders' outputs too, averaged with the main decoder's (SSL4MIS: yes, /8 over
    # CE + Dice of 4 decoders; the CCT paper: main decoder only)
    aux_supervised: bool = True
    # the main decoder's probabilities as a detached target (the CCT paper and code); False = SSL4MIS, whose
    # MSE also back-propagates into the main decoder
    detach_main: bool = True

    def __post_init__(self) -> None:
        check_fields(self, "semi.cct")
        self.drop_threshold = tuple(float(v) for v in self.drop_threshold)  # type: ignore[assignment]
        check(len(self.drop_threshold) == 2 and self.drop_threshold[0] <= self.drop_threshold[1],
              f"semi.cct.drop_threshold must be [low, high] in [0, 1], got {list(self.drop_threshold)}")
        check(self.noise_decoders + self.dropout_decoders + self.feature_drop_decoders >= 1,
              "semi.cct needs at least one auxiliary decoder")


@dataclass
class MCNetConfig:
    """MC-Net (Wu et al., MICCAI 2021)."""

    temperature: float = bounded(0.1, gt=0, le=1)  # T of the sharpening p^(1/T)/(p^(1/T) + (1 − p)^(1/T)) (their 0.1)
    # where the mutual consistency runs: every image of the batch (their train_mcnet_2d.py) or the unlabeled only
    consistency_on: Literal["all", "unlabeled"] = "all"
    # the sharpened targets detached (the paper's pseudo-labels); False = their code, whose targets carry gradient
    detach_targets: bool = True

    def __post_init__(self) -> None:
        check_fields(self, "semi.mcnet")
        check(self.consistency_on in ("all", "unlabeled"),
              f"semi.mcnet.consistency_on must be all or unlabeled, got {self.consistency_on!r}")


@dataclass
class SSNetConfig:
    """SS-Net (Wu et al., MICCAI 2022)."""

    vat_xi: float = bounded(10.0, gt=0, le=1000)  # ξ: step of the power iteration (their VAT2d xi=10.0)
    vat_eps: float = bounded(6.0, gt=0, le=1000)  # ε: L2 norm of r_adv per image (their 2-D --magnitude 6.0)
    vat_iterations: int = bounded(1, ge=1, le=16)  # power iterations (their ip=1)
    # images given the VAT smoothness term: the whole batch (their train_ss_2d.py) or the unlabeled only
    vat_on: Literal["all", "unlabeled"] = "all"
    separation_weight: float = bounded(0.1, ge=0, le=MAX_WEIGHT)  # their 0.1·(L_contr^l + L_contr^u) inside λ(t)
    proj_dim: int = bounded(32, ge=1, le=4096)  # projection / prediction head width (their feat_dim 32)
    memory_size: int = bounded(32, ge=2, le=100000)  # prototype feature vectors kept per class (elements_per_class)
    # a background prototype too; False = their code, which keeps correctly predicted foreground pixels only
    background_prototype: bool = False

    def __post_init__(self) -> None:
        check_fields(self, "semi.ssnet")
        check(self.vat_on in ("all", "unlabeled"), f"semi.ssnet.vat_on must be all or unlabeled, got {self.vat_on!r}")


@dataclass
class CPSConfig:
    """CPS (Chen et al., CVPR 2021)."""

    # Cross pseudo supervision on the labeled images too (L_cps = L_cps^l + L_cps^u, the CPS paper and its
    # code TorchSemiSeg); False = on the unlabeled images only (SSL4MIS train_cross_pseudo_supervision_2D.py).
    labeled: bool = True

    def __post_init__(self) -> None:
        check_fields(self, "semi.cps")


@dataclass
class BCPConfig:
    """BCP (Bai et al., CVPR 2023)."""

    # weight of the pseudo-labelled (unlabeled) part of each mixed target (`u_weight` 0.5 in ACDC_BCP_train.py)
    alpha: float = bounded(0.5, ge=0, le=MAX_WEIGHT)
    # side of the zero box of M as a fraction of the image side (int(H·2/3) in their generate_mask)
    box_fraction: float = bounded(2.0 / 3.0, gt=0, lt=1)
    # share of the run's steps spent in stage 1 (copy-paste among labeled images only; the teacher is then
    # reset to the student): their pre_iterations / (pre_iterations + max_iterations) = 10000 / 40000
    pretrain_fraction: float = bounded(0.25, ge=0, lt=1)
    # keep the largest 8-connected component of the teacher's hard label (their get_ACDC_2DLargestCC, nms=1)
    largest_component: bool = True

    def __post_init__(self) -> None:
        check_fields(self, "semi.bcp")


@dataclass
class LViTConfig:
    """LViT-style text-conditioned U-Net (Li et al., IEEE TMI 2023; `dusss.models.text_segmenters`)."""

    # the frozen text encoder whose mean word-piece state conditions every stage (LViT: frozen BERT features;
    # ours: the packaged all-MiniLM-L6-v2, or any local BERT-family folder with text.kind: hf)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)

    def __post_init__(self) -> None:
        check_fields(self, "semi.lvit")


__all__ = ["BCPConfig", "CCTConfig", "CPSConfig", "LViTConfig", "MCNetConfig", "SSNetConfig", "UAMTConfig",
           "UCMTConfig"]
