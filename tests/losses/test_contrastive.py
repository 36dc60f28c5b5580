"""Contrastive losses: hand-derived InfoNCE values, lambda=0 => CLIP, SSS logits, L_tg diagonal pairing, and
loop-based reference implementations of the AMVLM terms."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dusss.losses.contrastive import (
    clip_loss,
    css_loss,
    extended_infonce,
    g2l_infonce,
    gaussian_kl_standard,
    icl_loss,
    infonce,
    local_alignment_loss,
    sss_infonce,
    sss_logits,
    token_weights,
    w2_logits,
)


def softplus_neg(z: float) -> float:
    """-log(e^a / (e^a + e^b)) with z = a - b, i.e. log(1 + e^-z)."""
    return math.log1p(math.exp(-z))


X = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
Y = torch.tensor([[1.0, 0.0], [0.6, 0.8]])  # cos = [[1, 0.6], [0, 0.8]]
MU1 = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
SIG1 = torch.tensor([[1.0, 1.0], [2.0, 1.0]])
MU2 = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
SIG2 = torch.tensor([[1.0, 2.0], [1.0, 1.0]])  # W2 = [[2, 2], [4, 2]] (see test_uncertainty)


def test_infonce_hand_values() -> None:
    # Symmetric logits [[2,0],[0,2]]: every row and column gives log(1 + e^-2) = 0.126928.
    assert abs(float(infonce(torch.tensor([[2.0, 0.0], [0.0, 2.0]]))) - 0.126928) < 1e-6
    # [[1,0],[1,2]]: rows log(1+e^-1) = 0.313262 twice; columns [[1,1],[0,2]]: log 2 = 0.693147 and 0.126928.
    # 1/2 (0.313262 + (0.693147 + 0.126928)/2) = 0.361650
    assert abs(float(infonce(torch.tensor([[1.0, 0.0], [1.0, 2.0]]))) - 0.361650) < 1e-6


def test_lambda_zero_is_exactly_clip_and_hand_value() -> None:
    tau = 0.5
    # logits cos/tau = [[2, 1.2], [0, 1.6]]; rows: log(1+e^-0.8) = 0.371101, log(1+e^-1.6) = 0.183923;
    # columns [[2,0],[1.2,1.6]]: log(1+e^-2) = 0.126928, log(1+e^-0.4) = 0.513015
    hand = 0.5 * ((softplus_neg(0.8) + softplus_neg(1.6)) / 2 + (softplus_neg(2.0) + softplus_neg(0.4)) / 2)
    assert abs(hand - 0.298736) < 1e-6
    clip = clip_loss(X, Y, tau)
    assert abs(float(clip) - 0.298736) < 1e-6
    loss0, d0 = sss_infonce(X, Y, MU1, SIG1, MU2, SIG2, tau, lam=0.0)
    assert torch.equal(loss0, clip)
    assert torch.equal(d0, torch.ones(2, 2))
    loss_none, _ = sss_infonce(X, Y, None, None, None, None, tau, lam=0.2)  # no Gaussians: CLIP as well
    assert torch.equal(loss_none, clip)


def test_sss_logits_hand_values_and_at_least_cos() -> None:
    tau = 0.5
    logits, _, w2 = sss_logits(X, Y, MU1, SIG1, MU2, SIG2, tau, lam=0.2, a=1 / 200, b=4.0, eps=1e-6)
    # sim^ from test_uncertainty: [[1, 0.836828], [0.433633, 0.943725]], divided by tau = 0.5
    assert torch.allclose(logits, torch.tensor([[1.0, 0.836828], [0.433633, 0.943725]]) / tau, atol=1e-5)
    assert w2 is not None and torch.allclose(w2, torch.tensor([[2.0, 2.0], [4.0, 2.0]]))
    assert bool((logits >= (X @ Y.t()) / tau - 1e-6).all())
    loss, _ = sss_infonce(X, Y, MU1, SIG1, MU2, SIG2, tau, lam=0.2)
    assert torch.allclose(loss, infonce(logits))


def test_sss_gradient_reaches_gaussians_unless_detached() -> None:
    mu1 = MU1.clone().requires_grad_(True)
    sig1 = SIG1.clone().requires_grad_(True)
    loss, _ = sss_infonce(X, Y, mu1, sig1, MU2, SIG2, 0.5, lam=0.2)
    loss.backward()
    assert mu1.grad is not None and float(mu1.grad.abs().sum()) > 0
    assert sig1.grad is not None and float(sig1.grad.abs().sum()) > 0
    mu1.grad = None
    x = X.clone().requires_grad_(True)
    loss, _ = sss_infonce(x, Y, mu1, sig1, MU2, SIG2, 0.5, lam=0.2, detach_sss=True)
    loss.backward()
    assert mu1.grad is None and x.grad is not None


def test_extended_infonce_diagonal_pairing() -> None:
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pooled = torch.zeros(2, 2, 2)
    pooled[0, 0] = torch.tensor([1.0, 0.0])  # cos with t0 = 1
    pooled[0, 1] = torch.tensor([1.0, 1.0])  # image 0 pooled with text 1's mask: cos with t1 = 0.707107
    pooled[1, 0] = torch.tensor([0.0, 1.0])  # cos with t0 = 0
    pooled[1, 1] = torch.tensor([0.0, 3.0])  # cos with t1 = 1 (norm does not matter)
    # S = 2 * [[1, 0.707107], [0, 1]]; rows: log(1+e^-(2-1.414214)) = 0.444181, log(1+e^-2) = 0.126928;
    # columns: S^T = [[2, 0], [1.414214, 2]] -> 0.126928 and 0.444181. L = 0.285555 (same both ways here).
    hand = 0.5 * ((softplus_neg(2 - 2 * math.sqrt(0.5)) + softplus_neg(2.0)) / 2
                  + (softplus_neg(2.0) + softplus_neg(2 - 2 * math.sqrt(0.5))) / 2)
    assert abs(float(extended_infonce(pooled, t, 2.0)) - hand) < 1e-6
    # The transposed reading S'[b,n] = cos(v_nb, t_n) gives a different value, so the pairing is pinned down.
    assert abs(float(extended_infonce(pooled.transpose(0, 1), t, 2.0)) - hand) > 1e-3
    with pytest.raises(ValueError):
        extended_infonce(torch.zeros(2, 3, 2), torch.zeros(3, 2), 1.0)


def test_g2l_hand_value_with_mask() -> None:
    local = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [5.0, 5.0]]])  # sample 1 token 1 is padding
    mask = torch.tensor([[1, 1], [1, 0]])
    glob = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # (i=0,k=0): pos 1, negatives {<(0,1),(1,0)>=0}: log(1+e^-1) = 0.313262
    # (i=0,k=1): pos 0, negatives {0}: log 2
    # (i=1,k=0): pos 1, negatives {<(1,0),(0,1)>=0, <(0,1),(0,1)>=1}: -1 + log(e + 1 + e) = 0.862157
    hand = (softplus_neg(1.0) + math.log(2) + (math.log(2 * math.e + 1) - 1)) / 3
    assert abs(float(g2l_infonce(local, glob, 1.0, mask)) - hand) < 1e-6
    assert abs(hand - 0.622801) < 1e-6


def test_token_weights_quantile_clip_hand_values() -> None:
    attn = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5]])
    # 10th/90th percentiles (linear interpolation): 0.14 and 0.46 -> [0.14, 0.2, 0.3, 0.4, 0.46] / 1.5
    w = token_weights(attn, None, (1, 5), attn.device)
    assert torch.allclose(w, torch.tensor([[0.14, 0.2, 0.3, 0.4, 0.46]]) / 1.5, atol=1e-6)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    # valid [0.1..0.4]: percentiles 0.13 and 0.37 -> [0.13, 0.2, 0.3, 0.37, 0] / 1.0
    w = token_weights(attn, mask, (1, 5), attn.device)
    assert torch.allclose(w, torch.tensor([[0.13, 0.2, 0.3, 0.37, 0.0]]), atol=1e-6)
    assert torch.allclose(token_weights(None, mask, (1, 5), attn.device), torch.tensor([[0.25] * 4 + [0.0]]))


def _gauss_img(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return 2.0 * x, 0.5 * x[..., :1].expand_as(x)


def _gauss_txt(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return x + 0.1, -0.3 * x[..., 1:2].expand_as(x)


def _css_reference(patches: torch.Tensor, words: torch.Tensor, mask: torch.Tensor, tau: float) -> float:
    """Loop implementation of fixed CSS with uniform token weights."""

    def side(q: torch.Tensor, kv: torch.Tensor, gq, gc) -> float:
        n = q.shape[0]
        ctx = []
        for i in range(n):
            att = torch.softmax(kv @ q[i] / tau, dim=0)
            ctx.append(F.normalize((att[:, None] * kv).sum(0), dim=0))
        c = torch.stack(ctx)
        mq, lq = gq(q, None)
        mc, lc = gc(c, None)
        sq, sc = lq.exp(), lc.exp()
        s = torch.zeros(n, n)
        for i in range(n):
            for j in range(n):
                w2 = ((mq[i] - mc[j]) ** 2).sum() + ((sq[i] - sc[j]) ** 2).sum()
                kappa = torch.sigmoid(w2 / (((mq[i] - mc[j]) ** 2).sum() + 1e-6))
                s[i, j] = (1 - (1 - q[i] @ c[j]) * kappa) / tau
        total = 0.0
        for i in range(n):
            row = -s[i, i] + torch.logsumexp(s[i], 0)
            col = -s[i, i] + torch.logsumexp(s[:, i], 0)
            total += float(0.5 * (row + col)) / n
        return total

    word_losses, patch_losses = [], []
    for b in range(patches.shape[0]):
        w = words[b][mask[b].bool()]
        word_losses.append(side(w, patches[b], _gauss_txt, _gauss_img))
        patch_losses.append(side(patches[b], w, _gauss_img, _gauss_txt))
    return 0.5 * (sum(patch_losses) / len(patch_losses) + sum(word_losses) / len(word_losses))


def test_css_matches_loop_reference_and_ignores_padding() -> None:
    g = torch.Generator().manual_seed(0)
    patches = F.normalize(torch.randn(2, 4, 6, generator=g), dim=-1)
    words = F.normalize(torch.randn(2, 3, 6, generator=g), dim=-1)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    words = words * mask[..., None]
    loss, logs = css_loss(patches, words, mask, _gauss_img, _gauss_txt, 0.5)
    ref = _css_reference(patches, words, mask, 0.5)
    assert abs(float(loss) - ref) < 1e-5
    assert 0.5 < float(logs["css_kappa"]) <= 1.0
    # Extra padding positions change nothing.
    words_pad = torch.cat([words, torch.zeros(2, 2, 6)], dim=1)
    mask_pad = torch.cat([mask, torch.zeros(2, 2, dtype=mask.dtype)], dim=1)
    loss_pad, _ = css_loss(patches, words_pad, mask_pad, _gauss_img, _gauss_txt, 0.5)
    assert abs(float(loss_pad) - float(loss)) < 1e-5


def test_css_gradients_reach_gaussian_heads() -> None:
    lin_i, lin_t = torch.nn.Linear(6, 12), torch.nn.Linear(6, 12)

    def gi(x: torch.Tensor, m: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        out = lin_i(x)
        return x + out[..., :6], out[..., 6:]

    def gt(x: torch.Tensor, m: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        out = lin_t(x)
        return x + out[..., :6], out[..., 6:]

    g = torch.Generator().manual_seed(1)
    patches = F.normalize(torch.randn(2, 4, 6, generator=g), dim=-1).requires_grad_(True)
    words = F.normalize(torch.randn(2, 3, 6, generator=g), dim=-1).requires_grad_(True)
    loss, _ = css_loss(patches, words, torch.ones(2, 3), gi, gt, 0.1)
    loss.backward()
    for p in [*lin_i.parameters(), *lin_t.parameters(), patches, words]:
        assert p.grad is not None and float(p.grad.abs().sum()) > 0


def test_local_alignment_matches_loop_reference() -> None:
    g = torch.Generator().manual_seed(2)
    bsz, n, l_words, d, tau = 3, 4, 3, 5, 0.2
    patches = F.normalize(torch.randn(bsz, n, d, generator=g), dim=-1)
    words = F.normalize(torch.randn(bsz, l_words, d, generator=g), dim=-1)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]])
    gi = F.normalize(torch.randn(bsz, d, generator=g), dim=-1)
    gt = F.normalize(torch.randn(bsz, d, generator=g), dim=-1)

    def ref_side(tokens: torch.Tensor, valid: torch.Tensor, globs: torch.Tensor) -> float:
        num, den = 0.0, 0.0
        for b in range(bsz):
            ks = [k for k in range(tokens.shape[1]) if valid[b, k]]
            inv = {}
            for k in ks:
                sims = globs @ tokens[b, k]
                negs = torch.cat([sims[:b], sims[b + 1:]])  # the positive is excluded (A10)
                inv[k] = 1.0 / (float(negs.var(unbiased=False)) + 1e-6)
            lo, hi = min(inv.values()), max(inv.values())
            for k in ks:
                # min-max over the sample's tokens; a sample whose weights are all 0 (one token) gets 1s
                w = (inv[k] - lo) / max(hi - lo, 1e-12) if hi > lo else 1.0
                ce = float(-(globs @ tokens[b, k])[b] / tau + torch.logsumexp(globs @ tokens[b, k] / tau, 0))
                num += w * ce
                den += w
        return num / den

    ref = ref_side(patches, torch.ones(bsz, n), gt) + ref_side(words, mask, gi)
    got = local_alignment_loss(patches, words, mask, gi, gt, tau)
    assert abs(float(got) - ref) < 1e-4


def test_icl_with_tiny_sigma_matches_building_blocks_and_noise_is_per_element() -> None:
    g = torch.Generator().manual_seed(3)
    mu_i, mu_t = torch.randn(3, 5, 4, generator=g), torch.randn(3, 4, 4, generator=g)
    tmask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]])
    tiny = torch.full_like(mu_i, -30.0), torch.full_like(mu_t, -30.0)  # sigma clamps to 1e-4
    loss, logs = icl_loss(mu_i, tiny[0], mu_t, tiny[1], tmask, 0.1, generator=torch.Generator().manual_seed(0))
    s = torch.full((3, 4), 1e-4)
    l_w2 = infonce(w2_logits(mu_i[:, 0], s, mu_t[:, 0], s, 0.1))
    zi, zt = F.normalize(mu_i, dim=-1), F.normalize(mu_t, dim=-1)
    l_g = 0.5 * (g2l_infonce(zi[:, 1:], zi[:, 0], 0.1) + g2l_infonce(zt[:, 1:], zt[:, 0], 0.1, tmask))
    assert abs(float(logs["icl_w2"]) - float(l_w2)) < 1e-5
    assert abs(float(loss) - float(0.5 * (l_w2 + l_g))) < 1e-3
    # sigma = 1: z = normalize(mu + eps * sigma) with eps drawn per element (A4), not one scalar per batch.
    zeros_i, zeros_t = torch.zeros_like(mu_i), torch.zeros_like(mu_t)
    gen = torch.Generator().manual_seed(7)
    _, logs1 = icl_loss(mu_i, zeros_i, mu_t, zeros_t, tmask, 0.1, generator=gen)
    gen = torch.Generator().manual_seed(7)
    eps_i = torch.randn(mu_i.shape, generator=gen)
    eps_t = torch.randn(mu_t.shape, generator=gen)
    assert float(eps_i.std()) > 0.5  # genuinely different noise per element
    zi = F.normalize(mu_i + eps_i, dim=-1)
    zt = F.normalize(mu_t + eps_t, dim=-1)
    assert abs(float(logs1["icl_g2l_img"]) - float(g2l_infonce(zi[:, 1:], zi[:, 0], 0.1))) < 1e-5
    assert abs(float(logs1["icl_g2l_txt"]) - float(g2l_infonce(zt[:, 1:], zt[:, 0], 0.1, tmask))) < 1e-5


def test_w2_logits_and_gaussian_kl_hand_values() -> None:
    """(−a·W2 + b)/τ with W2 = ||Δμ||² + ||Δσ||² written out by hand; KL(N(μ, σ²) || N(0, 1)) per row, averaged."""
    from dusss.losses.contrastive import gaussian_kl_standard, w2_logits

    mu_x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    sg_x = torch.tensor([[1.0, 1.0], [0.5, 1.0]])
    mu_y = torch.tensor([[1.0, 1.0]])
    sg_y = torch.tensor([[2.0, 1.0]])
    # W2(x0, y0) = (0² + 1²) + (1² + 0²) = 2; W2(x1, y0) = (1² + 1²) + (1.5² + 0²) = 4.25
    got = w2_logits(mu_x, sg_x, mu_y, sg_y, tau=0.5, a=0.1, b=4.0)
    torch.testing.assert_close(got, torch.tensor([[(-0.2 + 4.0) / 0.5], [(-0.425 + 4.0) / 0.5]]))
    # a nearer Gaussian gets the larger logit (the sign that makes W2 a distance)
    assert got[0, 0] > got[1, 0]
    # KL row 0: μ = (1, 0), σ = (1, 1) -> ½(1 + 1 − 1 − 0) + ½(1 + 0 − 1 − 0) = 0.5
    # KL row 1: μ = (0, 2), σ = (0.5, 1) -> ½(0.25 − 1 − ln 0.25) + ½(1 + 4 − 1) = ½(−0.75 + 1.386294) + 2
    kl1 = 0.5 * (0.25 - 1 - math.log(0.25)) + 2.0
    assert gaussian_kl_standard(mu_x, sg_x).item() == pytest.approx((0.5 + kl1) / 2, rel=1e-6)
    assert gaussian_kl_standard(torch.zeros(3, 4), torch.ones(3, 4)).item() == 0.0


# -- killing the surviving mutants of tools/mutation.py (docs/mutation.md) -------------------------------------
_X, _Y = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])  # cos = 0, D_s = √2
_MUX, _MUY, _SIG = torch.tensor([[2.0]]), torch.tensor([[0.0]]), torch.tensor([[1.0]])  # W2 = 4


def test_sss_logits_defaults_and_forwarded_hyperparameters() -> None:
    mu_x = _MUX.clone().requires_grad_(True)
    logits, d, w2 = sss_logits(_X, _Y, mu_x, _SIG, _MUY, _SIG, tau=0.5)  # lam 0.2, a 1/200, b 4, eps 1e-6
    d_hand = math.exp(-0.2 * (4 / 200 + 4) / (math.sqrt(2) + 1e-6))
    assert d.item() == pytest.approx(d_hand) and w2.item() == pytest.approx(4.0)
    assert logits.item() == pytest.approx((1 - d_hand) / 0.5)  # sim^ = 1 − (1 − 0)·D_SSS
    logits.sum().backward()
    assert mu_x.grad is not None and mu_x.grad.abs().item() > 0  # D_SSS is not detached by default
    logits, d, _ = sss_logits(_X, _Y, _MUX, _SIG, _MUY, _SIG, tau=0.5, lam=1.0, a=0.25, b=1.0, eps=0.5)
    d_hand = math.exp(-1.0 * (0.25 * 4 + 1) / (math.sqrt(2) + 0.5))  # lam = 1 is not the "off" switch
    assert d.item() == pytest.approx(d_hand) and logits.item() == pytest.approx((1 - d_hand) / 0.5)
    _, d = sss_infonce(_X, _Y, _MUX, _SIG, _MUY, _SIG, tau=0.5)
    assert d.item() == pytest.approx(math.exp(-0.2 * 4.02 / (math.sqrt(2) + 1e-6)))


@pytest.mark.parametrize("missing", range(4))
def test_sss_logits_any_missing_gaussian_gives_plain_cosine(missing: int) -> None:
    args = [_MUX, _SIG, _MUY, _SIG]  # order of sss_logits: mu_x, sigma_x, mu_y, sigma_y
    args[missing] = None
    x, y = torch.tensor([[0.6, 0.8]]), torch.tensor([[1.0, 0.0]])  # cos = 0.6
    logits, d, w2 = sss_logits(x, y, *args, tau=0.5)
    assert logits.item() == pytest.approx(1.2) and d.item() == 1.0 and w2 is None


def test_w2_logits_default_shift_and_kl_sums_over_dims() -> None:
    # (−a·W2 + b)/tau = (−4/200 + 4)/0.5 with the defaults a = 1/200, b = 4
    assert w2_logits(_MUX, _SIG, _MUY, _SIG, 0.5).item() == pytest.approx((4 - 4 / 200) / 0.5)
    # KL(N((1, 0), I) || N(0, I)) = ½·|mu|² = 0.5 for the one row (summed over the 2 dims, mean over rows)
    assert gaussian_kl_standard(torch.tensor([[1.0, 0.0]]), torch.ones(1, 2)).item() == pytest.approx(0.5)
