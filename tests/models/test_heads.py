"""Projection heads and the PDT (METHOD.md §2.3)."""

from __future__ import annotations

import torch

from dusss.models.heads import PDT, GlobalHead, LocalHead


def test_global_head_shapes_and_affine_free_output_bn() -> None:
    head = GlobalHead(12, 8, hidden_dim=16)
    out = head(torch.randn(5, 12))
    assert out.shape == (5, 8)
    assert head.bn2.weight is None  # BN(affine=False)
    # Batch statistics: each output channel has ~zero mean over the batch in training mode.
    assert torch.allclose(out.mean(0), torch.zeros(8), atol=1e-5)
    head.train()
    assert head(torch.randn(1, 12)).shape == (1, 8)  # a single row falls back to running statistics


def test_local_head_masks_padding_out_of_batch_statistics() -> None:
    torch.manual_seed(0)
    head = LocalHead(6, 4, hidden_dim=8).train()
    x = torch.randn(2, 3, 6)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = head(x, mask)
    assert out.shape == (2, 3, 4)
    assert torch.equal(out[0, 2], torch.zeros(4)) and torch.equal(out[1, 1:], torch.zeros(2, 4))
    # Changing padded tokens changes nothing, in training mode too (BN sees only valid tokens).
    x2 = x.clone()
    x2[0, 2] = 100.0
    x2[1, 1:] = -50.0
    assert torch.allclose(head(x2, mask), out, atol=1e-6)
    # Equivalent to the plain head applied to the valid tokens only.
    flat = x[mask.bool()]
    ref = GlobalHead.forward(head, flat)
    assert torch.allclose(out[mask.bool()], ref, atol=1e-6)


def test_pdt_shapes_init_and_mean_residual() -> None:
    torch.manual_seed(0)
    pdt = PDT(16, num_heads=4).eval()
    assert abs(float(pdt.qkv.weight.detach().std()) - 0.02) < 0.005
    assert pdt.qkv.bias is None
    assert float(pdt.mu_proj.bias.detach().abs().sum()) == 0.0
    x = torch.randn(2, 5, 16)
    mu, ls = pdt(x)
    assert mu.shape == ls.shape == (2, 5, 16)
    # With the mean branch's projections zeroed, mu = x exactly (residual on mu only) ...
    with torch.no_grad():
        pdt.mu_proj.weight.zero_()
        pdt.mlp_mu[3].weight.zero_()
    mu0, _ = pdt(x)
    assert torch.equal(mu0, x)
    # ... and log sigma has no residual from x.
    with torch.no_grad():
        pdt.logsig_proj.weight.zero_()
        pdt.mlp_sig[3].weight.zero_()
    _, ls1 = pdt(x)
    assert torch.equal(ls1, torch.zeros_like(ls1))


def test_pdt_channel_split_between_mean_and_log_sigma() -> None:
    torch.manual_seed(1)
    pdt = PDT(16, num_heads=4).eval()
    with torch.no_grad():
        for lin in (pdt.mu_proj, pdt.logsig_proj):
            torch.nn.init.normal_(lin.weight)  # make both branches clearly sensitive to their inputs
    x = torch.randn(2, 5, 16)
    mu, ls = pdt(x)
    # Perturb the value weights of the last two heads (channels 8..15): only log sigma may change.
    with torch.no_grad():
        pdt.qkv.weight[2 * 16 + 8: 3 * 16] += 0.5 * torch.randn(8, 16)  # (LN output sums to 0: use random)
    mu2, ls2 = pdt(x)
    assert torch.allclose(mu2, mu, atol=1e-6)
    assert float((ls2 - ls).detach().abs().max()) > 1e-2
    # and the first two heads (channels 0..7) feed only the mean
    with torch.no_grad():
        pdt.qkv.weight[2 * 16: 2 * 16 + 8] += 0.5 * torch.randn(8, 16)
    mu3, ls3 = pdt(x)
    assert torch.allclose(ls3, ls2, atol=1e-6)
    assert float((mu3 - mu2).detach().abs().max()) > 1e-2


def test_pdt_key_mask() -> None:
    torch.manual_seed(2)
    pdt = PDT(8, num_heads=2).eval()
    x = torch.randn(1, 4, 8)
    mask = torch.tensor([[1, 1, 1, 0]])
    mu, ls = pdt(x, mask)
    x2 = x.clone()
    x2[0, 3] = 42.0
    mu2, ls2 = pdt(x2, mask)
    assert torch.allclose(mu[:, :3], mu2[:, :3], atol=1e-6) and torch.allclose(ls[:, :3], ls2[:, :3], atol=1e-6)


def test_layer_norm_option_has_no_running_statistics() -> None:
    torch.manual_seed(3)
    head = LocalHead(6, 4, hidden_dim=8, norm="layer")
    x, mask = torch.randn(2, 3, 6), torch.tensor([[1, 1, 0], [1, 0, 0]])
    train_out = head.train()(x, mask)
    assert torch.allclose(head.eval()(x, mask), train_out)
    assert not list(head.buffers())
    assert torch.equal(train_out[0, 2], torch.zeros(4))
