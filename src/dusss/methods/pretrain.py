"""Step-1 pre-training objectives: DuSSS (SSS + dual contrastive learning), AMVLM (CSS + ICL), CLIP.

`build_pretrain_objective(name, cfg)(vlm, batch) -> (loss, logs)`, with batch = {"image": [B,3,S,S],
"image_aug": [B,3,S,S], "text": list[str], "text_aug": list[str], ...}. Table 2's ablation is two switches of
`PretrainObjectiveConfig`: `sss` (SSS on/off, off = plain cosine logits) and `dcl` (IMC on/off).

Under torch.distributed every contrastive term gathers embeddings, mu and sigma from all ranks with the
differentiable `gather_with_grad` and scores the whole global batch on every rank (same loss everywhere), so
the negatives do not shrink with the world size; once the loop averages parameter gradients over ranks (DDP
or `sync_gradients`) the update equals the single-process update on the global batch. AMVLM's token-level
local loss uses local token rows against gathered globals (labels offset by rank*B), since token counts may
differ across ranks; averaged over ranks that is the mean of the per-rank losses, exactly.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dusss import distributed as dist
from dusss.config import MAX_WEIGHT, bounded, check_fields
from dusss.losses.contrastive import (
    css_loss,
    g2l_infonce,
    gaussian_kl_standard,
    icl_loss,
    infonce,
    local_alignment_loss,
    sss_logits,
    w2_logits,
)
from dusss.losses.uncertainty import sigma_from_logsigma
from dusss.models.vlm import VisionLanguageModel
from dusss.registry import Registry

Batch = dict[str, Any]
Logs = dict[str, float]


@dataclass
class PretrainObjectiveConfig:
    """Loss switches and constants (paper-mode defaults, METHOD.md §3.1-3.5).

    DuSSS: `sss` (eqs 1-5 on/off), `sss_lambda`/`sss_a`/`sss_b`/`sss_eps` (lambda, a, b, eps of eqs 2-4),
    `detach_sss` (no gradient through D_SSS), `dcl` (add IMC, eq 9), `imc_weight`, `imc_local_weight`
    (the code's global-to-local terms, 0 in paper mode), `w2_infonce_weight` and `vib_weight` (optional
    anchors for the Gaussians, off). AMVLM: weights of L_ori, CSS, local and ICL (1, 0.5, 0.1, 0.1), and
    whether CSS weights tokens by the encoders' [CLS] attention (uniform when False or for a CNN).
    """

    sss: bool = True
    sss_lambda: float = bounded(0.2, ge=0, le=MAX_WEIGHT)
    sss_a: float = bounded(1.0 / 200.0, gt=0, le=MAX_WEIGHT)
    sss_b: float = bounded(4.0, ge=-MAX_WEIGHT, le=MAX_WEIGHT)
    sss_eps: float = bounded(1e-6, gt=0, le=1)
    detach_sss: bool = False
    dcl: bool = True
    imc_weight: float = bounded(1.0, ge=0, le=MAX_WEIGHT)
    imc_local_weight: float = bounded(0.0, ge=0, le=MAX_WEIGHT)
    w2_infonce_weight: float = bounded(0.0, ge=0, le=MAX_WEIGHT)
    vib_weight: float = bounded(0.0, ge=0, le=MAX_WEIGHT)
    amvlm_ori_weight: float = bounded(1.0, ge=0, le=MAX_WEIGHT)
    amvlm_css_weight: float = bounded(0.5, ge=0, le=MAX_WEIGHT)
    amvlm_local_weight: float = bounded(0.1, ge=0, le=MAX_WEIGHT)
    amvlm_icl_weight: float = bounded(0.1, ge=0, le=MAX_WEIGHT)
    amvlm_attention_weights: bool = True

    def __post_init__(self) -> None:
        check_fields(self, "objective")


def _cls_gaussian(mu: torch.Tensor, logsigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return mu[:, 0], sigma_from_logsigma(logsigma[:, 0])


def _item(x: torch.Tensor | float) -> float:
    return float(x.detach()) if torch.is_tensor(x) else float(x)


def _text_aug(batch: Batch) -> list[str]:
    return list(batch.get("text_aug", batch["text"]))


def contrastive_pair(
    x: torch.Tensor,
    y: torch.Tensor,
    tau: torch.Tensor,
    gx: tuple[torch.Tensor, torch.Tensor] | None = None,
    gy: tuple[torch.Tensor, torch.Tensor] | None = None,
    cfg: PretrainObjectiveConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Symmetric (SSS-)InfoNCE between paired unit embeddings x, y [B,d] (eqs 6-9), over the global batch.

    x, y and the [CLS] Gaussians gx, gy = (mu, sigma) are gathered from all ranks with `gather_with_grad`
    and the full [R·B, R·B] matrix is scored on every rank (labels arange(R·B): the local rows sit at offset
    rank·B). Without Gaussians (or with `cfg.sss` off / lambda 0) the logits are cos/tau, i.e. CLIP.
    Returns (loss, D_SSS [R·B, R·B], W2 or None).
    """
    c = cfg or PretrainObjectiveConfig()
    g = dist.gather_with_grad
    lam = c.sss_lambda if c.sss else 0.0
    kw = {"lam": lam, "a": c.sss_a, "b": c.sss_b, "eps": c.sss_eps, "detach_sss": c.detach_sss}
    if gx is None or gy is None or lam == 0.0:
        logits, d_sss, w2 = sss_logits(g(x), g(y), None, None, None, None, tau, **kw)
    else:
        logits, d_sss, w2 = sss_logits(g(x), g(y), g(gx[0]), g(gx[1]), g(gy[0]), g(gy[1]), tau, **kw)
    return infonce(logits), d_sss, w2


class PretrainObjective:
    """Base class: `objective(vlm, batch) -> (loss, logs)`."""

    name = "base"

    def __init__(self, cfg: PretrainObjectiveConfig | None = None) -> None:
        self.cfg = cfg or PretrainObjectiveConfig()

    def __call__(self, vlm: VisionLanguageModel, batch: Batch) -> tuple[torch.Tensor, Logs]:
        raise NotImplementedError


class ClipObjective(PretrainObjective):
    """CLIP baseline: symmetric InfoNCE of online image vs online text globals, learnable tau."""

    name = "clip"

    def __call__(self, vlm: VisionLanguageModel, batch: Batch) -> tuple[torch.Tensor, Logs]:
        tau = vlm.temperature()
        zi = vlm.encode_image(batch["image"])["global"]
        zt = vlm.encode_text(list(batch["text"]))["global"]
        loss = infonce(dist.gather_with_grad(zi) @ dist.gather_with_grad(zt).t() / tau)
        return loss, {"loss_clip": _item(loss), "tau": _item(tau)}


class DusssObjective(PretrainObjective):
    """DuSSS Step 1 (paper mode): L = L_cmc + w_imc·L_imc, both with SSS logits sim^/tau (eqs 1-9).

    CMC pairs the online image with the momentum text (text_aug) and the online text with the momentum image
    (image_aug); IMC pairs I1 with momentum I2 and T1 with momentum T2. [CLS] Gaussians come from the
    (online) PDT heads applied to [global; local] of each branch.
    """

    name = "dusss"

    def __call__(self, vlm: VisionLanguageModel, batch: Batch) -> tuple[torch.Tensor, Logs]:
        c = self.cfg
        tau = vlm.temperature()
        i1 = vlm.encode_image(batch["image"])
        t1 = vlm.encode_text(list(batch["text"]))
        i2 = vlm.encode_image(batch["image_aug"], momentum=True)
        t2 = vlm.encode_text(_text_aug(batch), momentum=True)
        need_gauss = (c.sss and c.sss_lambda > 0) or c.w2_infonce_weight > 0 or c.vib_weight > 0
        gi1 = gt1 = gi2 = gt2 = None
        if need_gauss:
            gi1 = _cls_gaussian(*vlm.image_gaussians(i1))
            gt1 = _cls_gaussian(*vlm.text_gaussians(t1))
            gi2 = _cls_gaussian(*vlm.image_gaussians(i2))
            gt2 = _cls_gaussian(*vlm.text_gaussians(t2))

        l_it, d_it, w2_it = contrastive_pair(i1["global"], t2["global"], tau, gi1, gt2, c)
        l_ti, d_ti, _ = contrastive_pair(t1["global"], i2["global"], tau, gt1, gi2, c)
        loss_cmc = 0.5 * (l_it + l_ti)
        loss = loss_cmc
        logs: Logs = {"loss_cmc": _item(loss_cmc), "tau": _item(tau)}
        if c.dcl and c.imc_weight > 0:
            l_ii, _, _ = contrastive_pair(i1["global"], i2["global"], tau, gi1, gi2, c)
            l_tt, _, _ = contrastive_pair(t1["global"], t2["global"], tau, gt1, gt2, c)
            loss_imc = 0.5 * (l_ii + l_tt)
            loss = loss + c.imc_weight * loss_imc
            logs["loss_imc"] = _item(loss_imc)
        if c.imc_local_weight > 0:
            loss_g2l = 0.5 * (g2l_infonce(_pool_patches(i2["local"], i2["grid"]), i1["global"], tau)
                              + g2l_infonce(t2["local"], t1["global"], tau, t2["mask"]))
            loss = loss + c.imc_local_weight * loss_g2l
            logs["loss_g2l"] = _item(loss_g2l)
        if c.w2_infonce_weight > 0:
            assert gi1 is not None and gt1 is not None and gi2 is not None and gt2 is not None
            g = dist.gather_with_grad
            l_w2 = 0.5 * (
                infonce(w2_logits(g(gi1[0]), g(gi1[1]), g(gt2[0]), g(gt2[1]), tau, c.sss_a, c.sss_b))
                + infonce(w2_logits(g(gt1[0]), g(gt1[1]), g(gi2[0]), g(gi2[1]), tau, c.sss_a, c.sss_b)))
            loss = loss + c.w2_infonce_weight * l_w2
            logs["loss_w2"] = _item(l_w2)
        if c.vib_weight > 0:
            assert gi1 is not None and gt1 is not None
            l_kl = 0.5 * (gaussian_kl_standard(*gi1) + gaussian_kl_standard(*gt1))
            loss = loss + c.vib_weight * l_kl
            logs["loss_vib"] = _item(l_kl)
        logs.update(_sss_stats(torch.cat([d_it, d_ti], 0), w2_it))
        return loss, logs


def _pool_patches(local: torch.Tensor, grid: tuple[int, int], size: int = 4) -> torch.Tensor:
    """Average-pool patch embeddings [B,N,d] on their grid to at most size x size, re-normalised."""
    b, _, d = local.shape
    h, w = grid
    if h <= size and w <= size:
        return local
    fmap = local.transpose(1, 2).reshape(b, d, h, w)
    pooled = F.adaptive_avg_pool2d(fmap, (min(h, size), min(w, size)))
    return F.normalize(pooled.flatten(2).transpose(1, 2), dim=-1)


def _sss_stats(d_sss: torch.Tensor, w2: torch.Tensor | None) -> Logs:
    """D_SSS of the CMC matrices (stacked [2n, n], positives on each block's diagonal): mean over all pairs,
    positives, negatives, 10/90 % quantiles; mean W2 of positives and negatives."""
    d = d_sss.detach().float()
    n = d.shape[1]
    pos = torch.eye(n, dtype=torch.bool, device=d.device).repeat(d.shape[0] // n, 1)
    out = {"d_sss_mean": float(d.mean()), "d_sss_pos": float(d[pos].mean()),
           "d_sss_neg": float(d[~pos].mean()) if bool((~pos).any()) else float("nan"),
           "d_sss_q10": float(torch.quantile(d.flatten(), 0.1)), "d_sss_q90": float(torch.quantile(d.flatten(), 0.9))}
    if w2 is not None:
        w = w2.detach().float()
        p = pos[: w.shape[0]]
        out["w2_pos"] = float(w[p].mean())
        out["w2_neg"] = float(w[~p].mean()) if bool((~p).any()) else float("nan")
    return out


class AmvlmObjective(PretrainObjective):
    """AMVLM Step 1 (METHOD.md §3.5, fixed): L = w_ori·L_ori + w_css·L_css + w_local·L_local + w_icl·L_icl."""

    name = "amvlm"

    def __call__(self, vlm: VisionLanguageModel, batch: Batch) -> tuple[torch.Tensor, Logs]:
        c = self.cfg
        tau = vlm.temperature()
        attn = c.amvlm_attention_weights
        i1 = vlm.encode_image(batch["image"], with_attention=attn)
        t1 = vlm.encode_text(list(batch["text"]), with_attention=attn)
        g = dist.gather_with_grad
        zi, zt = i1["global"], t1["global"]
        l_ori = infonce(g(zi) @ g(zt).t() / tau)
        loss = c.amvlm_ori_weight * l_ori
        logs: Logs = {"loss_ori": _item(l_ori), "tau": _item(tau)}
        if c.amvlm_css_weight > 0:
            l_css, css_logs = css_loss(i1["local"], t1["local"], t1["mask"], vlm.gaussian_image, vlm.gaussian_text,
                                       tau, i1["cls_attention"], t1["cls_attention"])
            loss = loss + c.amvlm_css_weight * l_css
            logs["loss_css"] = _item(l_css)
            logs.update({k: _item(v) for k, v in css_logs.items() if k == "css_kappa"})
        if c.amvlm_local_weight > 0:
            l_loc = local_alignment_loss(i1["local"], t1["local"], t1["mask"], zi, zt, tau, g, dist.rank() * zi.shape[0])
            loss = loss + c.amvlm_local_weight * l_loc
            logs["loss_local"] = _item(l_loc)
        if c.amvlm_icl_weight > 0:
            i2 = vlm.encode_image(batch["image_aug"], momentum=True)
            t2 = vlm.encode_text(_text_aug(batch), momentum=True)
            mu_i, ls_i = vlm.image_gaussians(i2)
            mu_t, ls_t = vlm.text_gaussians(t2)
            l_icl, _ = icl_loss(mu_i, ls_i, mu_t, ls_t, t2["mask"], tau, c.sss_a, c.sss_b, g)
            loss = loss + c.amvlm_icl_weight * l_icl
            logs["loss_icl"] = _item(l_icl)
        return loss, logs


PRETRAIN_METHODS: Registry[type[PretrainObjective]] = Registry("pre-training method")
for _name, _objective in (("dusss", DusssObjective), ("amvlm", AmvlmObjective), ("clip", ClipObjective)):
    PRETRAIN_METHODS.add(_name, _objective)


def build_pretrain_objective(name: str, cfg: PretrainObjectiveConfig | None = None) -> PretrainObjective:
    """The objective registered under `name` ("dusss", "amvlm", "clip")."""
    return PRETRAIN_METHODS.lookup(name)(cfg)


@torch.no_grad()
def retrieval_at_k(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    ks: Sequence[int] = (1, 5),
    groups: Sequence[Hashable] | None = None,
) -> dict[str, float]:
    """Image->text and text->image recall@k (in %) for paired rows of image_emb [N,d], text_emb [N,d].

    Row i's correct partner is row i; with `groups` (e.g. the report strings) every row of the same group
    counts as correct, so duplicate reports do not count as misses. A hit at k: fewer than k wrong candidates
    score at least as high as the best correct one (ties count against, so a collapsed model that maps every
    input to one point scores 0, not 100). Keys: "i2t_R@k", "t2i_R@k", "mean_R@1".
    """
    n = image_emb.shape[0]
    if n == 0 or text_emb.shape[0] != n:
        raise ValueError(f"retrieval_at_k: need paired rows, got {image_emb.shape[0]} images and {text_emb.shape[0]} texts")
    sim = F.normalize(image_emb.float(), dim=-1) @ F.normalize(text_emb.float(), dim=-1).t()
    if groups is None:
        same = torch.eye(n, dtype=torch.bool, device=sim.device)
    else:
        ids: dict[Hashable, int] = {}
        gid = torch.tensor([ids.setdefault(gv, len(ids)) for gv in groups], device=sim.device)
        same = gid[:, None] == gid[None, :]
    out: dict[str, float] = {}
    for name, s in (("i2t", sim), ("t2i", sim.t())):
        best_pos = s.masked_fill(~same, float("-inf")).max(dim=1, keepdim=True).values
        wrong_above = ((s >= best_pos) & ~same).sum(dim=1)
        for k in ks:
            out[f"{name}_R@{k}"] = 100.0 * float((wrong_above < k).float().mean())
    if 1 in ks:
        out["mean_R@1"] = 0.5 * (out["i2t_R@1"] + out["t2i_R@1"])
    return out


__all__ = [
    "PRETRAIN_METHODS",
    "AmvlmObjective",
    "ClipObjective",
    "DusssObjective",
    "PretrainObjective",
    "PretrainObjectiveConfig",
    "build_pretrain_objective",
    "contrastive_pair",
    "retrieval_at_k",
]
