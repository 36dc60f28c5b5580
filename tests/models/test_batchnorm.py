"""frozen_running_stats: batch statistics in the forward, running buffers untouched."""

from __future__ import annotations

import torch
from torch import nn

from dusss.models.batchnorm import frozen_running_stats


def test_frozen_running_stats_normalises_with_the_batch_and_keeps_the_buffers() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)).train()
    x = torch.randn(4, 2, 5, 5) * 3 + 2
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with frozen_running_stats(net):
        y = net(x)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k])  # running mean / var and num_batches_tracked unchanged
    h = net[0](x)
    ref = (h - h.mean((0, 2, 3), keepdim=True)) / torch.sqrt(h.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    assert net[1].track_running_stats  # restored after the block
    net(x)  # outside the block the buffers move again
    assert not torch.equal(net[1].running_mean, before["1.running_mean"])
    assert int(net[1].num_batches_tracked) == 1


def test_frozen_running_stats_disabled_is_a_no_op() -> None:
    bn = nn.BatchNorm2d(2).train()
    with frozen_running_stats(bn, enabled=False):
        bn(torch.randn(3, 2, 4, 4) + 5)
    assert float(bn.running_mean.mean()) > 0.4  # 0.1 momentum towards 5


def test_batch_statistics_uses_the_batch_in_eval_mode_and_restores_modes() -> None:
    from dusss.models.batchnorm import batch_statistics

    net = torch.nn.Sequential(torch.nn.BatchNorm1d(2), torch.nn.Dropout(0.5))
    net.eval()
    x = torch.tensor([[0.0, 1.0], [2.0, 5.0]])
    with batch_statistics(net):
        assert net[0].training and not net[1].training  # dropout keeps its mode
        out = net(x)
    torch.testing.assert_close(out, (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5))
    assert not net[0].training
    assert torch.equal(net[0].running_mean, torch.zeros(2)) and int(net[0].num_batches_tracked) == 0
