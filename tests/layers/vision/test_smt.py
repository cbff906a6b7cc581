"""ScaleAwareModulation: multi-head mixed convolution, head-interleaved grouped aggregation,
modulation of the value projection — against an explicit loop over heads and groups."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from headwise.layers.vision import ScaleAwareModulation


def test_equals_explicit_heads_and_groups():
    torch.manual_seed(0)
    c, hc = 8, 4
    m = ScaleAwareModulation(c, hc).double().eval()
    with torch.no_grad():
        m.bn.running_mean.normal_()
        m.bn.weight.normal_()
    x = torch.randn(2, 5, 7, c, dtype=torch.float64)
    s = m.s(x).permute(0, 3, 1, 2)
    split = c // hc
    heads = []
    for i in range(hc):
        conv = m.local_conv[i]
        assert conv.kernel_size == (3 + 2 * i, 3 + 2 * i)
        heads.append(conv(s[:, i * split : (i + 1) * split]))
    groups = []
    per_group = m.proj0.out_channels // split
    for j in range(split):
        inputs = torch.stack([heads[i][:, j] for i in range(hc)], 1)  # channel j of every head
        weight = m.proj0.weight[j * per_group : (j + 1) * per_group]
        groups.append(F.conv2d(inputs, weight, m.proj0.bias[j * per_group : (j + 1) * per_group]))
    modulator = m.proj1(F.gelu(m.bn(torch.cat(groups, 1)))).permute(0, 2, 3, 1)
    torch.testing.assert_close(m(x), m.proj(modulator * m.v(x)))


def test_odd_grid_forward_backward_and_tokens():
    torch.manual_seed(1)
    m = ScaleAwareModulation(16)
    x = torch.randn(2, 5, 3, 16, requires_grad=True)
    y = m(x)
    y.square().sum().backward()
    assert y.shape == x.shape and torch.isfinite(x.grad).all()
    torch.testing.assert_close(m(x.reshape(2, 15, 16), size=(5, 3)), y.reshape(2, 15, 16))
