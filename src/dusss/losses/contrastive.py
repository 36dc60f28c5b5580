"""Contrastive losses of Step 1 (DuSSS eqs 5-9, AMVLM CSS/ICL/local, CLIP) and L_tg of Step 2 (eq 12).

Pure tensor functions, no I/O. Embeddings passed in are L2-normalised unless stated otherwise. Functions that
can run under DDP take local rows and (optionally gathered) columns plus `labels` = arange(B) + rank*B, so the
negatives come from every rank; in one process the columns are the rows' partners and labels = arange(B).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from dusss.losses.uncertainty import (
    _pairwise_sq,
    sigma_from_logsigma,
    sss_matrix,
    uncertainty_cosine,
    w2_diag,
)

Gaussian = tuple[torch.Tensor, torch.Tensor]
GaussianFn = Callable[[torch.Tensor, "torch.Tensor | None"], Gaussian]
GatherFn = Callable[[torch.Tensor], torch.Tensor]
MASK_VALUE = -1e4  # additive mask for invalid columns: finite (no inf*0 NaN), fits fp16, far below any logit


def _labels(n: int, device: torch.device, offset: int = 0) -> torch.Tensor:
    return torch.arange(n, device=device) + offset


def infonce(logits: torch.Tensor, labels: torch.Tensor | None = None,
            logits_t: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE (eqs 6-8 form): 1/2 [CE(logits, labels) + CE(logits_t, labels)].

    `logits` [B,M] scores local rows against all columns; `logits_t` [B,M] the other direction (rows of the
    second modality against all columns of the first). Default: square logits, labels arange(B),
    logits_t = logits^T.
    """
    if labels is None:
        labels = _labels(logits.shape[0], logits.device)
    if logits_t is None:
        logits_t = logits.t()
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits_t, labels))


def clip_loss(x: torch.Tensor, y: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """CLIP InfoNCE on unit embeddings x, y [B,d]: symmetric CE of x y^T / tau."""
    return infonce(x @ y.t() / tau)


def sss_logits(
    x: torch.Tensor,
    y: torch.Tensor,
    mu_x: torch.Tensor | None,
    sigma_x: torch.Tensor | None,
    mu_y: torch.Tensor | None,
    sigma_y: torch.Tensor | None,
    tau: torch.Tensor | float,
    lam: float = 0.2,
    a: float = 1.0 / 200.0,
    b: float = 4.0,
    eps: float = 1e-6,
    detach_sss: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Eqs 1-6: logits = sim^(x_i, y_j) / tau with sim^ = 1 - (1 - cos)·exp(-lam (a W2 + b) / D_s).

    x [B1,d], y [B2,d] unit embeddings; mu/sigma [B,D] their [CLS] Gaussians (sigma, not log sigma).
    lam = 0 (or any mu None) gives D_SSS = 1 and plain cos/tau, i.e. exactly CLIP's logits.
    Returns (logits [B1,B2], D_SSS [B1,B2], W2 [B1,B2] or None).
    """
    cos = x @ y.t()
    if lam == 0.0 or mu_x is None or mu_y is None or sigma_x is None or sigma_y is None:
        return cos / tau, torch.ones_like(cos), None
    d_sss, w2 = sss_matrix(x, y, mu_x, sigma_x, mu_y, sigma_y, lam=lam, a=a, b=b, eps=eps)
    if detach_sss:
        d_sss = d_sss.detach()
    return uncertainty_cosine(cos, d_sss) / tau, d_sss, w2


def sss_infonce(
    x: torch.Tensor,
    y: torch.Tensor,
    mu_x: torch.Tensor | None,
    sigma_x: torch.Tensor | None,
    mu_y: torch.Tensor | None,
    sigma_y: torch.Tensor | None,
    tau: torch.Tensor | float,
    lam: float = 0.2,
    a: float = 1.0 / 200.0,
    b: float = 4.0,
    eps: float = 1e-6,
    detach_sss: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs 6-9 in one process: 1/2 [L_x2y + L_y2x] with SSS-modulated logits (sim^ in numerator and
    denominator, all B partners in the denominator). Returns (loss, D_SSS [B,B])."""
    logits, d_sss, _ = sss_logits(x, y, mu_x, sigma_x, mu_y, sigma_y, tau, lam, a, b, eps, detach_sss)
    return infonce(logits), d_sss


def w2_logits(mu_x: torch.Tensor, sigma_x: torch.Tensor, mu_y: torch.Tensor, sigma_y: torch.Tensor,
              tau: torch.Tensor | float, a: float = 1.0 / 200.0, b: float = 4.0) -> torch.Tensor:
    """MAP/AMVLM distribution logits (-a·W2 + b)/tau, [B1,B2] (W2 of eq 1)."""
    return (-a * w2_diag(mu_x, sigma_x, mu_y, sigma_y) + b) / tau


def gaussian_kl_standard(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(N(mu, diag sigma^2) || N(0, I)) (optional VIB-style anchor, off by default)."""
    var = sigma * sigma
    return 0.5 * (var + mu * mu - 1.0 - torch.log(var)).sum(-1).mean()


def g2l_infonce(local: torch.Tensor, glob: torch.Tensor, tau: torch.Tensor | float,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """In-batch global-to-local InfoNCE (the DuSSS code's `in_batch_g2l_loss`, METHOD.md §3.3).

    For sample i and valid token k of `local` [B,K,d]: positive <l_ik, m_i>/tau; negatives <l_jk', m_i>/tau for
    every j != i and every valid k' (other tokens of sample i are neither positive nor negative).
    Returns -mean_{i,k} log softmax. `mask` [B,K] marks valid tokens (default all).
    """
    bsz, k, _ = local.shape
    if mask is None:
        mask = torch.ones(bsz, k, dtype=torch.bool, device=local.device)
    mask = mask.bool()
    s = torch.einsum("jkd,id->ijk", local, glob) / tau  # [B(i: global), B(j: sample), K]
    neg = s.masked_fill(~mask[None, :, :], float("-inf"))
    eye = torch.eye(bsz, dtype=torch.bool, device=local.device)
    neg = neg.masked_fill(eye[:, :, None], float("-inf"))
    neg_lse = torch.logsumexp(neg.reshape(bsz, -1), dim=1)  # [B]
    pos = s[torch.arange(bsz), torch.arange(bsz)]  # [B,K]
    loss = -pos + torch.logaddexp(pos, neg_lse[:, None])
    valid = mask.to(loss.dtype)
    return (loss * valid).sum() / valid.sum().clamp_min(1.0)


def token_weights(attention: torch.Tensor | None, mask: torch.Tensor | None, shape: tuple[int, int],
                  device: torch.device, quantiles: tuple[float, float] = (0.1, 0.9)) -> torch.Tensor:
    """Per-sample token weights summing to 1 over valid tokens, [B,N].

    From an encoder's [CLS]->token attention (detached): clipped to its per-sample `quantiles` over the valid
    tokens, then normalised (MGCA/AMVLM). Without attention (e.g. a CNN image encoder): uniform.
    """
    valid = torch.ones(shape, dtype=torch.bool, device=device) if mask is None else mask.bool()
    if attention is None:
        w = valid.float()
    else:
        a = attention.detach().float().masked_fill(~valid, float("nan"))
        lo = torch.nanquantile(a, quantiles[0], dim=1, keepdim=True)
        hi = torch.nanquantile(a, quantiles[1], dim=1, keepdim=True)
        w = torch.minimum(torch.maximum(a, lo), hi).nan_to_num(0.0).masked_fill(~valid, 0.0)
        w = torch.where(w.sum(1, keepdim=True) > 0, w, valid.float())
    return w / w.sum(1, keepdim=True).clamp_min(1e-12)


def _css_side(
    q: torch.Tensor,
    q_mask: torch.Tensor,
    kv: torch.Tensor,
    kv_mask: torch.Tensor,
    q_gauss: GaussianFn,
    ctx_gauss: GaussianFn,
    weights: torch.Tensor,
    tau: torch.Tensor | float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One CSS direction: queries q [B,Q,d] attend over kv [B,K,d]; returns (loss, mean kappa)."""
    bsz, nq, _ = q.shape
    scores = (q @ kv.transpose(1, 2)) / tau  # [B,Q,K]
    scores = scores.masked_fill(~kv_mask[:, None, :], MASK_VALUE)
    ctx = F.normalize(scores.softmax(dim=-1) @ kv, dim=-1)  # [B,Q,d] cross-modal context of each query
    ctx = ctx * q_mask[..., None].to(ctx.dtype)
    cos = q @ ctx.transpose(1, 2)  # [B,Q,Q]: <q_i, c_j>
    mu_q, ls_q = q_gauss(q, q_mask)
    mu_c, ls_c = ctx_gauss(ctx, q_mask)
    sig_q, sig_c = sigma_from_logsigma(ls_q), sigma_from_logsigma(ls_c)
    w2 = w2_diag(mu_q, sig_q, mu_c, sig_c)
    kappa = torch.sigmoid(w2 / (_pairwise_sq(mu_q, mu_c) + eps))  # AMVLM constraint, guarded division
    logits = uncertainty_cosine(cos, kappa) / tau  # modulation on the cosine, tau applied after (A6 fixed)
    pair = q_mask[:, :, None] & q_mask[:, None, :]
    logits = logits.masked_fill(~pair, MASK_VALUE)  # rows and columns: both CE directions see valid tokens only
    target = torch.arange(nq, device=q.device).expand(bsz, nq)
    ce_rows = F.cross_entropy(logits.reshape(bsz * nq, nq), target.reshape(-1), reduction="none").reshape(bsz, nq)
    logits_t = logits.transpose(1, 2)
    ce_cols = F.cross_entropy(logits_t.reshape(bsz * nq, nq), target.reshape(-1), reduction="none").reshape(bsz, nq)
    ce = 0.5 * (ce_rows + ce_cols) * q_mask.to(logits.dtype)
    has = (q_mask.any(dim=1) & kv_mask.any(dim=1)).to(ce.dtype)
    per_sample = (weights * ce).sum(dim=1) * has
    loss = per_sample.sum() / has.sum().clamp_min(1.0)
    mean_kappa = (kappa * pair).sum() / pair.sum().clamp_min(1)
    return loss, mean_kappa.detach()


def css_loss(
    patches: torch.Tensor,
    words: torch.Tensor,
    word_mask: torch.Tensor,
    gaussian_image: GaussianFn,
    gaussian_text: GaussianFn,
    tau: torch.Tensor | float,
    patch_attention: torch.Tensor | None = None,
    word_attention: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """AMVLM cross-modal similarity supervision (METHOD.md §3.5 item 2), with bugs A2/A4/A6/A13 fixed.

    Word side: A = softmax(W P^T/tau); c_w = normalize(A P); s[b,i,j] = <w_bi, c_bj>. Gaussians
    (mu, log sigma) of the words from the text PDT and of the contexts c_w (image-made) from the image PDT,
    with boolean key masks (A13). W2 per token pair (A2: a true pairwise W2 with sigma = exp(log sigma));
    kappa = sigmoid(W2 / ||dmu||^2); s^ = 1 - (1 - s)·kappa, divided by tau afterwards (A6). Loss: the
    attention-weighted CE of s^ rows and columns with targets i. Patch side: the same with the roles swapped.
    Returns (1/2 (L_patch + L_word), logs).
    """
    wm = word_mask.bool()
    pm = torch.ones(patches.shape[:2], dtype=torch.bool, device=patches.device)
    has_words = wm.any(dim=1)
    pm = pm & has_words[:, None]  # a sample without words has no patch-side target either
    w_words = token_weights(word_attention, wm, tuple(wm.shape), words.device)
    w_patch = token_weights(patch_attention, pm, tuple(pm.shape), patches.device)
    loss_word, kappa_w = _css_side(words, wm, patches, pm, gaussian_text, gaussian_image, w_words, tau, eps)
    loss_patch, kappa_p = _css_side(patches, pm, words, wm, gaussian_image, gaussian_text, w_patch, tau, eps)
    loss = 0.5 * (loss_patch + loss_word)
    return loss, {"css_word": loss_word.detach(), "css_patch": loss_patch.detach(),
                  "css_kappa": 0.5 * (kappa_w + kappa_p)}


def _inverse_variance_weights(sim: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """AMVLM local-loss token weights: minmax over tokens of 1/Var_{negatives}(sim) (A10: positive excluded)."""
    bsz, _, m = sim.shape
    neg = torch.ones(bsz, m, dtype=torch.bool, device=sim.device)
    neg[torch.arange(bsz), labels] = False
    n_neg = neg.sum(1).clamp_min(1)[:, None].to(sim.dtype)
    s = sim.detach()
    mean = (s * neg[:, None, :]).sum(-1) / n_neg
    var = (((s - mean[..., None]) ** 2) * neg[:, None, :]).sum(-1) / n_neg
    inv = 1.0 / (var + 1e-6)
    inv_min = inv.masked_fill(~valid, float("inf")).min(dim=1, keepdim=True).values
    inv_max = inv.masked_fill(~valid, float("-inf")).max(dim=1, keepdim=True).values
    w = (inv - inv_min) / (inv_max - inv_min).clamp_min(1e-12)
    w = w.masked_fill(~valid, 0.0)
    return torch.where(w.sum(1, keepdim=True) > 0, w, valid.to(w.dtype))


def _token_to_global_ce(tokens: torch.Tensor, valid: torch.Tensor, globals_all: torch.Tensor,
                        labels: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    bsz, n, _ = tokens.shape
    sim = tokens @ globals_all.t()  # [B,N,M]
    ce = F.cross_entropy((sim / tau).reshape(bsz * n, -1), labels.repeat_interleave(n), reduction="none")
    w = _inverse_variance_weights(sim, labels, valid).reshape(-1)
    return (w * ce).sum() / w.sum().clamp_min(1e-12)


def local_alignment_loss(
    patches: torch.Tensor,
    words: torch.Tensor,
    word_mask: torch.Tensor,
    image_global: torch.Tensor,
    text_global: torch.Tensor,
    tau: torch.Tensor | float,
    gather: GatherFn | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """AMVLM "loss_local" (METHOD.md §3.5 item 3), vectorised (A9) with the positive excluded from the
    variance (A10): every patch vs all text globals and every word vs all image globals, InfoNCE over the
    batch with target = own sample, weighted by minmax(1/Var over negatives). Sum of the two terms."""
    gather = gather or (lambda t: t)
    labels = _labels(patches.shape[0], patches.device, offset)
    pvalid = torch.ones(patches.shape[:2], dtype=torch.bool, device=patches.device)
    l_img = _token_to_global_ce(patches, pvalid, gather(text_global), labels, tau)
    l_txt = _token_to_global_ce(words, word_mask.bool(), gather(image_global), labels, tau)
    return l_img + l_txt


def icl_loss(
    mu_img: torch.Tensor,
    logsigma_img: torch.Tensor,
    mu_txt: torch.Tensor,
    logsigma_txt: torch.Tensor,
    txt_mask: torch.Tensor,
    tau: torch.Tensor | float,
    a: float = 1.0 / 200.0,
    b: float = 4.0,
    gather: GatherFn | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """AMVLM ICL (METHOD.md §3.5 item 4), fixed: inputs are the PDT Gaussians of the augmented sequences
    [CLS; tokens] ([B,1+N,D] image, [B,1+L,D] text with `txt_mask` [B,L] over the tokens).

    Global: W2-InfoNCE between the image and text [CLS] Gaussians, logits (-a W2 + b)/tau, sigma =
    exp(log sigma) (A2), over the global batch (`gather` = gather_with_grad under DDP). Local: z = mu + eps ⊙ sigma with eps ~ N(0, I) per element (A4), L2-normalised,
    then the CLS-vs-own-tokens g2l InfoNCE per modality. L = 1/2 (L_W2 + 1/2 (L_g2l,img + L_g2l,txt)).
    """
    gather = gather or (lambda t: t)
    s_img, s_txt = sigma_from_logsigma(logsigma_img), sigma_from_logsigma(logsigma_txt)
    mi, si, mt, st = (gather(t[:, 0]) for t in (mu_img, s_img, mu_txt, s_txt))
    l_w2 = infonce(w2_logits(mi, si, mt, st, tau, a, b))

    def sample(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return F.normalize(mu + noise * sigma, dim=-1)

    zi, zt = sample(mu_img, s_img), sample(mu_txt, s_txt)
    l_gi = g2l_infonce(zi[:, 1:], zi[:, 0], tau)
    l_gt = g2l_infonce(zt[:, 1:], zt[:, 0], tau, txt_mask)
    loss = 0.5 * (l_w2 + 0.5 * (l_gi + l_gt))
    return loss, {"icl_w2": l_w2.detach(), "icl_g2l_img": l_gi.detach(), "icl_g2l_txt": l_gt.detach()}


def extended_infonce(pooled: torch.Tensor, text: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Eq 12, L_tg (TCL's ExtendedInfoNCE): pooled [B,N,d] = image b pooled with the mask of text n, text [N,d]
    (B = N; image b's own text is n = b). S[b,n] = cos(v_bn, t_n)·scale;
    L = 1/2 [CE(S, arange) + CE(S^T, arange)]."""
    if pooled.shape[0] != pooled.shape[1] or pooled.shape[1] != text.shape[0]:
        raise ValueError(f"extended_infonce: pooled {tuple(pooled.shape)} must be [B,B,d] with text [B,d]")
    s = torch.einsum("bnd,nd->bn", F.normalize(pooled, dim=-1), F.normalize(text, dim=-1)) * scale
    return infonce(s)


__all__ = [
    "clip_loss",
    "css_loss",
    "extended_infonce",
    "g2l_infonce",
    "gaussian_kl_standard",
    "icl_loss",
    "infonce",
    "local_alignment_loss",
    "sss_infonce",
    "sss_logits",
    "token_weights",
    "w2_logits",
]
